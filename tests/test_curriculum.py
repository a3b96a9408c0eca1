"""Length phases, carry-over of hard examples, difficulty-weighted sampling, save/restore."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from engine.curriculum import DifficultyTracker, Phase, PhaseSampler, carry_over, phase_members


def test_phase_membership():
    phases = [Phase("p1", 20_000, steps=10), Phase("p2", 60_000, steps=10)]
    lengths = [100, 20_000, 20_001, 60_000, 60_001]
    assert phase_members(lengths, phases) == [[0, 1], [2, 3]]  # 60,001 exceeds every phase
    with pytest.raises(ValueError, match="must increase"):
        phase_members(lengths, [phases[1], phases[0]])


def test_difficulty_and_carry_over():
    tracker = DifficultyTracker(cap=8.0)
    tracker.update("a", [0, 0, 0, 0])        # never solved: hardest
    tracker.update("b", [1, 0, 0, 0])        # mean 0.25 -> difficulty 4
    tracker.update("c", [1, 1, 1, 1])        # solved
    tracker.update("d", [1, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # mean 0.1 -> 10, capped to 8
    assert [tracker.difficulty(x) for x in "abcd"] == [8.0, 4.0, 1.0, 8.0]
    assert carry_over(tracker, ["a", "b", "c", "e"], threshold=0.0) == ["a"]  # the paper's threshold: 0
    assert carry_over(tracker, ["a", "b", "c"], threshold=0.25, previous=["d", "c"]) == ["d", "a", "b"]


def test_carried_examples_are_mixed_in_and_weighted_by_difficulty():
    tracker = DifficultyTracker(cap=10.0)
    tracker.update("hard", [0, 0])       # difficulty 10
    tracker.update("medium", [1, 0])     # 2
    tracker.update("easy", [1, 1])       # 1
    own = [f"p2-{i}" for i in range(50)]
    sampler = PhaseSampler(own, carried=["hard", "medium", "easy"], carry_ratio=0.25, tracker=tracker, seed=0)
    draws = [sampler.sample(16) for _ in range(400)]
    assert all(sum(x in ("hard", "medium", "easy") for x in batch) == 4 for batch in draws)
    counts = Counter(x for batch in draws for x in batch if x in ("hard", "medium", "easy"))
    total = sum(counts.values())
    for name, weight in (("hard", 10), ("medium", 2), ("easy", 1)):
        assert counts[name] / total == pytest.approx(weight / 13, abs=0.03)
    # own examples come in shuffled epochs: every example once per 50 draws
    firsts = [x for batch in draws[:5] for x in batch if x.startswith("p2-")][:50]
    assert sorted(firsts) == sorted(own)


def test_save_restore_gives_the_same_next_samples():
    tracker = DifficultyTracker()
    tracker.update("h1", [0, 0])
    tracker.update("h2", [1, 0, 0])
    sampler = PhaseSampler([f"x{i}" for i in range(7)], carried=["h1", "h2"], carry_ratio=0.3, tracker=tracker,
                           seed=42)
    sampler.sample(5)
    state = json.loads(json.dumps(sampler.state_dict()))  # it must survive JSON (checkpoints)
    expected = [sampler.sample(5) for _ in range(6)]
    restored = PhaseSampler(["unused"], seed=0)
    restored.load_state_dict(state)
    assert [restored.sample(5) for _ in range(6)] == expected


def test_sampler_input_checks():
    with pytest.raises(ValueError, match="needs examples"):
        PhaseSampler([])
    with pytest.raises(ValueError, match="carry_ratio"):
        PhaseSampler(["a"], carried=["b"], carry_ratio=1.0)
    assert PhaseSampler(["a"], carried=[], carry_ratio=0.5).sample(3) == ["a", "a", "a"]
