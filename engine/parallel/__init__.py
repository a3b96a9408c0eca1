"""Parallelism: the only package that knows about ranks (the model never does).

    SequenceShard   one packed batch spread over a sequence-parallel group in the zigzag layout
                    (kernels.ring_attention's): padding, this rank's tokens and positions, and
                    the inverse
    make_mesh       the ("dp", "sp") DeviceMesh over the world
    parallelize     FSDP2 per decoder layer and at the root, gradients summed over the mesh
"""
from .fsdp import make_mesh, parallelize, shard_mesh
from .sequence import SequenceShard

__all__ = ["SequenceShard", "make_mesh", "parallelize", "shard_mesh"]
