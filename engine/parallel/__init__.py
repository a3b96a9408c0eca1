"""Parallelism: the only package that knows about ranks (the model never does).

    SequenceShard   one packed batch spread over a sequence-parallel group in the zigzag layout
                    (kernels.ring_attention's): padding, this rank's tokens and positions, and
                    the inverse
"""
from .sequence import SequenceShard

__all__ = ["SequenceShard"]
