"""The Triton sampler (kernels/triton_sample.py) against the torch sampler it stands in for
(engine.rollout.sampling.sample_batch, whose support, uniforms and distribution
tests/test_sampling.py checks): the same tokens and log-probs on rows of every kind, each row in
one chunk and in several. On the GPU when there is one, else under the Triton interpreter (small
vocabularies and few rows: the interpreter runs each (row, chunk) program of each pass in turn)."""
from __future__ import annotations

import pytest
import torch
from test_sampling import _mixed_rows

from engine.rollout import SamplingParams
from engine.rollout import sampling
from engine.rollout.sampling import sample_batch, sampler_backend, sampling_tensors
from kernels.triton_sample import CHUNK, sample_rows_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _both(logits, params, seeds, steps, chunk=CHUNK, uses=None):
    st = sampling_tensors(params, seeds, steps, "cpu")
    want = sample_batch(logits.clone(), *st)
    got = sample_rows_triton(logits.to(DEVICE), *(x.to(DEVICE) for x in st), chunk=chunk, uses=uses)
    return want, tuple(x.cpu() for x in got)


@pytest.mark.parametrize("seed,chunk,blocks", [(0, CHUNK, None), (1, 256, (64, 32))])
def test_the_kernel_draws_the_torch_samplers_tokens(seed, chunk, blocks, monkeypatch):
    """Rows of every kind (peaked, flat, bf16-rounded ties, -inf logits; greedy, top-k, top-p,
    both, temperature 0.5-1.2; seeds of both signs, steps up to 2^20) over 700 tokens: in one
    chunk; in three chunks of 256 (a partial last one; the goal's chunk found among them), each
    read in tiles of 64 (the draw's carry from block to block) and searched in tiles of 32."""
    import kernels.triton_sample as ts

    if blocks:
        monkeypatch.setattr(ts, "BLOCK", blocks[0])
        monkeypatch.setattr(ts, "PASS_BLOCK", blocks[1])
    logits, params, seeds, steps = _mixed_rows(v=700, seed=seed)
    (want_t, want_lp), (got_t, got_lp) = _both(logits, params, seeds, steps, chunk)
    assert got_t.tolist() == want_t.tolist()
    assert got_t.dtype == torch.int64 and got_lp.dtype == torch.float32
    torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=1e-5)  # a GPU's exp is approximate


def test_a_row_draws_the_same_token_whatever_the_batch_and_the_searches_launched():
    """A row alone and inside a batch of other rows (other settings): the same token and
    log-prob bit for bit (nothing a row sums depends on its neighbours). A search no row needs may
    run or not (`uses`: on a GPU without the hint both run, and rows without that setting leave)."""
    logits, params, seeds, steps = _mixed_rows(v=300, seed=4)
    pick = [1, 4, 3, 5]  # top-p, top-k + top-p, greedy, top-k
    st = sampling_tensors([params[i] for i in pick], [seeds[i] for i in pick], [steps[i] for i in pick], DEVICE)
    rows = logits[pick].to(DEVICE)
    batch = sample_rows_triton(rows, *st, chunk=128)
    for r in (0, 2):
        alone = sample_rows_triton(rows[r:r + 1].contiguous(), *(x[r:r + 1] for x in st), chunk=128)
        assert alone[0].item() == batch[0][r].item() and alone[1].item() == batch[1][r].item()
    top_p_only = [0, 0]
    both = sample_rows_triton(rows[top_p_only].contiguous(), *(x[top_p_only] for x in st), chunk=128,
                              uses=(True, True))
    assert both[0].tolist() == batch[0][top_p_only].tolist() and torch.equal(both[1], batch[1][top_p_only])
    greedy = sample_rows_triton(rows[2:3].contiguous(), *(x[2:3] for x in st), chunk=128, uses=(False, False))
    assert greedy[0].item() == batch[0][2].item() == int(rows[2].argmax())
    with pytest.raises(ValueError, match="power of two"):
        sample_rows_triton(rows, *st, chunk=100)
    with pytest.raises(ValueError, match="at most 256"):
        sample_rows_triton(torch.zeros(1, 4097, device=DEVICE), *(x[:1] for x in st), chunk=16)


def test_boundary_ties_and_steps():
    """A tie group straddling the top-p boundary, drawn over 24 steps of one seed (the uniforms'
    step input), and a top-k boundary inside a tie group: token for token the torch sampler's."""
    logits = torch.tensor([0.0, 2.0, -1.0, 2.0, 3.0, 2.0, 0.5])
    p = torch.softmax(logits.double(), -1)
    top_p = float(p[4] + 0.5 * p[1])  # the nucleus ends half-way into the three 2.0s
    rows = logits.expand(24, -1).contiguous()
    for params in (SamplingParams(temperature=1.0, top_p=top_p), SamplingParams(temperature=1.0, top_k=2)):
        (want, _), (got, _) = _both(rows, [params] * 24, [12345] * 24, list(range(24)))
        assert got.tolist() == want.tolist()
        assert set(got.tolist()) == {1, 3, 4, 5}  # ties kept whole, the token after them never


def test_a_chunk_whose_largest_key_is_the_top_k_threshold_counts_in_top_p():
    """Passes skip chunks whose keys all lie below the interval; one whose largest key is the top-k
    threshold itself still holds mass at it: top-k 2 keeps 5.0 (first chunk) and 4.0 (second), so
    top-p 0.8 needs 0.8 · (1 + e^-1) — more than 5.0's weight alone — and keeps both."""
    row = torch.full((6, 32), -10.0)
    row[:, 3], row[:, 20] = 5.0, 4.0
    (want, _), (got, _) = _both(row, [SamplingParams(temperature=1.0, top_k=2, top_p=0.8)] * 6, [9] * 6,
                                list(range(6)), chunk=16)
    assert got.tolist() == want.tolist() and set(got.tolist()) == {3, 20}


def test_signed_zeros_and_rows_without_a_finite_weight():
    """−0.0 and +0.0 are one value (a top-k boundary between them keeps both, as torch compares);
    a row of −inf, or with +inf or NaN logits, still gets a token inside the vocabulary."""
    logits = torch.tensor([1.0, 0.0, -0.0, -1.0]).expand(24, -1).contiguous()
    (want, _), (got, _) = _both(logits, [SamplingParams(temperature=1.0, top_k=2)] * 24, [7] * 24, list(range(24)))
    assert got.tolist() == want.tolist() and 2 in got.tolist()
    bad = torch.randn(3, 50)
    bad[0] = float("-inf")
    bad[1, 7] = float("inf")
    bad[2, 3] = float("nan")
    for params in (SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.0)):
        st = sampling_tensors([params] * 3, [1, 2, 3], [0, 0, 0], DEVICE)
        torch_tokens, _ = sample_batch(bad.clone(), *(x.cpu() for x in st))  # the torch sampler as well
        assert all(0 <= t < 50 for t in torch_tokens.tolist()), torch_tokens
        for chunk in (CHUNK, 16):  # in one chunk and in four
            tokens, _ = sample_rows_triton(bad.to(DEVICE), *st, chunk=chunk)
            assert all(0 <= t < 50 for t in tokens.tolist()), tokens
            assert tokens[0] == torch_tokens[0] == 49  # no finite weight at all: the last token, in both
    # a NaN in a later chunk than the support (top-k 1: token 20 alone, in the second chunk of 16): the
    # row's total is NaN, so no chunk owns the goal and one program writes the row's last weighted token
    row = torch.full((1, 64), -5.0)
    row[0, 20], row[0, 40] = 3.0, float("nan")
    st = sampling_tensors([SamplingParams(temperature=1.0, top_k=1)], [5], [0], DEVICE)
    tokens, _ = sample_rows_triton(row.to(DEVICE), *st, chunk=16)
    assert tokens.tolist() == [20]


def test_a_uniform_next_to_one_finds_its_token_without_the_fallback():
    """u within a few ulps of 1 (steps chosen for it) on one dominant logit and 127 tiny ones:
    the goal u · total must not pass the running sum the draw compares, or no token is found
    and the row falls back to its last token (127). The draw compares the part of the goal left
    in its chunk, at most that chunk's total, the chunk's running sum's last value; in one chunk
    and in four. Which tiny token is drawn is a matter of rounding (torch's CPU
    cumsum accumulates in fp64), so only the fallback is checked."""
    logits = torch.full((3, 128), -17.5)
    logits[:, 0] = 0.0
    steps = [269717, 443457, 1164063]
    st = sampling_tensors([SamplingParams(temperature=1.0)] * 3, [0, 0, 0], steps, DEVICE)
    assert bool((sampling.uniforms(st[3].cpu(), st[4].cpu()) > 1 - 1e-5).all())  # the case: u near 1
    for chunk in (CHUNK, 32):
        tokens, logprobs = sample_rows_triton(logits.to(DEVICE), *st, chunk=chunk)
        assert all(t < 127 for t in tokens.tolist()), (chunk, tokens)
        assert bool(torch.isfinite(logprobs).all())


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # ±3e38 − 3e38 in the interpreter: −inf, exp 0
def test_adjacent_floats_at_a_top_k_boundary():
    """A value and the next float below it on either side of a top-k = 1 boundary, positive and
    negative, with −inf in the row (so the keys span their whole range): the search over the
    float keys must end on the value itself, not one ulp off, and keep exactly the maximum, as
    torch's comparison does (the rows of 3e38 tie it with v − 5 and v − 6: ties are kept whole).
    3 steps of each row in one call (a step draws its own uniform among the 3e38 rows' ties)."""
    import numpy as np

    def below(x):
        return float(np.nextafter(np.float32(x), np.float32(-np.inf)))
    inf = float("inf")
    rows = []
    for v in (1.0, -1.0, -3.0, 1e-30, 3e38):
        rows += [[-inf, v, below(v), v - 5, v - 6], [v, below(v), v / 2 - 1, -inf, -abs(v) - 7]]
    logits = torch.tensor(rows).repeat(3, 1)
    steps = [s for s in range(3) for _ in rows]
    (want, _), (got, _) = _both(logits, [SamplingParams(temperature=1.0, top_k=1)] * len(logits), [11] * len(logits),
                                steps)
    assert got.tolist() == want.tolist()
    assert torch.equal(logits.gather(1, got[:, None]).squeeze(1), logits.max(-1).values)


def test_sampler_backend_choice(monkeypatch):
    monkeypatch.delenv("LONGRL_SAMPLER", raising=False)
    assert sampler_backend(torch.device("cpu")) == "torch"
    assert sampler_backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv("LONGRL_SAMPLER", "torch")
    assert sampler_backend(torch.device("cuda")) == "torch"
    monkeypatch.setenv("LONGRL_SAMPLER", "fast")
    with pytest.raises(ValueError, match="LONGRL_SAMPLER must be one of"):
        sampler_backend(torch.device("cpu"))


def test_a_rollout_with_the_kernel_sampler_equals_the_torch_one(tiny_checkpoint, monkeypatch):
    """Through the engine (the sampler `sampling.sample` picks): the same completions, log-probs
    within float rounding."""
    from engine.model import load_model
    from engine.rollout import Generator

    path, _ = tiny_checkpoint("qwen2", vocab_size=97)
    model = load_model(path, device=DEVICE, dtype="float32")[0]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (7, 12)]
    params = [SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=5, stop_token_ids=[]),
              SamplingParams(max_new_tokens=6, temperature=1.0, top_k=7, seed=6, stop_token_ids=[])]
    out = {}
    calls = []
    real = sampling.sample_batch
    monkeypatch.setattr(sampling, "sample_batch", lambda *a: calls.append(1) or real(*a))
    for backend in ("torch", "triton"):
        monkeypatch.setenv("LONGRL_SAMPLER", backend)
        calls.clear()
        res = Generator(model).generate(prompts, n=2, params=params)
        out[backend] = [[(c.token_ids, c.logprobs) for c in group] for group in res]
        assert bool(calls) == (backend == "torch")  # the kernel ran instead of the torch sampler
    for group_t, group_k in zip(out["torch"], out["triton"], strict=True):
        for (tt, lt), (tk, lk) in zip(group_t, group_k, strict=True):
            assert tk == tt
            torch.testing.assert_close(torch.tensor(lk), torch.tensor(lt), rtol=0, atol=1e-5)


def test_sampler_ops_counts_the_torch_samplers_calls_and_syncs():
    """bench/sampler_ops.py (the figure behind the kernel's reason to exist)."""
    from bench.sampler_ops import count

    r = count(rows=4, vocab=300, top_p=0.9, temperature=1.0)
    assert r["torch_calls"] > 100 and 0 < r["host_syncs_on_gpu"] == sum(r["syncs"].values())
    assert r["syncs"].get("nonzero", 0) >= 1
