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

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_prefill_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_prefill_tokens and max_num_seqs must be >= 1")


class PagedKVCache:
    def __init__(self, model, cfg: CacheConfig):
        mc = model.config
        w = model.embed_tokens.weight
        self.block_size = cfg.block_size
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
        if num_blocks < 1:
            raise ValueError(f"KV cache budget too small: one block needs {per_block} bytes")
        self.num_blocks = int(num_blocks)
        self.bytes = self.num_blocks * per_block
        shape = (mc.num_layers, self.num_blocks, *self.shape_per_layer)
        # zeros: rows past a sequence's end are masked in attention but still multiplied by 0
        self.k = torch.zeros(shape, device=w.device, dtype=w.dtype)
        self.v = torch.zeros(shape, device=w.device, dtype=w.dtype)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        for src, dst in copies:
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]


def _decode_backend(device: torch.device) -> str:
    choice = os.environ.get("LONGRL_PAGED_BACKEND", "auto")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return choice


class PagedAttention:
    """Attention context for one scheduler step: sequence i feeds new[i] tokens after
    cached[i] tokens already in its blocks (tables[i])."""

    def __init__(self, cache: PagedKVCache, tables: list[list[int]], cached: list[int], new: list[int]):
        self.cache = cache
        bs = cache.block_size
        device = cache.k.device
        self.cached, self.new, self.tables = cached, new, tables
        slots = []
        for table, c, n in zip(tables, cached, new):
            pos = torch.arange(c, c + n)
            blocks = torch.tensor(table, dtype=torch.long)[pos // bs]
            slots.append(blocks * bs + pos % bs)
        self.slots = torch.cat(slots).to(device)
        self.decode = all(n == 1 for n in new)
        if self.decode:
            width = max(len(t) for t in tables)
            bt = torch.zeros(len(tables), width, dtype=torch.int32)
            for i, t in enumerate(tables):
                bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
            self.block_tables = bt.to(device)
            self.seq_lens = torch.tensor([c + n for c, n in zip(cached, new)], dtype=torch.int32, device=device)
            self.backend = _decode_backend(device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.cache.k[layer], self.cache.v[layer]  # [NB, BS, Hkv, D]
        hkv, d = kc.shape[2], kc.shape[3]
        kc.view(-1, hkv, d)[self.slots] = k
        vc.view(-1, hkv, d)[self.slots] = v
        scale = q.shape[-1] ** -0.5
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
