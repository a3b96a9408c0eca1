"""Fused linear -> per-token log-prob (and entropy), never building [T, V].

Forward walks the tokens in chunks: one GEMM for the chunk's logits, the stats row pass,
and only lse [T] (and entropy [T]) are kept. Backward recomputes each chunk's logits and
turns the incoming gradients of log-prob and entropy into d(logits) with the grad row
pass, then two GEMMs give dH and dW (fp32 accumulation). Use it for old / reference
log-probs (under no_grad: one GEMM per chunk) and wherever a generic log-prob is needed;
the policy loss has its own op (grpo_loss.py) that needs no recompute.
"""
from __future__ import annotations

import torch

from .grpo_loss import _check_shapes
from .rows import accumulate_dw, chunk_logits, chunk_rows, logit_bytes, no_autocast, pick_rows


class _FusedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, rows, chunk, logits):
        with no_autocast(hidden.device):  # the backward recomputes these logits: both in the inputs' dtype
            return _FusedLogprob._forward(ctx, hidden, weight, targets, temperature, with_entropy, rows, chunk,
                                          logits)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, temperature, with_entropy, rows, chunk, logits):
        t = hidden.shape[0]
        inv_temp = 1.0 / temperature
        lse = torch.empty(t, device=hidden.device, dtype=torch.float32)
        logp = torch.empty_like(lse)
        ent = torch.empty_like(lse) if with_entropy else None
        for s in range(0, t, chunk):
            e = min(t, s + chunk)
            z = chunk_logits(hidden[s:e], weight, logits)
            c_lse, c_logp, c_ent = rows.stats(z, targets[s:e], inv_temp, with_entropy=with_entropy)
            lse[s:e], logp[s:e] = c_lse, c_logp
            if with_entropy:
                ent[s:e] = c_ent
            del z
        ctx.save_for_backward(hidden, weight, targets, lse, ent if with_entropy else lse)
        ctx.cfg = (inv_temp, with_entropy, rows, chunk, logits)
        if with_entropy:
            return logp, ent
        ctx.mark_non_differentiable(lse)
        return logp, lse  # second output stands in for "no entropy"; the wrapper drops it

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        with no_autocast(ctx.saved_tensors[0].device):
            return _FusedLogprob._backward(ctx, grad_logp, grad_ent)

    @staticmethod
    def _backward(ctx, grad_logp, grad_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        inv_temp, with_entropy, rows, chunk, logits = ctx.cfg
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        t = hidden.shape[0]
        d_hidden = torch.empty_like(hidden) if need_dh else None
        d_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_dw else None
        if grad_logp is None:
            grad_logp = torch.zeros(t, device=hidden.device, dtype=torch.float32)
        use_ent = with_entropy and grad_ent is not None
        for s in range(0, t, chunk):
            e = min(t, s + chunk)
            h = hidden[s:e]
            z = chunk_logits(h, weight, logits)
            dz = rows.grad(z, targets[s:e], lse[s:e], ent[s:e] if use_ent else None,
                           grad_logp[s:e].float(), grad_ent[s:e].float() if use_ent else None,
                           inv_temp).to(hidden.dtype)
            if need_dh:
                torch.matmul(dz, weight, out=d_hidden[s:e])
            if need_dw:
                accumulate_dw(d_weight, dz, h)
            del z, dz  # one chunk of logits alive at a time
        gw = d_weight.to(weight.dtype) if d_weight is not None else None
        return d_hidden, gw, None, None, None, None, None, None


def linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   temperature: float = 1.0, with_entropy: bool = False, backend: str | None = None,
                   chunk_tokens: int | None = None,
                   logits: str = "fp32") -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden [T, H], weight [V, H], targets [T] -> (logprob [T] fp32, entropy [T] fp32 | None)
    of softmax(hidden @ weight.T / temperature). Differentiable in hidden and weight. The
    products run in the inputs' dtype, under torch.autocast too (cast the inputs to choose it);
    logits: "fp32" (the chunk's logits written in fp32 from half-precision inputs) or "compute"
    (in the inputs' dtype), kernels.rows.chunk_logits."""
    _check_shapes(hidden, weight, targets)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows = pick_rows(backend, hidden.device)
    chunk = chunk_rows(hidden.shape[0], weight.shape[0], hidden.device, chunk_tokens,
                       logit_bytes(rows, hidden.dtype, logits))
    logp, second = _FusedLogprob.apply(hidden.contiguous(), weight, targets, float(temperature),
                                       bool(with_entropy), rows, max(chunk, 1), logits)
    return logp, (second if with_entropy else None)
