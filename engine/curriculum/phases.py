"""Length phases: phase k trains on examples with L(k−1) < length ≤ L(k)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..data.lengths import length_buckets


@dataclass
class Phase:
    name: str
    max_input_tokens: int
    steps: int  # RL steps (rollout batches) in this phase

    def __post_init__(self):
        if self.max_input_tokens <= 0 or self.steps <= 0:
            raise ValueError(f"phase {self.name!r}: max_input_tokens and steps must be > 0")


def phase_members(lengths: Sequence[int], phases: Sequence[Phase]) -> list[list[int]]:
    """Indices of the examples of each phase: L(k−1) < length ≤ L(k)."""
    bounds = [p.max_input_tokens for p in phases]
    if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
        raise ValueError(f"phase lengths must increase, got {bounds}")
    return length_buckets(lengths, bounds)
