"""GRPO advantages, the policy loss on log-probs, DAPO shaping and AEPO: hand-computed values."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from policy_cases import POLICY_CASES, case_tensors

from engine.rl import (AEPOController, DynamicSampler, GRPOLossConfig, ShortBatchError, aggregation_weights,
                       grpo_advantages, overlong_filter, overlong_penalty, policy_loss)


# ---- advantages -----------------------------------------------------------------------
def test_grpo_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.7, 0.5, 0.5, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 2, 2, 2])
    adv = grpo_advantages(rewards, groups)
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> ±0.866025
    torch.testing.assert_close(adv[:4], torch.tensor([0.866025, -0.866025, 0.866025, -0.866025]), atol=1e-5, rtol=0)
    assert adv[4].item() == pytest.approx(0.7)  # a group of one keeps its raw reward
    assert adv[5:].tolist() == [0.0, 0.0, 0.0]  # zero-std group: exactly zero


def test_advantage_scales_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1])
    none = grpo_advantages(rewards, groups, scale="none")
    assert none.tolist() == [0.5, -0.5, 0.0, 0.0]  # Dr. GRPO: centred only
    batch = grpo_advantages(rewards, groups, scale="batch")
    batch_std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std().item()  # 0.5
    torch.testing.assert_close(batch, torch.tensor([0.5, -0.5, 0.0, 0.0]) / (batch_std + 1e-6))
    tasks = torch.tensor([0, 0, 1, 1])
    task = grpo_advantages(rewards, groups, scale="task", task_ids=tasks)
    torch.testing.assert_close(task[:2], torch.tensor([0.5, -0.5]) / (math.sqrt(0.5) + 1e-6))
    with pytest.raises(ValueError, match="task_ids"):
        grpo_advantages(rewards, groups, scale="task")
    with pytest.raises(ValueError, match="unknown"):
        grpo_advantages(rewards, groups, scale="global")


# ---- the policy loss: one table shared with the fused kernel (tests/policy_cases.py) ----
@pytest.mark.parametrize("name", list(POLICY_CASES))
def test_policy_loss_matches_hand_computed_table(name):
    case = POLICY_CASES[name]
    t = case_tensors(case, logp=torch.tensor(case["logp"], dtype=torch.float64, requires_grad=True))
    loss, stats = policy_loss(t["logp"], t["adv"], t["weight"], old_logprob=t["old"], ref_logprob=t["ref"],
                              entropy=t["entropy"], behaviour_logprob=t["behaviour"], cfg=case["cfg"])
    assert loss.item() == pytest.approx(case["expected_loss"], abs=1e-6)
    loss.backward()
    torch.testing.assert_close(t["logp"].grad, torch.tensor(case["expected_grad"], dtype=torch.float64),
                               atol=1e-6, rtol=1e-6)
    assert stats["tokens"].item() == sum(w != 0 for w in case["weight"])


def test_policy_loss_micro_batches_sum_to_batch_loss():
    """Three uneven micro-batches with global counts give exactly the whole-batch loss."""
    lengths = [2, 5, 1, 4]
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    mask = torch.ones(len(seq))
    logp = torch.linspace(-2, -0.1, len(seq), dtype=torch.float64)
    adv = torch.tensor([1.0, 1, -1, -1, -1, -1, -1, 0.5, 2, 2, 2, 2], dtype=torch.float64)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        whole, _ = policy_loss(logp, adv, aggregation_weights(mask, seq, mode, dtype=torch.float64))
        parts = 0.0
        for a, b in ((0, 2), (2, 8), (8, 12)):
            w = aggregation_weights(mask[a:b], seq[a:b], mode, global_tokens=12, global_seqs=4, dtype=torch.float64)
            parts += policy_loss(logp[a:b], adv[a:b], w)[0].item()
        # on-policy: per-token loss is −A; by hand for each mode
        expected = {"token-mean": -adv.sum() / 12,
                    "seq-mean-token-mean": -(adv[:2].mean() + adv[2:7].mean() + adv[7:8].mean() + adv[8:].mean()) / 4,
                    "seq-mean-token-sum": -adv.sum() / 4}[mode]
        assert whole.item() == pytest.approx(expected.item(), abs=1e-9)
        assert parts == pytest.approx(expected.item(), abs=1e-9)


def test_policy_loss_needs_entropy_for_entropy_bonus():
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), cfg=GRPOLossConfig(entropy_coef=0.1))


# ---- DAPO -------------------------------------------------------------------------------
def test_dynamic_sampling_drops_zero_variance_and_refills():
    sampler = DynamicSampler(target_groups=3, max_rounds=5)
    rounds = [[[1, 1, 1], [0, 1, 0]], [[0, 0, 0], [0.5, 0.5, 0.5]], [[1, 0, 0], [0, 0, 1], [1, 1, 0]]]
    for groups in rounds:
        assert sampler.need_more()
        sampler.add(groups, values=lambda g: g)
    assert not sampler.need_more()
    kept = sampler.finish()
    assert kept == [[0, 1, 0], [1, 0, 0], [0, 0, 1]]
    assert sampler.metrics()["dynamic/dropped_groups"] == 3 and sampler.rounds == 3
    # the last round's third varied group is past the target: left out, and counted so
    assert sampler.metrics()["dynamic/kept_groups"] == 3 and sampler.metrics()["dynamic/surplus_groups"] == 1


def test_dynamic_sampling_shortfall(caplog):
    sampler = DynamicSampler(target_groups=2, max_rounds=2, on_shortfall="log")
    for _ in range(2):
        sampler.add([[1, 1], [0, 1]], values=lambda g: g)
    assert not sampler.need_more()
    with caplog.at_level(logging.WARNING):
        assert sampler.finish() == [[0, 1], [0, 1]]
    strict = DynamicSampler(target_groups=2, max_rounds=1, on_shortfall="error")
    strict.add([[1, 1], [0, 1]], values=lambda g: g)
    with pytest.raises(ShortBatchError, match="1/2 groups after 1 generation round"):
        strict.finish()


def test_overlong_penalty_at_and_beyond_the_buffer():
    lengths = torch.tensor([50, 80, 81, 90, 100, 120])
    pen = overlong_penalty(lengths, max_len=100, buffer=20)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.05, -0.5, -1.0, -1.0]))
    half = overlong_penalty(lengths, max_len=100, buffer=20, factor=0.5)
    torch.testing.assert_close(half, torch.tensor([0.0, 0.0, -0.025, -0.25, -0.5, -0.5]))
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, max_len=100, buffer=0)


def test_overlong_filter_masks_truncated():
    assert overlong_filter(torch.tensor([True, False, True])).tolist() == [False, True, False]


def test_aepo_hysteresis_and_state():
    aepo = AEPOController(high=2.0, low=1.0)
    adv = torch.tensor([1.0, -1.0, 0.0])
    assert aepo.sample_mask(adv).tolist() == [True, True, True]
    assert aepo.update(2.5) is True and aepo.sample_mask(adv).tolist() == [True, False, True]
    assert aepo.update(1.5) is True  # between the marks: keeps dropping
    assert aepo.update(0.9) is False and aepo.sample_mask(adv).tolist() == [True, True, True]
    aepo.update(3.0)
    other = AEPOController(high=2.0, low=1.0)
    other.load_state_dict(aepo.state_dict())
    assert other.dropping
