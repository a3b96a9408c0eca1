"""The paged rollout engine: parity with transformers, group sharing, preemption, chunked
prefill, sampling statistics, behaviour log-probs, and the torch path's shared-prefix decode."""
from __future__ import annotations

import pytest
import torch
from test_sampling import _chi2, _chi2_critical, _draws, _sample, _truncated_probs

from engine.data import build_prompt_ids
from engine.model import load_model
from engine.rollout import (BlockManager, CacheConfig, CacheTooSmall, Generator, NoFreeBlocks, SamplingParams)
from engine.rollout.sampling import truncate_logits
from kernels import linear_logprob
from kernels.paged_attention import paged_decode_attention_ref


def _hf_greedy(hf, prompt, n, eos=None):
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos if eos is not None else 0)
    new = out[0, len(prompt):].tolist()
    return new[: new.index(eos) + 1] if eos is not None and eos in new else new


GREEDY = SamplingParams(max_new_tokens=24, temperature=0)


def _tiny(tiny_checkpoint, kind, **overrides):
    path, hf = tiny_checkpoint(kind, **overrides)
    model, _ = load_model(path, device="cpu", dtype="float32")
    return model, hf


def _prompts(vocab, lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# ---- parity -----------------------------------------------------------------------------
def test_greedy_matches_transformers_embedded(smollm, hf_smollm):
    model, tok = smollm
    doc = "The Lindqvist Bridge opened in 1931. It was designed by Ada Lindqvist and spans 212 metres."
    prompts = [build_prompt_ids(tok, doc, "Who designed the bridge?")[0], tok.encode("Name three rivers:")]
    eos = tok.eos_token_id
    params = SamplingParams(max_new_tokens=32, temperature=0, stop_token_ids=[eos])
    out = Generator(model, tok).generate(prompts, n=2, params=params)
    for prompt, group in zip(prompts, out):
        expected = _hf_greedy(hf_smollm, prompt, 32, eos)
        assert [c.token_ids for c in group] == [expected, expected]
        assert group[0].finish_reason == ("stop" if expected[-1] == eos else "length")


@pytest.mark.parametrize("kind,overrides", [("qwen2", {}), ("qwen3", {"head_dim": 24})])
def test_greedy_matches_transformers_tiny(tiny_checkpoint, kind, overrides):
    model, hf = _tiny(tiny_checkpoint, kind, **overrides)
    prompts = _prompts(331, [17, 5, 40, 23])
    out = Generator(model, cache_cfg=CacheConfig(block_size=8)).generate(prompts, n=1, params=GREEDY)
    for prompt, group in zip(prompts, out):
        assert group[0].token_ids == _hf_greedy(hf, prompt, 24)


# ---- sharing, preemption, chunking --------------------------------------------------------
def test_group_prompt_is_prefilled_once_and_blocks_are_shared(tiny_checkpoint):
    model, _ = _tiny(tiny_checkpoint, "llama")
    prompts = _prompts(331, [10, 13])
    gen = Generator(model, cache_cfg=CacheConfig(block_size=4, max_num_seqs=3))
    gen.generate(prompts[:1], n=3, params=SamplingParams(max_new_tokens=6, temperature=1.0, seed=1))
    assert gen.stats.prompt_tokens == 10  # not 3 × 10
    # first decode step: 2 full prompt blocks shared by all three, each sample's own copy of
    # the partial third block (the last writer reuses the original): 2 + 3, not 3 × 3
    assert gen.stats.blocks_trace[0] == 10 // 4 + 3
    gen.generate(prompts, n=4, params=SamplingParams(max_new_tokens=3, temperature=1.0, seed=1))
    assert gen.stats.prompt_tokens == 10 + 13


def test_forced_preemption_gives_the_same_greedy_outputs(tiny_checkpoint):
    model, _ = _tiny(tiny_checkpoint, "qwen2")
    prompts = _prompts(331, [9, 14, 6])
    roomy = Generator(model).generate(prompts, n=2, params=GREEDY)
    tight_gen = Generator(model, cache_cfg=CacheConfig(block_size=4, num_blocks=12))
    tight = tight_gen.generate(prompts, n=2, params=GREEDY)
    assert tight_gen.stats.preemptions > 0 and tight_gen.stats.recomputed_tokens > 0
    assert [[c.token_ids for c in g] for g in tight] == [[c.token_ids for c in g] for g in roomy]


def test_chunked_prefill_gives_the_same_outputs(tiny_checkpoint):
    model, _ = _tiny(tiny_checkpoint, "qwen3", head_dim=24)
    prompts = _prompts(331, [45, 7, 30])
    whole_gen = Generator(model)
    whole = whole_gen.generate(prompts, params=GREEDY)
    chunked_gen = Generator(model, cache_cfg=CacheConfig(max_prefill_tokens=8))
    chunked = chunked_gen.generate(prompts, params=GREEDY)
    assert chunked_gen.stats.steps > whole_gen.stats.steps
    assert [g[0].token_ids for g in chunked] == [g[0].token_ids for g in whole]


def test_cache_too_small_is_a_clear_error(tiny_checkpoint, capsys):
    """Refused before any step, with what the request needs at most (prompt + max_new_tokens − 1
    positions: 20 + 100 − 1 in blocks of 4 = 30); ids outside the vocabulary are named; a request
    past the model's window is warned about once."""
    model, _ = _tiny(tiny_checkpoint, "llama")
    with pytest.raises(CacheTooSmall, match="raise the cache budget"):
        Generator(model, cache_cfg=CacheConfig(block_size=4, num_blocks=2)).generate([[1] * 20], params=GREEDY)
    gen = Generator(model, cache_cfg=CacheConfig(block_size=4, num_blocks=29))

    def step(*args):
        raise AssertionError("a step ran before the refusal")
    gen._step = step
    with pytest.raises(CacheTooSmall, match=r"prompt 0 \(20 tokens\) with max_new_tokens 100 needs 30 blocks of 4"):
        gen.generate([[1] * 20], params=SamplingParams(max_new_tokens=100, temperature=0))
    vocab = model.config.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(ValueError, match=f"prompt 1 has token id {bad}, outside the model's vocabulary of {vocab}"):
            gen.generate([[1, 2], [3, bad]], params=GREEDY)
    window = model.config.context_window
    long = Generator(model)
    for _ in range(2):
        long.generate([[1] * (window - 2)], params=SamplingParams(max_new_tokens=4, temperature=0))
    assert capsys.readouterr().err.count(f"past the model's {window}-token context window") == 1


def test_block_manager_fork_and_copy_on_write():
    bm = BlockManager(num_blocks=6, block_size=4)
    parent: list[int] = []
    assert bm.reserve(parent, 0, 6) == [] and len(parent) == 2
    a, b = bm.fork(parent), bm.fork(parent)
    bm.release(parent)
    assert bm.num_used == 2
    copies = bm.reserve(a, 6, 1)  # a writes into the shared partial block: copy it
    assert len(copies) == 1 and copies[0][0] == b[1] and a[1] != b[1] and a[0] == b[0]
    assert bm.reserve(b, 6, 1) == []  # b is now the only owner of the original: no copy
    with pytest.raises(NoFreeBlocks):
        bm.reserve(a, 7, 100)
    assert len(a) == 2  # all-or-nothing
    bm.release(a)
    bm.release(b)
    assert bm.num_free == 6


# ---- sampling -----------------------------------------------------------------------------
def test_first_token_frequencies_match_softmax(tiny_checkpoint):
    """Chi-square at a fixed seed: 4,000 samples of the first token over an 8-token vocabulary."""
    model, _ = _tiny(tiny_checkpoint, "llama", vocab_size=8)
    prompt = [1, 5, 2]
    temperature = 0.8
    with torch.no_grad():
        probs = torch.softmax(model.logits(model(torch.tensor(prompt)))[-1] / temperature, -1).double()
    out = Generator(model).generate([prompt], n=4000, params=SamplingParams(max_new_tokens=1, temperature=temperature,
                                                                            seed=123))
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in out[0]]), minlength=8).double()
    expected = probs * 4000
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 24.32  # chi-square, 7 degrees of freedom, p = 0.001


def test_top_k_and_top_p_keep_exactly_the_right_support():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))

    def support(**kw):
        return _draws(logits, 400, **kw)

    assert support(top_k=2) == {0, 1}
    assert support(top_p=0.8) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert support(top_p=0.81) == {0, 1, 2}
    assert support() == {0, 1, 2, 3}
    assert support(top_k=1) == {0}


def test_top_k_and_top_p_support_with_unsorted_logits():
    """Logits in no particular order: the kept set is exactly the k most likely tokens / the
    smallest nucleus of most likely tokens by probability, for every k and nucleus size."""
    g = torch.Generator().manual_seed(11)
    v = 10
    for _ in range(4):
        logits = 2 * torch.randn(v, generator=g)
        order = logits.argsort(descending=True)
        assert not torch.equal(order, torch.arange(v)) and not torch.equal(order, torch.arange(v).flip(0))
        probs = torch.softmax(logits.double(), -1)
        mass = probs[order].cumsum(0)
        assert probs.min() > 1e-4  # nucleus boundaries far from fp32 rounding

        def kept(top_k, top_p):
            out = truncate_logits(logits, top_k, top_p)
            finite = torch.isfinite(out)
            assert torch.equal(out[finite], logits[finite])  # kept logits are left as they were
            return set(finite.nonzero().flatten().tolist())

        for k in range(1, v + 1):
            assert kept(k, 1.0) == set(order[:k].tolist()), f"top_k={k}"
        for n in range(1, v + 1):  # top_p strictly between the mass of the n − 1 and the n most likely
            top_p = float(((mass[n - 2] if n > 1 else 0.0) + mass[n - 1]) / 2)
            assert kept(0, top_p) == set(order[:n].tolist()), f"top_p={top_p:.4f}, nucleus of {n}"
        # both: top-p on the top-k tokens' renormalised distribution (as transformers and vLLM do)
        top5 = probs[order[:5]] / probs[order[:5]].sum()
        top_p = float((top5.cumsum(0)[1] + top5.cumsum(0)[2]) / 2)
        assert kept(5, top_p) == set(order[:3].tolist())
        assert set(torch.nonzero(_truncated_probs(logits, 1.0, 5, top_p)).flatten().tolist()) == set(order[:3].tolist())

    # and through the sampler: a permuted version of the sorted-logits support test above
    logits = torch.log(torch.tensor([0.15, 0.05, 0.5, 0.3]))

    def support(**kw):
        return _draws(logits, 400, **kw)

    assert support(top_k=2) == {2, 3}
    assert support(top_p=0.8) == {2, 3}  # 0.5 + 0.3 reaches 0.8
    assert support(top_p=0.81) == {0, 2, 3}
    assert support(top_k=1) == {2}


def test_two_step_frequencies_match_truncated_softmax():
    """A fixed 2-step model driven through sample_batch the way the engine drives it (one seed per
    sequence, steps 0 then 1, settings mixed in one batch): the step-2 logits row depends on
    the step-1 token, and the joint frequencies of (token 1, token 2) must match
    P1(a) · P2(b | a) under each setting's temperature / top-k / top-p (chi-square, p = 0.001),
    with the behaviour log-prob of step 2 taken before truncation."""
    g = torch.Generator().manual_seed(8)
    v, n = 6, 4000
    step1 = 0.6 * torch.randn(v, generator=g)
    table = 0.6 * torch.randn(v, v, generator=g)  # step-2 logits row after token a: table[a], unsorted
    settings = [SamplingParams(temperature=0.8), SamplingParams(temperature=1.3, top_k=5, top_p=0.75)]
    params = [settings[i % 2] for i in range(2 * n)]  # interleaved: each setting's rows are not contiguous
    seeds = [1_000 + i for i in range(2 * n)]
    first, _ = _sample(step1, params, seeds, steps=0)
    rows = table[first]
    second, logprobs = _sample(rows, params, seeds, steps=1)
    for s, p in enumerate(settings):
        mine = torch.arange(s, 2 * n, 2)
        behaviour = torch.log_softmax(rows[mine].double() / p.temperature, -1).gather(-1, second[mine, None])
        assert torch.allclose(logprobs.double()[mine], behaviour.squeeze(-1), atol=1e-5)
        p1 = _truncated_probs(step1, p.temperature, p.top_k, p.top_p)
        p2 = torch.stack([_truncated_probs(table[a], p.temperature, p.top_k, p.top_p) for a in range(v)])
        joint = (p1[:, None] * p2).flatten()
        counts = torch.bincount(first[mine] * v + second[mine], minlength=v * v).double()
        stat, dof = _chi2(counts, joint, n)
        assert stat < _chi2_critical(dof), f"setting {s}: chi2 = {stat:.1f} on {dof} dof"
        if p.top_p < 1.0:
            assert (p2 == 0).any(1).all()  # truncation removed tokens at step 2 in every row


def test_second_token_frequencies_match_the_model(tiny_checkpoint):
    """Through the engine: 4,000 samples of 2 tokens from a tiny model (8-token vocabulary); the
    joint frequencies of (token 1, token 2) match P(a | prompt) · P(b | prompt, a) from the model's
    own forward passes, top-p applied (chi-square, p = 0.001). Catches a step-2 draw that reuses
    step 1's uniform, a KV cache that misses the first sampled token, wrong shared-block copies."""
    model, _ = _tiny(tiny_checkpoint, "llama", vocab_size=8)
    prompt = [1, 5, 2]
    params = SamplingParams(max_new_tokens=2, temperature=0.8, top_p=0.95, seed=321, ignore_eos=True)
    with torch.no_grad():
        p1 = _truncated_probs(model.logits(model(torch.tensor(prompt)))[-1], 0.8, 0, 0.95)
        p2 = torch.stack([_truncated_probs(model.logits(model(torch.tensor(prompt + [a])))[-1], 0.8, 0, 0.95)
                          for a in range(8)])
    out = Generator(model).generate([prompt], n=4000, params=params)[0]
    assert all(len(c.token_ids) == 2 for c in out)
    pairs = torch.tensor([c.token_ids for c in out])
    counts = torch.bincount(pairs[:, 0] * 8 + pairs[:, 1], minlength=64).double()
    stat, dof = _chi2(counts, (p1[:, None] * p2).flatten(), 4000)
    assert stat < _chi2_critical(dof), f"chi2 = {stat:.1f} on {dof} dof"


def test_seeds_make_samples_reproducible(tiny_checkpoint):
    model, _ = _tiny(tiny_checkpoint, "qwen2")
    prompts = _prompts(331, [6, 11])

    def run(seed):
        out = Generator(model).generate(prompts, n=3, params=SamplingParams(max_new_tokens=10, temperature=1.0,
                                                                            seed=seed))
        return [[c.token_ids for c in g] for g in out]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_strings_end_generation(smollm):
    model, tok = smollm
    prompt = tok.encode("Count: one, two, three, four, five, six,")
    free = Generator(model, tok).generate([prompt], params=SamplingParams(max_new_tokens=24, temperature=0))[0][0]
    text = tok.decode(free.token_ids)
    stop = text.strip().split()[2]  # a word that appears a few tokens in
    stopped = Generator(model, tok).generate([prompt], params=SamplingParams(max_new_tokens=24, temperature=0,
                                                                             stop=[stop]))[0][0]
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) < len(free.token_ids)
    assert stop in tok.decode(stopped.token_ids)
    assert stop not in tok.decode(stopped.token_ids[:-1])  # it stopped at the first occurrence
    # a stop string of 4-byte characters spans more tokens than characters: the window holds it whole
    from engine.rollout.scheduler import Sequence
    wide = "𝔸𝔹ℂ𝔻𝔼𝔽𝔾"
    ids = prompt + tok.encode(" so " + wide, add_special_tokens=False)
    assert len(ids) - len(prompt) > len(wide) + 8
    seq = Sequence(0, 0, ids, len(prompt), SamplingParams(stop=[wide]))
    assert Generator(model, tok)._hits_stop_string(seq, len(ids))


def test_behaviour_logprobs_equal_linear_logprob(smollm):
    model, tok = smollm
    prompt = tok.encode("The three primary colours are")
    temperature = 0.7
    comp = Generator(model, tok).generate([prompt], n=2, params=SamplingParams(max_new_tokens=12,
                                                                               temperature=temperature, top_p=0.9,
                                                                               seed=5))[0]
    for c in comp:
        ids = torch.tensor(prompt + c.token_ids)
        with torch.no_grad():
            hidden = model(ids)
            start = len(prompt) - 1
            logp, _ = linear_logprob(hidden[start:-1], model.lm_head_weight, ids[start + 1:], temperature=temperature)
        assert (logp - torch.tensor(c.logprobs)).abs().max().item() <= 1e-4


# ---- shared-prefix (cascade) decode on the torch path; the Triton kernels: test_paged_kernel.py ----------
def test_cascade_decode_equals_plain_paged_attention():
    """Shared-prefix attention (prompt read once per group) = plain paged attention."""
    from engine.rollout.paged import _cascade_decode, _plan_cascade
    g = torch.Generator().manual_seed(1)
    hq, hkv, d, bs, nb = 6, 2, 16, 4, 64
    k_cache = torch.randn(nb, bs, hkv, d, generator=g, dtype=torch.float64)
    v_cache = torch.randn(nb, bs, hkv, d, generator=g, dtype=torch.float64)
    prompt_blocks = [0, 1, 2]  # a 10-token prompt: 2 full blocks + 2 rows of a third
    k_cache[5, :2], v_cache[5, :2] = k_cache[2, :2], v_cache[2, :2]  # a sample's copy-on-write copy
    tables = [[0, 1, 2, 3], [0, 1, 5, 6], [7, 8, 9], [0, 1, 2, 10]]
    lens = [14, 13, 11, 15]
    prefix = [10, 10, 0, 10]  # sequence 2 shares nothing (e.g. it was preempted)
    groups = [0, 0, 1, 0]
    q = torch.randn(4, hq, d, generator=g, dtype=torch.float64)
    plan = _plan_cascade(tables, lens, prefix, groups, bs, torch.device("cpu"))
    ours = _cascade_decode(q, k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d), plan, d ** -0.5)
    bt = torch.zeros(4, 4, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, bt, torch.tensor(lens), d ** -0.5)
    assert prompt_blocks == tables[0][:3]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_generate_leaves_the_model_as_it_was(tiny_checkpoint):
    model, _ = _tiny(tiny_checkpoint, "qwen2")
    before_attrs = set(model.__dict__)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    model.train()
    gen = Generator(model)
    gen.generate(_prompts(331, [12, 5]), n=3, params=SamplingParams(max_new_tokens=5, temperature=1.0, seed=0))
    assert model.training and set(model.__dict__) == before_attrs
    for k, v in model.state_dict().items():
        assert v.data_ptr() == ptrs[k] and torch.equal(v, before[k]) and not v.is_inference()
    # the KV cache lived only inside generate(): nothing of the generator holds a tensor now
    assert not [k for k, v in vars(gen).items() if isinstance(v, torch.Tensor)]


def test_unseeded_sampling_leaves_the_global_generators_alone(tiny_checkpoint):
    """A request without a seed draws fresh entropy without reseeding torch's global
    generator: the trainer's RNG stream (and what a resume restores) stays its own."""
    model, _ = _tiny(tiny_checkpoint, "qwen2")
    gen = Generator(model)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = gen.generate(_prompts(331, [6, 9]), n=2, params=SamplingParams(max_new_tokens=6, temperature=1.0))
    assert torch.equal(torch.rand(4), expected)
    second = gen.generate(_prompts(331, [6, 9]), n=2, params=SamplingParams(max_new_tokens=6, temperature=1.0))
    assert [c.token_ids for g in first for c in g] != [c.token_ids for g in second for c in g]


def test_memory_pressure_costs_little_prompt_work():
    """GRPO groups in a cache at 60% / 40% of their need: a preempted sample keeps its group's
    whole prompt blocks (recomputing its own tokens only) and waiting work starts only when it
    fits beside the running sequences, so the prompts are prefilled about once (before: 5.1x and
    8.3x, each preempted sample prefilling its whole prompt again, half-done prefills thrown
    away at the next decode step), with the full cache's tokens."""
    from bench.preempt_case import run
    full, tight, tighter = run(groups=4, n=4, prompt_len=100, new=16, block_size=8, fractions=[1.0, 0.6, 0.4])
    for row in (full, tight, tighter):  # the stats count each prompt once, the rest as recomputed
        assert row["prompt_tokens_x_prompts"] == 1.0
    for row in (tight, tighter):
        assert row["preemptions"] > 0 and row["same_tokens_as_first"]
        assert row["prefilled_x_prompts"] < 1.5 and row["steps"] < 3 * full["steps"]


def test_a_preempted_sample_keeps_its_groups_prompt_blocks():
    from engine.rollout.scheduler import Scheduler, Sequence
    bm = BlockManager(num_blocks=10, block_size=4)
    prompt = Sequence(0, -1, list(range(10)), 10, SamplingParams())
    bm.reserve(prompt.table, 0, 10)  # 3 blocks, the last partial
    sched = Scheduler(bm, 64, 8)
    sample = Sequence(0, 0, list(range(12)), 10, SamplingParams(), table=bm.fork(prompt.table), num_cached=11,
                      shared_prefix=10)
    bm.reserve(sample.table, 10, 1)  # its copy of the partial block
    bm.reserve(sample.table, 11, 1)
    sched.running.append(sample)
    kept = sample.table[:2]
    sched._preempt(sample)
    assert sample.table == kept and sample.num_cached == 8 and sample.shared_prefix == 10
    assert sched.waiting[0] is sample and sample.pending == 4 and bm.ref[kept[0]] == 2


def test_a_group_whose_samples_all_wait_does_not_pin_its_prompt():
    """Both samples of one group preempted and waiting keep its prompt blocks; the other group's
    last sample must still grow to its full length: the kept blocks are given up (that group
    recomputes its prompt) instead of a CacheTooSmall for a request the cache holds alone."""
    from bench.preempt_case import TINY

    from engine.model import Decoder, DecoderConfig
    torch.manual_seed(0)
    model = Decoder(DecoderConfig.from_hf(TINY)).eval()
    prompts = _prompts(331, [8, 8], seed=5)
    params = [SamplingParams(max_new_tokens=28, temperature=1.0, seed=i, ignore_eos=True) for i in range(2)]
    gen = Generator(model, cache_cfg=CacheConfig(block_size=4, num_blocks=10))  # a request needs 9
    out = gen.generate(prompts, n=2, params=params)
    assert [[len(c.token_ids) for c in g] for g in out] == [[28, 28], [28, 28]] and gen.stats.preemptions > 0
    roomy = Generator(model, cache_cfg=CacheConfig(block_size=4, num_blocks=64)).generate(prompts, n=2, params=params)
    assert [[c.token_ids for c in g] for g in out] == [[c.token_ids for c in g] for g in roomy]
