"""Prefill over the paged KV cache: every path equals a dense reference.

Paths: a sequence's first chunk (its own keys, causal), a chunk that continues a cached
sequence (keys gathered by slot; on CPU a boolean offset mask, on CUDA expanded heads with a
lower-right causal bias), and flash-attn's varlen function over the whole step (CUDA only;
here a stand-in with the documented semantics checks our cu_seqlens and key gather).
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from engine.model.attention import causal_sdpa
from engine.rollout import paged
from engine.rollout.paged import CacheConfig, PagedAttention


def _dense(q, k, v, scale, q_offset):
    """q [Tq, Hq, D] over k, v [Tk, Hkv, D]; query i sees keys 0 .. q_offset + i. float64."""
    hq, hkv = q.shape[1], k.shape[1]
    kk = k.double().repeat_interleave(hq // hkv, dim=1)
    vv = v.double().repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    allowed = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + q_offset
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), vv)


@pytest.mark.parametrize("fused_offset", [False, True])
@pytest.mark.parametrize("tq,tk,hq,hkv", [(5, 12, 6, 2), (1, 9, 4, 4), (7, 7, 3, 1), (16, 40, 8, 2)])
def test_causal_sdpa_with_an_offset_equals_the_dense_reference(fused_offset, tq, tk, hq, hkv):
    g = torch.Generator().manual_seed(tq * 100 + tk)
    q, k, v = (torch.randn(t, h, 16, generator=g) for t, h in ((tq, hq), (tk, hkv), (tk, hkv)))
    out = causal_sdpa(q, k, v, 0.25, q_offset=tk - tq, fused_offset=fused_offset)
    torch.testing.assert_close(out.double(), _dense(q, k, v, 0.25, tk - tq), rtol=1e-5, atol=1e-5)
    if fused_offset and tq > 1 and tq < tk:
        with pytest.raises(ValueError, match="q_offset = Tk - Tq"):
            causal_sdpa(q, k, v, 0.25, q_offset=tk - tq - 1, fused_offset=True)


@pytest.mark.parametrize("fused_offset", [False, True])
@pytest.mark.parametrize("tq,tk", [(5, 12), (7, 7), (1, 9)])
def test_causal_sdpa_with_expanded_kv_heads_equals_the_dense_reference(monkeypatch, fused_offset, tq, tk):
    """fp32 on a GPU, SDPA gets the K/V heads expanded instead of enable_gqa (no fused kernel takes
    GQA in fp32 there): the same attention, each branch (causal, one token, offset)."""
    from engine.model import attention

    assert attention.expand_kv_for_sdpa("cuda", torch.float32) and not attention.expand_kv_for_sdpa("cuda",
                                                                                                 torch.bfloat16)
    assert not attention.expand_kv_for_sdpa("cpu", torch.float32)
    expanded = []
    monkeypatch.setattr(attention, "expand_kv_for_sdpa", lambda *a: expanded.append(a) or True)
    g = torch.Generator().manual_seed(tq * 100 + tk)
    q, k, v = (torch.randn(t, h, 16, generator=g) for t, h in ((tq, 6), (tk, 2), (tk, 2)))
    out = causal_sdpa(q, k, v, 0.25, q_offset=tk - tq, fused_offset=fused_offset)
    assert expanded == [("cpu", torch.float32)]
    torch.testing.assert_close(out.double(), _dense(q, k, v, 0.25, tk - tq), rtol=1e-5, atol=1e-5)


class _Model:  # what PagedKVCache reads off a model
    def __init__(self, layers, hq, hkv, d):
        self.config = types.SimpleNamespace(num_layers=layers, num_heads=hq, num_kv_heads=hkv, head_dim=d)
        self.embed_tokens = types.SimpleNamespace(weight=torch.zeros(1, dtype=torch.float32))


def _fake_flash_attn(calls):
    """flash_attn.flash_attn_varlen_func as documented (causal aligned bottom-right when the
    key sequence is longer than the query sequence), written densely."""
    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
        assert causal
        calls.append((cu_q.tolist(), cu_k.tolist(), max_q, max_k))
        outs = []
        for i in range(len(cu_q) - 1):
            a, b, c, e = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
            assert b - a <= max_q and e - c <= max_k
            outs.append(_dense(q[a:b], k[c:e], v[c:e], softmax_scale, (e - c) - (b - a)).to(q.dtype))
        return torch.cat(outs)
    return types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)


@pytest.mark.parametrize("varlen", [False, True])
def test_paged_prefill_equals_the_dense_reference(monkeypatch, varlen):
    """Three sequences in one prefill step: a first chunk (nothing cached), a chunk after 13
    cached tokens (not block aligned) and one after 32 (aligned), through random block tables."""
    calls = []
    if varlen:
        monkeypatch.setattr(paged, "_flash_varlen", lambda device, dtype: True)
        monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn(calls))
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, bs = 6, 2, 16, 8
    cache = paged.PagedKVCache(_Model(1, hq, hkv, d), CacheConfig(block_size=bs, num_blocks=40))
    cached, new = [0, 13, 32], [11, 6, 9]
    perm = torch.randperm(40, generator=g).tolist()
    tables, used = [], 0
    for c, n in zip(cached, new):
        nb = -(-(c + n) // bs)
        tables.append(perm[used:used + nb])
        used += nb
    history = [torch.randn(2, c, hkv, d, generator=g) for c in cached]  # earlier chunks' K, V
    for table, (kh, vh) in zip(tables, history):  # write them into the cache by slot
        for t in range(kh.shape[0]):
            cache.k[0, table[t // bs], t % bs], cache.v[0, table[t // bs], t % bs] = kh[t], vh[t]
    total = sum(new)
    q, k, v = torch.randn(total, hq, d, generator=g), torch.randn(total, hkv, d, generator=g), \
        torch.randn(total, hkv, d, generator=g)
    ctx = PagedAttention(cache, tables, cached, new)
    out = ctx.attend(0, q, k, v)
    start = 0
    for (kh, vh), c, n in zip(history, cached, new):
        keys, values = torch.cat([kh, k[start:start + n]]), torch.cat([vh, v[start:start + n]])
        want = _dense(q[start:start + n], keys, values, d ** -0.5, c)
        torch.testing.assert_close(out[start:start + n].double(), want, rtol=1e-5, atol=1e-5)
        start += n
    if varlen:  # one call for the whole step, per-sequence key spans cached + new
        assert calls == [([0, 11, 17, 26], [0, 11, 30, 71], 11, 41)]


def test_the_kv_cache_is_sized_after_the_allocator_lets_go(monkeypatch):
    order = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: order.append("sync"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: order.append("empty_cache"))

    def mem_get_info(device=None):
        order.append("mem_get_info")
        return (10 << 30) if "empty_cache" in order else (2 << 30), 80 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert paged.cuda_cache_budget(torch.device("cuda", 0), 0.5) == 5 << 30
    assert order == ["sync", "empty_cache", "mem_get_info"]
