"""DAPO's batch shaping (Yu et al., arXiv 2503.14476) and AEPO (QwenLong-L1.5).

- Dynamic sampling: a group whose rewards (or another metric) are all equal has zero
  advantage everywhere and teaches nothing; drop it and generate more groups until the
  batch is full or a cap of generation rounds is reached.
- Soft overlong punishment: a length-dependent penalty in the last `buffer` tokens before
  the response limit.
- Overlong filtering: truncated samples leave the loss.
- AEPO: while the batch entropy is above a high mark, negative-advantage samples leave the
  loss; below a low mark they come back (hysteresis).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

import torch

log = logging.getLogger(__name__)
G = TypeVar("G")


class ShortBatchError(RuntimeError):
    """Dynamic sampling could not fill the batch within its generation rounds."""


def group_has_variance(values: Sequence[float], tol: float = 0.0) -> bool:
    return len(values) > 1 and (max(values) - min(values)) > tol


@dataclass
class DynamicSampler(Generic[G]):
    """Collects groups over generation rounds, keeping only those whose metric varies.

        sampler = DynamicSampler(target_groups=32, max_rounds=4)
        while sampler.need_more():
            sampler.add(generate_groups(...), values=lambda g: g.rewards)
        groups = sampler.finish()
    """
    target_groups: int
    max_rounds: int = 3
    on_shortfall: str = "log"  # "log": train on what there is; "error": raise ShortBatchError
    kept: list = field(default_factory=list)
    rounds: int = 0
    seen_groups: int = 0
    dropped_groups: int = 0

    def __post_init__(self):
        if self.on_shortfall not in ("log", "error"):
            raise ValueError(f"on_shortfall must be 'log' or 'error', got {self.on_shortfall!r}")
        if self.target_groups < 1 or self.max_rounds < 1:
            raise ValueError("target_groups and max_rounds must be >= 1")

    def need_more(self) -> bool:
        return len(self.kept) < self.target_groups and self.rounds < self.max_rounds

    def missing(self) -> int:
        return max(0, self.target_groups - len(self.kept))

    def add(self, groups: Sequence[G], values: Callable[[G], Sequence[float]]) -> None:
        self.rounds += 1
        for g in groups:
            self.seen_groups += 1
            if group_has_variance(list(values(g))):
                self.kept.append(g)
            else:
                self.dropped_groups += 1

    def finish(self) -> list[G]:
        if len(self.kept) < self.target_groups:
            msg = (f"dynamic sampling filled {len(self.kept)}/{self.target_groups} groups after {self.rounds} "
                   f"generation round(s) ({self.dropped_groups} of {self.seen_groups} groups had zero variance)")
            if self.on_shortfall == "error":
                raise ShortBatchError(msg + "; raise rl.dynamic_sampling.max_rounds or set on_shortfall='log'")
            log.warning(msg)
        return self.kept[: self.target_groups]

    def metrics(self) -> dict[str, float]:
        """kept_groups: the groups the batch trains on; surplus_groups: groups with variance past
        the target (the last round's extra), left out."""
        return {"dynamic/rounds": self.rounds, "dynamic/kept_groups": min(len(self.kept), self.target_groups),
                "dynamic/surplus_groups": max(0, len(self.kept) - self.target_groups),
                "dynamic/dropped_groups": self.dropped_groups,
                "dynamic/shortfall": self.missing()}


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """Penalty [N] added to the reward: 0 up to max_len − buffer, then falling linearly to
    −factor at max_len: min(−(L − (max_len − buffer)) / buffer · factor, 0); −factor past max_len."""
    if buffer <= 0 or buffer > max_len:
        raise ValueError(f"overlong buffer must be in 1..max_len ({max_len}), got {buffer}")
    excess = lengths.to(torch.float32) - (max_len - buffer)
    penalty = torch.clamp(-excess / buffer * factor, max=0.0)
    return torch.where(lengths > max_len, torch.full_like(penalty, -factor), penalty)


def overlong_filter(truncated: torch.Tensor) -> torch.Tensor:
    """keep [N] (bool): truncated samples are masked out of the loss."""
    return ~truncated.to(torch.bool)


@dataclass
class AEPOController:
    """Entropy-gated negative sampling: while batch entropy > high, drop negative-advantage
    samples from the loss (pushes entropy down); below low, restore them."""
    high: float
    low: float
    dropping: bool = False

    def __post_init__(self):
        if self.low > self.high:
            raise ValueError(f"AEPO needs low <= high, got low={self.low}, high={self.high}")

    def update(self, batch_entropy: float) -> bool:
        if batch_entropy > self.high:
            self.dropping = True
        elif batch_entropy < self.low:
            self.dropping = False
        return self.dropping

    def sample_mask(self, advantages: torch.Tensor) -> torch.Tensor:
        """keep [N] (bool) for per-sample advantages under the current state."""
        if not self.dropping:
            return torch.ones_like(advantages, dtype=torch.bool)
        return advantages >= 0

    def state_dict(self) -> dict:
        return {"dropping": self.dropping}

    def load_state_dict(self, state: dict) -> None:
        self.dropping = bool(state["dropping"])
