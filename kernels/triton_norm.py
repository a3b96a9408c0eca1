"""RMSNorm as one Triton kernel, for inference on a GPU (the rollout's prefill and decode steps).

    rms_norm_triton(x [..., H], weight [H], eps) -> [..., H]

engine.model.model.RMSNorm's function: statistics in fp32 whatever the activation dtype,
y = x · rsqrt(mean(x²) + eps) rounded to x's dtype, then weight · y in the dtype torch's
promotion gives (bf16 · bf16 → bf16, computed in fp32 and rounded once). In torch that is
eight kernels (the fp32 copy, the square, the mean, + eps, rsqrt, the product, the cast,
the weight); in a batch-64 decode step of a 28-layer model, 57 norms are ~450 launches. Here
it is one launch a norm: one program per row, the row held in registers (H up to 16,384).
Only the mean's summation order differs from torch's. No backward: the trainer, which needs
gradients, keeps the torch module (engine.model.model.RMSNorm takes this path only in
inference mode, on CUDA, and where $LONGRL_NORM is not "torch": the trainer's no-grad old and
reference log-probs keep the update's own norm, so the first ratio stays exactly 1). Runs on CPU under
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
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, H, eps, BLOCK_H: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    ok = cols < H
    x32 = tl.load(x_ptr + r * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / H + eps)  # torch.rsqrt is the approximate one too
    y = _round(x32 * rstd, x_ptr.dtype.element_ty)  # in x's dtype, as torch casts back before the weight
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    tl.store(out_ptr + r * stride_o + cols, _round(w.to(tl.float32) * y.to(tl.float32), out_ptr.dtype.element_ty),
             mask=ok)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The module docstring's function over the last dimension of x."""
    h = x.shape[-1]
    if weight.shape != (h,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match the hidden size {h}")
    if h > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {h} > {MAX_HIDDEN}, more than one program's registers hold")
    rows = x.reshape(-1, h)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(h)
        _rms_norm_kernel[(rows.shape[0],)](rows, weight.contiguous(), out, rows.stride(0), out.stride(0), h,
                                           float(eps), BLOCK_H=block, num_warps=4 if block <= 2048 else 8)
    return out.view(*x.shape[:-1], h)
