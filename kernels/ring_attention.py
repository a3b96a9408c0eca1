"""Causal ring attention over a sequence-parallel group, zigzag layout, packed sequences.

    idx = zigzag_indices(seqlens, world, rank)          # the packed tokens this rank holds
    out = ring_attention(q[idx], k[idx], v[idx], seqlens, group=sp_group)   # differentiable

Layout. Every sequence (its length a multiple of 2W, W the group size: pad at its end, where
causal attention keeps the padding out of every real token's view) is cut into 2W chunks;
rank r holds chunks r and 2W−1−r of each sequence, in sequence order. Chunk r sees fewer
keys than chunk 2W−1−r, so every rank does the same causal work.

Ring. Each rank starts with its own K/V; at step s it holds the K/V of rank (r − s) mod W,
computes the blocks its queries see among them with `attention_block` and merges them into
the running (out, lse) by `merge` (fp32). Between steps the K/V travel one hop around the
ring (isend/irecv, posted before the step's compute so they overlap it). Per sequence and
step, with a = r and b = 2W−1−r the query chunks and c = src, d = 2W−1−src the key chunks:
step 0 computes (a, c) and (b, d) causally and (b, c) in full; a source below r gives (a, c)
and (b, c) in full; a source above r gives (b, c) and (b, d) in full. Every step after the
first is two full blocks: balanced.

Backward. The K/V go around again with an fp32 gradient accumulator travelling beside them;
each rank adds its queries' share for the block it holds (`attention_block_backward` with
the merged out and lse, so no block stored its probabilities), and a last hop hands every
accumulator back to its owner. GQA: K/V travel at their own head count.

Communication is torch.distributed point-to-point on any backend (gloo on CPU, NCCL on GPU);
the group's collectives time out as the process group was configured.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from .attention_block import attention_block, attention_block_backward, merge


def zigzag_indices(seqlens: Sequence[int], world: int, rank: int) -> torch.Tensor:
    """Indices into the packed tokens (sequences of `seqlens` laid end to end) of what `rank`
    holds: per sequence, its chunk `rank` then its chunk 2W−1−rank, chunks of length L / 2W."""
    _check_lengths(seqlens, world)
    if not 0 <= rank < world:
        raise ValueError(f"zigzag_indices: rank {rank} outside 0..{world - 1}")
    parts, start = [], 0
    for n in seqlens:
        c = n // (2 * world)
        for j in (rank, 2 * world - 1 - rank):
            parts.append(torch.arange(start + j * c, start + (j + 1) * c))
        start += n
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _check_lengths(seqlens: Sequence[int], world: int) -> None:
    if world < 1:
        raise ValueError(f"ring attention: world size must be >= 1, got {world}")
    bad = [(i, n) for i, n in enumerate(seqlens) if n <= 0 or n % (2 * world)]
    if bad:
        i, n = bad[0]
        raise ValueError(f"ring attention: sequence {i} has {n} tokens; every sequence must be a positive "
                         f"multiple of 2 x world = {2 * world} (pad each sequence at its end)")


def _pairs(rank: int, src: int, world: int):
    """(query half, key half, causal) blocks of one sequence at a step whose K/V come from src:
    half 0 is chunk rank (queries) / src (keys), half 1 is chunk 2W−1−rank / 2W−1−src."""
    if src == rank:
        return [(0, 0, True), (1, 0, False), (1, 1, True)]
    if src < rank:
        return [(0, 0, False), (1, 0, False)]
    return [(1, 0, False), (1, 1, False)]


class _Ring:
    """The group's neighbours and one hop of a tensor around it."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world) if group is not None \
            else (self.rank + 1) % self.world
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world) if group is not None \
            else (self.rank - 1) % self.world

    def start_hop(self, tensor: torch.Tensor):
        """Post the send of `tensor` to the next rank and the receive of the previous rank's;
        -> (receive buffer, handles). Wait on the handles before reading the buffer."""
        recv = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, self.next, self.group),
               dist.P2POp(dist.irecv, recv, self.prev, self.group)]
        return recv, dist.batch_isend_irecv(ops)


def _seq_slices(seqlens: Sequence[int], world: int):
    """Per sequence: (local start, chunk length c); the rank's 2c tokens start at `start`."""
    out, start = [], 0
    for n in seqlens:
        c = n // (2 * world)
        out.append((start, c))
        start += 2 * c
    return out


def _local_segments(segments, seqlens, world: int, rank: int):
    """This rank's rows of the global segment ids (None: plain causal)."""
    if segments is None:
        return None
    return segments[zigzag_indices(seqlens, world, rank).to(segments.device)]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seqlens, scale, group, segments):
        ring = _Ring(group)
        w, r = ring.world, ring.rank
        d = k.shape[2]
        slices = _seq_slices(seqlens, w)
        q_seg = _local_segments(segments, seqlens, w, r)
        acc: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        kv = torch.cat([k, v], dim=-1).contiguous()
        for step in range(w):
            src = (r - step) % w
            pending = ring.start_hop(kv) if step < w - 1 else None  # the next step's K/V, during this one
            kk, vv = kv[..., :d], kv[..., d:]
            k_seg = _local_segments(segments, seqlens, w, src)  # the K/V's segments: known, not sent
            for i, (start, c) in enumerate(slices):
                for qh, kh, causal in _pairs(r, src, w):
                    qs = slice(start + qh * c, start + (qh + 1) * c)
                    ks = slice(start + kh * c, start + (kh + 1) * c)
                    seg = {} if q_seg is None else {"q_seg": q_seg[qs], "k_seg": k_seg[ks]}
                    o, lse = attention_block(q[qs], kk[ks], vv[ks], causal=causal, scale=scale, **seg)
                    # the running output in fp32 (merge returns its first argument's dtype), rounded once below
                    acc[(i, qh)] = (o.to(lse.dtype), lse) if (i, qh) not in acc else merge(*acc[(i, qh)], o, lse)
            if pending is not None:
                recv, handles = pending
                for h in handles:
                    h.wait()
                kv = recv
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32 if q.dtype != torch.float64 else q.dtype, device=q.device)
        for (i, qh), (o, l_) in acc.items():
            start, c = slices[i]
            out[start + qh * c: start + (qh + 1) * c] = o
            lse[start + qh * c: start + (qh + 1) * c] = l_
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = (tuple(seqlens), scale, group, segments)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        seqlens, scale, group, segments = ctx.cfg
        ring = _Ring(group)
        w, r = ring.world, ring.rank
        d = k.shape[2]
        q_seg = _local_segments(segments, seqlens, w, r)
        acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        slices = _seq_slices(seqlens, w)
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        kv = torch.cat([k, v], dim=-1).contiguous()
        dkv = torch.zeros(kv.shape, dtype=acc_dtype, device=kv.device)  # travels with the K/V it belongs to
        for step in range(w):
            src = (r - step) % w
            pending = ring.start_hop(kv) if step < w - 1 else None
            kk, vv = kv[..., :d], kv[..., d:]
            k_seg = _local_segments(segments, seqlens, w, src)
            for start, c in slices:
                for qh, kh, causal in _pairs(r, src, w):
                    qs = slice(start + qh * c, start + (qh + 1) * c)
                    ks = slice(start + kh * c, start + (kh + 1) * c)
                    seg = {} if q_seg is None else {"q_seg": q_seg[qs], "k_seg": k_seg[ks]}
                    gq, gk, gv = attention_block_backward(dout[qs], q[qs], kk[ks], vv[ks], out[qs], lse[qs],
                                                          causal=causal, scale=scale, **seg)
                    dq[qs] += gq
                    dkv[ks, :, :d] += gk
                    dkv[ks, :, d:] += gv
            if w > 1:
                dkv, handles = ring.start_hop(dkv)  # the accumulator follows its K/V one hop
                for h in handles:
                    h.wait()
            if pending is not None:
                recv, handles = pending
                for h in handles:
                    h.wait()
                kv = recv
        # after W hops every accumulator is back with the rank whose K/V it belongs to
        return dq.to(q.dtype), dkv[..., :d].to(k.dtype), dkv[..., d:].to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: Sequence[int], *,
                   scale: float | None = None, group=None, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of packed sequences spread over the ranks of `group` (default: the
    world) in the zigzag layout: q [T_local, Hq, D], k and v [T_local, Hkv, D] are this rank's
    tokens (`zigzag_indices(seqlens, W, rank)` of the packed q, k, v), seqlens the GLOBAL
    length of each sequence (multiples of 2W). -> out [T_local, Hq, D], equal to this rank's
    rows of single-process causal attention; differentiable in q, k and v.

    segments: integer ids of the GLOBAL packed tokens [Σ seqlens], the same on every rank,
    for shared-prefix group rows [P | R1 … RG] sharded as one sequence: 0 on the prompt,
    i + 1 on response i (padding: any id of its own). A token then sees the earlier tokens of
    the prompt and of its own segment only (kernels.attention_block's q_seg/k_seg)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_attention needs an initialised torch.distributed process group")
    w = dist.get_world_size(group)
    _check_lengths(seqlens, w)
    local = sum(n // w for n in seqlens)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3 or t.shape[0] != local:
            raise ValueError(f"ring_attention: {name} must be [{local}, H, D] (this rank's share of "
                             f"{sum(seqlens)} tokens over {w} ranks), got {tuple(t.shape)}")
    if k.shape != v.shape or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"ring_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need "
                         f"k and v alike, one head dim, Hq a multiple of Hkv")
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"ring_attention: scale must be finite, got {scale}")
    if segments is not None and (segments.shape != (sum(seqlens),) or segments.is_floating_point()):
        raise ValueError(f"ring_attention: segments must be integer ids of the {sum(seqlens)} packed tokens, got "
                         f"{tuple(segments.shape)} {segments.dtype}")
    return _RingAttention.apply(q, k, v, list(seqlens), scale, group, segments)
