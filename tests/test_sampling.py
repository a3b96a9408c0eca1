"""The batched sampler: counter-based uniforms, reproducibility whatever the batch, the exact
top-k / top-p support at every partial-sort width, frequencies (chi-square), greedy rows and
behaviour log-probs. The chi-square helpers here are also used by test_rollout.py."""
from __future__ import annotations

import pytest
import torch

from engine.rollout import SamplingParams, sampling
from engine.rollout.sampling import sample_batch, sampling_tensors, sequence_seed, truncate_logits, uniforms


# ---- helpers (shared with test_rollout.py) ---------------------------------------------------
def _truncated_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution sampling should draw from, by the definition (fp64, independent of
    truncate_logits): softmax(logits / T) restricted to the tokens at least as likely as the k-th
    most likely, renormalised, then to the smallest set of most likely tokens whose mass reaches
    top_p and every token tied with the least likely of them, renormalised."""
    probs = torch.softmax(logits.double() / temperature, -1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if 0 < top_k < len(probs):
        keep = probs >= probs.sort(descending=True).values[top_k - 1]
    if top_p < 1.0:
        ranked = (probs * keep).sort(descending=True).values
        mass = ranked.cumsum(0) / ranked.sum()
        n = min(int((mass < top_p).sum()) + 1, len(probs))  # tokens before the mass reaches top_p, + the one that does
        keep &= probs >= ranked[n - 1]
    kept = probs * keep
    return kept / kept.sum()


def _chi2_critical(dof: int, z: float = 3.0902) -> float:
    """Upper p = 0.001 point of chi-square(dof) (Wilson-Hilferty, a shade above the exact value
    for dof >= 5: 20.75 vs 20.52 at 5, 66.71 vs 66.62 at 35, 103.5 vs 103.4 at 63)."""
    a = 2.0 / (9 * dof)
    return dof * (1 - a + z * a ** 0.5) ** 3


def _chi2(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """(statistic, dof) over the cells of positive probability; a zero-probability cell drawn fails."""
    support = probs > 0
    assert counts[~support].sum() == 0, f"drew outside the support: {counts[~support].tolist()}"
    expected = probs[support] * n
    assert expected.min() >= 5, "too few samples per cell for a chi-square test"
    return (((counts[support] - expected) ** 2) / expected).sum().item(), int(support.sum()) - 1


def _sample(logits: torch.Tensor, params: SamplingParams | list[SamplingParams], seeds, steps=0):
    """sample_batch over rows of `logits` ([V] is repeated once per seed); steps: an int or one per row."""
    seeds = list(seeds)
    if logits.dim() == 1:
        logits = logits.expand(len(seeds), -1).contiguous()
    params = params if isinstance(params, list) else [params] * len(seeds)
    steps = steps if isinstance(steps, list) else [steps] * len(seeds)
    return sample_batch(logits, *sampling_tensors(params, seeds, steps, logits.device))


def _draws(logits: torch.Tensor, n: int = 400, seed: int = 0, **kw) -> set[int]:
    """The tokens drawn in n rows of one [V] logits row (T = 1 unless given), seeds seed..seed+n-1."""
    params = SamplingParams(**{"temperature": 1.0, **kw})
    return set(_sample(logits, params, range(seed, seed + n))[0].tolist())


# ---- uniforms and seeds ------------------------------------------------------------------
def _triple32(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 17
    x = x * 0xED5AD4BB & m
    x ^= x >> 11
    x = x * 0xAC4C1B51 & m
    x ^= x >> 15
    x = x * 0x31848BAB & m
    return x ^ x >> 14


def test_uniforms_equal_the_unsigned_32_bit_hash_written_out():
    """int64 tensor arithmetic (no unsigned types in torch) gives the hash of plain unsigned
    integers bit for bit, for negative and extreme seeds and steps past 2**32."""
    seeds = [0, 1, -1, 2 ** 63 - 1, -2 ** 63, 123_456_789_012_345, sequence_seed(7, 3), sequence_seed(-5, 1)]
    steps = [0, 1, 2, 3, 2 ** 31, 2 ** 32 + 5, 17, 10 ** 12]
    ours = uniforms(torch.tensor(seeds), torch.tensor(steps))
    for u, s, t in zip(ours.tolist(), seeds, steps):
        s &= 2 ** 64 - 1
        h = _triple32((s & 0xFFFFFFFF) ^ _triple32((s >> 32) ^ _triple32((t & 0xFFFFFFFF) ^ 0x9E3779B9)))
        assert u == (h >> 8) / 2 ** 24


def test_uniforms_are_uniform_within_a_stream_and_across_seeds():
    """Chi-square over 64 cells of u, and over 8 × 8 cells of (u at step t, u at t + 1) and of
    (seed s, seed s + 1) at the same step: no bias, no correlation between neighbours."""
    n = 20_000
    steps = torch.arange(n + 1)
    stream = uniforms(torch.full_like(steps, 42), steps)
    across = uniforms(torch.arange(n + 1) * 1_000_003 + 7, torch.full_like(steps, 3))  # sample seeds of one request
    for u in (stream, across):
        stat, dof = _chi2(torch.bincount((u[:n] * 64).long(), minlength=64).double(), torch.full((64,), 1 / 64), n)
        assert stat < _chi2_critical(dof)
        pairs = (u[:-1] * 8).long() * 8 + (u[1:] * 8).long()
        stat, dof = _chi2(torch.bincount(pairs, minlength=64).double(), torch.full((64,), 1 / 64), n)
        assert stat < _chi2_critical(dof)
    assert 0 <= stream.min() and stream.max() < 1


def test_sequence_seed_formula_and_fresh_entropy():
    assert sequence_seed(7, 3) == 7 * 1_000_003 + 3  # the formula callers' seeds were chosen for
    huge = sequence_seed(2 ** 70, 5)
    assert -2 ** 63 <= huge < 2 ** 63 and huge % 2 ** 64 == (2 ** 70 * 1_000_003 + 5) % 2 ** 64
    assert sequence_seed(-1, 0) == -1_000_003
    state = torch.get_rng_state()
    fresh = {sequence_seed(None, 0) for _ in range(8)}
    assert torch.equal(torch.get_rng_state(), state)  # os.urandom, not torch's global generator
    assert len(fresh) == 8 and all(0 <= s < 2 ** 63 for s in fresh)


# ---- reproducibility ---------------------------------------------------------------------
def _mixed_rows(v: int = 5000, seed: int = 0):
    """Rows that take every path: peaked (nucleus inside 64 candidates), medium (a wider partial
    sort), flat (the full sort), bf16-rounded (ties everywhere), a row with -inf logits; settings
    mixed, greedy among them; int64 seeds of both signs, steps of all sizes."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(12, v, generator=g) * torch.tensor([4, 0.05, 1, 4, 0.05, 1, 4, 0.05, 1, 2, 2, 3])[:, None]
    logits[9:11] = logits[9:11].bfloat16().float()
    logits[11, ::3] = float("-inf")
    params = [SamplingParams(temperature=0.7, top_p=0.95), SamplingParams(temperature=1.0, top_p=0.95),
              SamplingParams(temperature=1.0), SamplingParams(temperature=0),
              SamplingParams(temperature=1.2, top_k=2000, top_p=0.9), SamplingParams(temperature=0.5, top_k=50),
              SamplingParams(temperature=1.0, top_k=5, top_p=0.5), SamplingParams(temperature=0.9, top_p=0.3),
              SamplingParams(temperature=1.1, top_k=300), SamplingParams(temperature=0.7, top_p=0.95),
              SamplingParams(temperature=0, top_k=3), SamplingParams(temperature=0.8, top_k=40, top_p=0.99)]
    seeds = torch.randint(-2 ** 63, 2 ** 63 - 1, (12,), generator=g).tolist()
    seeds = [None if p.temperature == 0 else s for p, s in zip(params, seeds)]
    steps = [0, 1, 5, 0, 77, 2 ** 20, 3, 9, 12, 0, 4, 31]
    return logits, params, seeds, steps


def test_a_row_draws_the_same_token_whatever_the_batch():
    """Each row alone, then inside batches of other sizes, orders and neighbours (duplicates,
    other settings): the same token and log-prob, row for row."""
    logits, params, seeds, steps = _mixed_rows()
    alone = [_sample(logits[i:i + 1], params[i:i + 1], seeds[i:i + 1], steps[i:i + 1]) for i in range(12)]
    g = torch.Generator().manual_seed(1)
    orders = [list(range(12)), list(range(11, -1, -1)), torch.randperm(12, generator=g).tolist(),
              [3, 3, 0, 5, 0], [7], torch.randint(0, 12, (40,), generator=g).tolist()]
    for order in orders:
        tokens, logprobs = _sample(logits[order], [params[i] for i in order], [seeds[i] for i in order],
                                   [steps[i] for i in order])
        for row, i in enumerate(order):
            assert tokens[row] == alone[i][0][0], f"row {i} in batch {order}"
            assert torch.allclose(logprobs[row], alone[i][1][0], rtol=0, atol=1e-6)
    # and the step moves the draw: a sampled row over 64 steps does not repeat one token
    row = 1
    drawn = _sample(logits[row].expand(64, -1), params[row], [seeds[row]] * 64, list(range(64)))[0]
    assert len(set(drawn.tolist())) > 16


@pytest.mark.parametrize("width,widen", [(2, 2), (8, 4), (64, 16), (10 ** 6, 16)])
def test_the_partial_sort_width_changes_no_token(monkeypatch, width, widen):
    """Whether a row's support is found among 2, 8, 64 candidates, after widening, or in the
    whole vocabulary sorted, it draws the same token (bit for bit on CPU)."""
    logits, params, seeds, steps = _mixed_rows()
    expected = _sample(logits, params, seeds, steps)
    monkeypatch.setattr(sampling, "_CANDIDATES", width)
    monkeypatch.setattr(sampling, "_WIDEN", widen)
    tokens, logprobs = _sample(logits, params, seeds, steps)
    assert torch.equal(tokens, expected[0]) and torch.equal(logprobs, expected[1])


def test_different_seeds_draw_differently():
    logits = 0.5 * torch.randn(1000, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=1.0, top_p=0.95)
    a = _sample(logits, params, range(200))[0]
    assert len(set(a.tolist())) > 100
    first, second = (_sample(logits.expand(50, -1), params, [s] * 50, list(range(50)))[0] for s in (11, 12))
    assert (first != second).sum() > 40  # two streams, step by step


# ---- the support ------------------------------------------------------------------------------
def _support_of_threshold(scaled: torch.Tensor, top_k: int, top_p: float, width: int) -> tuple[set[int] | None, float]:
    """(the support `_threshold` finds for one row from its `width` largest logits, None where
    they do not hold it all; its lower bound on the width that does)."""
    vals = scaled.sort(descending=True).values[None, :width]
    z = torch.exp(scaled - scaled.max()).sum()[None]
    thr, ok, need = sampling._threshold(vals, torch.tensor([False]), torch.tensor([top_k]), torch.tensor([top_p]), z,
                                        scaled.shape[0])
    return (set((scaled >= thr).nonzero().flatten().tolist()) if ok.item() else None), need.item()


def test_the_threshold_is_truncate_logits_at_every_width():
    """`_threshold` from the w largest logits either says its candidates do not hold the support
    (and bounds the width that does from below, never past it), or finds exactly truncate_logits'
    support; and at w = V it always does. Rows: unsorted, flat, peaked, and with ties
    (bf16-rounded, and a tie group straddling the top-k and the top-p boundaries)."""
    g = torch.Generator().manual_seed(4)
    v = 400
    rows = [torch.randn(v, generator=g) * s for s in (0.05, 1.0, 3.0)]
    rows.append((torch.randn(v, generator=g) * 2).bfloat16().float())
    tie = torch.full((v,), -5.0)
    tie[[7, 3, 300, 41, 120]] = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0])  # 3 then three 2s
    rows.append(tie)
    settings = [(0, 0.95), (0, 0.5), (0, 0.9999), (5, 1.0), (3, 1.0), (2, 1.0), (50, 0.8), (300, 0.95), (1, 1.0)]
    p3 = torch.softmax(tie, -1)
    settings.append((0, float((p3[7] + p3[7] + p3[3]) / 2)))  # mid-way into the tie group: kept whole
    for i, scaled in enumerate(rows):
        for top_k, top_p in settings:
            expected = set(torch.isfinite(truncate_logits(scaled, top_k, top_p)).nonzero().flatten().tolist())
            # the narrowest candidates that hold it: the support (all of top-k's, for its mass) and one below
            holds = 1 + (len(expected) if top_k == 0 else int((scaled >= scaled.topk(top_k).values[-1]).sum()))
            for width in (1, 2, 8, 64, 399, v):
                got, need = _support_of_threshold(scaled, top_k, top_p, width)
                assert got is None or got == expected, f"row {i}, top_k={top_k}, top_p={top_p}, width={width}"
                assert (got is None) == (width < min(holds, v)) and (got is not None or width < need <= holds)
            assert got == expected
            if i == len(rows) - 1 and top_k in (2, 3):
                assert expected == {7, 3, 300, 41}  # top-k keeps the tie at its k-th value
    assert set(torch.isfinite(truncate_logits(tie, 0, settings[-1][1])).nonzero().flatten().tolist()) == {7, 3, 300, 41}


def test_the_bucketed_nucleus_threshold_is_truncate_logits():
    """`_nucleus_threshold` (a mass histogram by distance from the max; only the boundary bucket
    sorted) finds exactly truncate_logits' top-p support, all rows at once: peaked, flat, spread past
    the buckets' span (the boundary in the catch-all bucket), -inf logits, bf16 ties, a tie group
    straddling the boundary, and a row whose nucleus is its first token."""
    g = torch.Generator().manual_seed(6)
    v = 3000
    rows = [torch.randn(v, generator=g) * s for s in (0.01, 0.3, 1.0, 4.0, 12.0)]
    rows.append(torch.linspace(0, -80, v)[torch.randperm(v, generator=g)])  # 40 nats past the span
    masked = torch.randn(v, generator=g)
    masked[torch.randperm(v, generator=g)[:2500]] = float("-inf")
    rows.append(masked)
    rows.append((torch.randn(v, generator=g) * 2).bfloat16().float())
    tie = torch.full((v,), -5.0)
    tie[[7, 3, 300, 41, 120]] = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0])
    rows.append(tie)
    rows.append(torch.cat([torch.tensor([30.0]), torch.randn(v - 1, generator=g)]))
    scaled = torch.stack(rows)
    for top_p in (0.3, 0.9, 0.95, 0.999, 0.9999):
        top = scaled.amax(-1, keepdim=True)
        weights = torch.exp(scaled - top)
        thr = sampling._nucleus_threshold(scaled, weights, weights.sum(-1), torch.full((len(rows),), top_p), top)
        for i, row in enumerate(scaled):
            # in float64: near top_p = 0.9999 a fp32 cumsum no longer resolves the tail tokens' mass
            expected = torch.isfinite(truncate_logits(row.double(), 0, top_p))
            assert torch.equal(row >= thr[i], expected), (i, top_p, int((row >= thr[i]).sum()), int(expected.sum()))


@pytest.mark.parametrize("candidates", [4, 64])
def test_draws_stay_in_truncate_logits_support_and_cover_it(monkeypatch, candidates):
    """Small vocabulary: over 3,000 draws per setting no token outside truncate_logits' support
    appears, and every token in it does (each has mass >= 0.5 %); with a flat row the first
    candidates do not reach top_p and wider sorts take over, to the same effect."""
    monkeypatch.setattr(sampling, "_CANDIDATES", candidates)
    g = torch.Generator().manual_seed(5)
    peaked = torch.randn(24, generator=g) * 0.8
    flat = 0.05 * torch.randn(200, generator=g)
    cases = [(peaked, 1.0, 0, 0.9), (peaked, 0.7, 6, 1.0), (peaked, 1.3, 10, 0.8), (peaked, 1.0, 0, 1.0),
             (flat, 1.0, 0, 0.9), (flat, 1.0, 150, 0.95), (flat, 0.5, 0, 0.5)]
    for logits, t, top_k, top_p in cases:
        support = set(torch.isfinite(truncate_logits(logits / t, top_k, top_p)).nonzero().flatten().tolist())
        assert min(_truncated_probs(logits, t, top_k, top_p)[sorted(support)]) > 0.005 or len(logits) == 200
        drawn = _draws(logits, 3000 if len(logits) < 200 else 12_000, temperature=t, top_k=top_k, top_p=top_p)
        assert drawn == support, f"T={t}, top_k={top_k}, top_p={top_p}: {sorted(drawn ^ support)}"
        if logits is flat and top_p < 1:
            assert len(support) > 64  # past the first candidates, and past a quarter of the vocabulary


# ---- frequencies -----------------------------------------------------------------------------
FREQ_CASES = [(0.8, 0, 1.0), (1.0, 0, 0.95), (0.7, 0, 0.95), (1.3, 5, 1.0), (1.0, 4, 0.8), (1.5, 7, 0.6)]


@pytest.mark.parametrize("temperature,top_k,top_p", FREQ_CASES)
def test_frequencies_match_the_truncated_softmax(temperature, top_k, top_p):
    """Chi-square (p = 0.001) of 4,000 first tokens of different seeds, and of 4,000 tokens of
    one stream (steps 0..3,999), against softmax(logits / T) truncated by definition; logits
    unsorted, with a tie."""
    logits = torch.tensor([0.3, 1.2, -0.4, 0.9, 1.2, -1.0, 0.1, 0.6, -0.2, 0.5])
    probs = _truncated_probs(logits, temperature, top_k, top_p)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    n = 4000
    for seeds, steps in ((range(n), 0), ([99] * n, list(range(n)))):
        tokens = _sample(logits, params, seeds, steps)[0]
        stat, dof = _chi2(torch.bincount(tokens, minlength=10).double(), probs, n)
        assert stat < _chi2_critical(dof), f"chi2 = {stat:.1f} on {dof} dof"


def test_ties_at_the_top_p_boundary_are_drawn_evenly():
    """A tie group straddles the top-p boundary: it is kept whole and its tokens drawn alike;
    the token after it never."""
    logits = torch.tensor([0.0, 2.0, -1.0, 2.0, 3.0, 2.0, 0.5])
    p = torch.softmax(logits.double(), -1)
    top_p = float(p[4] + 0.5 * p[1])  # the nucleus ends half-way into the three 2.0s
    probs = _truncated_probs(logits, 1.0, 0, top_p)
    assert set(probs.nonzero().flatten().tolist()) == {1, 3, 4, 5}
    n = 4000
    tokens = _sample(logits, SamplingParams(temperature=1.0, top_p=top_p), range(n))[0]
    stat, dof = _chi2(torch.bincount(tokens, minlength=7).double(), probs, n)
    assert stat < _chi2_critical(dof)


# ---- greedy rows and behaviour log-probs -----------------------------------------------------
def test_greedy_rows_take_the_argmax_among_sampled_rows():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(16, 500, generator=g)
    logits[3, [10, 20]] = 50.0  # a tie at the top: the lowest id, as torch.argmax
    params = [SamplingParams(temperature=0 if i % 2 else 1.0, top_p=0.9) for i in range(16)]
    params[3] = SamplingParams(temperature=0)
    seeds = [None if p.temperature == 0 else i for i, p in enumerate(params)]
    tokens, _ = _sample(logits, params, seeds, list(range(16)))
    greedy = torch.tensor([p.temperature == 0 for p in params])
    assert torch.equal(tokens[greedy], logits[greedy].argmax(-1)) and tokens[3] == 10
    assert not torch.equal(tokens[~greedy], logits[~greedy].argmax(-1))
    # more ties at the top than the partial sort's 64 candidates: still the lowest-id argmax, at top-p 1
    flat = torch.zeros(2, 500)
    flat[:, 300:400] = 5.0
    tokens, _ = _sample(flat, [SamplingParams(temperature=0)] * 2, [None, None], [0, 0])
    assert tokens.tolist() == [300, 300]


def test_item_seeds_differ_by_item_and_not_by_batch():
    from engine.rollout.sampling import item_seed
    assert item_seed(0, "a") == item_seed(0, "a") != item_seed(0, "b") != item_seed(1, "b")
    assert item_seed(None, "a") is None and 0 <= item_seed(7, "x") < 2 ** 31


def test_behaviour_logprobs_are_log_softmax_of_the_scaled_logits_before_truncation():
    logits, params, seeds, steps = _mixed_rows(seed=7)
    tokens, logprobs = _sample(logits, params, seeds, steps)
    t = torch.tensor([p.temperature or 1.0 for p in params])  # greedy: T = 1
    expected = torch.log_softmax(logits.double() / t[:, None].double(), -1).gather(1, tokens[:, None]).squeeze(1)
    assert logprobs.dtype == torch.float32 and tokens.dtype == torch.int64
    torch.testing.assert_close(logprobs.double(), expected, rtol=0, atol=1e-5)


# ---- through the engine ----------------------------------------------------------------------
def test_sampled_rollouts_do_not_depend_on_the_batch_or_on_preemption(tiny_checkpoint):
    """A seeded request samples the same tokens alone or beside other requests, and when a tight
    cache preempts and recomputes its sequences: each draw hangs on (seed, sample, step) only."""
    from engine.model import load_model
    from engine.rollout import CacheConfig, Generator
    path, _ = tiny_checkpoint("qwen2")
    model, _ = load_model(path, device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 331, (n,), generator=g).tolist() for n in (9, 14, 6)]
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True) for s in (5, 6, 7)]
    params[1] = SamplingParams(max_new_tokens=12, temperature=0.7, top_k=20, seed=6, ignore_eos=True)

    def tokens(out):
        return [[c.token_ids for c in group] for group in out]

    together = tokens(Generator(model).generate(prompts, n=2, params=params))
    alone = [tokens(Generator(model).generate([p], n=2, params=[q]))[0] for p, q in zip(prompts, params)]
    assert together == alone
    tight = Generator(model, cache_cfg=CacheConfig(block_size=4, num_blocks=12))
    assert tokens(tight.generate(prompts, n=2, params=params)) == together and tight.stats.preemptions > 0
    assert together[0][0] != together[0][1]  # the samples of a request differ
