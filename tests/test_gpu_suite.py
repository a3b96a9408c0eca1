"""The one-call GPU suite on a machine like the GPU machine minus the GPU: no pytest, no
triton (hidden by a sitecustomize), no CUDA. It must import, report every case skipped with
"needs CUDA", write its JSON and exit with status 2, without a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDE = '''
import sys
class _Hide:
    """A machine without these packages: importing them fails as if never installed."""
    names = ("pytest", "triton", "flash_attn")
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Hide())
'''


def test_suite_without_cuda_pytest_or_triton_skips_every_case(tmp_path):
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(HIDE)
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{ROOT}", "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    report = json.loads((out / "gpu_suite.json").read_text())
    assert report["pytest"] is None and report["triton"] is None and report["card"] is None
    cases = ["tests", "bf16_matmul_tflops", "grpo_loss", "rollout", "rl_step", "update", "ring"]
    for name in cases:
        assert report[name] == {"skipped": "needs CUDA"}
        assert f"{name}: skipped (needs CUDA)" in proc.stdout
    assert "pytest missing" in proc.stdout and "triton missing" in proc.stdout


def test_rl_step_case_budget_follows_free_memory():
    from bench.train_step_case import budget_from_free_memory

    gib = 1 << 30
    per_token = 28 * 1536 * 2 + 40 * 1536 * 2  # the 1.5B shape: 209 KiB per token
    assert budget_from_free_memory(40 * gib, 28, 1536) == 32768  # capped
    assert budget_from_free_memory(4 * gib, 28, 1536) == (2 * gib // per_token) // 1024 * 1024 == 10240
    assert budget_from_free_memory(gib // 8, 28, 1536, floor=17408) == 17408  # never below one sequence


def test_rollout_decode_case_runs_on_cpu(tmp_path, monkeypatch):
    """bench/gpu_rollout_case.py's measurement on a tiny model on CPU: prompts' KV written at
    random (every prompt slot, every layer), decode steps counted, the must-read bytes as stated."""
    import torch

    from bench.gpu_rollout_case import RandomPrefill, decode_case, measure
    from conftest import tiny_hf_model
    from engine.model import load_model

    path = tmp_path / "tiny"
    tiny_hf_model("qwen2", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2).save_pretrained(str(path))
    model = load_model(path, device="cpu", dtype="float32")[0]
    cfg = model.config
    for share in (True, False):
        r = decode_case(model, groups=2, n=3, prompt_len=37, new=5, share=share, block_size=16)
        assert r["decode_steps"] == 4 and r["batch"] == 6 and r["share_prefix"] is share
        weights = sum(p.numel() * 4 for p in model.parameters())
        kv = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
        assert r["bytes_per_step"] == weights + (2 * 37 + 6 * 3) * kv  # mean suffix (5 + 1) / 2 = 3 tokens
        assert r["decode_step_s"] > 0 and r["decode_tokens_per_s"] > 0
    # the suite's summary: graphs against eager at the graph lengths (on CPU: the graph step run eagerly)
    monkeypatch.setenv("LONGRL_PAGED_BACKEND", "triton")
    out = measure(model, [21], [21, 9], groups=2, n=2, new=3, bw=1e9, graphs=("eager", "off"))
    assert [(c["prompt_len"], c["share_prefix"], c["cuda_graphs"]) for c in out["cases"]] == \
        [(21, True, "eager"), (21, False, "eager"), (21, True, "off"), (9, True, "eager"), (9, True, "off")]
    assert [c["graph_steps"] for c in out["cases"]] == [2, 2, 0, 2, 0]
    assert set(out["graphs_speedup"]) == {"21", "9"} and all(v > 0 for v in out["graphs_speedup"].values())
    assert out["roofline_fraction"] == min(c["roofline_fraction"] for c in out["cases"][:1])
    eager_graph, off = out["step_breakdown"]
    assert (eager_graph["cuda_graphs"], off["cuda_graphs"]) == ("eager", "off")
    assert eager_graph["decode_steps"] == eager_graph["graph_steps"] == 2 and off["graph_steps"] == 0
    for r in (eager_graph, off):
        assert 0 < r["model_ms"] < r["step_ms"] and 0 < r["sampler_ms"] < r["step_ms"] and r["rest_ms"] > 0
    # the random prefill fills every layer's K and V at the chunk's slots
    from engine.rollout.paged import CacheConfig, PagedAttention, PagedKVCache
    cache = PagedKVCache(model, CacheConfig(block_size=16, num_blocks=8))
    ctx = PagedAttention(cache, [[3, 5]], [0], [20])
    RandomPrefill(model)(torch.zeros(20, dtype=torch.long), position_ids=torch.arange(20), attn=ctx)
    flat = cache.k.view(cfg.num_layers, -1, cfg.num_kv_heads, cfg.head_dim)
    assert bool((flat[:, ctx.slots] != 0).all()) and int((flat != 0).any(-1).any(-1).sum()) == cfg.num_layers * 20
