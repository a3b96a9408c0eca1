"""The paged decode kernels (kernels.paged_attention) against the fp64 torch reference:
GQA-grouped split-K decode, and shared-prefix decode where a group's prompt is read once.
Inputs are built on the CPU; the kernels run on CUDA when there is one, else under the
Triton interpreter."""
from __future__ import annotations

import inspect

import pytest
import torch

from kernels.paged_attention import (paged_decode_attention, paged_decode_attention_ref, plan_shared_prefix,
                                     plan_shared_prefix_from_lists, shared_prefix_decode_attention)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LENS = [1, 17, 100, 257]  # none a multiple of a block, a tile or a split


def _cache(nb, bs, hkv, d, g, dtype=torch.float32):
    return (torch.randn(nb, bs, hkv, d, generator=g).to(dtype), torch.randn(nb, bs, hkv, d, generator=g).to(dtype))


def _tables(lens, bs, nb, g):
    """Disjoint, randomly permuted blocks per sequence -> [B, max_blocks] int32."""
    perm = torch.randperm(nb, generator=g)
    width = max(-(-n // bs) for n in lens)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(lens):
        k = -(-n // bs)
        tables[i, :k] = perm[used:used + k]
        used += k
    return tables


def _on_device(fn, *args, **kwargs):
    """fn with its tensor arguments on DEVICE; the result back on the CPU."""
    def move(x):
        return x.to(DEVICE) if isinstance(x, torch.Tensor) else x
    return fn(*map(move, args), **{k: move(v) for k, v in kwargs.items()}).cpu()


def _ref(q, k_cache, v_cache, tables, lens, scale):
    return paged_decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), tables, lens, scale)


# ---- plain paged decode ------------------------------------------------------------------------------------
@pytest.mark.parametrize("hq,hkv,d,bs,block_n,splits", [
    (2, 2, 64, 16, 64, 1),      # GQA 1; a tile spans 4 blocks; one split writes the output directly
    (8, 2, 64, 16, 16, 3),      # GQA 4; a tile is a block
    (7, 1, 128, 64, 16, 8),     # GQA 7 (rows padded to 16); a tile is part of a block; more splits than tiles
    (8, 2, 128, 64, 128, 2),    # a tile spans 2 blocks of 64
    (14, 2, 64, 16, 32, None),  # GQA 7, split count chosen by the heuristic
])
def test_paged_decode_matches_reference(hq, hkv, d, bs, block_n, splits):
    g = torch.Generator().manual_seed(hq * 1000 + d + bs)
    nb = sum(-(-n // bs) for n in LENS) + 3
    q = torch.randn(len(LENS), hq, d, generator=g)
    k_cache, v_cache = _cache(nb, bs, hkv, d, g)
    lens = torch.tensor(LENS, dtype=torch.int32)
    tables = _tables(LENS, bs, nb, g)
    ours = _on_device(paged_decode_attention, q, k_cache, v_cache, tables, lens, d ** -0.5, num_splits=splits,
                      block_n=block_n)
    assert ours.dtype == q.dtype and ours.shape == q.shape
    torch.testing.assert_close(ours.double(), _ref(q, k_cache, v_cache, tables, lens, d ** -0.5),
                               rtol=1e-5, atol=1e-5)


def test_triton_paged_decode_matches_reference():
    """Odd head_dim (24, padded to 32) and block_size 8 (below a 16-token tile); default tiling."""
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, d, bs, nb = 5, 6, 2, 24, 8, 40
    q = torch.randn(b, hq, d, generator=g)
    k_cache, v_cache = _cache(nb, bs, hkv, d, g)
    lens = torch.tensor([1, 8, 9, 30, 17], dtype=torch.int32)
    tables = _tables(lens.tolist(), bs, nb, g)
    ours = _on_device(paged_decode_attention, q, k_cache, v_cache, tables, lens, scale=d ** -0.5)
    torch.testing.assert_close(ours.double(), _ref(q, k_cache, v_cache, tables, lens, d ** -0.5),
                               rtol=1e-5, atol=1e-5)


def test_empty_splits_under_the_heuristic_change_nothing():
    """A wide table makes the heuristic split a short sequence: most splits are empty (lse −inf)."""
    from kernels.triton_paged import pick_num_splits
    g = torch.Generator().manual_seed(3)
    d, bs = 64, 16
    k_cache, v_cache = _cache(70, bs, 1, d, g)
    q = torch.randn(2, 2, d, generator=g)
    tables = torch.stack([torch.randperm(70, generator=g)[:64] for _ in range(2)]).to(torch.int32)
    lens = torch.tensor([3, 40], dtype=torch.int32)
    assert pick_num_splits(tables.shape[1] * bs, 2, 64, q.device) == 4
    ours = _on_device(paged_decode_attention, q, k_cache, v_cache, tables, lens, d ** -0.5)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), _ref(q, k_cache, v_cache, tables, lens, d ** -0.5),
                               rtol=1e-5, atol=1e-5)


def test_large_logits_stay_finite():
    """Scores of several hundred: exp without the running / merge max would overflow fp32."""
    g = torch.Generator().manual_seed(9)
    hq, hkv, d, bs = 4, 2, 64, 16
    lens = [5, 70]
    k_cache, v_cache = _cache(10, bs, hkv, d, g)
    q = 100 * torch.randn(2, hq, d, generator=g)
    tables = _tables(lens, bs, 10, g)
    lens = torch.tensor(lens, dtype=torch.int32)
    ours = _on_device(paged_decode_attention, q, k_cache, v_cache, tables, lens, d ** -0.5, num_splits=3,
                      block_n=16)
    torch.testing.assert_close(ours.double(), _ref(q, k_cache, v_cache, tables, lens, d ** -0.5),
                               rtol=1e-5, atol=1e-5)


def test_an_empty_sequence_attends_to_nothing():
    """A length-0 row (a plain sequence's prefix part, read alone) gives 0, not 0/0, whether its one
    partial is the output or its partials are merged; the rows beside it are unaffected."""
    g = torch.Generator().manual_seed(11)
    hq, hkv, d, bs = 4, 2, 64, 16
    k_cache, v_cache = _cache(8, bs, hkv, d, g)
    q = torch.randn(3, hq, d, generator=g)
    lens = [0, 5, 40]
    tables = _tables(lens, bs, 8, g)
    lens = torch.tensor(lens, dtype=torch.int32)
    ref = _ref(q[1:], k_cache, v_cache, tables[1:], lens[1:], d ** -0.5)
    for splits in (1, 3):
        ours = _on_device(paged_decode_attention, q, k_cache, v_cache, tables, lens, d ** -0.5, num_splits=splits,
                          block_n=16)
        assert torch.equal(ours[0], torch.zeros(hq, d)), splits
        torch.testing.assert_close(ours[1:].double(), ref, rtol=1e-5, atol=1e-5)


def test_a_dominant_first_tile_stays_finite():
    """One split walking 25 tiles whose first tile scores ~350 (base 2) above the rest: each tile is
    exponentiated against the running maximum, so the rescale of what came before is exp2(≤ 0); a
    tile's own maximum would give exp2(+350) = inf and a NaN output. The softmax is the first block's."""
    g = torch.Generator().manual_seed(12)
    hq, hkv, d, bs, n = 2, 1, 64, 16, 400
    k_cache, v_cache = _cache(n // bs, bs, hkv, d, g)
    tables = torch.arange(n // bs, dtype=torch.int32)[None]
    k_cache[0] = 30.0  # the first tile's keys: scores 64 * 30 / 8 = 240 nats above ~N(0, 1)
    q = torch.ones(1, hq, d)
    lens = torch.tensor([n], dtype=torch.int32)
    ours = _on_device(paged_decode_attention, q, k_cache, v_cache, tables, lens, d ** -0.5, num_splits=1, block_n=16)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), _ref(q, k_cache, v_cache, tables, lens, d ** -0.5),
                               rtol=1e-5, atol=1e-5)


def test_split_heuristic():
    from kernels.triton_paged import STAND_IN_RESIDENT, pick_num_splits
    cpu = torch.device("cpu")  # stands in for an H100: 132 SMs, STAND_IN_RESIDENT programs each
    assert STAND_IN_RESIDENT == 2
    assert pick_num_splits(256, 1, 64, cpu) == 1  # short context: no merge pass
    assert pick_num_splits(4096, 256, 64, cpu) == 1  # 256 programs already fill the 264 places
    assert pick_num_splits(4096, 128, 64, cpu) == 2
    # 16 programs (8 prompts × 2 KV heads): 16 splits fill 256 of the 264 places; 17 would leave 8
    # programs to run alone after the rest
    assert pick_num_splits(16384, 16, 64, cpu) == 16
    assert pick_num_splits(32768, 8, 64, cpu) == 33
    assert pick_num_splits(32768, 8, 64, cpu, resident=3) == 49  # 396 places where a SM holds 3
    assert pick_num_splits(32768, 300, 64, cpu) == 1  # more programs than places: no split
    assert pick_num_splits(1 << 20, 1, 64, cpu) == 64  # capped
    assert pick_num_splits(4096, 1, 64, cpu) == 16  # ≥ MIN_TILES_PER_SPLIT tiles a split


def test_programs_per_sm():
    """The residency arithmetic (compute capability 9.0 limits) for each bound in turn."""
    from kernels.triton_paged import programs_per_sm
    # 200 registers -> 6,400 a warp; 4 warps: 25,600 of 65,536 -> 2; shared 114,688 + 1 KB reserved -> 2
    assert programs_per_sm(200, 114688, 4) == 2
    assert programs_per_sm(128, 65536, 4) == 3  # shared bound: 233,472 // 66,560
    assert programs_per_sm(255, 0, 8) == 1  # registers: 255 -> 8,192 a warp (units of 256), 65,536 a block
    assert programs_per_sm(32, 0, 4) == 16  # threads: 2,048 // 128
    assert programs_per_sm(16, 0, 1) == 32  # the block limit
    assert programs_per_sm(255, 232448, 32) == 1  # never below one
    assert programs_per_sm(200, 0, 2) == 2  # a 2-warp block takes registers for 4 warps: 65,536 // 25,600
    assert programs_per_sm(16, 45600, 4) == 4  # 45,600 B take 45,696 (units of 128): 233,472 // 46,720


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_paged_decode_16_bit(dtype, tol):
    g = torch.Generator().manual_seed(4)
    hq, hkv, d, bs = 8, 2, 64, 16
    nb = sum(-(-n // bs) for n in LENS)
    q = torch.randn(len(LENS), hq, d, generator=g).to(dtype)
    k_cache, v_cache = _cache(nb, bs, hkv, d, g, dtype)
    lens = torch.tensor(LENS, dtype=torch.int32)
    tables = _tables(LENS, bs, nb, g)
    ours = _on_device(paged_decode_attention, q, k_cache, v_cache, tables, lens, d ** -0.5, num_splits=3)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.double(), _ref(q, k_cache, v_cache, tables, lens, d ** -0.5), rtol=tol, atol=tol)


# ---- shared-prefix decode ----------------------------------------------------------------------------------
def _shared_batch(g, bs, hkv, d, dtype=torch.float32):
    """Groups of 1, 3, 8 and 10 samples (interleaved in the batch) plus two plain sequences.
    Prefixes are not block-aligned (but one); each member owns a copy-on-write copy of the
    prompt's partial last block: the prompt's rows, then its own tokens."""
    groups = {  # group id -> (prefix_len, suffix lengths); suffix 1 = just the new token
        7: (37, [1, 5, 16]),
        2: (16, [1] * 8),
        9: (50, [2, 1, 30, 3, 1, 9, 17, 1, 4, 1]),
        4: (5, [12]),
    }
    plain = [23, 1]
    order = [(gid, i) for gid, (_, sfx) in groups.items() for i in range(len(sfx))] + [(None, j) for j in range(2)]
    order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]  # members not adjacent
    nb = 200
    k_cache, v_cache = _cache(nb, bs, hkv, d, g, dtype)
    free = torch.randperm(nb, generator=g).tolist()
    prompt_blocks = {gid: [free.pop() for _ in range(-(-plen // bs))] for gid, (plen, _) in groups.items()}
    rows_tables, lens, prefix, gids = [], [], [], []
    for gid, i in order:
        if gid is None:
            n = plain[i]
            rows_tables.append([free.pop() for _ in range(-(-n // bs))])
            lens.append(n), prefix.append(0), gids.append(-1)
            continue
        plen, sfx = groups[gid]
        n = plen + sfx[i]
        table = list(prompt_blocks[gid][: plen // bs])
        if plen % bs:  # copy-on-write: the member's own block with the prompt's first rows
            own = free.pop()
            src = prompt_blocks[gid][-1]
            k_cache[own, : plen % bs], v_cache[own, : plen % bs] = k_cache[src, : plen % bs], v_cache[src, : plen % bs]
            table.append(own)
        table += [free.pop() for _ in range(-(-n // bs) - len(table))]
        rows_tables.append(table)
        lens.append(n), prefix.append(plen), gids.append(gid)
    tables = torch.zeros(len(order), max(map(len, rows_tables)), dtype=torch.int32)
    for r, t in enumerate(rows_tables):
        tables[r, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return (k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), torch.tensor(prefix),
            torch.tensor(gids))


@pytest.mark.parametrize("hq,hkv,d,bs,block_n,splits,cap", [
    (4, 4, 64, 16, 32, 2, 4),      # GQA 1; the groups of 8 and 10 exceed 4 members per program
    (8, 2, 64, 16, 16, None, None),  # GQA 4, default cap (16 members, 64 rows): one program per group
    (7, 1, 128, 16, 64, 3, 3),     # GQA 7: 3 members × 7 heads = 21 rows (padded to 32)
])
def test_shared_prefix_equals_plain_attention(hq, hkv, d, bs, block_n, splits, cap):
    g = torch.Generator().manual_seed(hq + d)
    k_cache, v_cache, tables, lens, prefix, gids = _shared_batch(g, bs, hkv, d)
    q = torch.randn(len(lens), hq, d, generator=g)
    ours = _on_device(shared_prefix_decode_attention, q, k_cache, v_cache, tables, lens, prefix, gids, d ** -0.5,
                      num_splits=splits, block_n=block_n, members_per_program=cap)
    # sharing changes which program reads the prefix, not the result: plain paged attention is the reference
    ref = paged_decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), tables, lens, d ** -0.5)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


def test_shared_prefix_plan():
    """Members grouped by id whatever their batch position; big groups cut by the cap; a plan
    reused across calls gives the same result."""
    g = torch.Generator().manual_seed(5)
    k_cache, v_cache, tables, lens, prefix, gids = _shared_batch(g, 16, 1, 64)
    plan = plan_shared_prefix(*(x.to(DEVICE) for x in (tables, lens, prefix, gids)), block_size=16, gqa_group=2,
                              members_per_program=4)
    members = plan.members.tolist()
    assert sorted(len([m for m in row if m >= 0]) for row in members) == [1, 2, 3, 4, 4, 4, 4]
    for row in members:
        served = [m for m in row if m >= 0]
        assert len({int(gids[m]) for m in served}) == 1 and served == sorted(served)
        assert plan.prefix_ends[members.index(row)].item() == prefix[served[0]]
    assert sorted(m for row in members for m in row if m >= 0) == (prefix > 0).nonzero().squeeze(1).tolist()
    assert plan.suffix_starts.tolist() == prefix.tolist() and plan.prefix_ends.device.type == DEVICE
    assert any(row[1] >= 0 and row[1] != row[0] + 1 for row in members)  # some group is not adjacent in the batch
    q = torch.randn(len(lens), 2, 64, generator=g)
    args = (q, k_cache, v_cache, tables, lens, prefix, gids, 0.125)
    torch.testing.assert_close(_on_device(shared_prefix_decode_attention, *args, plan=plan, num_splits=1),
                               _on_device(shared_prefix_decode_attention, *args, members_per_program=4, num_splits=1))


@pytest.mark.parametrize("cap", [None, 3, 4])
def test_plan_from_lists_is_the_device_plan(cap):
    """The engine's host-side planner gives the device planner's work items (the same members per
    item, the same prefix ends), suffix starts and split bounds, so the kernels compute the same."""
    g = torch.Generator().manual_seed(9)
    k_cache, v_cache, tables, lens, prefix, gids = _shared_batch(g, 16, 2, 64)
    dev = plan_shared_prefix(*(x.to(DEVICE) for x in (tables, lens, prefix, gids)), block_size=16, gqa_group=4,
                             members_per_program=cap)
    host = plan_shared_prefix_from_lists(prefix.tolist(), gids.tolist(), lens.tolist(), 4, torch.device(DEVICE),
                                         members_per_program=cap)

    def items(plan):
        return sorted((tuple(m), e) for m, e in zip(plan.members.tolist(), plan.prefix_ends.tolist()))
    assert items(host) == items(dev) and host.members.shape == dev.members.shape
    assert host.suffix_starts.tolist() == dev.suffix_starts.tolist()
    assert (host.max_prefix, host.max_suffix) == (dev.max_prefix, dev.max_suffix)
    assert host.members.dtype == host.prefix_ends.dtype == torch.int32 and host.members.device.type == DEVICE
    q = torch.randn(len(lens), 8, 64, generator=g)
    args = (q, k_cache, v_cache, tables, lens, None, None, 0.125)
    torch.testing.assert_close(_on_device(shared_prefix_decode_attention, *args, plan=host, num_splits=2),
                               _ref(q, k_cache, v_cache, tables, lens, 0.125).float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="different prefix_lens"):
        plan_shared_prefix_from_lists([4, 5], [1, 1], [9, 9], 1, torch.device("cpu"))
    empty = plan_shared_prefix_from_lists([0, 0], [1, 2], [3, 7], 1, torch.device("cpu"))
    assert empty.members.shape == (0, 1) and empty.max_suffix == 7


def test_shared_prefix_all_plain_and_all_shared():
    g = torch.Generator().manual_seed(6)
    hq, hkv, d, bs = 4, 2, 64, 16
    k_cache, v_cache = _cache(40, bs, hkv, d, g)
    lens = torch.tensor([9, 33, 18], dtype=torch.int32)
    tables = _tables(lens.tolist(), bs, 40, g)
    q = torch.randn(3, hq, d, generator=g)
    ref = _ref(q, k_cache, v_cache, tables, lens, d ** -0.5)
    zeros = torch.zeros(3, dtype=torch.long)
    none = _on_device(shared_prefix_decode_attention, q, k_cache, v_cache, tables, lens, zeros, zeros, d ** -0.5)
    torch.testing.assert_close(none.double(), ref, rtol=1e-5, atol=1e-5)
    # a whole sequence as its own "prefix" (empty suffix): every suffix partial is empty
    whole = _on_device(shared_prefix_decode_attention, q, k_cache, v_cache, tables, lens, lens.long(), torch.arange(3),
                       d ** -0.5, num_splits=2)
    torch.testing.assert_close(whole.double(), ref, rtol=1e-5, atol=1e-5)
    # the same from the engine's host planner, which must take prefix_len == seq_len as the device one does
    host = plan_shared_prefix_from_lists(lens.tolist(), [0, 1, 2], lens.tolist(), hq // hkv, torch.device(DEVICE))
    assert host.max_suffix == 0 and host.prefix_ends.tolist() == lens.tolist()
    whole = _on_device(shared_prefix_decode_attention, q, k_cache, v_cache, tables, lens, None, None, d ** -0.5,
                       num_splits=2, plan=host)
    torch.testing.assert_close(whole.double(), ref, rtol=1e-5, atol=1e-5)


def test_a_long_prompt_is_split_and_short_suffixes_are_not(monkeypatch):
    """Four samples of a 2,000-token prompt, each 1–4 tokens past it: the prompt's one program per KV
    head is split over the sequence (to fill the GPU), the suffixes are each one split (no merge
    work for a few tokens); each count from its own part's length, in tokens. One such sequence
    decoded plainly is split as the prompt is. The outputs are the reference's."""
    from kernels import triton_paged
    launches = []
    real = triton_paged._launch_partial

    def spy(*args):
        a = inspect.signature(real).bind(*args).arguments
        kind = "prefix" if a["members"] is not None else "suffix" if a["starts"] is not None else "plain"
        launches.append((kind, a["num_splits"]))
        return real(*args)
    monkeypatch.setattr(triton_paged, "_launch_partial", spy)
    g = torch.Generator().manual_seed(13)
    hq, hkv, d, bs, p = 2, 1, 64, 16, 2000
    nb = p // bs + 4
    k_cache, v_cache = _cache(nb, bs, hkv, d, g)
    lens = torch.tensor([p + 1, p + 2, p + 3, p + 4], dtype=torch.int32)
    tables = torch.cat([torch.arange(p // bs).expand(4, -1), (p // bs + torch.arange(4))[:, None]], 1).to(torch.int32)
    q = torch.randn(4, hq, d, generator=g)
    prefix = torch.full((4,), p, dtype=torch.long)
    ours = _on_device(shared_prefix_decode_attention, q, k_cache, v_cache, tables, lens, prefix, torch.zeros(4),
                      d ** -0.5)
    plain = _on_device(paged_decode_attention, q[:1], k_cache, v_cache, tables[:1], lens[:1], d ** -0.5)
    if DEVICE == "cpu":  # the split counts of an H100 (pick_num_splits stands in for one without a GPU)
        assert launches == [("prefix", 8), ("suffix", 1), ("plain", 8)], launches
    ref = _ref(q, k_cache, v_cache, tables, lens, d ** -0.5)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.double(), ref[:1], rtol=1e-5, atol=1e-5)


def test_the_split_choice_follows_the_compiled_residency(monkeypatch):
    """On a GPU the split choice asks the compiled partial kernel how many of its programs a SM
    holds (registers and shared memory, once per variant) and fills that many places; under the
    interpreter it assumes STAND_IN_RESIDENT and records nothing. A context too short to split
    asks nothing."""
    from kernels import triton_paged as tp
    monkeypatch.setattr(tp, "_RESIDENT", {})  # measured here, whatever ran before
    splits = []
    real = tp._launch_partial
    monkeypatch.setattr(tp, "_launch_partial", lambda *a: splits.append(a[11]) or real(*a))
    g = torch.Generator().manual_seed(5)
    hq, hkv, d, bs, n = 12, 2, 128, 16, 4
    nb = 160  # 40 blocks a sequence: 640 tokens, 10 tiles of 64, room for 2 splits
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    k_cache, v_cache = (x.to(dtype) for x in _cache(nb, bs, hkv, d, g))
    tables = torch.arange(nb, dtype=torch.int32).view(n, nb // n)
    lens = torch.tensor([600, 640, 101, 17], dtype=torch.int32)
    q = torch.randn(n, hq, d, generator=g).to(dtype)
    out = _on_device(paged_decode_attention, q, k_cache, v_cache, tables, lens, d ** -0.5)
    tol = 2e-2 if DEVICE == "cuda" else 1e-5
    torch.testing.assert_close(out.double(), _ref(q, k_cache, v_cache, tables, lens, d ** -0.5), rtol=tol, atol=tol)
    _on_device(paged_decode_attention, q, k_cache, v_cache, tables[:, :8], lens.clamp(max=128), d ** -0.5)
    if DEVICE == "cpu":
        assert tp.resident_programs() == [] and splits == [2, 1]
        return
    (entry,) = tp.resident_programs()  # the long context's variant only
    assert "error" not in entry and entry["regs"] > 0 and entry["shared"] > 0, entry
    assert entry["members"] == 0 and not entry["start"] and entry["dtype"] == "bfloat16", entry
    props = torch.cuda.get_device_properties(0)
    assert entry["resident"] == tp.programs_per_sm(entry["regs"], entry["shared"], entry["num_warps"],
                                                   props.regs_per_multiprocessor,
                                                   props.shared_memory_per_multiprocessor,
                                                   props.max_threads_per_multi_processor)
    assert splits == [tp.pick_num_splits(640, n * hkv, 64, torch.device("cuda"), entry["resident"]), 1]


def test_a_prefix_program_holds_at_most_max_rows_query_rows():
    """members × GQA group ≤ MAX_ROWS (the [rows, D] fp32 accumulator a program keeps in registers),
    but always one member, whatever the group."""
    from kernels.paged_attention import MAX_ROWS, members_cap
    for group in range(1, 2 * MAX_ROWS + 2):
        cap = members_cap(group)
        assert cap >= 1 and (cap == 1 or cap * group <= MAX_ROWS), (group, cap)


def test_shared_prefix_bf16():
    g = torch.Generator().manual_seed(7)
    hq, hkv, d, bs = 8, 2, 64, 16
    k_cache, v_cache, tables, lens, prefix, gids = _shared_batch(g, bs, hkv, d, torch.bfloat16)
    q = torch.randn(len(lens), hq, d, generator=g).to(torch.bfloat16)
    ours = _on_device(shared_prefix_decode_attention, q, k_cache, v_cache, tables, lens, prefix, gids, d ** -0.5,
                      num_splits=2)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), _ref(q, k_cache, v_cache, tables, lens, d ** -0.5),
                               rtol=2e-2, atol=2e-2)


def test_shared_prefix_validation():
    g = torch.Generator().manual_seed(8)
    _, _, tables, lens, prefix, gids = _shared_batch(g, 16, 1, 64)
    member = int((gids == 9).nonzero()[1])
    bad = prefix.clone()
    bad[member] -= 1
    with pytest.raises(ValueError, match="different prefix_lens"):
        plan_shared_prefix(tables, lens, bad, gids, block_size=16, gqa_group=1)
    bad_tables = tables.clone()
    bad_tables[member, 0] = 199 - bad_tables[member, 0]
    with pytest.raises(ValueError, match="do not share"):
        plan_shared_prefix(bad_tables, lens, prefix, gids, block_size=16, gqa_group=1)
    with pytest.raises(ValueError, match="prefix_lens <= seq_lens"):
        plan_shared_prefix(tables, lens, lens.long() + 1, gids, block_size=16, gqa_group=1)
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(torch.zeros(1, 1, 64), torch.zeros(1, 16, 1, 64), torch.zeros(1, 16, 1, 64),
                               tables[:1], lens[:1], 1.0, num_splits=0)
