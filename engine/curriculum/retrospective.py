"""Difficulty-aware retrospective sampling: hard examples of earlier phases, weighted by
difficulty, mixed into the next phase."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class DifficultyTracker:
    """Per-example mean group reward of the latest rollout, and the difficulty it implies."""
    cap: float = 10.0  # difficulty of an example the policy never solves (1 / 0)
    mean_reward: dict[str, float] = field(default_factory=dict)

    def update(self, example_id: str, rewards: Sequence[float]) -> None:
        self.mean_reward[example_id] = sum(rewards) / len(rewards) if rewards else 0.0

    def difficulty(self, example_id: str) -> float:
        mean = self.mean_reward.get(example_id, 0.0)
        return self.cap if mean <= 0 else min(1.0 / mean, self.cap)

    def hard(self, ids: Sequence[str], threshold: float = 0.0) -> list[str]:
        """Seen examples among `ids` whose mean reward is at or below `threshold`."""
        return [i for i in ids if i in self.mean_reward and self.mean_reward[i] <= threshold]

    def state_dict(self) -> dict:
        return {"cap": self.cap, "mean_reward": dict(self.mean_reward)}

    def load_state_dict(self, state: dict) -> None:
        self.cap = float(state["cap"])
        self.mean_reward = {str(k): float(v) for k, v in state["mean_reward"].items()}


def carry_over(tracker: "DifficultyTracker", phase_ids: Sequence[str], threshold: float = 0.0,
               previous: Sequence[str] = ()) -> list[str]:
    """The examples to carry into the next phase: this phase's hard ones, plus those carried
    before that are still hard (each once)."""
    keep = tracker.hard(list(previous), threshold) + tracker.hard(phase_ids, threshold)
    return list(dict.fromkeys(keep))


class PhaseSampler:
    """Draws example ids for one phase: its own examples in shuffled epochs, plus (at
    `carry_ratio`) examples carried from earlier phases, weighted by difficulty."""

    def __init__(self, ids: Sequence[str], *, carried: Sequence[str] = (), carry_ratio: float = 0.0,
                 tracker: DifficultyTracker | None = None, seed: int = 0):
        if not ids and not carried:
            raise ValueError("a phase needs examples: none fall within its length range")
        if not 0 <= carry_ratio < 1:
            raise ValueError(f"carry_ratio must be in [0, 1), got {carry_ratio}")
        self.ids, self.carried = list(ids), list(carried)
        self.carry_ratio = carry_ratio if self.carried else 0.0
        self.tracker = tracker or DifficultyTracker()
        self.rng = random.Random(seed)
        self.order: list[str] = []
        self.pos = 0
        self.epoch = 0

    def _next_own(self) -> str:
        if self.pos >= len(self.order):
            self.order = list(self.ids)
            self.rng.shuffle(self.order)
            self.pos, self.epoch = 0, self.epoch + 1
        self.pos += 1
        return self.order[self.pos - 1]

    def sample(self, batch: int) -> list[str]:
        n_carry = round(batch * self.carry_ratio) if self.ids else batch
        out = [self._next_own() for _ in range(batch - n_carry)]
        if n_carry:
            weights = [self.tracker.difficulty(i) for i in self.carried]
            out += self.rng.choices(self.carried, weights=weights, k=n_carry)
        return out

    def state_dict(self) -> dict:
        return {"ids": self.ids, "carried": self.carried, "carry_ratio": self.carry_ratio, "order": self.order,
                "pos": self.pos, "epoch": self.epoch, "rng": _rng_state(self.rng),
                "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ids, self.carried = list(state["ids"]), list(state["carried"])
        self.carry_ratio, self.order = float(state["carry_ratio"]), list(state["order"])
        self.pos, self.epoch = int(state["pos"]), int(state["epoch"])
        self.rng.setstate(_rng_unstate(state["rng"]))
        self.tracker.load_state_dict(state["tracker"])


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_unstate(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss
