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


def _epochs(draws: list[str], size: int) -> list[list[str]]:
    return [draws[i:i + size] for i in range(0, len(draws) - size + 1, size)]


def test_carried_examples_join_each_epoch_without_repeats():
    tracker = DifficultyTracker()
    tracker.update("h1", [0, 0])
    tracker.update("h2", [1, 0])
    own = [f"p2-{i}" for i in range(10)]
    sampler = PhaseSampler(own, carried=["h1", "h2"], carry_ratio=0.9, tracker=tracker, seed=3)
    draws = [x for _ in range(30) for x in sampler.sample(4)]  # batches cut across epochs of 10 + 2
    for epoch in _epochs(draws, 12):  # a ratio of 0.9 asks for 90 carried: capped at the pool of 2
        assert len(set(epoch)) == 12 and {"h1", "h2"} < set(epoch)


def test_carried_share_of_an_epoch_is_the_ratio_spread_through_it():
    tracker = DifficultyTracker()
    pool = [f"hard-{i}" for i in range(20)]
    own = [f"p2-{i}" for i in range(30)]
    sampler = PhaseSampler(own, carried=pool, carry_ratio=0.25, tracker=tracker, seed=0)
    draws, mixes = [], []
    for _ in range(20):  # four epochs of 30 own + 10 carried (a quarter of 40)
        draws += sampler.sample(8)
        mixes.append(sampler.last_mix)
    for epoch in _epochs(draws, 40):
        assert len(set(epoch)) == 40 and sorted(x for x in epoch if x.startswith("p2-")) == sorted(own)
        slots = [n for n, x in enumerate(epoch) if x.startswith("hard-")]
        assert len(slots) == 10 and all(3 <= b - a <= 5 for a, b in zip(slots, slots[1:]))  # every 4th
    assert sum(m["carried"] for m in mixes) == 40 and sum(m["own"] for m in mixes) == 120
    assert all(m == {"carried": sum(x.startswith("hard-") for x in draws[8 * n:8 * n + 8]),
                     "own": sum(x.startswith("p2-") for x in draws[8 * n:8 * n + 8])} for n, m in enumerate(mixes))


def test_harder_carried_examples_are_drawn_more_often_and_earlier():
    tracker = DifficultyTracker(cap=10.0)
    hard, easy = [f"hard-{i}" for i in range(5)], [f"easy-{i}" for i in range(5)]
    for x in hard:
        tracker.update(x, [0, 0])  # difficulty 10
    for x in easy:
        tracker.update(x, [1, 1])  # difficulty 1
    own = [f"p2-{i}" for i in range(12)]
    picked, first = Counter(), Counter()
    for seed in range(200):  # 3 of the 10 per epoch (a share of 0.2 of 15)
        sampler = PhaseSampler(own, carried=easy + hard, carry_ratio=0.2, tracker=tracker, seed=seed)
        carried = [x for x in sampler.sample(15) if not x.startswith("p2-")]
        assert len(carried) == 3
        picked.update(x.split("-")[0] for x in carried)
        first[carried[0].split("-")[0]] += 1
    assert picked["hard"] / 600 > 0.75  # weighted without replacement: about 0.88; uniform: 0.5
    assert first["hard"] / 200 > 0.8  # the first pick: 50 / 55 = 0.91
    # a pool drawn whole each epoch: the harder ones come earlier in it
    position = Counter()
    for seed in range(200):
        sampler = PhaseSampler([], carried=easy + hard, tracker=tracker, seed=seed)
        for n, x in enumerate(sampler.sample(10)):
            position[x.split("-")[0]] += n
    assert position["hard"] < 0.6 * position["easy"]


def test_phase_of_carried_examples_only_cycles_through_the_pool():
    sampler = PhaseSampler([], carried=["a", "b", "c"], carry_ratio=0.25, seed=1)
    draws = sampler.sample(9)
    assert sampler.last_mix == {"carried": 9, "own": 0}
    assert all(sorted(epoch) == ["a", "b", "c"] for epoch in _epochs(draws, 3))


def test_save_restore_gives_the_same_next_samples():
    tracker = DifficultyTracker()
    tracker.update("h1", [0, 0])
    tracker.update("h2", [1, 0, 0])
    sampler = PhaseSampler([f"x{i}" for i in range(7)], carried=["h1", "h2"], carry_ratio=0.3, tracker=tracker,
                           seed=42)
    sampler.sample(5)  # mid-epoch: epochs are 7 own + 2 carried
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


def test_task_balanced_batches_give_each_group_an_equal_share():
    groups = {"a": 2, "b": 10, "c": 30}
    ids = [f"{g}{i}" for g, size in groups.items() for i in range(size)]
    sampler = PhaseSampler(ids, balance_by={x: x[0] for x in ids}, seed=0)
    batches = [sampler.sample(6) for _ in range(20)]
    assert all(Counter(x[0] for x in batch) == {"a": 2, "b": 2, "c": 2} for batch in batches)
    for g, size in groups.items():  # each group in its own epochs: no repeats within one
        stream = [x for batch in batches for x in batch if x[0] == g]
        assert all(sorted(epoch) == sorted(f"{g}{i}" for i in range(size)) for epoch in _epochs(stream, size))


def test_task_balance_remainders_rotate_between_batches():
    ids = ["a0", "a1", "b0", "b1", "c0", "c1"]
    sampler = PhaseSampler(ids, balance_by={x: x[0] for x in ids}, seed=0)
    shares = [Counter(x[0] for x in sampler.sample(4)) for _ in range(3)]
    assert all(sorted(s.values()) == [1, 1, 2] for s in shares)
    assert sum(shares, Counter()) == {"a": 4, "b": 4, "c": 4}
    with pytest.raises(ValueError, match="no group"):
        PhaseSampler(ids, balance_by={"a0": "a"})


def test_task_balance_with_carried_examples():
    tracker = DifficultyTracker()
    own = [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(6)]
    carried = ["a-hard0", "a-hard1", "c-hard0"]  # task c has no example of this phase's length
    for x in carried:
        tracker.update(x, [0, 0])
    sampler = PhaseSampler(own, carried=carried, carry_ratio=0.25, tracker=tracker, seed=5,
                           balance_by={x: x[0] for x in own + carried})
    batches = [sampler.sample(6) for _ in range(8)]
    assert all(Counter(x[0] for x in batch) == {"a": 2, "b": 2, "c": 2} for batch in batches)
    a_stream = [x for batch in batches for x in batch if x[0] == "a"]
    for epoch in _epochs(a_stream, 8):  # 6 own + both carried (a quarter of 8)
        assert len(set(epoch)) == 8 and {"a-hard0", "a-hard1"} < set(epoch)
    assert all(x == "c-hard0" for batch in batches for x in batch if x[0] == "c")  # its pool alone
    assert sampler.last_mix["carried"] + sampler.last_mix["own"] == 6
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = [sampler.sample(5) for _ in range(7)]
    restored = PhaseSampler(["unused"], seed=0)
    restored.load_state_dict(state)
    assert [restored.sample(5) for _ in range(7)] == expected
