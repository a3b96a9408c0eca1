"""Decode attention over a paged KV cache: one new query token per sequence.

    paged_decode_attention(q [B, Hq, D], k_cache, v_cache [num_blocks, block_size, Hkv, D],
                           block_tables [B, max_blocks] int32, seq_lens [B] int32, scale) -> [B, Hq, D]

Sequence b's keys are tokens 0 .. seq_lens[b]−1, token t living in block
block_tables[b, t // block_size] at row t % block_size. GQA: query head h reads KV head
h // (Hq / Hkv). The Triton kernel runs one program per (sequence, query head) and walks
the sequence's blocks with an online softmax in fp32; `paged_decode_attention_ref` is the
same function in plain torch (gather, then softmax), used on CPU and by the tests.
"""
from __future__ import annotations

import torch


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    b, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    lens = seq_lens.tolist()
    span = max(lens)
    blocks = block_tables[:, : (span + bs - 1) // bs].long()
    keys = k_cache[blocks].reshape(b, -1, hkv, d)[:, :span]  # [B, span, Hkv, D]
    values = v_cache[blocks].reshape(b, -1, hkv, d)[:, :span]
    mask = torch.arange(span, device=q.device)[None, :] < seq_lens[:, None].to(q.device)
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None, :], keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask[:, None, None, :],
        scale=scale, enable_gqa=hq != hkv)
    return out[:, :, 0, :]


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
    from .triton_paged import paged_decode_triton
    return paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale)
