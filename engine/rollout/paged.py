"""The paged KV cache and the attention context the decoder uses during rollout.

The cache is two tensors per layer, [num_blocks, block_size, Hkv, D], sized from a byte
budget when a rollout starts and dropped when it ends, so the update gets the memory back.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch

from kernels.paged_attention import (paged_decode_attention, paged_decode_attention_ref, plan_items,
                                     plan_shared_prefix_from_lists, shared_prefix_decode_attention)

from ..model.attention import causal_sdpa, flash_attn_available
from .hostmem import to_device


LOOKAHEAD = ("auto", "on", "off")  # CacheConfig.lookahead's settings (engine.lookahead_on)


def check_lookahead(choice: str) -> str:
    if choice not in LOOKAHEAD:
        raise ValueError(f"lookahead must be auto, on or off, got {choice!r}")
    return choice


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
    share_prefix: bool = True  # decode reads a group's prompt KV once per step for all its samples
    cuda_graphs: str = "auto"  # auto | on | eager | off (engine/rollout/graphs.py); $LONGRL_CUDA_GRAPHS overrides
    # auto | on | off: a graph decode step is launched before the last one's tokens are read (the host's
    # work overlaps the device's; engine.lookahead_on); $LONGRL_LOOKAHEAD overrides
    lookahead: str = "auto"

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_prefill_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_prefill_tokens and max_num_seqs must be >= 1")
        if self.decode_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"decode_backend must be auto, torch or triton, got {self.decode_backend!r}")
        if self.cuda_graphs not in ("auto", "on", "eager", "off"):
            raise ValueError(f"cuda_graphs must be auto, on, eager or off, got {self.cuda_graphs!r}")
        check_lookahead(self.lookahead)


class PagedKVCache:
    def __init__(self, model, cfg: CacheConfig, max_blocks: int | None = None, spare: bool = False):
        """max_blocks: the most this rollout can use; the cache is never sized past it. spare: one
        more block past num_blocks that no sequence owns (`spare_block`: CUDA-graph padding rows)."""
        mc = model.config
        w = model.embed_tokens.weight
        self.block_size = cfg.block_size
        self.decode_backend = cfg.decode_backend
        self.share_prefix = cfg.share_prefix
        self.shape_per_layer = (cfg.block_size, mc.num_kv_heads, mc.head_dim)
        self.gqa_group = mc.num_heads // mc.num_kv_heads
        per_block = mc.num_layers * 2 * cfg.block_size * mc.num_kv_heads * mc.head_dim * w.element_size()
        if cfg.num_blocks:
            num_blocks = cfg.num_blocks
        else:
            if cfg.max_bytes:
                budget = cfg.max_bytes
            elif w.device.type == "cuda":
                budget = cuda_cache_budget(w.device, cfg.gpu_memory_fraction)
            else:
                budget = cfg.cpu_bytes
            num_blocks = budget // per_block
        if max_blocks is not None and not cfg.num_blocks:
            num_blocks = min(num_blocks, max_blocks)
        if num_blocks < 1:
            raise ValueError(f"KV cache budget too small: one block needs {per_block} bytes")
        self.num_blocks = int(num_blocks)
        self.bytes = self.num_blocks * per_block
        self.spare_block = self.num_blocks if spare else None
        shape = (mc.num_layers, self.num_blocks + spare, *self.shape_per_layer)
        # zeros: rows past a sequence's end are masked in attention but still multiplied by 0
        self.k = torch.zeros(shape, device=w.device, dtype=w.dtype)
        self.v = torch.zeros(shape, device=w.device, dtype=w.dtype)
        self.tables = DecodeTables(w.device)  # the decoding sequences' block tables, on the device
        # torch decode path, per layer: the prompts of the groups decoding, stacked for one
        # attention call, kept until the set of groups changes (the prompts never do)
        self.prefix_store: dict[int, tuple] = {}

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        for src, dst in copies:
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]


class DecodeTables:
    """The block tables of the sequences that decode, kept as the rows of one [rows, width] int32
    tensor on the cache's device and written incrementally: a decode step adds at most one block
    per sequence (or replaces its last, copy-on-write), so a step writes those few entries and
    gathers the batch's rows on the device, where rebuilding every table from Python lists costs
    O(batch x table width) host work and a [B, width] host-to-device copy per step (33 ms at 64
    sequences of 60K tokens on the Triton path: `python -m bench.decode_tables_case`).

    A sequence keeps its row from its first decode step until `drop`. Its row is rewritten from
    the first entry that may differ from what was written: none, the last (replaced), or all of
    it when the scheduler gave its blocks back since (Sequence.resets) or the table shrank."""

    def __init__(self, device: torch.device | str, rows: int = 64, width: int = 64):
        self.device = torch.device(device)
        self.table = torch.zeros(rows, width, dtype=torch.int32, device=self.device)
        self.row_of: dict[object, list[int]] = {}  # seq -> [row, its resets, entries written, last entry]
        self.free = list(range(rows - 1, -1, -1))
        self.entries_written = 0  # entries copied to the device so far (tests, benches)

    def _grow(self, rows: int, width: int) -> None:
        """At least [rows, width], doubling the dimension that grows."""
        r, w = self.table.shape
        new_rows = r if rows <= r else max(rows, 2 * r)
        new_width = w if width <= w else max(width, 2 * w)
        if (new_rows, new_width) != (r, w):
            table = torch.zeros(new_rows, new_width, dtype=torch.int32, device=self.device)
            table[:r, :w] = self.table
            self.table = table
            self.free = list(range(new_rows - 1, r - 1, -1)) + self.free

    def gather(self, seqs) -> torch.Tensor:
        """Bring the rows of `seqs` (objects with .table: list[int] and .resets) up to date ->
        their rows [B, longest] int32 on the device (zeros, or stale entries, past a shorter
        table: attention reads a sequence's table only up to its length)."""
        rs, cs, vs, rows = [], [], [], []
        longest = 1
        for seq in seqs:
            table = seq.table
            state = self.row_of.get(seq)
            if state is None:
                if not self.free:
                    self._grow(self.table.shape[0] + 1, 0)
                state = self.row_of[seq] = [self.free.pop(), -1, 0, -1]
            row, resets, n, last = state
            if resets != seq.resets or len(table) < n:
                start = 0
            elif n and table[n - 1] != last:
                start = n - 1
            else:
                start = n
            if start < len(table):
                rs += [row] * (len(table) - start)
                cs += range(start, len(table))
                vs += table[start:]
            state[1:] = seq.resets, len(table), table[-1] if table else -1
            rows.append(row)
            longest = max(longest, len(table))
        self._grow(0, longest)
        # to_device: a blocking host-to-device copy would wait for the device's queue (the step
        # launched ahead, engine.py's lookahead) before the host could go on
        if vs:
            idx = to_device(torch.tensor([rs, cs, vs], dtype=torch.long), self.device)
            self.table[idx[0], idx[1]] = idx[2].to(torch.int32)
            self.entries_written += len(vs)
        rows = to_device(torch.tensor(rows, dtype=torch.long), self.device)
        return self.table[:, :longest].index_select(0, rows)

    def drop(self, seq) -> None:
        """A finished sequence gives its row back."""
        state = self.row_of.pop(seq, None)
        if state is not None:
            self.free.append(state[0])


def cuda_cache_budget(device: torch.device, fraction: float) -> int:
    """Bytes for the KV cache: a fraction of the device's free memory, read after handing
    PyTorch's cached blocks back to the driver (the update's activations and logits chunks
    stay cached in the allocator, and the driver counts them as used until released)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * fraction)


def _decode_backend(device: torch.device, configured: str = "auto") -> str:
    choice = os.environ.get("LONGRL_PAGED_BACKEND") or configured
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return choice


class PagedAttention:
    """Attention context for one scheduler step: sequence i feeds new[i] tokens after
    cached[i] tokens already in its blocks (tables[i]).

    Decode uses shared-prefix attention when samples of a group decode together:
    prefix_lens[i] > 0 says sequence i's first prefix_lens[i] tokens are the prompt it shares
    with the other members of groups[i]. The prompt's keys are then read once per group, not
    once per sample, and each sample's own suffix is attended separately; the two partial
    results merge through their log-sum-exp. On CPU (torch backend) that is one fused SDPA call
    over every group's prompt and one bmm per KV head over the suffixes, per layer
    (`_cascade_decode`); on the Triton backend the split-K kernels of kernels/paged_attention.py.
    CacheConfig.share_prefix = False turns it off (benchmarks).

    block_tables: a decode step's tables already on the device as [B, W] int32
    (`DecodeTables.gather`, what the engine passes); None builds them from `tables`."""

    def __init__(self, cache: PagedKVCache, tables: list[list[int]], cached: list[int], new: list[int],
                 prefix_lens: list[int] | None = None, groups: list[int] | None = None,
                 block_tables: torch.Tensor | None = None):
        self.cache = cache
        bs = cache.block_size
        device = cache.k.device
        # plain ints, one tensor: a decode step touches one slot per sequence, and per-sequence
        # tensor ops here would cost more than the lookup itself
        self.slots = torch.tensor([table[p // bs] * bs + p % bs for table, c, n in zip(tables, cached, new)
                                   for p in range(c, c + n)], dtype=torch.long, device=device)
        self.decode = all(n == 1 for n in new)
        self.cascade = None
        if self.decode:
            self.backend = _decode_backend(device, cache.decode_backend)
            lens = [c + n for c, n in zip(cached, new)]
            shared = (cache.share_prefix and prefix_lens is not None and groups is not None
                      and any(p > 0 for p in prefix_lens))
            if self.backend == "torch" and shared and device.type == "cpu":
                self.cascade = _plan_cascade(tables, lens, prefix_lens, groups, bs, device, block_tables)
            else:
                self.block_tables = (_block_table(tables, torch.int32).to(device) if block_tables is None
                                     else block_tables)
                self.seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
                self.shared = shared and self.backend == "triton"
                if self.shared:  # the shared-prefix kernels' work items, once for every layer, with no device sync
                    self.prefix_plan = plan_shared_prefix_from_lists(prefix_lens, groups, lens, cache.gqa_group, device)
        else:
            self._plan_prefill(tables, cached, new, bs, device)

    @classmethod
    def on_device(cls, cache: PagedKVCache, slots: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                  plan=None) -> PagedAttention:
        """A decode step's context from tensors already on the device, for the Triton kernels (the
        CUDA-graph step: nothing here reads a host list). plan: a SharedPrefixPlan, or None for
        plain paged attention."""
        self = cls.__new__(cls)
        self.cache, self.slots, self.decode, self.cascade, self.backend = cache, slots, True, None, "triton"
        self.block_tables, self.seq_lens = block_tables, seq_lens
        self.shared, self.prefix_plan = plan is not None, plan
        return self

    def _plan_prefill(self, tables, cached, new, bs, device) -> None:
        """Index tensors for a prefill step, built once and used by every layer: each chunk that
        continues a cached sequence gathers its keys by slot; a sequence's first chunk attends to
        its own new keys as they are. With flash-attn (CUDA) the step is one varlen call over all
        sequences (separate q / k cu_seqlens, bottom-right causal), keys gathered by one index."""
        self.varlen = _flash_varlen(device, self.cache.k.dtype)
        rows, start = [], 0
        key_slots, k_lens = [], []
        for table, c, n in zip(tables, cached, new):
            total = c + n
            slots = None
            if c or self.varlen:
                slots = _table_slots(table, total, bs)
                key_slots.append(slots)
                slots = None if self.varlen else slots.to(device)
            rows.append((start, n, c, slots))
            k_lens.append(total)
            start += n
        self.prefill_rows = rows
        if self.varlen:
            self.key_slots = torch.cat(key_slots).to(device)
            self.cu_q = torch.tensor([0, *itertools.accumulate(new)], dtype=torch.int32, device=device)
            self.cu_k = torch.tensor([0, *itertools.accumulate(k_lens)], dtype=torch.int32, device=device)
            self.max_q, self.max_k = max(new), max(k_lens)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.cache.k[layer], self.cache.v[layer]  # [NB, BS, Hkv, D]
        hkv, d = kc.shape[2], kc.shape[3]
        kc.view(-1, hkv, d)[self.slots] = k
        vc.view(-1, hkv, d)[self.slots] = v
        return self._attend_stored(layer, q, k, v)

    def attend_rotating(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> torch.Tensor:
        """`attend` for q and k not yet rotated: the rotation and this step's K/V write are one
        launch (kernels.triton_pointwise.rope_store_triton; the model calls this on a GPU in
        inference mode)."""
        from kernels.triton_pointwise import rope_store_triton

        kc, vc = self.cache.k[layer], self.cache.v[layer]
        hkv, d = kc.shape[2], kc.shape[3]
        q, k = rope_store_triton(q, k, v, cos, sin, kc.view(-1, hkv, d), vc.view(-1, hkv, d), self.slots)
        return self._attend_stored(layer, q, k, v)

    def _attend_stored(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention once this step's k, v are in the cache."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        hkv, d = kc.shape[2], kc.shape[3]
        scale = q.shape[-1] ** -0.5
        if self.cascade is not None:
            return _cascade_decode(q, kc.view(-1, hkv, d), vc.view(-1, hkv, d), self.cascade, scale,
                                   self.cache.prefix_store, layer)
        if self.decode:
            if self.backend != "triton":
                return paged_decode_attention_ref(q, kc, vc, self.block_tables, self.seq_lens, scale)
            if not self.shared:
                return paged_decode_attention(q, kc, vc, self.block_tables, self.seq_lens, scale)
            return shared_prefix_decode_attention(q, kc, vc, self.block_tables, self.seq_lens, None, None, scale,
                                                  plan=self.prefix_plan)
        k_flat, v_flat = kc.view(-1, hkv, d), vc.view(-1, hkv, d)
        if self.varlen:
            from flash_attn import flash_attn_varlen_func
            keys, values = _rows(k_flat, self.key_slots), _rows(v_flat, self.key_slots)
            return flash_attn_varlen_func(q, keys, values, self.cu_q, self.cu_k, self.max_q, self.max_k,
                                          softmax_scale=scale, causal=True)
        outs = []
        for start, n, c, slots in self.prefill_rows:
            if slots is None:  # the sequence's first chunk: its keys are the ones just computed
                keys, values = k[start:start + n], v[start:start + n]
            else:
                keys, values = _rows(k_flat, slots), _rows(v_flat, slots)
            outs.append(causal_sdpa(q[start:start + n], keys, values, scale, q_offset=c))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _block_table(tables: list[list[int]], dtype: torch.dtype) -> torch.Tensor:
    """Block tables as one [B, longest] tensor (zeros past a shorter table), on the host."""
    bt = torch.zeros(len(tables), max(len(t) for t in tables), dtype=dtype)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t, dtype=dtype)
    return bt


def _table_slots(table: list[int], n: int, bs: int) -> torch.Tensor:
    """The cache slots of a sequence's tokens 0 .. n-1 (int64, on the host)."""
    blocks = torch.tensor(table[: -(-n // bs)], dtype=torch.long)
    return (blocks[:, None] * bs + torch.arange(bs)).flatten()[:n]


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] along dim 0 for an index of any shape, by index_select: on CPU several times
    faster than advanced indexing for the row gathers of decode (suffix K/V, stacked queries)."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


def _flash_varlen(device: torch.device, dtype: torch.dtype) -> bool:
    """Prefill through flash-attn's varlen function: a GPU, half precision, flash-attn importable."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_attn_available()


def _plan_cascade(tables, lens, prefix_lens, groups, bs, device, block_tables=None) -> dict:
    """Index tensors, built once per step. The groups whose samples share a prompt are stacked
    for one attention call: rows [Ng, Mmax] are each group's members (B, a zero query row, pads
    a group with fewer members), `where` [B] puts each sequence's row of the stacked result
    back (Ng·Mmax, a row of weight zero, for a sequence that shares nothing). Every sequence's
    own suffix is padded to the longest, with an additive mask."""
    b = len(tables)
    members = plan_items(prefix_lens, groups, cap=b)  # each group whole, members in batch order
    width = max(n - p for n, p in zip(lens, prefix_lens))
    bt = _block_table(tables, torch.long) if block_tables is None else block_tables.long()
    start = torch.tensor(prefix_lens, dtype=torch.long)[:, None]
    end = torch.tensor(lens, dtype=torch.long)[:, None]
    pos = start + torch.arange(width)[None, :]
    valid = pos < end
    pos = torch.minimum(pos, end - 1)
    slots = bt.gather(1, pos // bs) * bs + pos % bs
    mask = torch.zeros(valid.shape).masked_fill_(~valid, float("-inf"))
    plan = {"suffix_slots": slots.to(device), "suffix_mask": mask[:, None, None, :].to(device), "groups": None}
    if members:
        mmax = max(len(idx) for idx in members)
        rows = torch.full((len(members), mmax), b, dtype=torch.long)
        where = torch.full((b,), len(members) * mmax, dtype=torch.long)
        for gi, idx in enumerate(members):
            rows[gi, : len(idx)] = torch.tensor(idx)
            where[idx] = gi * mmax + torch.arange(len(idx))
        # the first block id tells a group from a later one that reuses its request index
        key = tuple((groups[idx[0]], prefix_lens[idx[0]], tables[idx[0]][0]) for idx in members)
        sources = [(tables[idx[0]], prefix_lens[idx[0]]) for idx in members]
        plan["groups"] = {"key": key, "sources": sources, "rows": rows.to(device), "where": where.to(device), "bs": bs}
    return plan


def _attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None):
    """q [N, H, L, D], k, v [N, H, S, D] -> (out [N, H, L, D], log-sum-exp [N, H, L]): torch's
    fused CPU attention kernel, which returns the log-sum-exp that merging partials needs."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                       scale=scale)


def _stack_prefixes(k_flat, v_flat, groups: dict):
    """The groups' prompts K / V stacked [Ng, Hkv, Pmax, D] (zeros past a shorter prompt, masked)."""
    bs = groups["bs"]
    plens = [p for _, p in groups["sources"]]
    pmax = max(plens)
    hkv, d = k_flat.shape[1:]
    ks = k_flat.new_zeros(len(plens), pmax, hkv, d)
    vs = v_flat.new_zeros(len(plens), pmax, hkv, d)
    for i, (table, plen) in enumerate(groups["sources"]):
        slots = _table_slots(table, plen, bs).to(k_flat.device)
        ks[i, :plen], vs[i, :plen] = _rows(k_flat, slots), _rows(v_flat, slots)
    mask = None
    if min(plens) < pmax:
        pad = torch.arange(pmax)[None, :] >= torch.tensor(plens)[:, None]
        mask = torch.zeros(pad.shape, dtype=k_flat.dtype).masked_fill_(pad, float("-inf"))[:, None, None, :]
        mask = mask.to(k_flat.device)
    return ks.transpose(1, 2).contiguous(), vs.transpose(1, 2).contiguous(), mask


def _cascade_decode(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, plan: dict, scale: float,
                    store: dict | None = None, layer: int = 0):
    """q [B, Hq, D]; k_flat, v_flat [slots, Hkv, D] -> [B, Hq, D] (CPU). All groups' prompts in one
    attention call (each group's members' queries against its prompt, stacked over groups), each
    sequence's own suffix in one batched call, the two normalised partials merged by their
    log-sum-exp. `store` keeps the stacked prompts between steps, rebuilt when the set of groups
    decoding changes (the prompts themselves never do)."""
    b, hq, d = q.shape
    hkv = k_flat.shape[1]
    g = hq // hkv
    dtype = k_flat.dtype
    qh = q.to(dtype).view(b, hkv, g, d)
    # each sequence's own suffix: a few query rows per (sequence, head) against at most the response
    # so far, where batched matmuls beat the fused kernel's per-(sequence, head) set-up. One bmm per
    # KV head over the gathered [B, S, Hkv, D] rows: a head's [S, D] is a strided matrix BLAS takes
    # as it is, where a [B, Hkv] batch would first be copied contiguous
    ks = _rows(k_flat, plan["suffix_slots"])  # [B, S, Hkv, D]
    vs = _rows(v_flat, plan["suffix_slots"])
    s2 = torch.stack([torch.bmm(qh[:, h], ks[:, :, h].transpose(1, 2)) for h in range(hkv)], 1)  # [B, Hkv, G, S]
    s2.mul_(scale).add_(plan["suffix_mask"].to(dtype))
    lse2 = torch.logsumexp(s2, -1)  # [B, Hkv, G]
    p2 = torch.exp(s2 - lse2[..., None])
    out = torch.stack([torch.bmm(p2[:, h], vs[:, :, h]) for h in range(hkv)], 1)  # [B, Hkv, G, D]
    groups = plan["groups"]
    if groups is None:
        return out.reshape(b, hq, d).to(q.dtype)
    cached = store.get(layer) if store is not None else None
    if cached is None or cached[0] != groups["key"]:
        cached = (groups["key"], *_stack_prefixes(k_flat, v_flat, groups))
        if store is not None:
            store[layer] = cached
    _, kp, vp, pmask = cached
    ng, mmax = groups["rows"].shape
    padded = torch.cat([qh, qh.new_zeros(1, hkv, g, d)])
    qg = _rows(padded, groups["rows"]).permute(0, 2, 1, 3, 4).reshape(ng, hkv, mmax * g, d)
    o, lse = _attend_lse(qg, kp, vp, scale, pmask)  # [Ng, Hkv, Mmax·G, D], [Ng, Hkv, Mmax·G]
    o = o.view(ng, hkv, mmax, g, d).permute(0, 2, 1, 3, 4).reshape(ng * mmax, hkv, g, d)
    lse = lse.view(ng, hkv, mmax, g).permute(0, 2, 1, 3).reshape(ng * mmax, hkv, g)
    o1 = _rows(torch.cat([o, o.new_zeros(1, hkv, g, d)]), groups["where"])
    lse1 = _rows(torch.cat([lse, lse.new_full((1, hkv, g), float("-inf"))]), groups["where"])
    w1 = torch.sigmoid(lse1 - lse2)[..., None]  # the prefix's share of the total mass
    return torch.lerp(out, o1, w1).reshape(b, hq, d).to(q.dtype)
