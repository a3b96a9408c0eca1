"""The paged KV cache and the attention context the decoder uses during rollout.

The cache is two tensors per layer, [num_blocks, block_size, Hkv, D], sized from a byte
budget when a rollout starts and dropped when it ends, so the update gets the memory back.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

from ..model.attention import causal_sdpa


@dataclass
class CacheConfig:
    block_size: int = 16  # tokens per block (a multiple of 256 for flash-attn's paged API)
    num_blocks: int | None = None  # explicit size; else from the budgets below
    max_bytes: int | None = None  # explicit byte budget for K and V of all layers
    gpu_memory_fraction: float = 0.5  # of the free GPU memory when no explicit size is given
    cpu_bytes: int = 2 << 30  # CPU budget when no explicit size is given
    max_prefill_tokens: int = 2048  # tokens prefilled per scheduler step (chunked prefill)
    max_num_seqs: int = 256  # sequences decoding together
    decode_backend: str = "auto"  # auto: triton on CUDA, torch elsewhere; $LONGRL_PAGED_BACKEND overrides

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_prefill_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_prefill_tokens and max_num_seqs must be >= 1")
        if self.decode_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"decode_backend must be auto, torch or triton, got {self.decode_backend!r}")


class PagedKVCache:
    def __init__(self, model, cfg: CacheConfig, max_blocks: int | None = None):
        """max_blocks: the most this rollout can use; the cache is never sized past it."""
        mc = model.config
        w = model.embed_tokens.weight
        self.block_size = cfg.block_size
        self.decode_backend = cfg.decode_backend
        self.shape_per_layer = (cfg.block_size, mc.num_kv_heads, mc.head_dim)
        per_block = mc.num_layers * 2 * cfg.block_size * mc.num_kv_heads * mc.head_dim * w.element_size()
        if cfg.num_blocks:
            num_blocks = cfg.num_blocks
        else:
            if cfg.max_bytes:
                budget = cfg.max_bytes
            elif w.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(w.device)
                budget = int(free * cfg.gpu_memory_fraction)
            else:
                budget = cfg.cpu_bytes
            num_blocks = budget // per_block
        if max_blocks is not None and not cfg.num_blocks:
            num_blocks = min(num_blocks, max_blocks)
        if num_blocks < 1:
            raise ValueError(f"KV cache budget too small: one block needs {per_block} bytes")
        self.num_blocks = int(num_blocks)
        self.bytes = self.num_blocks * per_block
        shape = (mc.num_layers, self.num_blocks, *self.shape_per_layer)
        # zeros: rows past a sequence's end are masked in attention but still multiplied by 0
        self.k = torch.zeros(shape, device=w.device, dtype=w.dtype)
        self.v = torch.zeros(shape, device=w.device, dtype=w.dtype)
        # torch decode path: each group's prompt K^T / V laid out for batched matmuls, built at
        # the group's first decode step and reused until the rollout ends (the prompt never changes)
        self.prefix_store: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        for src, dst in copies:
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]


def _decode_backend(device: torch.device, configured: str = "auto") -> str:
    choice = os.environ.get("LONGRL_PAGED_BACKEND") or configured
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return choice


class PagedAttention:
    """Attention context for one scheduler step: sequence i feeds new[i] tokens after
    cached[i] tokens already in its blocks (tables[i]).

    Decode on the torch path uses shared-prefix ("cascade") attention when samples of a
    group decode together: prefix_lens[i] > 0 says sequence i's first prefix_lens[i] tokens
    are the prompt it shares with the other members of groups[i]. The prompt's keys are then
    read once per group, not once per sample, and each sample's own suffix is attended
    separately; the two partial results merge through their log-sum-exp."""

    def __init__(self, cache: PagedKVCache, tables: list[list[int]], cached: list[int], new: list[int],
                 prefix_lens: list[int] | None = None, groups: list[int] | None = None):
        self.cache = cache
        bs = cache.block_size
        device = cache.k.device
        self.cached, self.new, self.tables = cached, new, tables
        # plain ints, one tensor: a decode step touches one slot per sequence, and per-sequence
        # tensor ops here would cost more than the lookup itself
        self.slots = torch.tensor([table[p // bs] * bs + p % bs for table, c, n in zip(tables, cached, new)
                                   for p in range(c, c + n)], dtype=torch.long, device=device)
        self.decode = all(n == 1 for n in new)
        self.cascade = None
        if self.decode:
            self.backend = _decode_backend(device, cache.decode_backend)
            lens = [c + n for c, n in zip(cached, new)]
            shared = prefix_lens is not None and groups is not None and any(p > 0 for p in prefix_lens)
            if self.backend == "torch" and shared:
                self.cascade = _plan_cascade(tables, lens, prefix_lens, groups, bs, device)
            else:
                width = max(len(t) for t in tables)
                bt = torch.zeros(len(tables), width, dtype=torch.int32)
                for i, t in enumerate(tables):
                    bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
                self.block_tables = bt.to(device)
                self.seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.cache.k[layer], self.cache.v[layer]  # [NB, BS, Hkv, D]
        hkv, d = kc.shape[2], kc.shape[3]
        kc.view(-1, hkv, d)[self.slots] = k
        vc.view(-1, hkv, d)[self.slots] = v
        scale = q.shape[-1] ** -0.5
        if self.cascade is not None:
            return _cascade_decode(q, kc.view(-1, hkv, d), vc.view(-1, hkv, d), self.cascade, scale,
                                   self.cache.prefix_store, layer)
        if self.decode:
            fn = paged_decode_attention if self.backend == "triton" else paged_decode_attention_ref
            return fn(q, kc, vc, self.block_tables, self.seq_lens, scale)
        outs, start = [], 0
        bs = self.cache.block_size
        for table, c, n in zip(self.tables, self.cached, self.new):
            total = c + n
            idx = torch.tensor(table[: -(-total // bs)], dtype=torch.long, device=kc.device)
            keys = kc[idx].reshape(-1, hkv, d)[:total]
            values = vc[idx].reshape(-1, hkv, d)[:total]
            outs.append(causal_sdpa(q[start:start + n], keys, values, scale, q_offset=c))
            start += n
        return torch.cat(outs)


def _slot(table: list[int], position: int, bs: int) -> int:
    return table[position // bs] * bs + position % bs


def _plan_cascade(tables, lens, prefix_lens, groups, bs, device) -> dict:
    """Slot indices, built once per step: each group's shared prefix, and every sequence's
    suffix (padded to the longest, with a mask)."""
    members: dict[int, list[int]] = {}
    for i, (p, g) in enumerate(zip(prefix_lens, groups)):
        if p > 0:
            members.setdefault(g, []).append(i)
    prefix = []
    for group, idx in members.items():
        plen, table = prefix_lens[idx[0]], tables[idx[0]]
        rows = slice(idx[0], idx[-1] + 1) if idx == list(range(idx[0], idx[-1] + 1)) else torch.tensor(idx, device=device)
        key = (group, plen, table[0])  # the first block id tells a group from a later one
        prefix.append((rows, len(idx), key, (table, plen, bs)))  # slots built only on a store miss
    suffix_len = [n - p for n, p in zip(lens, prefix_lens)]
    width = max(suffix_len)
    suffix = [[_slot(table, min(p + j, n - 1), bs) for j in range(width)]
              for table, n, p in zip(tables, lens, prefix_lens)]
    mask = torch.arange(width)[None, :] < torch.tensor(suffix_len)[:, None]
    return {"prefix": prefix, "suffix_slots": torch.tensor(suffix, dtype=torch.long, device=device),
            "suffix_mask": mask.to(device)}


def _cascade_decode(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, plan: dict, scale: float,
                    store: dict | None = None, layer: int = 0):
    """q [B, Hq, D]; k_flat, v_flat [slots, Hkv, D] -> [B, Hq, D]. `store` keeps each
    group's prefix in matmul layout between steps."""
    b, hq, d = q.shape
    hkv = k_flat.shape[1]
    g = hq // hkv
    qh = q.float().view(b, hkv, g, d)
    # each sequence's own suffix: [B, Hkv, G, S]
    ks = k_flat[plan["suffix_slots"]].float().permute(0, 2, 3, 1)  # [B, Hkv, D, S]
    vs = v_flat[plan["suffix_slots"]].float().permute(0, 2, 1, 3)  # [B, Hkv, S, D]
    s2 = (qh @ ks) * scale
    s2 = s2.masked_fill(~plan["suffix_mask"][:, None, None, :], float("-inf"))
    m2 = s2.amax(-1, keepdim=True)
    p2 = torch.exp(s2 - m2)
    l2 = p2.sum(-1, keepdim=True)
    o2 = p2 @ vs  # [B, Hkv, G, D]
    m1 = torch.full_like(m2, float("-inf"))
    l1 = torch.zeros_like(l2)
    o1 = torch.zeros_like(o2)
    for idx, m, key, (table, plen, bs) in plan["prefix"]:
        cached = store.get((layer, key)) if store is not None else None
        if cached is None:  # the prompt's keys and values, read once for the whole group
            slots = torch.tensor([_slot(table, t, bs) for t in range(plen)], dtype=torch.long, device=q.device)
            cached = (k_flat[slots].float().permute(1, 2, 0).contiguous(),  # K^T [Hkv, D, P]
                      v_flat[slots].float().permute(1, 0, 2).contiguous())  # V [Hkv, P, D]
            if store is not None:
                store[(layer, key)] = cached
        kt, vp = cached
        qg = qh[idx].permute(1, 0, 2, 3).reshape(hkv, m * g, d)
        s1 = (qg @ kt) * scale  # [Hkv, m·G, P]
        mx = s1.amax(-1, keepdim=True)
        p1 = torch.exp(s1 - mx)
        part = (p1 @ vp).view(hkv, m, g, d).permute(1, 0, 2, 3)
        m1[idx] = mx.view(hkv, m, g, 1).permute(1, 0, 2, 3)
        l1[idx] = p1.sum(-1, keepdim=True).view(hkv, m, g, 1).permute(1, 0, 2, 3)
        o1[idx] = part
    top = torch.maximum(m1, m2)
    a1, a2 = torch.exp(m1 - top), torch.exp(m2 - top)
    out = (o1 * a1 + o2 * a2) / (l1 * a1 + l2 * a2)
    return out.view(b, hq, d).to(q.dtype)
