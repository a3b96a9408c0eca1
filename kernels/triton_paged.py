"""Triton kernel of kernels.paged_attention (see there for the function it computes)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr,
                         stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_btb, stride_ob, stride_oh,
                         scale, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    kvh = h // GROUP
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + dims, mask=dmask, other=0.0).to(tl.float32)
    n = tl.load(lens_ptr + b)
    rows = tl.arange(0, BLOCK_SIZE)
    m = float("-inf")
    s = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(0, tl.cdiv(n, BLOCK_SIZE)):
        block = tl.load(bt_ptr + b * stride_btb + j).to(tl.int64)
        tok_mask = (j * BLOCK_SIZE + rows) < n
        offs = block * stride_kb + rows[:, None] * stride_kt + kvh * stride_kh + dims[None, :]
        tile_mask = tok_mask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + offs, mask=tile_mask, other=0.0).to(tl.float32)
        scores = tl.sum(k * q[None, :], axis=1) * scale
        scores = tl.where(tok_mask, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.where(tok_mask, tl.exp(scores - m_new), 0.0)
        v = tl.load(v_ptr + offs, mask=tile_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        s = s * alpha + tl.sum(p, axis=0)
        m = m_new
    out = acc / s
    tl.store(out_ptr + b * stride_ob + h * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dmask)


def paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale):
    b, hq, d = q.shape
    _, block_size, hkv, d2 = k_cache.shape
    if d2 != d or hq % hkv:
        raise ValueError(f"paged attention: q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}")
    if block_size & (block_size - 1):
        raise ValueError(f"paged attention: block_size must be a power of two, got {block_size}")
    q = q.contiguous()
    bt = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    _paged_decode_kernel[(b, hq)](q, k_cache, v_cache, bt, lens, out,
                                  q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                  bt.stride(0), out.stride(0), out.stride(1), float(scale),
                                  GROUP=hq // hkv, BLOCK_SIZE=block_size, HEAD_DIM=d,
                                  BLOCK_D=triton.next_power_of_2(d))
    return out
