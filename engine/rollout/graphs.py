"""Decode steps replayed from CUDA graphs: one graph per (batch bucket, prefix-program bucket).

A decode step of a small model is mostly launch overhead on a GPU: 28 layers × a dozen
kernels each, every one launched from Python. Here the whole step — embedding, every layer
(projections, RoPE, the K/V write, the paged attention kernels), the final norm and the
lm_head — is captured once per bucket and replayed, so a step costs one host-to-device copy
of its inputs, a copy of its block tables into the static buffer (and a fill of the padding
rows' first entries) and one graph launch. Sampling stays outside, in Triton kernels on a GPU
(kernels/triton_sample.py).

Static buffers (they live as long as the rollout's cache; graphs bake in their addresses):
  inputs [6 + cap, max_batch] int64: rows ids, positions, slots, lengths, suffix starts, then
         per prefix program its prefix end and its members (−1 pads);
  tables [max_batch, width] int32: the batch's block tables (width bounds every sequence of
         the rollout: longest prompt + its max_new_tokens).
  logits [max_batch, V] fp32: every graph's output (one buffer, outside the graphs' pool).
A batch of n sequences runs in the graph of bucket b ≥ n; rows n..b−1 are padding: token 0 at
position 0, writing and reading one spare cache block no sequence owns (length 1), so they
compute finite garbage nobody reads. Prefix programs are padded the same way (no members,
prefix end 0: the program exits at once). Split counts are chosen from the static width.

A bucket's graph is captured at its CAPTURE_AT-th step; its first steps run the same static
step eagerly. So batch sizes a rollout passes through for a step or two (samples finishing
one by one) cost no capture, and a short rollout (a judge's few tokens) stays eager.

Modes (CacheConfig.cuda_graphs, $LONGRL_CUDA_GRAPHS overrides): auto — capture on CUDA when
the decode backend is Triton; on — the same, an error elsewhere and when a capture fails;
eager — the static step without capture, on any device with the Triton backend (how the CPU
tests check everything but the capture itself); off — the engine's ordinary step.

A graph is checked at capture: the warm-up run (eager, on the same inputs; it also compiles
the Triton kernels and lets cuBLAS pick its algorithms outside the capture) must give the
replay's logits; otherwise, or if the capture raises, the rollout goes on without graphs and
says why once (mode on: raises). The capture is begun and ended by hand so that a failed one
still hands the stream and the allocator back. Graphs share one memory pool: only their
intermediates live there, and no graph reads another's.
"""
from __future__ import annotations

import os
import time
import warnings

import torch

from kernels.paged_attention import SharedPrefixPlan, members_cap, plan_items

from .hostmem import to_device
from .paged import PagedAttention, _decode_backend

MODES = ("auto", "on", "eager", "off")
CAPTURE_AT = 3  # a bucket's graph is captured at its third step
_FIELDS = 6  # ids, positions, slots, lengths, suffix starts, prefix ends; then the members


def graphs_mode(device: torch.device, configured: str, backend: str) -> str:
    """-> "capture" (auto), "on" (capture, failures raise), "eager" or "off" for a rollout on
    `device` with this decode backend setting."""
    mode = os.environ.get("LONGRL_CUDA_GRAPHS") or configured
    if mode not in MODES:
        raise ValueError(f"cuda_graphs must be one of {', '.join(MODES)}, got {mode!r}")
    triton = _decode_backend(device, backend) == "triton"
    if mode == "auto":
        return "capture" if device.type == "cuda" and triton else "off"
    if mode in ("on", "eager") and not triton:
        raise ValueError(f"cuda_graphs={mode} runs the Triton decode kernels: decode_backend is "
                         f"{_decode_backend(device, backend)!r} on {device.type}")
    if mode == "on" and device.type != "cuda":
        raise ValueError(f"cuda_graphs=on needs a CUDA device, the model is on {device.type}")
    return mode


def batch_bucket(n: int) -> int:
    """The graph batch size that serves n sequences: 1, 2, 4, 8, then multiples of 8 to 64, of 16
    to 256, of 32 beyond (padding is a few rows; the number of graphs stays small)."""
    if n <= 8:
        return 1 << (n - 1).bit_length()
    step = 8 if n <= 64 else 16 if n <= 256 else 32
    return -(-n // step) * step


def _items_bucket(k: int, b: int) -> int:
    """Prefix programs padded to a power of two, at most the batch bucket (k ≤ n ≤ b)."""
    return 0 if k == 0 else min(1 << (k - 1).bit_length(), b)


class DecodeGraphs:
    """The rollout's decode step on static buffers, captured per bucket (modes "capture", "on")
    or run eagerly on them (mode "eager"). `step` returns None when it cannot serve a batch
    (larger than max_batch, a table wider than the buffers, or graphs turned off after a failed
    capture): the engine then runs its ordinary step."""

    def __init__(self, model, cache, max_batch: int, max_len: int, mode: str):
        if cache.spare_block is None:
            raise ValueError("DecodeGraphs needs a cache with a spare block (PagedKVCache(..., spare=True))")
        self.model, self.cache, self.mode = model, cache, mode
        self.device = cache.k.device
        bs = cache.block_size
        self.width = -(-max_len // bs) + 1
        self.max_tokens = self.width * bs  # bounds every length: the split counts' input
        self.max_batch = batch_bucket(max(1, max_batch))
        self.share = cache.share_prefix
        self.cap = members_cap(cache.gqa_group) if self.share else 0
        rows = _FIELDS + self.cap
        self.inputs = torch.zeros(rows, self.max_batch, dtype=torch.long, device=self.device)
        self.tables = torch.full((self.max_batch, self.width), cache.spare_block, dtype=torch.int32,
                                 device=self.device)
        self.logits = torch.empty(self.max_batch, model.config.vocab_size, dtype=torch.float32,
                                  device=self.device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.uses: dict[tuple[int, int], int] = {}
        self.pool = self.stream = None  # made at the first capture
        self.disabled: str | None = None  # why graphs were turned off for this rollout
        self.capture_seconds = 0.0
        self.replays = 0  # steps served by replaying a captured graph (the capture's own check not counted)
        self.last_items = 0  # prefix programs of the last step, before padding (tests)

    # ---- one step ----------------------------------------------------------------------------------
    def step(self, seqs, tables: torch.Tensor, feed=None) -> torch.Tensor | None:
        """seqs: the decoding sequences (each feeds its last token), tables: their block tables
        [n, w] on the device (DecodeTables.gather) -> logits [n, V] fp32, or None. feed: (tokens
        on the device, rows, their rows in tokens): those rows' tokens are not on the host yet
        (the engine's lookahead), they are copied from the sampler's output on the device."""
        n = len(seqs)
        if self.disabled or n > self.max_batch or tables.shape[1] > self.width:
            return None
        b = batch_bucket(n)
        bs, spare = self.cache.block_size, self.cache.spare_block
        pos = [s.num_cached for s in seqs]
        prefix = [s.shared_prefix for s in seqs] if self.share else [0] * n
        items = plan_items(prefix, [s.request for s in seqs], self.cap) if self.share else []
        ni = _items_bucket(len(items), b)
        pad = b - n
        rows = [
            [s.token_ids[p] for s, p in zip(seqs, pos)] + [0] * pad,
            pos + [0] * pad,
            [s.table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)] + [spare * bs] * pad,
            [p + 1 for p in pos] + [1] * pad,
            prefix + [0] * pad,
            [prefix[m[0]] for m in items] + [0] * (b - len(items)),
        ]
        for j in range(self.cap):
            rows.append([m[j] if j < len(m) else -1 for m in items] + [-1] * (b - len(items)))
        # staged in pinned memory: with the engine's lookahead the last step may still be queued
        to_device(torch.tensor(rows, dtype=torch.long), self.device, out=self.inputs[:, :b])
        pending = sum(1 for t in rows[0] if t < 0)  # tokens still on the device (engine.PENDING)
        if pending != (len(feed[1]) if feed is not None else 0):
            raise RuntimeError(f"graph step: {pending} rows without their token on the host, "
                               f"{len(feed[1]) if feed is not None else 0} fed from the device")
        if pending:
            tokens, rows_to, rows_from = feed
            index = to_device(torch.tensor([rows_to, rows_from], dtype=torch.long), self.device)
            self.inputs[0].index_copy_(0, index[0], tokens.index_select(0, index[1]))
        self.tables[:n, : tables.shape[1]].copy_(tables)
        if pad:
            self.tables[n:b, 0] = spare
        self.last_items = len(items)
        key = (b, ni)
        if key in self.graphs:
            self.graphs[key].replay()
            self.replays += 1
            return self.logits[:n]
        self.uses[key] = self.uses.get(key, 0) + 1
        if self.mode == "eager" or self.uses[key] < CAPTURE_AT:
            return self._forward(b, ni)[:n]
        return None if self._capture(key) is None else self.logits[:n]  # replayed once already, for its check

    def _forward(self, b: int, ni: int) -> torch.Tensor:
        """The step on the first b rows and ni prefix programs of the buffers -> logits[:b] (fp32)."""
        x = self.inputs[:, :b]
        plan = None
        if self.share:
            members = x[_FIELDS:, :ni].t().contiguous().to(torch.int32)  # [ni, cap]
            plan = SharedPrefixPlan(members, x[5, :ni].to(torch.int32), x[4].to(torch.int32), self.max_tokens,
                                    self.max_tokens)
        ctx = PagedAttention.on_device(self.cache, x[2], self.tables[:b], x[3].to(torch.int32), plan)
        hidden = self.model(x[0], position_ids=x[1], attn=ctx)
        out = self.logits[:b]
        out.copy_(self.model.logits(hidden))
        return out

    # ---- capture -----------------------------------------------------------------------------------
    def _capture(self, key: tuple[int, int]) -> torch.Tensor | None:
        """Capture the step of this bucket and replay it once -> logits[:b], or None (graphs off)."""
        b, ni = key
        if self.device.type == "cuda":  # the steps launched before (the engine's lookahead) are not the capture's time
            torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        try:
            if self.stream is None:
                self.stream, self.pool = torch.cuda.Stream(self.device), torch.cuda.graph_pool_handle()
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):  # warm-up: compiles, picks algorithms; its logits are the check
                want = self._forward(b, ni).clone()
            current.wait_stream(self.stream)
            graph = self._record(b, ni)
            graph.replay()
            if not torch.allclose(self.logits[:b], want, rtol=1e-3, atol=1e-3):
                diff = (self.logits[:b] - want).abs().max().item()
                raise RuntimeError(f"the replayed step's logits differ from the eager step's by up to {diff:.3g}")
        except Exception as err:  # noqa: BLE001 - any failure: the rollout goes on eagerly
            self.capture_seconds += time.perf_counter() - started
            self.disabled = f"batch {b}, {ni} prefix programs: {type(err).__name__}: {err}"
            self.graphs.clear()  # their pool goes back with them
            if self.mode == "on":
                raise RuntimeError(f"cuda_graphs=on: capture failed ({self.disabled})") from err
            warnings.warn(f"CUDA graphs off for this rollout ({self.disabled})", RuntimeWarning, stacklevel=3)
            return None  # the engine's ordinary step computes this step again
        self.capture_seconds += time.perf_counter() - started
        self.graphs[key] = graph
        return self.logits[:b]

    def _record(self, b: int, ni: int) -> torch.cuda.CUDAGraph:
        """Capture by hand (not torch.cuda.graph, whose exit leaves the capture stream current and the
        allocator capturing when capture_end raises): the stream is restored whatever happens, and a
        capture that cannot end still hands its pool back to the allocator."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.stream(self.stream):
            graph.capture_begin(pool=self.pool)
            try:
                self._forward(b, ni)
            finally:
                try:
                    graph.capture_end()
                except Exception:
                    end_pool = getattr(torch._C, "_cuda_endAllocateToPool", None)
                    if end_pool is not None:  # what capture_end skipped when it raised
                        end_pool(self.device.index if self.device.index is not None else
                                 torch.cuda.current_device(), self.pool)
                    raise
        return graph
