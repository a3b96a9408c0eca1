"""Decode attention over a paged KV cache: one new query token per sequence.

    paged_decode_attention(q [B, Hq, D], k_cache, v_cache [num_blocks, block_size, Hkv, D],
                           block_tables [B, max_blocks] int32, seq_lens [B] int32, scale,
                           num_splits=None) -> [B, Hq, D]
    shared_prefix_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, prefix_lens [B],
                                   group_ids [B], scale, num_splits=None, plan=None) -> [B, Hq, D]

Sequence b's keys are tokens 0 .. seq_lens[b]−1, token t living in block
block_tables[b, t // block_size] at row t % block_size. GQA: query head h reads KV head
h // (Hq / Hkv). Both functions compute softmax(q·Kᵀ·scale)·V over those tokens; they differ
only in how the work is cut.

Plain (`paged_decode_attention`): one program per (sequence, KV head, split). It holds all
Hq/Hkv query heads of the KV head as the rows of a tl.dot (padded to ≥ 16), so each K/V
tile (BLOCK_N tokens, gathered block by block: any block_size, a tile may span several
blocks or part of one) is read once per KV head, not once per query head. Split-K: split s
covers a contiguous, tile-aligned token range and writes its normalised partial output and
log-sum-exp to fp32 scratch; a merge kernel, one program per (sequence, query head),
combines the splits by LSE (empty splits have lse = −inf and weight 0). num_splits=None
fills the programs the GPU holds at once at long context, measured from the compiled kernel
(kernels.triton_paged.pick_num_splits; bounded by block_tables' width, no device sync), and
picks 1 split for short contexts, where the partial is the output and no merge runs.

Shared prefix (`shared_prefix_decode_attention`): sequences with prefix_lens[b] > 0 and the
same group_ids[b] (any integer labels; ignored where prefix_lens[b] = 0) share their first
prefix_lens[b] tokens: the same blocks at the start of their tables (checked for the full
blocks; the last, partial prefix block may be a copy-on-write copy holding the same rows, and
is read through the group's first member in batch order). Members need not be adjacent in
the batch and must agree on prefix_lens (checked). Launch 1: one program per (group piece, KV
head, split) serves up to `members_per_program` members at once (their members × Hq/Hkv
query rows are the M of the tl.dot), so a group's prompt KV is read once per step instead of
once per sample; larger groups are cut into several pieces. Launch 2: one program per
(sequence, KV head, split) over the sequence's own tokens prefix_lens[b] .. seq_lens[b]−1
(the whole sequence when prefix_lens[b] = 0). One merge combines prefix and suffix partials.
`plan_shared_prefix` turns the groups into work items (torch ops, a few device syncs, checks
that members share the prefix's blocks); `plan_shared_prefix_from_lists` builds the same plan
from host lists without a sync. Build it once per decode step and pass it as `plan=` to every layer.

Inputs fp32, bf16 or fp16 (q is cast to the cache's dtype for the tl.dot; fp32 dots stay
IEEE fp32, not TF32), fp32 accumulation and partials, output in q.dtype; cache offsets in
int64. Any block_size and head_dim (padded to a power of two ≥ 16); block_n a power of two
≥ 16; members_per_program defaults to as many members as fit 64 query rows, at most 16.
`paged_decode_attention_ref` is the same function in plain torch (gather, then softmax), used on
CPU and by the tests; it is the reference of both (sharing changes which program reads the
prefix, not the result).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# triton is imported only when a kernel runs (TRITON_INTERPRET must be set first): the plan and its
# host-side pieces live here, importable without it
MAX_ROWS = 64  # query rows per program in shared-prefix mode: bounds the [rows, D] fp32 accumulator


@dataclass
class SharedPrefixPlan:
    """Work items of one decode step, built once and reusable by every layer.

    members [W, M] int32: the sequences one prefix program serves (−1 pads), all of one group;
    the first is the one whose block table the program reads. prefix_ends [W] int32: their
    prefix length. suffix_starts [B] int32: where each sequence's own tokens begin (0 when it
    shares nothing). max_prefix, max_suffix: host ints for the split choice. A sequence with
    suffix_starts > 0 must be a member of some program: the decode reads its prefix partials
    without having cleared them (kernels/triton_paged.py _merge_kernel)."""
    members: torch.Tensor
    prefix_ends: torch.Tensor
    suffix_starts: torch.Tensor
    max_prefix: int
    max_suffix: int

    @property
    def members_per_program(self) -> int:
        return self.members.shape[1]


def members_cap(gqa_group: int) -> int:
    """Members one prefix program serves by default: as many as fit MAX_ROWS query rows, at most 16."""
    return max(1, min(16, MAX_ROWS // gqa_group))


def plan_items(prefix_lens: list[int], group_ids: list[int], cap: int) -> list[list[int]]:
    """The prefix programs' members from host lists: the sequences with prefix_lens > 0 grouped
    by group_ids (members in batch order, groups in order of first appearance), each group cut
    into pieces of at most `cap`. Checks that a group's members agree on prefix_len; the block
    tables are not read (the caller vouches that members share the prefix's blocks)."""
    groups: dict[int, list[int]] = {}
    for i, (p, g) in enumerate(zip(prefix_lens, group_ids)):
        if p > 0:
            groups.setdefault(g, []).append(i)
    items = []
    for idx in groups.values():
        if any(prefix_lens[i] != prefix_lens[idx[0]] for i in idx):
            raise ValueError("shared prefix: members of a group have different prefix_lens")
        items += [idx[j:j + cap] for j in range(0, len(idx), cap)]
    return items


def plan_shared_prefix_from_lists(prefix_lens: list[int], group_ids: list[int], seq_lens: list[int], gqa_group: int,
                                  device: torch.device, members_per_program: int | None = None) -> SharedPrefixPlan:
    """plan_shared_prefix's plan from host lists: one host-to-device copy, no device sync, no check
    of the block tables (the caller's forks share their prompt's blocks by construction; what the
    rollout engine uses)."""
    if any(not 0 <= p <= n for p, n in zip(prefix_lens, seq_lens)):
        raise ValueError("shared prefix: need 0 <= prefix_lens <= seq_lens")
    items = plan_items(prefix_lens, group_ids, members_per_program or members_cap(gqa_group))
    width = max((len(m) for m in items), default=1)
    flat = [i for m in items for i in m + [-1] * (width - len(m))]
    ends = [prefix_lens[m[0]] for m in items]
    packed = torch.tensor(flat + ends + list(prefix_lens), dtype=torch.int32).to(device)
    n_items = len(items)
    members = packed[: n_items * width].view(n_items, width)
    return SharedPrefixPlan(members, packed[n_items * width: n_items * (width + 1)], packed[n_items * (width + 1):],
                            max(ends, default=0), max((n - p for n, p in zip(seq_lens, prefix_lens)), default=0))


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
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           num_splits: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """The Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1). block_n: tokens per K/V tile
    (power of two ≥ 16; default 64 for head_dim ≤ 128)."""
    from .triton_paged import paged_decode_triton
    _check_splits(num_splits)
    return paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, block_n)


def shared_prefix_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   block_tables: torch.Tensor, seq_lens: torch.Tensor, prefix_lens: torch.Tensor,
                                   group_ids: torch.Tensor, scale: float, num_splits: int | None = None,
                                   block_n: int | None = None, plan: SharedPrefixPlan | None = None,
                                   members_per_program: int | None = None) -> torch.Tensor:
    """The Triton kernels. num_splits, when given, applies to the prefix and the suffix launch
    alike. With plan= (from plan_shared_prefix) prefix_lens, group_ids and members_per_program
    are not read."""
    from .triton_paged import shared_prefix_decode_triton
    _check_splits(num_splits)
    return shared_prefix_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, prefix_lens, group_ids, scale,
                                       num_splits, block_n, plan, members_per_program)


def plan_shared_prefix(block_tables: torch.Tensor, seq_lens: torch.Tensor, prefix_lens: torch.Tensor,
                       group_ids: torch.Tensor, block_size: int, gqa_group: int,
                       members_per_program: int | None = None) -> SharedPrefixPlan:
    """The work items of shared_prefix_decode_attention for one step (gqa_group = Hq / Hkv)."""
    from .triton_paged import plan_shared_prefix as plan
    return plan(block_tables, seq_lens, prefix_lens, group_ids, block_size, gqa_group, members_per_program)


def _check_splits(num_splits: int | None) -> None:
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"paged attention: num_splits must be >= 1, got {num_splits}")
