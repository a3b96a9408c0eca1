"""The policy loss on log-prob tensors: the plain-torch reference of the fused kernel.

`policy_loss` takes per-token log-probs (with autograd) and returns the same loss and
stats as `kernels.linear_grpo_loss` computes from hidden states; tests run both on one
table of cases (tests/policy_cases.py). The per-token formula lives once, in
kernels.reference; the aggregation weights once, in kernels.grpo_loss.
"""
from __future__ import annotations

import math

import torch

from kernels.grpo_loss import AGGREGATIONS, MISMATCH_OVER, GRPOLossConfig, aggregation_weights
from kernels.reference import grpo_token_loss_reference, kl_reference

__all__ = ["policy_loss", "aggregation_weights", "AGGREGATIONS", "GRPOLossConfig"]


def policy_loss(logprob: torch.Tensor, advantages: torch.Tensor, token_weight: torch.Tensor, *,
                old_logprob: torch.Tensor | None = None, ref_logprob: torch.Tensor | None = None,
                entropy: torch.Tensor | None = None, behaviour_logprob: torch.Tensor | None = None,
                cfg: GRPOLossConfig | None = None):
    """logprob [T] (requires grad), advantages [T], token_weight [T] -> (loss, stats).
    behaviour_logprob: the rollout's log-probs of the tokens (needed with cfg.tis_cap; they
    give the trainer − rollout mismatch stats either way)."""
    cfg = cfg or GRPOLossConfig()
    if cfg.entropy_coef and entropy is None:
        raise ValueError("entropy_coef is set: pass the per-token entropy")
    if cfg.tis_cap is not None and behaviour_logprob is None:
        raise ValueError("tis_cap is set: pass behaviour_logprob, the rollout's log-probs of the tokens")
    per_token = grpo_token_loss_reference(logprob, entropy, advantages, old_logprob, ref_logprob, cfg,
                                          behaviour_logprob)
    loss = (token_weight * per_token).sum()
    with torch.no_grad():
        active = token_weight != 0
        n = active.sum().clamp(min=1)
        old = logprob if old_logprob is None else old_logprob
        ratio = torch.exp(torch.clamp(logprob - old, -cfg.logratio_clamp, cfg.logratio_clamp))
        stats = {
            "logprob": (logprob * active).sum() / n,
            "ratio": (ratio * active).sum() / n,
            "clip_low": (((advantages < 0) & (ratio < 1 - cfg.clip_low)) & active).sum() / n,
            "clip_high": (((advantages > 0) & (ratio > 1 + cfg.clip_high)) & active).sum() / n,
            "tokens": n,
        }
        if cfg.kl_coef and ref_logprob is not None:
            stats["kl"] = (kl_reference(logprob, ref_logprob, cfg.kl_estimator) * active).sum() / n
        if entropy is not None:
            stats["entropy"] = (entropy * active).sum() / n
        if behaviour_logprob is not None:
            gap = old - behaviour_logprob  # trainer − rollout, before this update
            stats.update(mismatch_abs=(gap.abs() * active).sum() / n,
                         mismatch_over=((gap.abs() > MISMATCH_OVER) & active).sum() / n,
                         max_mismatch_abs=torch.where(active, gap.abs(), 0.0).max())
            if cfg.tis_cap is not None:
                capped = gap >= math.log(cfg.tis_cap)
                stats.update(tis_weight=(torch.exp(gap).clamp(max=cfg.tis_cap) * active).sum() / n,
                             tis_capped=(capped & active).sum() / n)
    return loss, stats
