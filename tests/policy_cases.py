"""One table of policy-loss cases, shared by the torch reference on log-probs
(tests/test_rl.py, against the hand-computed values here) and the fused kernel
(tests/test_kernels.py, against the reference on the same ratios, advantages and weights).

Each case gives the current log-probs, the importance ratios (old = logp − log ratio; None:
strictly on-policy), ref = logp + ref_delta, the rollout's log-probs `gap` below old, advantages, token weights, entropy, the
config, and the loss and d(loss)/d(logp) worked out by hand (comments show the work).
"""
from __future__ import annotations

import math

import torch

from kernels import GRPOLossConfig

POLICY_CASES = {
    # A>0, r=2: −A·clip(r)=−1.28 (clipped high, no grad) | A<0, r=.5: −A·.8=0.8 (clipped low, no grad)
    # A>0, r=1.1: −1.1, grad −1.1 | A<0, r=.9: 0.9, grad 0.9.  loss = .25·(−1.28+.8−1.1+.9) = −0.17
    "clip_branches": dict(cfg=GRPOLossConfig(), logp=[-1.0, -2.0, -0.5, -1.5], ratio=[2.0, 0.5, 1.1, 0.9],
                          adv=[1.0, -1.0, 1.0, -1.0], weight=[0.25] * 4,
                          expected_loss=-0.17, expected_grad=[0.0, 0.0, -0.275, 0.225]),
    # A<0, r=5: max(5, 1.28)=5 > c·|A|=3 -> 3 (dual clip, no grad) | A<0, r=2: 2 < 3 -> 2, grad 2.  loss .5·3+.5·2
    "dual_clip": dict(cfg=GRPOLossConfig(clip_c=3.0), logp=[-1.0, -1.0], ratio=[5.0, 2.0], adv=[-1.0, -1.0],
                      weight=[0.5, 0.5], expected_loss=2.5, expected_grad=[0.0, 1.0]),
    # on-policy: r = 1, loss per token −A, grad −A·w
    "on_policy": dict(cfg=GRPOLossConfig(), logp=[-0.3, -1.2, -2.0], ratio=None, adv=[0.5, -2.0, 1.0],
                      weight=[1 / 3] * 3, expected_loss=0.5 / 3,
                      expected_grad=[-0.5 / 3, 2.0 / 3, -1.0 / 3]),
    # k3 with x = ref − logp = ∓0.5: KL = eˣ − x − 1; dKL/dlogp = −(eˣ − 1); coefficient 0.1
    "kl_k3": dict(cfg=GRPOLossConfig(kl_coef=0.1, kl_estimator="k3"), logp=[-1.0, -2.0], ratio=None,
                  ref_delta=[-0.5, 0.5], adv=[0.0, 0.0], weight=[1.0, 1.0],
                  expected_loss=0.1 * ((math.exp(-0.5) + 0.5 - 1) + (math.exp(0.5) - 0.5 - 1)),
                  expected_grad=[-0.1 * (math.exp(-0.5) - 1), -0.1 * (math.exp(0.5) - 1)]),
    # k1: KL = logp − ref = 0.4, grad 1; k2 alongside in its own case
    "kl_k1": dict(cfg=GRPOLossConfig(kl_coef=0.5, kl_estimator="k1"), logp=[-1.0], ratio=None, ref_delta=[-0.4],
                  adv=[1.0], weight=[1.0], expected_loss=-1.0 + 0.5 * 0.4, expected_grad=[-1.0 + 0.5]),
    "kl_k2": dict(cfg=GRPOLossConfig(kl_coef=0.5, kl_estimator="k2"), logp=[-1.0], ratio=None, ref_delta=[-0.4],
                  adv=[0.0], weight=[1.0], expected_loss=0.5 * 0.5 * 0.16, expected_grad=[0.5 * 0.4]),
    # entropy bonus: loss −A − coef·H = −1 − 0.01·2
    "entropy": dict(cfg=GRPOLossConfig(entropy_coef=0.01), logp=[-0.7], ratio=None, adv=[1.0], weight=[1.0],
                    entropy=[2.0], expected_loss=-1.02, expected_grad=[-1.0]),
    # log-ratio clamp ±0.5: r = e^±0.5 and no gradient through the clamp; third token masked
    "logratio_clamp_and_mask": dict(cfg=GRPOLossConfig(logratio_clamp=0.5), logp=[-1.0, -1.0, -1.0],
                                    ratio=[math.e, 1 / math.e, 1.0], adv=[-1.0, 1.0, 1.0], weight=[1.0, 1.0, 0.0],
                                    expected_loss=math.exp(0.5) - math.exp(-0.5), expected_grad=[0.0, 0.0, 0.0]),
    # truncated importance sampling, cap 2, on-policy (r = 1): the rollout's log-probs below the trainer's by
    # log 1.5 (weight 1.5) and log 4 (weight 4, capped to 2). −A·w: −1.5 | 2.  loss .5·(−1.5) + .5·2 = 0.25;
    # grad −A·w·(token weight): −0.75 | 1.0
    "tis": dict(cfg=GRPOLossConfig(tis_cap=2.0), logp=[-1.0, -2.0], ratio=None, gap=[math.log(1.5), math.log(4.0)],
                adv=[1.0, -1.0], weight=[0.5, 0.5], expected_loss=0.25, expected_grad=[-0.75, 1.0]),
}


def case_tensors(case: dict, logp: torch.Tensor) -> dict:
    """old / ref / adv / weight / entropy tensors for a case, around the given current logp."""
    def tensor(values):
        return torch.tensor(values, dtype=logp.dtype, device=logp.device)

    base = logp.detach()
    old = None if case.get("ratio") is None else base - torch.log(tensor(case["ratio"]))
    ref = None if case.get("ref_delta") is None else base + tensor(case["ref_delta"])
    entropy = None if case.get("entropy") is None else tensor(case["entropy"])
    # the rollout's log-probs, `gap` below the trainer's before the update (old, or logp on-policy)
    behaviour = None if case.get("gap") is None else (base if old is None else old) - tensor(case["gap"])
    return {"logp": logp, "old": old, "ref": ref, "adv": tensor(case["adv"]), "weight": tensor(case["weight"]),
            "entropy": entropy, "behaviour": behaviour}
