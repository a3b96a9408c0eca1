"""Every decode path of the rollout engine gives the same greedy tokens: the torch backend
with and without shared-prefix attention (fused SDPA calls with their log-sum-exp, or the
gathered reference), and the Triton backend's plain split-K kernel and its shared-prefix
kernels (on the GPU when there is one, else under the interpreter on CPU)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from engine.rollout import CacheConfig, Generator, SamplingParams
from engine.rollout import paged


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import tiny_decoder
    return tiny_decoder(tmp_path_factory.mktemp("ckpt") / "qwen2", num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2)


def test_every_decode_path_gives_the_same_greedy_tokens(tiny, monkeypatch):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, tiny.config.vocab_size, (n,), generator=g).tolist() for n in (19, 6)]
    params = SamplingParams(max_new_tokens=9, temperature=0, stop_token_ids=[])
    calls = []
    for name in ("paged_decode_attention", "shared_prefix_decode_attention", "paged_decode_attention_ref",
                 "_cascade_decode"):
        real = getattr(paged, name)
        def spy(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)
        monkeypatch.setattr(paged, name, spy)
    plans = []
    real_plan = paged.plan_shared_prefix_from_lists
    monkeypatch.setattr(paged, "plan_shared_prefix_from_lists",
                        lambda *a, **k: plans.append(real_plan(*a, **k)) or plans[-1])
    out = {}
    # the Triton paths on the GPU when there is one (no interpreter there), else on CPU
    models = {"cpu": tiny, "cuda": copy.deepcopy(tiny).cuda() if torch.cuda.is_available() else None}
    for backend, share, used in [("torch", False, "paged_decode_attention_ref"), ("torch", True, "_cascade_decode"),
                                 ("triton", False, "paged_decode_attention"),
                                 ("triton", True, "shared_prefix_decode_attention")]:
        calls.clear()
        model = models["cuda"] if backend == "triton" and models["cuda"] is not None else tiny
        # graphs off: on a GPU they would plan the step on the device themselves (tests/test_cuda_graphs.py)
        gen = Generator(model, cache_cfg=CacheConfig(block_size=4, decode_backend=backend, share_prefix=share,
                                                     cuda_graphs="off"))
        out[backend, share] = [[c.token_ids for c in group] for group in gen.generate(prompts, n=3, params=params)]
        assert set(calls) == {used}, (backend, share, set(calls))  # the path under test ran, and only it
    # the Triton path served each group's 3 samples from one prefix program while they ran together
    assert plans and all(p.members.shape == (2, 3) for p in plans[:3]), [p.members.tolist() for p in plans[:3]]
    want = out["torch", False]
    assert all(len(t) == 9 for group in want for t in group)
    for key, got in out.items():
        assert got == want, key


def _tables(lens_prefix, bs, g):
    """Random block tables: each group's members share their prompt's full blocks and hold a
    copy-on-write copy of its partial last block; plain sequences own everything."""
    perm = iter(torch.randperm(400, generator=g).tolist())
    tables, lens, prefix, groups = [], [], [], []
    for gid, (plen, suffixes) in enumerate(lens_prefix):
        shared = [next(perm) for _ in range(plen // bs)]
        for s in suffixes:
            own = [next(perm) for _ in range(-(-(plen + s) // bs) - len(shared))]
            tables.append(shared + own)
            lens.append(plen + s)
            prefix.append(plen if len(suffixes) > 1 else 0)
            groups.append(gid)
    return tables, lens, prefix, groups


def test_cpu_cascade_stacks_groups_of_any_prompt_length_and_rebuilds_when_they_change():
    from engine.rollout.paged import _cascade_decode, _plan_cascade
    from kernels.paged_attention import paged_decode_attention_ref

    g = torch.Generator().manual_seed(2)
    hq, hkv, d, bs = 6, 2, 16, 4
    k_cache = torch.randn(400, bs, hkv, d, generator=g, dtype=torch.float64)
    v_cache = torch.randn(400, bs, hkv, d, generator=g, dtype=torch.float64)
    # prompts of 10, 8 (block aligned) and 13 tokens with 3, 1 (shares nothing) and 2 samples
    layout = [(10, [1, 5, 2]), (8, [3]), (13, [7, 1])]
    tables, lens, prefix, groups = _tables(layout, bs, g)
    for t, p in zip(tables, prefix):  # copy-on-write copies of the partial prompt block hold the same rows
        if p % bs:
            src = tables[prefix.index(p)][p // bs]
            for cache in (k_cache, v_cache):
                cache[t[p // bs], : p % bs] = cache[src, : p % bs]

    def check(rows, store):
        sub = [tables[i] for i in rows]
        plan = _plan_cascade(sub, [lens[i] for i in rows], [prefix[i] for i in rows], [groups[i] for i in rows], bs,
                             torch.device("cpu"))
        q = torch.randn(len(rows), hq, d, generator=g, dtype=torch.float64)
        ours = _cascade_decode(q, k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d), plan, d ** -0.5, store, 0)
        bt = torch.zeros(len(rows), max(map(len, sub)), dtype=torch.int32)
        for i, t in enumerate(sub):
            bt[i, : len(t)] = torch.tensor(t)
        ref = paged_decode_attention_ref(q, k_cache, v_cache, bt, torch.tensor([lens[i] for i in rows]), d ** -0.5)
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
        return plan

    store = {}
    order = [4, 0, 5, 1, 3, 2]  # members interleaved in the batch
    plan = check(order, store)
    assert plan["groups"]["rows"].shape == (2, 3)  # two sharing groups stacked, padded to 3 members
    key = store[0][0]
    check(order, store)
    assert store[0][0] is key  # same groups: the stacked prompts are reused
    check([0, 2, 3], store)  # group 2 finished: restacked with group 0 alone
    assert store[0][0] != key and store[0][1].shape[0] == 1


def test_decode_profile_tool_reports_the_sampler_and_the_operators(tmp_path, capsys):
    """bench/decode_profile.py (the command behind README's per-step figures) on a tiny model:
    the decode steps counted, the sampler timed in decode steps only, the operators per step."""
    from bench.decode_profile import main
    from conftest import tiny_hf_model

    path = tmp_path / "tiny"
    tiny_hf_model("qwen2", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2).save_pretrained(str(path))
    assert main(["--model", str(path), "--prompts", "2", "--n", "3", "--prompt-len", "20", "--new", "6",
                 "--top", "4"]) == 0
    out = capsys.readouterr().out
    r = json.loads(out.strip().splitlines()[-1])
    assert r["decode_steps"] == 5 and r["sampler_calls_in_decode"] == 5 and r["decode_tokens_per_s"] > 0
    assert 0 < r["sampler_ms_per_step"] < r["decode_ms_per_step"]
    assert len(r["ops_ms_per_step"]) == 4 and all(ms >= 0 for ms in r["ops_ms_per_step"].values())
    assert "operators over the last 3 decode steps" in out
