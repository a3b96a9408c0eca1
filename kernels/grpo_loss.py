"""Fused linear -> GRPO/DAPO policy loss, with the gradient formed in the forward pass.

The loss is element-wise in each token's log-prob, so d(loss)/d(logits) is known as soon
as a chunk's log-probs are: per chunk of tokens we run one GEMM for the logits, the row
kernels (stats, then d(logits) written over the logits buffer), and two GEMMs for dH and
dW. Three GEMMs in all, no recompute, the memory of one chunk plus an fp32 dW.
backward() only scales the stored dH, dW by the incoming gradient.

Per token, with r = exp(clamp(logp − old, ±logratio_clamp)) and A the advantage:

    pg   = max(−A·r, −A·clip(r, 1 − clip_low, 1 + clip_high))       (DAPO's clip-higher)
    pg   = min(pg, −A·clip_c)            where A < 0, when clip_c is set (dual clip)
    pg   = pg · min(exp(π_old − π_rollout), tis_cap)   with rollout log-probs and tis_cap set
    loss = pg + kl_coef · KL(logp, ref) − entropy_coef · H

π_old is the trainer's log-prob before this update (`old`, or logp itself when strictly
on-policy); the truncated importance weight is a constant of the gradient. Given the
rollout's behaviour log-probs, the stats also report the rollout/trainer mismatch.

and the batch loss is Σ token_weight · loss. `aggregation_weights` builds token_weight so
that summing over micro-batches and ranks gives exactly the batch loss of each mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .rows import accumulate_dw, chunk_logits, chunk_rows, logit_bytes, no_autocast, pick_rows

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass
class GRPOLossConfig:
    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO's clip-higher (Yu et al., arXiv 2503.14476)
    clip_c: float | None = None  # dual-clip constant for negative advantages (e.g. 3.0); None = off
    logratio_clamp: float = 20.0
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = 0.0
    tis_cap: float | None = None  # truncated importance sampling cap (needs behaviour log-probs); None = off

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"GRPOLossConfig.temperature must be > 0, got {self.temperature}")
        if not (0 <= self.clip_low < 1) or self.clip_high < 0:
            raise ValueError(f"GRPOLossConfig: need 0 <= clip_low < 1 and clip_high >= 0, "
                             f"got {self.clip_low}, {self.clip_high}")
        if self.clip_c is not None and self.clip_c <= 1:
            raise ValueError(f"GRPOLossConfig.clip_c must be > 1 (or None), got {self.clip_c}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"GRPOLossConfig.tis_cap must be > 0 (or None), got {self.tis_cap}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"GRPOLossConfig.kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")


# ---- aggregation -------------------------------------------------------------------
def aggregation_weights(loss_mask: torch.Tensor, seq_index: torch.Tensor, mode: str, *,
                        global_tokens: int | None = None, global_seqs: int | None = None,
                        norm_len: int | None = None, seq_tokens: torch.Tensor | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """token_weight [T] (in `dtype`) for one micro-batch.

    loss_mask [T] (1 on tokens in the loss), seq_index [T] (which sequence each token
    belongs to). global_tokens / global_seqs are the counts of loss tokens / sequences over
    the whole batch — every micro-batch on every rank — so that the sum of the micro-batch
    losses is the batch loss; they default to this micro-batch's own counts. seq_tokens
    (indexed by seq_index): each sequence's loss tokens over every rank, for a sequence cut
    across ranks (sequence parallelism); by default a sequence lies whole in the micro-batch
    and its tokens are counted here.

      token-mean                Σ_tokens loss / global_tokens
      seq-mean-token-mean       mean over sequences of each sequence's token mean
      seq-mean-token-sum        mean over sequences of each sequence's token sum
      seq-mean-token-sum-norm   Σ_tokens loss / (global_seqs · norm_len)   (Dr. GRPO: a
                                constant norm_len, e.g. the max response length)
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation {mode!r} unknown; choose one of {', '.join(AGGREGATIONS)}")
    mask = loss_mask.to(torch.float64)
    seq_index = seq_index.to(torch.long)
    n_seqs_local = int(torch.unique(seq_index[mask > 0]).numel())
    tokens = global_tokens if global_tokens is not None else int(mask.sum().item())
    seqs = global_seqs if global_seqs is not None else n_seqs_local
    if mode == "token-mean":
        w = mask / max(tokens, 1)
    elif mode == "seq-mean-token-mean":
        if seq_tokens is not None:
            per_seq = seq_tokens.to(device=mask.device, dtype=torch.float64)
        else:
            per_seq = torch.zeros(int(seq_index.max().item()) + 1 if seq_index.numel() else 1, dtype=torch.float64,
                                  device=mask.device).index_add_(0, seq_index, mask)
        w = mask / per_seq[seq_index].clamp(min=1) / max(seqs, 1)
    elif mode == "seq-mean-token-sum":
        w = mask / max(seqs, 1)
    else:
        if not norm_len:
            raise ValueError("seq-mean-token-sum-norm needs norm_len (e.g. the maximum response length)")
        w = mask / (max(seqs, 1) * norm_len)
    return w.to(dtype)


# ---- per-token math (shared by every backend) ----------------------------------------
MISMATCH_OVER = 0.1  # |trainer − rollout| log-prob gap counted by the mismatch_over stat


def grpo_token_terms(logp: torch.Tensor, entropy: torch.Tensor | None, adv: torch.Tensor,
                     old: torch.Tensor | None, ref: torch.Tensor | None, cfg: GRPOLossConfig,
                     behaviour: torch.Tensor | None = None):
    """-> (loss [C], dloss/dlogp [C], stats dict of [C] tensors), all fp32, hand-derived.
    Stats whose name starts with "max_" are reduced by max, the others by mean."""
    adv = adv.float()
    if old is None:  # strictly on-policy: r = exp(logp − sg(logp)) = 1, dr/dlogp = 1
        raw = torch.zeros_like(logp)
    else:
        raw = logp - old.float()
    log_ratio = raw.clamp(-cfg.logratio_clamp, cfg.logratio_clamp)
    ratio = torch.exp(log_ratio)
    ratio_passes = (raw.abs() <= cfg.logratio_clamp).float()  # clamp blocks the gradient outside
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    pg = torch.maximum(pg1, pg2)
    dpg = torch.where(pg1 >= pg2, -adv * ratio, torch.zeros_like(pg1))
    dual = torch.zeros_like(pg, dtype=torch.bool)
    if cfg.clip_c is not None:
        pg3 = -adv * cfg.clip_c
        dual = (adv < 0) & (pg3 < pg)
        pg = torch.where(dual, pg3, pg)
        dpg = torch.where(dual, torch.zeros_like(dpg), dpg)
    extra = {}
    if behaviour is not None:
        gap = (logp if old is None else old.float()) - behaviour.float()  # trainer − rollout, before this update
        extra = {"mismatch_abs": gap.abs(), "mismatch_over": (gap.abs() > MISMATCH_OVER).float(),
                 "max_mismatch_abs": gap.abs()}
        if cfg.tis_cap is not None:
            is_w = torch.exp(gap.clamp(max=math.log(cfg.tis_cap))).clamp(max=cfg.tis_cap)
            pg, dpg = pg * is_w, dpg * is_w
            extra.update(tis_weight=is_w, tis_capped=(gap >= math.log(cfg.tis_cap)).float())
    elif cfg.tis_cap is not None:
        raise ValueError("GRPOLossConfig.tis_cap is set but no behaviour (rollout) log-probs were given")
    loss = pg
    dlogp = dpg * ratio_passes
    kl = None
    if cfg.kl_coef and ref is not None:
        kl, dkl = _kl_and_grad(logp, ref.float(), cfg.kl_estimator)
        loss = loss + cfg.kl_coef * kl
        dlogp = dlogp + cfg.kl_coef * dkl
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * entropy
    stats = {
        "ratio": ratio,
        "clip_low": ((adv < 0) & (ratio < 1 - cfg.clip_low)).float(),
        "clip_high": ((adv > 0) & (ratio > 1 + cfg.clip_high)).float(),
        "clip_dual": dual.float(),
    }
    if kl is not None:
        stats["kl"] = kl
    stats.update(extra)
    return loss, dlogp, stats


def _kl_and_grad(logp: torch.Tensor, ref: torch.Tensor, estimator: str):
    if estimator == "k1":
        return logp - ref, torch.ones_like(logp)
    if estimator == "k2":
        diff = logp - ref
        return 0.5 * diff * diff, diff
    raw = ref - logp  # k3: e^x − x − 1 with x = ref − logp, x clamped to ±20, value to ±10
    x = raw.clamp(-20.0, 20.0)
    value = torch.exp(x) - x - 1
    passes = (raw.abs() <= 20.0) & (value <= 10.0)
    return value.clamp(-10.0, 10.0), torch.where(passes, -(torch.exp(x) - 1), torch.zeros_like(x))


# ---- the fused op -----------------------------------------------------------------------
class _FusedGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, adv, token_weight, old, ref, behaviour, cfg, rows, chunk, stats_out,
                logits):
        with no_autocast(hidden.device):  # the products in the inputs' dtype, as the gradients assume
            return _FusedGRPOLoss._forward(ctx, hidden, weight, targets, adv, token_weight, old, ref, behaviour, cfg,
                                           rows, chunk, stats_out, logits)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, adv, token_weight, old, ref, behaviour, cfg, rows, chunk, stats_out,
                 logits):
        t = hidden.shape[0]
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_hidden = torch.empty_like(hidden) if need_dh else None
        d_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_dw else None
        inv_temp = 1.0 / cfg.temperature
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        sums: dict[str, torch.Tensor] = {}
        maxes: dict[str, torch.Tensor] = {}
        for s in range(0, t, chunk):
            e = min(t, s + chunk)
            h = hidden[s:e]
            z = chunk_logits(h, weight, logits)  # [C, V]: GEMM 1
            # entropy is always computed: the loss may need it and the stats always report it
            lse, logp, ent = rows.stats(z, targets[s:e], inv_temp, with_entropy=True)
            tok_loss, dlogp, tok_stats = grpo_token_terms(
                logp, ent, adv[s:e], None if old is None else old[s:e], None if ref is None else ref[s:e], cfg,
                None if behaviour is None else behaviour[s:e])
            w = token_weight[s:e].float()
            loss += (w * tok_loss).sum()
            tok_stats.update(logprob=logp, entropy=ent)
            for k, v in tok_stats.items():  # every token here is a loss token (the caller dropped the rest)
                if k.startswith("max_"):
                    maxes[k] = torch.maximum(maxes[k], v.max()) if k in maxes else v.max()
                else:
                    sums[k] = sums.get(k, 0.0) + v.sum()
            if need_dh or need_dw:
                g_ent = (-cfg.entropy_coef * w) if cfg.entropy_coef else None
                dz = rows.grad(z, targets[s:e], lse, ent, w * dlogp, g_ent, inv_temp).to(hidden.dtype)
                if need_dh:
                    torch.matmul(dz, weight, out=d_hidden[s:e])  # GEMM 2
                if need_dw:
                    accumulate_dw(d_weight, dz, h)  # GEMM 3
                del dz
            del z  # free this chunk's logits before the next GEMM allocates the next ones
        stats_out.update({k: (v / max(t, 1)).detach() for k, v in sums.items()})
        stats_out.update({k: v.detach() for k, v in maxes.items()})
        stats_out["tokens"] = torch.tensor(t)
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        d_hidden, d_weight = ctx.saved_tensors
        # scale in place: the stored gradients are handed over, not copied (dW is [V, H] fp32)
        gh = d_hidden.mul_(grad_loss.to(d_hidden.dtype)) if d_hidden is not None else None
        gw = d_weight.mul_(grad_loss).to(ctx.weight_dtype) if d_weight is not None else None
        return gh, gw, None, None, None, None, None, None, None, None, None, None, None


def linear_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                     advantages: torch.Tensor, token_weight: torch.Tensor,
                     old_logprob: torch.Tensor | None = None, ref_logprob: torch.Tensor | None = None,
                     behaviour_logprob: torch.Tensor | None = None,
                     cfg: GRPOLossConfig | None = None, backend: str | None = None,
                     chunk_tokens: int | None = None,
                     logits: str = "fp32") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """hidden [T, H], weight [V, H], targets [T] (the token that follows each position),
    advantages [T], token_weight [T] -> (loss scalar fp32, stats).

    Tokens with token_weight 0 (prompts, padding, filtered samples) are dropped before any
    GEMM. stats: means over the loss tokens of logprob, entropy, ratio, kl (when on) and the
    fractions clipped low / high / by the dual clip, plus `tokens`. With behaviour_logprob
    (the rollout's log-probs of the same tokens): mismatch_abs (mean |trainer − rollout|),
    max_mismatch_abs, mismatch_over (share of tokens over 0.1) and, with cfg.tis_cap,
    tis_weight (mean) and tis_capped (share at the cap). logits: "fp32" (default) or "compute",
    the chunk logits' dtype for half-precision inputs (kernels.rows.chunk_logits)."""
    cfg = cfg or GRPOLossConfig()
    _check_shapes(hidden, weight, targets, advantages=advantages, token_weight=token_weight,
                  old_logprob=old_logprob, ref_logprob=ref_logprob, behaviour_logprob=behaviour_logprob)
    keep = (token_weight != 0).nonzero().squeeze(-1)
    if keep.numel() < token_weight.numel():
        hidden, targets, advantages, token_weight = hidden[keep], targets[keep], advantages[keep], token_weight[keep]
        old_logprob = None if old_logprob is None else old_logprob[keep]
        ref_logprob = None if ref_logprob is None else ref_logprob[keep]
        behaviour_logprob = None if behaviour_logprob is None else behaviour_logprob[keep]
    if cfg.tis_cap is not None and behaviour_logprob is None:
        raise ValueError("cfg.tis_cap is set: pass behaviour_logprob (the rollout's log-probs of the targets)")
    rows = pick_rows(backend, hidden.device)
    chunk = chunk_rows(hidden.shape[0], weight.shape[0], hidden.device, chunk_tokens,
                       logit_bytes(rows, hidden.dtype, logits))
    stats: dict[str, torch.Tensor] = {}
    loss = _FusedGRPOLoss.apply(hidden.contiguous(), weight, targets, advantages, token_weight,
                    old_logprob, ref_logprob, behaviour_logprob, cfg, rows, max(chunk, 1), stats, logits)
    return loss, stats


def _check_shapes(hidden, weight, targets, **per_token):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [T, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    t = hidden.shape[0]
    for name, tensor in {"targets": targets, **per_token}.items():
        if tensor is not None and tuple(tensor.shape) != (t,):
            raise ValueError(f"{name} must have shape [{t}] (one per token), got {tuple(tensor.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
