"""The rollout's batched sampler in Triton: engine.rollout.sampling.sample_batch's function (same
arguments, same support, same uniforms, same draw rule), each row split over programs.

    sample_rows_triton(logits [B, V], temperature, top_k, top_p, seeds, steps) -> (tokens [B] int64,
                                                                                 log-probs [B] fp32)

Why: in torch a sampler step of 64 rows is 269 torch calls, 16 of them needing a device value on
the host (`python -m bench.sampler_ops`); here it is a dozen launches and no sync. The version
before this one ran one program per row (64 programs on a 132-SM H100) and read an 8-byte scratch
a logit in each of up to 17 search passes: 1.07 ms a step for 64 rows of a 152K vocabulary at
top-p 0.95 on an H100 (bench/gpu_sampler_case.py, 2026-11-26). Here each row is cut into chunks
of CHUNK logits, one program per (row, chunk), and every pass reads 4 bytes a logit:
1. `_keys_kernel`: each scaled logit x = logits / T (greedy: T = 1) as an order-preserving int32
   key, stored; the chunk's max and min.
2. The support threshold (a key: every token whose key is >= it is in), by a 16-way search over
   the keys, one launch a pass (`_pass_kernel`): each program measures, for its chunk, the count
   (top-k) or the mass Σ exp(x − max) (top-p: the weight recomputed from the key, so no weight
   scratch) of the keys at or above 16 probes, the lower ends of the 16 equal parts of the row's
   interval [lo, hi); the next pass's programs sum the chunks' figures (in one fixed order) and
   keep the part where the answer lies. Top-k's threshold is the largest key K with
   #{x >= K} >= k (the k-th largest value, ties kept whole); top-p's the largest K >= that with
   Σ_{x >= K} exp(x − max) >= top_p · Z_k (Z_k: the top-k-truncated normaliser, the first pass's
   sum at lo) — the value of the least likely token whose preceding mass is still < top_p, as
   truncate_logits defines it; greedy: the max. An interval of at most 2^32 keys is one key wide
   after 8 decisions: PASSES = 9 launches a search. A batch without top-k rows (or without top-p
   rows) skips that search when the caller says so (`uses`).
3. `_totals_kernel`: each chunk's support weight, as the draw's running sum reaches it at the
   chunk's end (block cumsums on a carry), its full normaliser part, its last weighted token.
4. `_draw_kernel`: the uniform u of (seed, step) (sampling.uniforms' 32-bit hash, bit for bit;
   greedy rows u = 0); the goal u · total, with the chunks' prefix sums in fp64; the one chunk
   whose prefix interval holds the goal scans its keys for the first weighted token whose running
   support weight reaches the rest of the goal (at most the chunk's total: the same scan's last
   value). A GPU's tree scan may leave the last weighted token's running sum an ulp below that
   total (the zero weights after it summed in another grouping); a goal in that ulp gets the
   chunk's last weighted token, the one it lies past every other of. A row with no positive
   weight (all −inf, or NaN / inf logits) gets its last weighted token, else the vocabulary's
   last, as the torch sampler's clamped search gives it.
Every sum runs in an order fixed by the row's length and CHUNK alone (no atomics, no dependence on
the batch): a row's token depends on its seed, step and logits only. Rounding differs from the
torch sampler's (per-lane and per-chunk sums, not a sorted cumsum), so a token can differ where a
probe's mass or the draw's goal lies within float rounding of a boundary; the tests check equality
on rows of every kind. Runs on CUDA, or on CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 8192  # logits a program covers: fixed, so that a row's sums never depend on the batch or the card
BLOCK = 1024  # tile of the streaming kernels (keys, totals, the draw)
PASS_BLOCK = 256  # tile of the search passes, by PROBES probes
PROBES = 16  # keys measured a pass: the search keeps one of 16 parts
PASSES = 9  # a 16-way search over at most 2^32 keys: 8 decisions narrow it to one key, after the first pass
MAX_CHUNKS = 256


@triton.jit
def _mul32(x, c: tl.constexpr):
    """x * c mod 2^32 for x in [0, 2^32), in int64: c as its signed 32-bit twin keeps |x·c| < 2^63."""
    if c >= 2147483648:
        y = x * (c - 4294967296)
    else:
        y = x * c
    return y & 0xFFFFFFFF


@triton.jit
def _hash32(x):
    """sampling._hash32 (Wellons' triple32) on a word held in int64."""
    x = x ^ (x >> 17)
    x = _mul32(x, 0xED5AD4BB)
    x = x ^ (x >> 11)
    x = _mul32(x, 0xAC4C1B51)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x31848BAB)
    return x ^ (x >> 14)


@triton.jit
def _key(x):
    """fp32 -> int32 whose signed order is the float order (−0 taken as +0, as comparisons do)."""
    bits = tl.where(x == 0, 0.0, x).to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _temperature(temp_ptr, r):
    """(T as the logits are divided by, greedy): greedy rows (T <= 0) divide by 1, as sample_batch."""
    t = tl.load(temp_ptr + r)
    return tl.where(t <= 0, 1.0, t), t <= 0


@triton.jit
def _chunk(r, c, V, CHUNK: tl.constexpr):
    """(the row's keys offset, this chunk's first and end logit)."""
    start = c * CHUNK
    return r * V, start, tl.minimum(start + CHUNK, V)


@triton.jit
def _row_range(pmax_ptr, pmin_ptr, r, S, S_P2: tl.constexpr):
    """The row's max and min scaled logit, from its chunks' (every program of a row gets the same)."""
    s = tl.arange(0, S_P2)
    ok = s < S
    m = tl.max(tl.load(pmax_ptr + r * S + s, mask=ok, other=float("-inf")), axis=0)
    lo = tl.min(tl.load(pmin_ptr + r * S + s, mask=ok, other=float("inf")), axis=0)
    return m, lo


@triton.jit
def _keys_kernel(logits_ptr, stride_l, temp_ptr, keys_ptr, pmax_ptr, pmin_ptr, kmax_ptr, V, S,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    row = logits_ptr + r * stride_l
    base, start, end = _chunk(r, c, V, CHUNK)
    temp, _ = _temperature(temp_ptr, r)
    m = tl.full((), float("-inf"), tl.float32)
    mn = tl.full((), float("inf"), tl.float32)
    kmax = tl.full((), -2147483648, tl.int32)  # the chunk's largest key (NaN's too: the passes skip by it)
    for v0 in range(start, end, BLOCK):  # helpers inlined in loops: the interpreter pays for each call
        offs = v0 + tl.arange(0, BLOCK)
        ok = offs < end
        x = tl.load(row + offs, mask=ok, other=float("-inf")).to(tl.float32)
        if temp != 1.0:
            x = tl.div_rn(x, temp)  # rounded as torch divides (the GPU's default fp32 division is approximate)
        m = tl.maximum(m, tl.max(x, axis=0))
        mn = tl.minimum(mn, tl.min(tl.where(ok, x, float("inf")), axis=0))
        bits = tl.where(x == 0, 0.0, x).to(tl.int32, bitcast=True)  # _key
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        kmax = tl.maximum(kmax, tl.max(tl.where(ok, key, -2147483648), axis=0))
        tl.store(keys_ptr + base + offs, key, mask=ok)
    tl.store(pmax_ptr + r * S + c, m)
    tl.store(pmin_ptr + r * S + c, mn)
    tl.store(kmax_ptr + r * S + c, kmax)


@triton.jit(do_not_specialize=["i"])
def _pass_kernel(keys_ptr, pmax_ptr, pmin_ptr, kmax_ptr, temp_ptr, topk_ptr, topp_ptr, lo_ptr, hi_ptr, need_ptr,
                 part_ptr, B, V, S, i, FIRST: tl.constexpr, SECOND: tl.constexpr, BY_MASS: tl.constexpr,
                 AFTER_K: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, S_P2: tl.constexpr,
                 PROBES: tl.constexpr):
    """Pass i of the launch sequence (state and partial sums alternate between two slots by i's
    parity: a pass reads slot 1 − i % 2 and writes slot i % 2, so no program reads what another of
    its launch writes). The row's interval [lo, hi): lo qualifies, hi does not; `need` the count or
    mass a key must reach. A chunk whose keys are all below lo adds 0 to every probe: it stores
    zeros without reading its keys (peaked rows leave most chunks behind after a pass or two)."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cur = i % 2
    prev = 1 - cur
    t = tl.load(temp_ptr + r)
    j = tl.arange(0, PROBES)
    m = tl.zeros((), tl.float32)
    if FIRST or BY_MASS:
        m, mn = _row_range(pmax_ptr, pmin_ptr, r, S, S_P2)
    if FIRST:
        if BY_MASS:
            active = (t > 0) & (tl.load(topp_ptr + r) < 1.0)
            if AFTER_K:  # the top-k threshold, the search before this one
                lo = tl.load(lo_ptr + prev * B + r)
            else:
                lo = _key(mn).to(tl.int64)
            need = tl.zeros((), tl.float32)  # top_p · (the mass at lo, measured by this pass)
        else:
            top_k = tl.load(topk_ptr + r)
            active = (t > 0) & (top_k > 0) & (top_k < V)
            lo = _key(mn).to(tl.int64)
            need = top_k.to(tl.float32)  # a count in fp32: exact below 2^24 tokens
        hi = tl.where(active, _key(m).to(tl.int64) + 1, lo + 1)
    else:
        lo = tl.load(lo_ptr + prev * B + r)
        hi = tl.load(hi_ptr + prev * B + r)
        need = tl.load(need_ptr + prev * B + r)
        span = hi - lo
        if span > 1:  # the last pass measured this row's probes: keep the part where the answer lies
            s = tl.arange(0, S_P2)
            parts = tl.load(part_ptr + ((prev * B + r) * S + s[:, None]) * PROBES + j[None, :],
                            mask=(s < S)[:, None], other=0.0)
            sums = tl.sum(parts, axis=0)
            if SECOND:
                if BY_MASS:
                    need = tl.load(topp_ptr + r) * tl.sum(tl.where(j == 0, sums, 0.0), axis=0)
            probes = lo + (span * j) // PROBES
            # the qualifying probes are a prefix (the sums fall as the key rises); probe 0 is lo itself
            q = (sums >= need) | (j == 0)
            new_lo = tl.max(tl.where(q, probes, lo), axis=0)
            hi = tl.min(tl.where(q, hi, probes), axis=0)
            lo = new_lo
    if c == 0:
        tl.store(lo_ptr + cur * B + r, lo)
        tl.store(hi_ptr + cur * B + r, hi)
        tl.store(need_ptr + cur * B + r, need)
    span = hi - lo
    if span > 1:
        probes = (lo + (span * j) // PROBES).to(tl.int32)  # in [lo, hi): within int32's range
        start = c * CHUNK
        end = tl.where(tl.load(kmax_ptr + r * S + c) >= lo, tl.minimum(start + CHUNK, V), start)
        # probes by keys: each lane keeps its keys' sums at every probe, reduced once at the end (a
        # [keys, probes] tile would shuffle every key through shared memory to lanes of probes)
        acc = tl.zeros((PROBES, BLOCK), dtype=tl.float32)
        for v0 in range(start, end, BLOCK):
            offs = v0 + tl.arange(0, BLOCK)
            ok = offs < end
            key = tl.load(keys_ptr + r * V + offs, mask=ok, other=0)
            if BY_MASS:
                x = tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)  # the key's float
                w = tl.exp(x - m)
            else:
                w = tl.full((BLOCK,), 1.0, tl.float32)
            acc += tl.where(ok[None, :] & (key[None, :] >= probes[:, None]), w[None, :], 0.0)
        tl.store(part_ptr + ((cur * B + r) * S + c) * PROBES + j, tl.sum(acc, axis=1))


@triton.jit
def _scan(keys_ptr, base, start, end, thr, m, rest, BLOCK: tl.constexpr):
    """A chunk's support weights (key >= thr) summed as the draw runs over them: each block's cumsum
    on a carry, the carry its last value. -> (the sum at the chunk's end, the sum of all its weights
    exp(x − max), its last weighted token or −1, the first weighted token whose running sum reaches
    `rest` (fp64) or `end`). The totals and the draw both call it: the same sums, bit for bit."""
    carry = tl.zeros((), tl.float32)
    z = tl.zeros((), tl.float32)
    last = tl.full((), -1, tl.int64)
    token = end.to(tl.int64)
    thr = thr.to(tl.int32)  # a key: int32 compares
    for v0 in range(start, end, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        ok = offs < end
        key = tl.load(keys_ptr + base + offs, mask=ok, other=0)
        x = tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)  # the key's float (−0 as +0)
        w_all = tl.where(ok, tl.exp(x - m), 0.0)
        w = tl.where(key >= thr, w_all, 0.0)
        cdf = tl.cumsum(w, axis=0) + carry
        hit = (cdf.to(tl.float64) >= rest) & (w > 0)
        token = tl.minimum(token, tl.min(tl.where(hit, offs.to(tl.int64), end), axis=0))
        last = tl.maximum(last, tl.max(tl.where(w > 0, offs.to(tl.int64), -1), axis=0))
        carry = tl.sum(tl.where(tl.arange(0, BLOCK) == BLOCK - 1, cdf, 0.0), axis=0)
        z += tl.sum(w_all, axis=0)
    return carry, z, last, token


@triton.jit(do_not_specialize=["final"])
def _totals_kernel(keys_ptr, pmax_ptr, pmin_ptr, temp_ptr, lo_ptr, thr_ptr, tot_ptr, z_ptr, last_ptr,
                   B, V, S, final, SEARCHED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                   S_P2: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    m, mn = _row_range(pmax_ptr, pmin_ptr, r, S, S_P2)
    if SEARCHED:
        thr = tl.load(lo_ptr + final * B + r)
    else:
        thr = _key(mn).to(tl.int64)  # the whole row
    _, greedy = _temperature(temp_ptr, r)
    thr = tl.where(greedy, _key(m).to(tl.int64), thr)
    if c == 0:
        tl.store(thr_ptr + r, thr)
    base, start, end = _chunk(r, c, V, CHUNK)
    carry, z, last, _ = _scan(keys_ptr, base, start, end, thr, m, float("inf"), BLOCK)
    tl.store(tot_ptr + r * S + c, carry)
    tl.store(z_ptr + r * S + c, z)
    tl.store(last_ptr + r * S + c, last)


@triton.jit
def _draw_kernel(logits_ptr, stride_l, keys_ptr, pmax_ptr, pmin_ptr, temp_ptr, seed_ptr, step_ptr, thr_ptr,
                 tot_ptr, z_ptr, last_ptr, tok_ptr, lp_ptr, V, S, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 S_P2: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    m, mn = _row_range(pmax_ptr, pmin_ptr, r, S, S_P2)
    temp, greedy = _temperature(temp_ptr, r)
    # the uniform of (seed, step): sampling.uniforms
    seed = tl.load(seed_ptr + r)
    step = tl.load(step_ptr + r)
    h = _hash32((step & 0xFFFFFFFF) ^ 0x9E3779B9)
    h = _hash32(((seed >> 32) & 0xFFFFFFFF) ^ h)
    h = _hash32((seed & 0xFFFFFFFF) ^ h)
    u = (h >> 8).to(tl.float32) * 5.960464477539063e-08  # 2^-24
    u = tl.where(greedy, 0.0, u)
    # the chunks' support totals and their prefix sums, in fp64, computed alike in every program of
    # the row (the same masked sums), so that exactly one chunk's interval (before, through] holds
    # the goal when the total is positive; the goal is above 0, so the token found has weight
    s = tl.arange(0, S_P2)
    tot = tl.load(tot_ptr + r * S + s, mask=s < S, other=0.0).to(tl.float64)
    total = tl.sum(tot, axis=0)
    before = tl.sum(tl.where(s < c, tot, 0.0), axis=0)
    through = tl.sum(tl.where(s <= c, tot, 0.0), axis=0)
    goal = tl.maximum(u.to(tl.float64) * total, 1e-300)
    last = tl.max(tl.load(last_ptr + r * S + s, mask=s < S, other=-1), axis=0)
    token = tl.full((), V, tl.int64)
    weighted = total > 0  # false for a NaN total: no chunk owns the goal then
    owner = weighted & (before < goal) & (goal <= through)
    if owner:
        mine = tl.sum(tl.where(s == c, tot, 0.0), axis=0)
        rest = tl.minimum(goal - before, mine)  # <= the chunk's total, its running sum's last value
        thr = tl.load(thr_ptr + r)
        base, start, end = _chunk(r, c, V, CHUNK)
        _, _, mine_last, token = _scan(keys_ptr, base, start, end, thr, m, rest, BLOCK)
        token = tl.where(token < end, token, mine_last)  # not reached (a tree scan's ulp): its last weighted
    # no chunk holds the goal (no positive weight, or NaN): the row's last weighted token, else V − 1,
    # written by the first chunk's program
    write = owner | ((c == 0) & ~weighted)
    if write:
        token = tl.where(owner, token, tl.where(last >= 0, last, V - 1))
        zs = tl.load(z_ptr + r * S + s, mask=s < S, other=0.0)
        z = tl.sum(zs, axis=0)
        x_tok = tl.load(logits_ptr + r * stride_l + token).to(tl.float32)
        if temp != 1.0:
            x_tok = tl.div_rn(x_tok, temp)
        tl.store(tok_ptr + r, token)
        tl.store(lp_ptr + r, x_tok - m - tl.log(z))


def sample_rows_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       seeds: torch.Tensor, steps: torch.Tensor, uses: tuple[bool, bool] | None = None,
                       chunk: int = CHUNK, num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_batch on the logits' device (see the module docstring). `uses` = (some row has
    top-k, some row has top-p): a search no row needs is not launched. None: read from top_k and
    top_p when they are on the CPU, else both searches run (no host sync; rows without that
    setting leave at once). `chunk` (a power of two >= 16) sets the logits a program covers: a
    row's rounding depends on it, so the engine keeps CHUNK; tests and benches vary it."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"sampler: logits must be [B, V] with contiguous rows, got {tuple(logits.shape)}")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"sampler: chunk must be a power of two >= 16, got {chunk}")
    b, vocab = logits.shape
    if vocab >= 1 << 24:
        raise ValueError(f"sampler: a vocabulary of {vocab} tokens; the kernel counts in fp32, exact below 2^24")
    dev = logits.device
    tokens = torch.empty(b, dtype=torch.int64, device=dev)
    logprobs = torch.empty(b, dtype=torch.float32, device=dev)
    if b == 0:
        return tokens, logprobs
    if uses is None:
        uses = (bool((top_k > 0).any()) if top_k.device.type == "cpu" else True,
                bool((top_p < 1).any()) if top_p.device.type == "cpu" else True)
    temp = temperature.to(device=dev, dtype=torch.float32).contiguous()
    top_k = top_k.to(device=dev, dtype=torch.int64).contiguous()
    top_p = top_p.to(device=dev, dtype=torch.float32).contiguous()
    seeds = seeds.to(device=dev, dtype=torch.int64).contiguous()
    steps = steps.to(device=dev, dtype=torch.int64).contiguous()
    s = triton.cdiv(vocab, chunk)
    if s > MAX_CHUNKS:
        raise ValueError(f"sampler: chunks of {chunk} cut a {vocab}-token vocabulary into {s} (at most {MAX_CHUNKS}: "
                         f"every program reads all its row's chunk sums)")
    grid = (b, s)
    block, pass_block = min(BLOCK, chunk), min(PASS_BLOCK, chunk)
    sizes = dict(CHUNK=chunk, S_P2=triton.next_power_of_2(s))
    keys = torch.empty(b, vocab, dtype=torch.int32, device=dev)  # the scratch: 4 bytes a logit
    pmax, pmin, tot, z = (torch.empty(b, s, dtype=torch.float32, device=dev) for _ in range(4))
    kmax = torch.empty(b, s, dtype=torch.int32, device=dev)
    last = torch.empty(b, s, dtype=torch.int64, device=dev)
    lo, hi = (torch.empty(2, b, dtype=torch.int64, device=dev) for _ in range(2))
    need = torch.empty(2, b, dtype=torch.float32, device=dev)
    part = torch.empty(2, b, s, PROBES, dtype=torch.float32, device=dev)
    thr = torch.empty(b, dtype=torch.int64, device=dev)
    _keys_kernel[grid](logits, logits.stride(0), temp, keys, pmax, pmin, kmax, vocab, s, BLOCK=block,
                       num_warps=num_warps, **sizes)
    i = 0
    for by_mass, used in ((False, uses[0]), (True, uses[1])):
        if not used:
            continue
        for p in range(PASSES):
            _pass_kernel[grid](keys, pmax, pmin, kmax, temp, top_k, top_p, lo, hi, need, part, b, vocab, s, i,
                               FIRST=p == 0, SECOND=by_mass and p == 1, BY_MASS=by_mass,
                               AFTER_K=by_mass and p == 0 and uses[0],
                               BLOCK=pass_block, PROBES=PROBES, num_warps=num_warps, **sizes)
            i += 1
    _totals_kernel[grid](keys, pmax, pmin, temp, lo, thr, tot, z, last, b, vocab, s, (i - 1) % 2,
                         SEARCHED=i > 0, BLOCK=block, num_warps=num_warps, **sizes)
    _draw_kernel[grid](logits, logits.stride(0), keys, pmax, pmin, temp, seeds, steps, thr, tot, z, last,
                       tokens, logprobs, vocab, s, BLOCK=block, num_warps=num_warps, **sizes)
    return tokens, logprobs
