"""Naive references: full logits [T, V], autograd for the gradients.

Used by tests (in fp64) and benches (as the baseline) only. The formulas here are written
independently of the fused path: the fused path derives its gradients by hand, these get
theirs from autograd, and the tests compare the two.
"""
from __future__ import annotations

import torch

from .grpo_loss import GRPOLossConfig


def naive_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                  temperature: float = 1.0, with_entropy: bool = False):
    """-> (logprob [T], entropy [T] | None), in hidden's dtype."""
    logits = (hidden @ weight.t()) / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, entropy


def kl_reference(logp: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from the sampled token's log-probs (Schulman's k1/k2/k3)."""
    if estimator == "k1":
        return logp - ref
    if estimator == "k2":
        return 0.5 * (logp - ref) ** 2
    if estimator == "k3":
        log_r = torch.clamp(ref - logp, -20.0, 20.0)
        return torch.clamp(torch.exp(log_r) - log_r - 1, -10.0, 10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}")


def grpo_token_loss_reference(logp: torch.Tensor, entropy: torch.Tensor | None, advantages: torch.Tensor,
                              old_logprob: torch.Tensor | None, ref_logprob: torch.Tensor | None,
                              cfg: GRPOLossConfig, behaviour_logprob: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token policy loss [T] from log-probs: clipped surrogate (+ dual clip), times the
    truncated importance weight when cfg.tis_cap is set, + KL - entropy bonus."""
    old = logp.detach() if old_logprob is None else old_logprob
    log_ratio = torch.clamp(logp - old, -cfg.logratio_clamp, cfg.logratio_clamp)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    if cfg.clip_c is not None:
        pg = torch.where(advantages < 0, torch.minimum(pg, -advantages * cfg.clip_c), pg)
    if cfg.tis_cap is not None:
        pg = pg * torch.minimum(torch.exp(old.detach() - behaviour_logprob), torch.tensor(cfg.tis_cap, dtype=pg.dtype))
    loss = pg
    if cfg.kl_coef and ref_logprob is not None:
        loss = loss + cfg.kl_coef * kl_reference(logp, ref_logprob, cfg.kl_estimator)
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * entropy
    return loss


def naive_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    advantages: torch.Tensor, token_weight: torch.Tensor,
                    old_logprob: torch.Tensor | None = None, ref_logprob: torch.Tensor | None = None,
                    behaviour_logprob: torch.Tensor | None = None,
                    cfg: GRPOLossConfig | None = None) -> torch.Tensor:
    """Scalar loss = sum(token_weight * per-token loss) through materialised logits."""
    cfg = cfg or GRPOLossConfig()
    logp, entropy = naive_logprob(hidden, weight, targets, temperature=cfg.temperature,
                                  with_entropy=bool(cfg.entropy_coef))
    per_token = grpo_token_loss_reference(logp, entropy, advantages, old_logprob, ref_logprob, cfg, behaviour_logprob)
    return (token_weight * per_token).sum()
