"""RMSNorm as one Triton kernel, for inference on a GPU (the rollout's prefill and decode steps).

    rms_norm_triton(x [..., H], weight [H], eps) -> [..., H]
    add_rms_norm_triton(x, delta, weight, eps) -> (x + delta, norm(x + delta))

engine.model.model.RMSNorm's function: statistics in fp32 whatever the activation dtype,
y = x · rsqrt(mean(x²) + eps) rounded to x's dtype, then weight · y in the dtype torch's
promotion gives (bf16 · bf16 → bf16, computed in fp32 and rounded once). In torch that is
eight kernels (the fp32 copy, the square, the mean, + eps, rsqrt, the product, the cast,
the weight); in a batch-64 decode step of a 28-layer model, 57 norms are ~450 launches. Here
it is one launch a norm: one program per row, the row held in registers (H up to 16,384).
The second form also takes the residual add that precedes every norm of a decoder but the
first (h + attention, h + MLP): one launch instead of two, and the sum is read once.
Only the mean's summation order differs from torch's. No backward: the trainer, which needs
gradients, keeps the torch module (engine.model.model takes this path only in inference mode,
on CUDA, and where $LONGRL_FUSED is not "torch": the trainer's no-grad old and reference
log-probs keep the update's own norm, so the first ratio stays exactly 1). Runs on CPU under
TRITON_INTERPRET=1 for the tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 16384  # a row in one program's registers


@triton.jit
def _round(v, dtype: tl.constexpr):
    """fp32 v -> dtype, rounded to nearest even. bf16 by hand: the interpreter's conversion
    truncates (a GPU's rounds to nearest even); the rounded fp32 value then converts exactly."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536: the mask 0xFFFF0000
        # a NaN stays one: a GPU's NaN is 0x7FFFFFFF, which the rounding would carry into -0.0
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    return v.to(dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, d_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_d, stride_o, stride_s, H, eps,
                     BLOCK_H: tl.constexpr, RESIDUAL: tl.constexpr):
    """One row: y = norm(x) or, with RESIDUAL, s = x + d (stored, rounded to sum_ptr's dtype) and y = norm(s).
    Without RESIDUAL, sum_ptr is x_ptr (its dtype is the norm's input dtype; nothing is stored there)."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    ok = cols < H
    x32 = tl.load(x_ptr + r * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if RESIDUAL:  # the residual add, rounded once as torch's h + delta is, then normalised from that value
        d32 = tl.load(d_ptr + r * stride_d + cols, mask=ok, other=0.0).to(tl.float32)
        s = _round(x32 + d32, sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + r * stride_s + cols, s, mask=ok)
        x32 = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / H + eps)  # torch.rsqrt is the approximate one too
    y = _round(x32 * rstd, sum_ptr.dtype.element_ty)  # in the input's dtype, as torch casts back before the weight
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    tl.store(out_ptr + r * stride_o + cols, _round(w.to(tl.float32) * y.to(tl.float32), out_ptr.dtype.element_ty),
             mask=ok)


def _rows(x: torch.Tensor, h: int) -> torch.Tensor:
    rows = x.reshape(-1, h)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _check(h: int, weight: torch.Tensor) -> None:
    if weight.shape != (h,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match the hidden size {h}")
    if h > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {h} > {MAX_HIDDEN}, more than one program's registers hold")


def _launch(rows, delta, weight, out, sums, eps: float) -> None:
    if rows.shape[0]:
        h = rows.shape[1]
        block = triton.next_power_of_2(h)
        residual = delta is not None
        _rms_norm_kernel[(rows.shape[0],)](rows, delta if residual else rows, weight.contiguous(), out,
                                           sums if residual else rows, rows.stride(0),
                                           delta.stride(0) if residual else 0, out.stride(0),
                                           sums.stride(0) if residual else 0, h, float(eps), BLOCK_H=block,
                                           RESIDUAL=residual, num_warps=4 if block <= 2048 else 8)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The module docstring's function over the last dimension of x."""
    h = x.shape[-1]
    _check(h, weight)
    rows = _rows(x, h)
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _launch(rows, None, weight, out, None, eps)
    return out.view(*x.shape[:-1], h)


def add_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, norm(s)) with s = x + delta, in one launch: a decoder layer's residual add and the norm
    that reads its result (the post-attention norm, or the next layer's input norm). s is rounded
    to torch's promotion of the two dtypes, as `x + delta` is, and the norm reads that value."""
    h = x.shape[-1]
    _check(h, weight)
    if delta.shape != x.shape:
        raise ValueError(f"add_rms_norm: delta {tuple(delta.shape)} does not match x {tuple(x.shape)}")
    rows, drows = _rows(x, h), _rows(delta, h)
    sums = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, delta.dtype), device=x.device)
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, sums.dtype), device=x.device)
    _launch(rows, drows, weight, out, sums, eps)
    return sums.view(x.shape), out.view(x.shape)
