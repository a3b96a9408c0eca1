"""The rollout's batched sampler as one Triton kernel: engine.rollout.sampling.sample_batch's
function (same arguments, same support, same uniforms, same draw rule), one program per row.

    sample_rows_triton(logits [B, V], temperature, top_k, top_p, seeds, steps) -> (tokens [B] int64,
                                                                                 log-probs [B] fp32)

Why: in torch a sampler step of 64 rows is 269 torch calls, 16 of them needing a device value
on the host (`python -m bench.sampler_ops`): on a GPU, launch overhead and syncs beside a decode
step replayed as one CUDA graph; here it is one launch. A row's program streams its logits
twice and then its own scratch (8 bytes a logit, [B, V] int32 + fp32, allocated per call):
1. max, min, and each scaled logit x = logits / T (greedy: T = 1)'s order-preserving integer key,
   stored; then each weight exp(x − max), stored, and their sum Z;
2. the support threshold, found by a search over the keys, each pass one read of the
   row's keys (and weights): top-k's threshold is the largest key K with #{x ≥ K} ≥ k (the
   k-th largest value, ties kept whole); top-p's is the largest K ≥ that with
   Σ_{x ≥ K} exp(x − max) ≥ top_p · Z_k (Z_k: the top-k-truncated normaliser) — the value of
   the least likely token whose preceding mass is still < top_p, as truncate_logits defines
   it; greedy: the max. A four-way search, three keys measured in each pass: at most 17
   passes for each (the key range is 2^32), so a row with both is read about 40 times. The
   version before the scratch, a bisection that recomputed x / T and the exp of every logit
   in every probe (4 warps, tiles of 1,024), took 4.6 ms of device time a decode step for 64
   rows of a 152K vocabulary at top-p 0.95 on an H200 (torch.profiler, 2026-11-26); this one
   1.1 ms on an H100, the earlier 4.7 ms in the same run (bench/gpu_sampler_case.py);
3. the uniform u of (seed, step), the same 32-bit hash as sampling.uniforms (int64
   arithmetic with the multipliers' signed twins, so it is bit for bit that function); greedy
   rows u = 0;
4. the draw: the first token in vocabulary order whose cumulative support weight reaches
   u · total (above 0), in blocks with a running carry.
Sums run in a fixed order per row (no atomics): a row's token depends on its seed, step and
logits only. Rounding differs from the torch sampler's (block sums, not a sorted cumsum), so a
token can differ where a probe's mass or the draw's target lies within float rounding of a
boundary; the tests check equality on rows of every kind. Runs on CUDA, or on CPU under
TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

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
def _load(row, v0, V, temp, BLOCK_V: tl.constexpr):
    """A block of the row's scaled logits: logits / temp, rounded as torch divides (div_rn: the
    GPU's default fp32 division is approximate); at T = 1 the logits as they are (x / 1 == x)."""
    offs = v0 + tl.arange(0, BLOCK_V)
    ok = offs < V
    raw = tl.load(row + offs, mask=ok, other=float("-inf")).to(tl.float32)
    if temp != 1.0:
        raw = tl.div_rn(raw, temp)
    return raw, offs, ok


@triton.jit
def _block(keys, weights, v0, V, BY_MASS: tl.constexpr, BLOCK_V: tl.constexpr):
    """A block of the row's scratch: (offsets, in range, keys, weights; BY_MASS False: weight 1,
    for counts)."""
    offs = v0 + tl.arange(0, BLOCK_V)
    ok = offs < V
    key = tl.load(keys + offs, mask=ok, other=0)
    if BY_MASS:
        w = tl.load(weights + offs, mask=ok, other=0.0)
    else:
        w = tl.full((BLOCK_V,), 1.0, tl.float32)
    return offs, ok, key, w


@triton.jit
def _above(keys, weights, V, k, BY_MASS: tl.constexpr, BLOCK_V: tl.constexpr):
    """#{x ≥ key k} or (BY_MASS) Σ_{x ≥ key k} exp(x − m) over the row, from its keys and weights
    (a count in fp32: exact below 2^24 tokens). Per-lane sums, reduced once at the end."""
    acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs, ok, key, w = _block(keys, weights, v0, V, BY_MASS, BLOCK_V)
        acc += tl.where(ok & (key >= k), w, 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _largest_key(keys, weights, V, lo, hi, need, BY_MASS: tl.constexpr, BLOCK_V: tl.constexpr):
    """The largest key K in [lo, hi) whose count (or, BY_MASS, mass) of values >= K reaches
    `need` (lo must qualify, hi must not), by a four-way search: each pass over the row measures
    three keys at once (the quarter points) and keeps the quarter where the answer lies; a span
    of at most 2^32 keys needs 16 passes (one more kept as a margin). The sums of a key are
    _above's, in the same order."""
    for _ in range(17):
        if hi - lo > 1:
            span = hi - lo
            k1 = lo + span // 4
            k2 = lo + span // 2
            k3 = lo + (span * 3) // 4
            a1 = tl.zeros((BLOCK_V,), dtype=tl.float32)
            a2 = tl.zeros((BLOCK_V,), dtype=tl.float32)
            a3 = tl.zeros((BLOCK_V,), dtype=tl.float32)
            for v0 in range(0, V, BLOCK_V):
                offs, ok, key, w = _block(keys, weights, v0, V, BY_MASS, BLOCK_V)
                a1 += tl.where(ok & (key >= k1), w, 0.0)
                a2 += tl.where(ok & (key >= k2), w, 0.0)
                a3 += tl.where(ok & (key >= k3), w, 0.0)
            # the qualifying keys are a prefix of k1 <= k2 <= k3 (the sums fall as the key rises)
            q1 = tl.sum(a1, axis=0) >= need
            q2 = tl.sum(a2, axis=0) >= need
            q3 = tl.sum(a3, axis=0) >= need
            new_lo = tl.where(q3, k3, tl.where(q2, k2, tl.where(q1, k1, lo)))
            hi = tl.where(q1, tl.where(q2, tl.where(q3, hi, k3), k2), k1)
            lo = new_lo
    return lo


@triton.jit
def _block_cdf(keys, weights, v0, V, thr, carry, BLOCK_V: tl.constexpr):
    """A block's support weights (keys >= thr), their cumsum on the carry, and its last value
    (the next block's carry)."""
    offs, ok, key, w = _block(keys, weights, v0, V, True, BLOCK_V)
    w = tl.where(ok & (key >= thr), w, 0.0)
    cdf = tl.cumsum(w, axis=0) + carry
    return offs, w, cdf, tl.sum(tl.where(tl.arange(0, BLOCK_V) == BLOCK_V - 1, cdf, 0.0), axis=0)


@triton.jit
def _sample_kernel(logits_ptr, stride_l, temp_ptr, topk_ptr, topp_ptr, seed_ptr, step_ptr, tok_ptr, lp_ptr,
                   keys_ptr, weights_ptr, V, BLOCK_V: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row = logits_ptr + r * stride_l
    keys = keys_ptr + r * V  # the row's scratch: each scaled logit's key, and its weight exp(x − max)
    weights = weights_ptr + r * V
    t = tl.load(temp_ptr + r)
    greedy = t <= 0
    temp = tl.where(greedy, 1.0, t)  # logits / T, as sample_batch divides
    top_k = tl.load(topk_ptr + r)
    top_p = tl.load(topp_ptr + r)
    # 1. max, min, the keys; then the weights and their sum, the normaliser
    m = tl.full((), float("-inf"), tl.float32)
    lo_x = tl.full((), float("inf"), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        x, offs, ok = _load(row, v0, V, temp, BLOCK_V)
        m = tl.maximum(m, tl.max(x, axis=0))
        lo_x = tl.minimum(lo_x, tl.min(tl.where(ok, x, float("inf")), axis=0))
        tl.store(keys + offs, _key(x), mask=ok)
    z = tl.zeros((), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        x, offs, ok = _load(row, v0, V, temp, BLOCK_V)
        w = tl.exp(x - m)
        z += tl.sum(w, axis=0)
        tl.store(weights + offs, w, mask=ok)
    # 2. the support threshold (a key): every key >= thr is in
    top_key = _key(m).to(tl.int64)
    thr = _key(lo_x).to(tl.int64)  # the whole row
    zk = z
    if (t > 0) & (top_k > 0) & (top_k < V):  # #{x >= thr} = V >= k holds, #{x > max} = 0 < k
        thr = _largest_key(keys, weights, V, thr, top_key + 1, top_k, False, BLOCK_V)
        zk = _above(keys, weights, V, thr, True, BLOCK_V)
    if (t > 0) & (top_p < 1.0):  # the mass above thr is zk >= top_p * zk, above the max none
        thr = _largest_key(keys, weights, V, thr, top_key + 1, top_p * zk, True, BLOCK_V)
    if greedy:
        thr = top_key
    # 3. the uniform of (seed, step): sampling.uniforms
    seed = tl.load(seed_ptr + r)
    step = tl.load(step_ptr + r)
    h = _hash32((step & 0xFFFFFFFF) ^ 0x9E3779B9)
    h = _hash32(((seed >> 32) & 0xFFFFFFFF) ^ h)
    h = _hash32((seed & 0xFFFFFFFF) ^ h)
    u = (h >> 8).to(tl.float32) * 5.960464477539063e-08  # 2^-24
    u = tl.where(greedy, 0.0, u)
    # 4. the draw, in vocabulary order. The total is the draw's own running sum (each block's cumsum
    # on the carry, the carry its last value), so u < 1 keeps the goal below the value the draw
    # reaches at the support's end (a sequential scan: the last weighted token's value is the total
    # bit for bit; a GPU's tree scan may round it below, and the fallback then takes that token)
    total = tl.zeros((), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs, w, cdf, total = _block_cdf(keys, weights, v0, V, thr, total, BLOCK_V)
    goal = tl.maximum(u * total, 1.1754943508222875e-38)  # above 0: the token found has weight
    carry = tl.zeros((), dtype=tl.float32)
    token = tl.full((), V, tl.int64)
    last = tl.full((), -1, tl.int64)  # the support's last token
    for v0 in range(0, V, BLOCK_V):
        offs, w, cdf, cdf_end = _block_cdf(keys, weights, v0, V, thr, carry, BLOCK_V)
        hit = (cdf >= goal) & (w > 0)
        token = tl.minimum(token, tl.min(tl.where(hit, offs.to(tl.int64), V), axis=0))
        last = tl.maximum(last, tl.max(tl.where(w > 0, offs.to(tl.int64), -1), axis=0))
        carry = cdf_end
    # a row with no positive weight (all −inf, or NaN / inf logits) gets the last token, as the
    # torch sampler's clamped search gives it; a weighted row whose goal rounding left past its
    # cumulative values gets its last weighted token, the draw's own answer
    token = tl.where(token < V, token, tl.where(last >= 0, last, V - 1))
    x_tok = tl.load(row + token).to(tl.float32)
    if temp != 1.0:
        x_tok = tl.div_rn(x_tok, temp)
    tl.store(tok_ptr + r, token)
    tl.store(lp_ptr + r, x_tok - m - tl.log(z))


def sample_rows_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       seeds: torch.Tensor, steps: torch.Tensor,
                       block: int | None = None, num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_batch on the logits' device in one launch (see the module docstring). The tile
    width and warps are the row kernels' (kernels.triton_rows.launch_config: timed once per
    vocabulary size, dtype and card on a GPU); `block` forces a width (with `num_warps`)."""
    from kernels.triton_rows import launch_config

    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"sampler: logits must be [B, V] with contiguous rows, got {tuple(logits.shape)}")
    b, vocab = logits.shape
    if vocab >= 1 << 24:
        raise ValueError(f"sampler: a vocabulary of {vocab} tokens; the kernel counts in fp32, exact below 2^24")
    dev = logits.device
    tokens = torch.empty(b, dtype=torch.int64, device=dev)
    logprobs = torch.empty(b, dtype=torch.float32, device=dev)
    if b == 0:
        return tokens, logprobs
    keys = torch.empty(b, vocab, dtype=torch.int32, device=dev)  # each row's scratch (8 bytes a logit)
    weights = torch.empty(b, vocab, dtype=torch.float32, device=dev)
    args = (temperature.to(device=dev, dtype=torch.float32).contiguous(),
            top_k.to(device=dev, dtype=torch.int64).contiguous(),
            top_p.to(device=dev, dtype=torch.float32).contiguous(),
            seeds.to(device=dev, dtype=torch.int64).contiguous(), steps.to(device=dev, dtype=torch.int64).contiguous(),
            tokens, logprobs, keys, weights, vocab)

    def launch(rows, block_v, warps):  # rows: the first rows of the logits (the tuning times a few)
        _sample_kernel[(rows.shape[0],)](rows, rows.stride(0), *args, BLOCK_V=block_v, num_warps=warps)

    config = (min(block, triton.next_power_of_2(vocab)), num_warps) if block else \
        launch_config("sample", logits, launch)
    launch(logits, *config)
    return tokens, logprobs
