"""Every decode path of the rollout engine gives the same greedy tokens: the torch backend
with and without shared-prefix attention (fused SDPA calls with their log-sum-exp, or the
gathered reference), and the Triton backend's plain split-K kernel and its shared-prefix
kernels (on the GPU when there is one, else under the interpreter on CPU)."""
from __future__ import annotations

import copy

import pytest
import torch

from engine.model import load_model
from engine.rollout import CacheConfig, Generator, SamplingParams
from engine.rollout import paged


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import tiny_hf_model
    hf = tiny_hf_model("qwen2", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path_factory.mktemp("ckpt") / "qwen2"
    hf.save_pretrained(str(path))
    return load_model(path, device="cpu", dtype="float32")[0]


def test_every_decode_path_gives_the_same_greedy_tokens(tiny, monkeypatch):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, tiny.config.vocab_size, (n,), generator=g).tolist() for n in (19, 6)]
    params = SamplingParams(max_new_tokens=9, temperature=0, stop_token_ids=[])
    calls = []
    for name in ("paged_decode_attention", "shared_prefix_decode_attention", "paged_decode_attention_ref",
                 "_cascade_decode"):
        real = getattr(paged, name)
        monkeypatch.setattr(paged, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    plans = []
    real_plan = paged.plan_shared_prefix
    monkeypatch.setattr(paged, "plan_shared_prefix", lambda *a, **k: plans.append(real_plan(*a, **k)) or plans[-1])
    out = {}
    # the Triton paths on the GPU when there is one (no interpreter there), else on CPU
    models = {"cpu": tiny, "cuda": copy.deepcopy(tiny).cuda() if torch.cuda.is_available() else None}
    for backend, share, used in [("torch", False, "paged_decode_attention_ref"), ("torch", True, "_cascade_decode"),
                                 ("triton", False, "paged_decode_attention"),
                                 ("triton", True, "shared_prefix_decode_attention")]:
        calls.clear()
        model = models["cuda"] if backend == "triton" and models["cuda"] is not None else tiny
        gen = Generator(model, cache_cfg=CacheConfig(block_size=4, decode_backend=backend, share_prefix=share))
        out[backend, share] = [[c.token_ids for c in group] for group in gen.generate(prompts, n=3, params=params)]
        assert set(calls) == {used}, (backend, share, set(calls))  # the path under test ran, and only it
    # the Triton path served each group's 3 samples from one prefix program while they ran together
    assert plans and all(p.members.shape == (2, 3) for p in plans[:3]), [p.members.tolist() for p in plans[:3]]
    want = out["torch", False]
    assert all(len(t) == 9 for group in want for t in group)
    for key, got in out.items():
        assert got == want, key
