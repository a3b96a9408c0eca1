"""Difficulty-aware retrospective sampling: hard examples of earlier phases, weighted by
difficulty, mixed into the next phase's epochs; optionally balanced across tasks or sources."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence


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


def carried_quota(n_own: int, pool: int, ratio: float) -> int:
    """Carried examples in one epoch: `ratio` is their share of the epoch (so ratio/(1−ratio)
    times the own count), capped at the pool so none repeats; with no own examples, the whole pool."""
    if not n_own:
        return pool
    return min(pool, round(ratio / (1 - ratio) * n_own))


def weighted_order(ids: Sequence[str], weights: Sequence[float], rng: random.Random) -> list[str]:
    """`ids` in a random order where heavier ones tend to come first: an exponential race
    (Efraimidis–Spirakis keys), so every prefix is a weighted draw without replacement."""
    race = sorted((rng.expovariate(w), n) for n, w in enumerate(weights))
    return [ids[n] for _, n in race]


def interleave(own: list[str], extra: list[str], rng: random.Random) -> list[str]:
    """`extra` spread evenly through `own` (one every len/len(extra) slots, at a random phase),
    so carried examples come throughout the epoch rather than in one block."""
    if not extra:
        return own
    total, shift = len(own) + len(extra), rng.randrange(len(own) + len(extra))
    slots = {(j * total + shift) // len(extra): x for j, x in enumerate(extra)}  # integer math: distinct slots
    rest = iter(own)
    return [slots[p] if p in slots else next(rest) for p in range(total)]


@dataclass
class _Stream:
    """One group's examples and its position in the current epoch order."""
    own: list[str] = field(default_factory=list)
    carried: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    pos: int = 0


class PhaseSampler:
    """Draws example ids for one phase in epochs: each epoch is the phase's own examples
    shuffled, with a difficulty-weighted draw (without replacement) of the carried examples
    spread through it, so no example repeats within an epoch.

    `carry_ratio` is the carried share of an epoch, capped at the carried pool; a phase (or
    group) with no own examples cycles through its carried pool alone. With `balance_by`
    (id -> task or data source) every group of the phase, carried examples in their own
    group, keeps its own epochs and gets an equal share of each batch."""

    def __init__(self, ids: Sequence[str], *, carried: Sequence[str] = (), carry_ratio: float = 0.0,
                 tracker: DifficultyTracker | None = None, seed: int = 0,
                 balance_by: Mapping[str, str] | None = None):
        if not ids and not carried:
            raise ValueError("a phase needs examples: none fall within its length range")
        if not 0 <= carry_ratio < 1:
            raise ValueError(f"carry_ratio must be in [0, 1), got {carry_ratio}")
        own = list(dict.fromkeys(ids))
        own_set = set(own)
        self.carried = [c for c in dict.fromkeys(carried) if c not in own_set]  # each id once per epoch
        self.carry_ratio = carry_ratio if self.carried else 0.0
        self.tracker = tracker or DifficultyTracker()
        self.rng = random.Random(seed)
        self.streams = _streams(own, self.carried, balance_by)
        self.turn = 0  # the first group to get one of a batch's remainder
        self.last_mix = {"carried": 0, "own": 0}

    def sample(self, batch: int) -> list[str]:
        """`batch` ids; `last_mix` then counts the carried and own ones among them."""
        out = [self._next(s) for s, k in zip(self.streams.values(), self._shares(batch)) for _ in range(k)]
        carried = set(self.carried)
        n_carried = sum(x in carried for x in out)
        self.last_mix = {"carried": n_carried, "own": len(out) - n_carried}
        return out

    def _shares(self, batch: int) -> list[int]:
        """The batch split evenly across groups; those that get one more rotate from batch to
        batch, so no group is favoured over time."""
        n = len(self.streams)
        base, extra = divmod(batch, n)
        lucky = {(self.turn + j) % n for j in range(extra)}
        self.turn = (self.turn + extra) % n
        return [base + (g in lucky) for g in range(n)]

    def _next(self, s: _Stream) -> str:
        if s.pos >= len(s.order):
            s.order, s.pos = self._epoch(s), 0
        s.pos += 1
        return s.order[s.pos - 1]

    def _epoch(self, s: _Stream) -> list[str]:
        """A new epoch order; difficulties are read now, so carried examples the policy has
        since learned to solve lose weight."""
        own = list(s.own)
        self.rng.shuffle(own)
        weights = [self.tracker.difficulty(c) for c in s.carried]
        k = carried_quota(len(own), len(s.carried), self.carry_ratio)
        return interleave(own, weighted_order(s.carried, weights, self.rng)[:k], self.rng)

    def state_dict(self) -> dict:
        return {"carry_ratio": self.carry_ratio, "turn": self.turn, "rng": _rng_state(self.rng),
                "streams": {g: asdict(s) for g, s in self.streams.items()}, "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.streams = {g: _Stream(list(s["own"]), list(s["carried"]), list(s["order"]), int(s["pos"]))
                        for g, s in state["streams"].items()}
        self.carried = [c for s in self.streams.values() for c in s.carried]
        self.carry_ratio, self.turn = float(state["carry_ratio"]), int(state["turn"])
        self.rng.setstate(_rng_unstate(state["rng"]))
        self.tracker.load_state_dict(state["tracker"])


def _streams(own: list[str], carried: list[str], balance_by: Mapping[str, str] | None) -> dict[str, _Stream]:
    """One stream per group (one for the whole phase without `balance_by`), in key order so
    the split of a batch does not depend on the order of the ids."""
    group = balance_by if balance_by is not None else dict.fromkeys(own + carried, "")
    missing = [i for i in own + carried if i not in group]
    if missing:
        raise ValueError(f"balance_by has no group for {len(missing)} example(s), e.g. {missing[0]!r}")
    streams: dict[str, _Stream] = {}
    for i in own:
        streams.setdefault(str(group[i]), _Stream()).own.append(i)
    for c in carried:
        streams.setdefault(str(group[c]), _Stream()).carried.append(c)
    return dict(sorted(streams.items()))


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_unstate(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss
