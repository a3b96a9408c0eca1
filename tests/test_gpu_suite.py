"""The one-call GPU suite on a machine like the GPU machine minus the GPU: no pytest, no
triton (hidden by a sitecustomize), no CUDA. It must import, report every case skipped with
"needs CUDA", write its JSON and exit with status 2, without a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("entry", ["module", "script"])
def test_suite_without_cuda_pytest_or_triton_skips_every_case(tmp_path, entry):
    """Through `python -m bench.gpu_suite` and through bench/gpu_suite.sh (which hands its
    options on, --budget among them, to the machine's python3)."""
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(HIDE)
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{ROOT}", "CUDA_VISIBLE_DEVICES": "",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = tmp_path / "out"
    cmd = ([sys.executable, "-m", "bench.gpu_suite", "--out", str(out)] if entry == "module" else
           ["bash", "bench/gpu_suite.sh", str(out), "--budget", "300"])
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
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
        # warmed up once (the same rollout untimed first: the figures are the second's), then not
        r = decode_case(model, groups=2, n=3, prompt_len=37, new=5, share=share, block_size=16, warmup=share)
        assert r["decode_steps"] == 4 and r["batch"] == 6 and r["share_prefix"] is share
        weights = sum(p.numel() * 4 for p in model.parameters())
        kv = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
        assert r["bytes_per_step"] == weights + (2 * 37 + 6 * 3) * kv  # mean suffix (5 + 1) / 2 = 3 tokens
        assert r["decode_step_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["mean_batch"] == 6 and r["batch_step_s"] == r["decode_step_s"]
    # a cache too small for the whole batch: it decodes in waves, and the step figure is the time per
    # `batch` decoded tokens (a group holds 2 shared prompt blocks + 1 block of its own per sample)
    per_block = cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 4
    r = decode_case(model, groups=2, n=3, prompt_len=37, new=5, share=False, block_size=16,
                    cache_bytes=7 * per_block, warmup=False)
    assert r["mean_batch"] < 6 and r["decode_steps"] > 4
    assert r["batch_step_s"] == pytest.approx(r["decode_step_s"] * 6 / r["mean_batch"])
    assert r["decode_tokens_per_s"] == pytest.approx(6 / r["batch_step_s"])
    # at most every sample's 4 decode steps (a wave's first rows may decode beside the next prefill)
    assert 4 * 3 < round(r["mean_batch"] * r["decode_steps"]) <= 6 * 4
    # the suite's summary: graphs against eager at the graph lengths (on CPU: the graph step run eagerly)
    # and the fused kernels against torch's ops ($LONGRL_FUSED=torch for that case only, restored after)
    from bench import gpu_rollout_case
    monkeypatch.setenv("LONGRL_PAGED_BACKEND", "triton")
    monkeypatch.setenv("LONGRL_FUSED", "triton")
    seen_env, real_case = [], gpu_rollout_case._decode_case

    def spy(*args):
        seen_env.append((os.environ.get("LONGRL_FUSED"), os.environ.get("LONGRL_LOOKAHEAD")))
        return real_case(*args)
    monkeypatch.setattr(gpu_rollout_case, "_decode_case", spy)
    monkeypatch.setenv("LONGRL_LOOKAHEAD", "on")
    out = measure(model, [21], [21, 9], groups=2, n=2, new=3, bw=1e9, graphs=("eager", "off"), warmup=False,
                  fused_lens=[9], lookahead_lens=[9])
    assert [(c["prompt_len"], c["share_prefix"], c["cuda_graphs"], c["fused"], c["lookahead"])
            for c in out["cases"]] == \
        [(21, True, "eager", True, True), (21, False, "eager", True, True), (21, True, "off", True, True),
         (9, True, "eager", True, True), (9, True, "off", True, True), (9, True, "eager", False, True),
         (9, True, "eager", True, False)]
    assert seen_env == [(None, None)] * 5 + [("torch", None), (None, "off")]
    assert os.environ["LONGRL_FUSED"] == "triton" and os.environ["LONGRL_LOOKAHEAD"] == "on"
    assert [c["graph_steps"] for c in out["cases"]] == [2, 2, 0, 2, 0, 2, 2]
    assert set(out["graphs_speedup"]) == {"21", "9"} and all(v > 0 for v in out["graphs_speedup"].values())
    assert set(out["fused_speedup"]) == {"9"} and out["fused_speedup"]["9"] > 0
    assert set(out["lookahead_speedup"]) == {"9"} and out["lookahead_speedup"]["9"] > 0
    assert out["roofline_fraction"] == min(c["roofline_fraction"] for c in out["cases"][:1])
    eager_graph, off, second = out["step_breakdown"]  # with and without graphs at 21, with graphs at 9
    assert (eager_graph["cuda_graphs"], off["cuda_graphs"]) == ("eager", "off")
    assert (eager_graph["prompt_len"], off["prompt_len"], second["prompt_len"], second["cuda_graphs"]) == \
        (21, 21, 9, "eager")
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


def test_suite_stages_keep_to_the_budget(monkeypatch):
    """A stage runs for what is left of the suite's budget (less the summary's reserve) and is
    killed there; once the budget is spent a stage does not start and reads as skipped."""
    import time

    from bench import gpu_suite as gs

    monkeypatch.setattr(gs.Budget, "RESERVE", 0.5)
    monkeypatch.setattr(gs.Budget, "MIN_STAGE", 1.0)
    monkeypatch.setattr(gs, "BUDGET", gs.Budget(6.0))  # the stage gets ~5.5 s: room for two interpreters to start
    t0 = time.monotonic()
    # a stage that started a process of its own: on the timeout both are killed (one process group)
    spawn = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
             "time.sleep(60)']); print(p.pid, flush=True); time.sleep(60)")
    proc = gs.stage([sys.executable, "-c", spawn], timeout=100)
    assert proc.returncode == 124 and "timed out after" in proc.stderr and time.monotonic() - t0 < 15
    grandchild = int(proc.stdout.split()[0])
    time.sleep(0.2)
    status = Path(f"/proc/{grandchild}/status")
    assert not status.exists() or "\tZ" in status.read_text().split("State:")[1].splitlines()[0]  # gone, or a zombie
    started = time.monotonic()
    proc = gs.stage([sys.executable, "-c", "print('never')"], timeout=100)
    assert getattr(proc, "skipped", False) and proc.stdout == "" and time.monotonic() - started < 0.5
    assert gs._last_json(proc) == {"skipped": "not started: the suite's time budget (6 s, --budget) is spent"}
    assert gs._not_run(gs._last_json(proc)) == "skipped" and gs._not_run({"x": 1}) is None


def _fake_stage_output(cmd: list[str]) -> dict:
    """What each stage's module prints last on a GPU, with made-up figures (the keys the summary reads)."""
    module = cmd[2]
    t = {"median": 0.2, "min": 0.19, "max": 0.21, "rounds": 3, "all": [0.19, 0.2, 0.21]}
    if module == "bench.kernel_case":
        return {"impl": "fused", "tokens": int(cmd[cmd.index("--tokens") + 1]),
                "hidden": int(cmd[cmd.index("--hidden") + 1]), "seconds": 0.2, "time": t, "peak_extra_bytes": 4 << 30}
    if module == "bench.gpu_rollout_case" and "--shared-only" in cmd:  # the decode_tune's best launch
        return {"batch": 64, "copy_bandwidth": 3e12, "cases": [
            {"share_prefix": True, "prompt_len": 61440, "batch_step_s": 0.0025, "roofline_fraction": 0.75}]}
    if module == "bench.gpu_rollout_case" and "--profile" not in cmd:
        case = {"share_prefix": True, "cuda_graphs": "auto", "graph_steps": 31, "batch": 64, "mean_batch": 64.0,
                "prompt_len": 16384, "batch_step_s": 0.004, "decode_tokens_per_s": 16000.0, "roofline_fraction": 0.6}
        waves = {**case, "share_prefix": False, "mean_batch": 40.0, "batch_step_s": 0.03, "roofline_fraction": 0.08}
        unfused = {**case, "fused": False, "batch_step_s": 0.005, "roofline_fraction": 0.48}
        return {"batch": 64, "copy_bandwidth": 3e12, "cases": [case, waves, unfused], "graphs_speedup": {"16384": 3.5},
                "fused_speedup": {"16384": 1.25}, "lookahead_speedup": {"1024": 1.125},
                "step_breakdown": [{"prompt_len": 1024, "cuda_graphs": "auto", "step_ms": 5.0, "model_ms": 3.0,
                                    "sampler_ms": 0.5, "rest_ms": 1.5}], "roofline_fraction": 0.6}
    if module == "bench.gpu_sampler_case":
        return {"cases": [{"setting": "top_p 0.95", "ms": {"chunk 8192 x 4 warps": 0.25, "chunk 4096 x 8 warps": 0.2,
                                                          "default launch": 0.25, "torch sampler": 4.5},
                           "host_ms": {"default launch": 0.125}}]}
    if module == "bench.gpu_rollout_case" and "--profile" in cmd:
        return {"cases": [{"prompt_len": 16384, "share_prefix": True, "device_ms_per_step": 6.5,
                           "top_ms_per_step": {"_decode_partial_kernel": 1.25, "nvjet_sm90_tst_88x64(...)": 0.5}}]}
    if module == "bench.gpu_decode_tune":
        default = {"waves": 2, "num_warps": 4, "num_stages": 3, "block_n": 64}
        mine = {**default, "shared_ms": 2.0, "roofline_fraction": 0.25, "max_abs_diff": 0.0}
        best = {**default, "waves": 8, "shared_ms": 1.0, "roofline_fraction": 0.5, "max_abs_diff": 0.0}
        return {"default": default, "lengths": [{"prompt_len": 61440, "settings": [mine, best], "best": best}]}
    if module == "bench.decode_tables_case":
        return {"cases": [{"prompt_len": 16384, "backend": "triton", "lists": {"median_ms": 9.0},
                           "device": {"median_ms": 0.4}, "speedup": 22.5}]}
    if module == "bench.train_step_case":
        return {"time/step": 40.0, "time/rollout": 25.0, "time/reward": 0.01, "time/old_logprob": 0.0,
                "time/ref_logprob": 0.0, "time/update": 14.0, "rollout_tokens_per_s": 600.0,
                "update_tokens_per_s": 5000.0, "config/mini_batches": 1, "config/ref_model": False}
    if module == "bench.update_case":
        return {"time": t, "seconds": 0.2, "tokens": 32760, "peak_extra_bytes": 8 << 30}
    if module == "bench.gpu_ring_case":
        return {"world": 1, "seconds": 0.01, "rel_error": 1e-3}
    raise AssertionError(f"unexpected stage {cmd}")


@pytest.mark.parametrize("broken", [None, "bench.gpu_rollout_case", "bench.train_step_case", "no pytest",
                                    "tests timed out"])
def test_suite_summary_on_a_fake_gpu(tmp_path, monkeypatch, capsys, broken):
    """The whole suite's flow and its summary tables on CPU, the stages faked: every table
    prints from its figures; a stage that fails, or that the budget skips, is named in its
    table and in the closing list, the exit status is 1, and the stages after it still run."""
    import torch

    from bench import gpu_suite as gs
    import kernels.rows

    ran, envs = [], {}

    def fake_stage(cmd, timeout, log=None, env=None):
        ran.append(cmd[2])
        if env:
            envs[cmd[2]] = env
        skipped = cmd[2] == broken == "bench.gpu_rollout_case"
        if skipped:
            rc, out, err = 0, "", "not started: the suite's time budget (540 s, --budget) is spent"
        elif cmd[2] == broken:
            rc, out, err = 1, "", "Traceback\nRuntimeError: boom"
        else:
            rc, out, err = 0, "progress line\n" + json.dumps(_fake_stage_output(cmd)) + "\n", ""
        if log is not None:
            log.write_text(out + err)
        proc = subprocess.CompletedProcess(cmd, rc, out, err)
        proc.skipped = skipped
        return proc

    tests = {"returncode": 0, "summary": "3 passed in 1.0s"}
    if broken == "no pytest":  # the pytest-free check passed: the tests count as passed
        tests = {"returncode": 0, "skipped": "pytest not installed", "summary": "pytest not installed: kernel tests "
                 "skipped; pytest-free fused-loss check 4/4 passed"}
    elif broken == "tests timed out":
        tests = {"returncode": 124, "summary": "timed out after 150 s"}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(gs, "stage", fake_stage)
    monkeypatch.setattr(gs, "run_tests", lambda out: tests)
    monkeypatch.setattr(gs, "bf16_matmul_tflops", lambda: 700.0)
    monkeypatch.setattr(kernels.rows, "chunk_rows", lambda *a, **k: 4096)
    rc = gs.main(["--out", str(tmp_path / "out")])
    text = capsys.readouterr().out
    assert ran == ["bench.gpu_rollout_case", "bench.gpu_sampler_case", "bench.gpu_decode_tune",
                   "bench.gpu_rollout_case", "bench.train_step_case"] \
        + ["bench.kernel_case"] * 2 * len(gs.CASES) \
        + ["bench.decode_tables_case", "bench.update_case", "bench.update_case", "bench.gpu_ring_case",
           "bench.gpu_rollout_case"]
    # the decode_tune's best launch (waves 8) run again through the rollout, as $LONGRL_DECODE_LAUNCH
    assert envs == {"bench.gpu_rollout_case": {"LONGRL_DECODE_LAUNCH": "waves=8,num_warps=4,num_stages=3,block_n=64"}}
    tuned = "LONGRL_DECODE_LAUNCH=waves=8,num_warps=4,num_stages=3,block_n=64) ==\n"
    assert tuned + ("skipped: not started" if broken == "bench.gpu_rollout_case" else
                    "prompt  61440      shared     2.50 ms/step   75.0% of the roofline") in text
    report = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    assert report["card"] == "Fake GPU" and report["budget_s"] == 540 and report["elapsed_s"] >= 0
    assert "speed-up x1.000 (target >= x3.150: not met)" in text and "W=1: fwd+bwd 10.0 ms" in text and "x22.5" in text
    assert ("top_p 0.95              kernel  0.250 ms  (host 0.125 ms to issue)  best chunk 4096 x 8 warps  "
            "0.200 ms  torch sampler  4.500 ms") in text
    assert "prompt  61440: default 2.000 ms (25.0% of the roofline); best 1.000 ms (50.0%) at waves 8" in text
    assert [r["logits"] for r in report["grpo_loss"]] == ["fp32", "compute"] * len(gs.CASES)  # each case both ways
    assert "targets: roofline >= 85%" in text
    if broken == "tests timed out":
        assert rc == 1 and "failed or skipped cases: tests (" in text and "tests on CUDA: timed out" in text
    elif broken in (None, "no pytest"):
        assert rc == 0 and "failed or skipped" not in text and f"tests on CUDA: {tests['summary']}" in text
        assert "4.00 ms/step" in text and "60.0% of the roofline" in text
        assert "30.00 ms/step" in text and "(mean batch 40.0: ms per 64 tokens)" in text
        assert "prompt 16384: x3.50" in text and "model 3.00 + sampler 0.50 + rest 1.50" in text
        assert "prompt  16384     shared: 6.50 ms on the device a step; _decode_partial_kernel 1.250, " \
            "nvjet_sm90_tst_88x64 0.500" in text
        assert "graphs, torch ops     5.00 ms/step" in text and "stacked projections vs torch's ops (graph step, same case): prompt " \
            "16384: x1.25" in text
        assert "lookahead (a step launched before the last one's tokens are read) vs reading first: prompt 1024: " \
            "x1.12" in text
        assert "40.0s: rollout 25.0s" in text and "parts add up to the step" in text
    elif broken == "bench.gpu_rollout_case":
        assert rc == 1 and report["rollout"] == {"skipped": "not started: the suite's time budget (540 s, --budget) "
                                                              "is spent"}
        assert "== rollout decode ==\nskipped: not started" in text and "failed or skipped cases: rollout" in text
        assert "rollout_tuned" not in text.split("failed or skipped cases:")[1]  # last, budget allowing: no failure
    else:
        assert rc == 1 and report["rl_step"] == {"error": ["Traceback", "RuntimeError: boom"]}
        assert "error: ['Traceback', 'RuntimeError: boom']" in text and "failed or skipped cases: rl_step" in text


def test_decode_tables_case_runs_on_cpu(capsys):
    """The suite's decode-tables stage (bench/decode_tables_case.py) at a tiny size, both backends:
    its stand-in cache must carry what PagedAttention reads of a cache."""
    from bench.decode_tables_case import main

    assert main(["--prompt-len", "40", "--steps", "3", "--groups", "2", "--n", "3"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [c["backend"] for c in out["cases"]] == ["torch", "triton"]
    assert all(c["lists"]["median_ms"] > 0 and c["device"]["median_ms"] > 0 for c in out["cases"])


def test_update_case_trains_in_bf16_mixed_on_the_gpu(tmp_path, monkeypatch):
    """The suite's update stage computes as training on a GPU does (bf16 over fp32 master weights),
    not in fp32: checked on the trainer it builds, with a tiny CPU model standing in."""
    import torch

    import bench.update_case as uc
    from conftest import tiny_decoder

    model = tiny_decoder(tmp_path / "tiny", "qwen2", num_hidden_layers=1)
    monkeypatch.setattr(uc, "build", lambda gpu: model)
    assert uc.trainer_for(True, "shared", 2, 4).precision.compute == torch.bfloat16
    assert uc.trainer_for(False, "shared", 2, 4).precision.compute is None


def test_sampler_case_and_kernel_profile_run_on_cpu(tmp_path, capsys):
    """bench/gpu_sampler_case.py times every chunk and warp setting, the default launch and the torch
    sampler (here under the interpreter, a check of the code path, not a figure); the rollout
    case's --profile ranks a decode step's operators per profiled step."""
    import json

    from bench import gpu_sampler_case
    from bench.gpu_rollout_case import kernel_profile
    from conftest import tiny_hf_model
    from engine.model import load_model

    assert gpu_sampler_case.main(["--device", "cpu", "--rows", "2", "--vocab", "40", "--repeats", "1",
                                  "--chunks", "16,64", "--warps", "4", "--pass-blocks", "32"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [c["setting"] for c in out["cases"]] == ["top_p 0.95", "top_k 50 + top_p 0.95", "greedy"]
    for case in out["cases"]:
        assert set(case["ms"]) == {"chunk 16 x 4 warps", "chunk 64 x 4 warps", "chunk 8192 x 4 warps, pass tile 32",
                                   "default launch", "torch sampler"}
        assert case["host_ms"]["default launch"] > 0
        assert all(isinstance(v, float) and v > 0 for v in case["ms"].values()), case
    path = tmp_path / "tiny"
    tiny_hf_model("qwen2", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2).save_pretrained(str(path))
    model = load_model(path, device="cpu", dtype="float32")[0]
    r = kernel_profile(model, groups=2, n=2, prompt_len=21, new=6, share=True, top=4)
    # 5 decode steps, profiled from the 3rd
    assert r["profiled_steps"] == 3 and r["batch"] == 4 and len(r["top_ms_per_step"]) == 4
    top = r["top_ms_per_step"].values()
    assert all(v > 0 for v in top) and r["device_ms_per_step"] >= max(top)


def test_decode_tune_case_runs_on_cpu_and_launch_overrides(monkeypatch, capsys):
    """bench/gpu_decode_tune.py at a tiny size under the interpreter: every setting computes the
    default's output and is timed, the best is one of them, LAUNCH is restored after; the splits
    follow LAUNCH["waves"]; $LONGRL_DECODE_LAUNCH's settings are read and checked."""
    import torch

    from bench.gpu_decode_tune import tune
    from kernels import triton_paged as tp

    before = dict(tp.LAUNCH)
    grid = [(2, 4, 3, 16), (8, 4, 3, 32)]
    r = tune([40], groups=2, n=2, suffix=3, grid=grid, device="cpu", repeats=1, hq=4, hkv=2, d=16, progress=True)
    assert tp.LAUNCH == before and r["copy_bandwidth"] is None
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [r]  # after each length
    (length,) = r["lengths"]
    assert [(s["waves"], s["block_n"]) for s in length["settings"]] == [(2, 16), (8, 32)]
    assert all(s["max_abs_diff"] < 1e-5 and s["shared_ms"] > 0 and s["plain_ms"] > 0 for s in length["settings"])
    assert length["best"] in length["settings"]
    assert length["must_read_bytes"] == (2 * 40 + 4 * 3) * 2 * 16 * 2 * 4  # fp32 K and V of 2 heads of 16
    # the splits follow the waves: 12 programs in 264 places (132 SMs, 2 each) want 22 splits in 1 wave, 44 in 2
    monkeypatch.setitem(tp.LAUNCH, "waves", 1)
    assert tp.pick_num_splits(1 << 20, 12, 64, torch.device("cpu")) == 22
    monkeypatch.setitem(tp.LAUNCH, "waves", 2)
    assert tp.pick_num_splits(1 << 20, 12, 64, torch.device("cpu")) == 44
    assert tp.launch_overrides(" waves=4, num_warps=8 ,") == {"waves": 4, "num_warps": 8}
    assert tp.launch_overrides("block_n=0") == {"block_n": 0} and tp.launch_overrides("") == {}
    refused = (("wave=4", "unknown setting 'wave'"), ("num_warps=x", "num_warps needs a non-negative integer"),
               ("waves=\u00b2", "waves needs a non-negative integer"),
               ("num_stages=0", "num_stages must be at least 1"),
               ("num_warps=3", "num_warps must be a power of two"), ("num_warps=64", "up to 32"), ("block_n=24", "block_n must be 0 or a power"),
               ("block_n=8", "block_n must be 0 or a power"), ("waves=2,waves=4", "waves given twice"))
    for bad, words in refused:
        with pytest.raises(ValueError, match=words):
            tp.launch_overrides(bad)
    # the launch passes LAUNCH's warps, stages and tile on (the interpreter ignores warps and stages)
    from bench.gpu_decode_tune import workload

    seen = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(kwargs)

    monkeypatch.setattr(tp, "_decode_partial_kernel", Spy())
    for key, value in (("num_warps", 8), ("num_stages", 2), ("block_n", 32)):
        monkeypatch.setitem(tp.LAUNCH, key, value)
    q, k, v, bt, lens, prefix, gid = workload(1, 2, 40, 3, 4, 2, 16, 16, "cpu", torch.float32)
    tp.paged_decode_triton(q, k, v, bt, lens, 0.25, num_splits=2)
    assert [(s["num_warps"], s["num_stages"], s["BLOCK_N"]) for s in seen] == [(8, 2, 32)]


def test_best_launch_is_fastest_over_every_length():
    """The tuned rollout's setting: least shared time summed over the lengths, among settings that
    ran at every length and matched the default's output; none where that is the default."""
    from bench.gpu_suite import best_launch

    default = {"waves": 1, "num_warps": 4, "num_stages": 3, "block_n": 64}

    def row(ms, diff=0.0, **kw):
        return {**default, **kw, "shared_ms": ms, "max_abs_diff": diff}

    lengths = [{"prompt_len": 16384, "settings": [row(2.0), row(1.0, waves=2), row(0.5, num_stages=4),
                                                  row(0.1, block_n=32, diff=0.5)]},
               {"prompt_len": 61440, "settings": [row(6.0), row(6.0, waves=2), row(9.0, num_stages=4),
                                                  row(0.1, block_n=32, diff=0.5), row(0.2, num_warps=8)]}]
    tune = {"default": default, "lengths": lengths}
    # waves 2: 7.0 in all, against 8.0 (default) and 9.5 (stages 4); block_n 32 computes something else;
    # 8 warps ran at one length only
    assert best_launch(tune) == "waves=2,num_warps=4,num_stages=3,block_n=64"
    lengths[1]["settings"][1]["error"] = "RuntimeError: boom"
    assert best_launch(tune) is None  # the default is then the fastest over both
    assert best_launch({"error": "x"}) is None and best_launch({"default": default, "lengths": []}) is None
