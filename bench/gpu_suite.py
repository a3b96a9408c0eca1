"""The one-call GPU suite: correctness on CUDA, then the GPU benches, a short table last.

    bash bench/gpu_suite.sh [OUT_DIR]        (= python3 -m bench.gpu_suite --out OUT_DIR)

Runs from the repository root with the machine's own python3, torch and triton (no
installs, nothing downloaded). Only torch, triton, transformers and safetensors are
promised there, so nothing here imports pytest:
  1. the kernel tests on CUDA (pytest, the "-cuda" parametrisations and gpu-marked tests);
     without pytest they are reported skipped ("pytest not installed") and a pytest-free
     check of the fused loss against the fp64 reference on CUDA runs instead;
  2. the bf16 matmul rate of this card, measured now (the roofline's denominator);
  3. rollout decode at batch 64 (8 groups of 8 sharing 16K- and 60K-token prompts) against the
     memory-bandwidth roofline, with and without prefix sharing, CUDA graphs against eager
     steps, and where a step's time goes (bench/gpu_rollout_case.py); then the sampler kernel
     at 64 rows of a 152K vocabulary beside the torch sampler (bench/gpu_sampler_case.py), and
     the paged decode kernels alone at a few launch settings (bench/gpu_decode_tune.py), and an
     eager 16K step's kernels ranked by device time (bench/gpu_rollout_case.py --profile);
  4. one full RL step at a GPU size, with its time split and whether the parts add up
     to the step (bench/train_step_case.py --gpu);
  5. fused GRPO loss forward+backward at T up to 64K, H 4096 / 5120, V 151,936, bf16:
     time (median of 3 rounds, with min–max), fraction of the 3-GEMM roofline (6·T·H·V
     FLOPs at the measured rate, on the median), and peak extra memory against one chunk
     of fp32 logits plus an fp32 dW;
  6. the host work of a decode step's block tables, rebuilt from lists against kept on the
     device (bench/decode_tables_case.py --device cuda);
  7. the shared-prefix update against the repeated layout, one group at P = 16K, R = 2K,
     G = 8 on the 1.5B shape (bench/update_case.py --gpu);
  8. ring attention over every GPU of the machine against one-GPU causal attention
     (bench/gpu_ring_case.py; on one GPU a group of one checks the path);
  9. where the budget allows and a decode_tune setting beat the default launch: the shared-prompt
     decode of 3. again with that setting ($LONGRL_DECODE_LAUNCH).
The whole suite keeps to --budget seconds (default 540, inside the device machine's 600-s
limit a command): each stage is cut to what is left, one that cannot start is reported
skipped, and the JSON is rewritten after every stage.
Full figures go to OUT_DIR/gpu_suite.json, the pytest log to OUT_DIR/tests.log, each stage's
whole output to OUT_DIR/<stage>.log. Exit status: 0 every case ran and the tests passed; 1 a
test or a case failed or was skipped; 2 no CUDA device (nothing ran).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.spread import fmt
from bench.train_step_case import split_problems

ROOT = Path(__file__).resolve().parents[1]
CASES = [(8192, 4096), (32768, 4096), (65536, 4096), (32768, 5120), (65536, 5120)]
VOCAB = 151_936


def bf16_matmul_tflops(n: int = 8192, iters: int = 20) -> float:
    import torch
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12


def run_tests(out: Path) -> dict:
    if importlib.util.find_spec("pytest") is None:
        return smoke_check(out)
    # the paged-kernel and decode-path modules run whole: their tests take the GPU when there is one
    cmd = [sys.executable, "-m", "pytest", "-q", "tests/test_kernels.py", "tests/test_model.py",
           "tests/test_rollout.py", "tests/test_attention_block.py", "tests/test_paged_kernel.py",
           "tests/test_decode_paths.py", "tests/test_cuda_graphs.py", "tests/test_triton_sampler.py",
           "tests/test_prefill.py", "tests/test_shared_prefix.py", "tests/test_triton_norm.py",
           "tests/test_triton_pointwise.py", "tests/test_precision.py", "-k",
           "cuda or gpu or test_paged_kernel or test_decode_paths or "
           "test_triton_sampler or test_triton_norm or test_triton_pointwise or fused",
           "-p", "no:cacheprovider"]
    t0 = time.perf_counter()
    proc = stage(cmd, STAGE_TIMEOUT["tests"])
    (out / "tests.log").write_text(proc.stdout + proc.stderr)
    tail = (proc.stdout.strip().splitlines() or proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"returncode": proc.returncode, "summary": tail, "seconds": time.perf_counter() - t0}


def smoke_check(out: Path, device: str = "cuda") -> dict:
    """Without pytest the kernel tests cannot run (they are pytest modules); say so, and
    check the fused GRPO loss against the fp64 materialised-logits reference instead:
    value, dhidden and dweight, fp32, odd shapes, both backends, one chunk and several."""
    import torch

    from kernels import GRPOLossConfig, linear_grpo_loss
    from kernels.reference import naive_grpo_loss

    t0, lines, failed = time.perf_counter(), [], 0
    g = torch.Generator().manual_seed(0)
    t, h, v = 301, 67, 5003
    hid, w = torch.randn(t, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g, dtype=torch.float64)
    w /= h ** 0.5
    y, adv = torch.randint(0, v, (t,), generator=g), torch.randn(t, generator=g, dtype=torch.float64)
    tw = torch.rand(t, generator=g, dtype=torch.float64) / t
    cfg = GRPOLossConfig()

    def grads(fn, dtype, dev):  # -> (loss, dhidden, dweight) in fp64 on the CPU
        hh = hid.detach().to(dev, dtype).requires_grad_()  # detach: fp64 on the CPU would be hid itself
        ww = w.detach().to(dev, dtype).requires_grad_()
        loss = fn(hh, ww)
        loss.backward()
        return loss.detach().double().cpu().reshape(1), hh.grad.double().cpu(), ww.grad.double().cpu()

    ref = grads(lambda hh, ww: naive_grpo_loss(hh, ww, y, advantages=adv, token_weight=tw, cfg=cfg),
                torch.float64, "cpu")
    for backend in ("torch", "triton"):
        for chunk in (None, 64):
            name = f"{backend}-{device} chunk={chunk or 'auto'}"
            try:
                got = grads(lambda hh, ww: linear_grpo_loss(
                    hh, ww, y.to(device), advantages=adv.float().to(device), token_weight=tw.float().to(device),
                    cfg=cfg, backend=backend, chunk_tokens=chunk)[0], torch.float32, device)
                err = max(((a - b).abs().max() / (b.abs().max() + 1e-12)).item() for a, b in zip(got, ref))
                ok = err <= 1e-4
                lines.append(f"{name}: max relative error (loss, dH, dW) {err:.2e} {'ok' if ok else 'FAILED (> 1e-4)'}")
            except Exception as exc:  # report every case, not just the first failure
                ok = False
                lines.append(f"{name}: FAILED {type(exc).__name__}: {exc}")
            failed += not ok
    (out / "tests.log").write_text("pytest not installed: kernel tests skipped\n" + "\n".join(lines) + "\n")
    return {"returncode": int(failed > 0), "skipped": "pytest not installed", "smoke": lines,
            "summary": f"pytest not installed: kernel tests skipped; pytest-free fused-loss check "
                       f"{len(lines) - failed}/{len(lines)} passed", "seconds": time.perf_counter() - t0}


# seconds per stage: a stage that hangs or crawls is reported, the rest still runs
STAGE_TIMEOUT = {"tests": 210, "kernel_case": 60, "rollout": 180, "sampler": 90, "decode_tune": 120,
                 "decode_profile": 60, "decode_tables": 60, "rl_step": 240, "update": 120, "ring": 120,
                 "rollout_tuned": 120}
UPDATE = {"prompt": 16384, "response": 2048, "group": 8}
# the decode kernels' launch settings tried by the suite (bench/gpu_decode_tune.py has the wider grid)
DECODE_TUNE = ("--waves", "1", "2", "--warps", "4", "8", "--stages", "3", "4", "--block-n", "32", "64")
# where an eager decode step's device time goes, kernel by kernel (bench/gpu_rollout_case.py --profile)
DECODE_PROFILE = ("--profile", "16384", "--new", "16", "--top", "12")


CASE_NAMES = ["tests", "bf16_matmul_tflops", "grpo_loss", "rollout", "sampler", "decode_tune", "decode_profile",
              "decode_tables", "rl_step", "update", "ring", "rollout_tuned"]


def _version(module: str) -> str | None:
    """The version of an optional tool, None where it is not installed (never raises)."""
    try:
        if importlib.util.find_spec(module) is None:
            return None
        mod = __import__(module)
        return str(getattr(mod, "__version__", "installed"))
    except ModuleNotFoundError:
        return None
    except Exception as exc:  # present but broken: say how
        return f"broken ({type(exc).__name__})"


def _guarded(fn):
    """A case run in this process: its result, or {"error": the traceback's last lines}."""
    import traceback
    try:
        return fn()
    except Exception:  # noqa: BLE001 - one case's failure is recorded, the rest still run
        return {"error": traceback.format_exc().strip().splitlines()[-3:]}


def _last_json(proc: subprocess.CompletedProcess) -> dict:
    """A stage's result: the JSON of its last stdout line, or its stderr tail."""
    if getattr(proc, "skipped", False):
        return {"skipped": proc.stderr}
    if proc.returncode == 0:
        try:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return {"error": ["no JSON result line", *proc.stdout.strip().splitlines()[-2:]]}
    return {"error": (proc.stderr.strip().splitlines() or ["(no stderr)"])[-3:]}


class Budget:
    """The suite's wall-clock budget (--budget): a stage runs for its own limit or for what is
    left of the budget less RESERVE (the summary's time), whichever is less; with under
    MIN_STAGE seconds left it does not start and reads as skipped. So one call of the suite
    ends inside the device machine's per-command limit with every finished figure kept."""
    RESERVE, MIN_STAGE = 10.0, 20.0

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def timeout(self, limit: float) -> float:
        return min(limit, self.end - time.monotonic() - self.RESERVE)


BUDGET = Budget(float("inf"))


def stage(cmd: list[str], timeout: float, log: Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run one stage within the suite's budget; past its timeout it is killed and reads as a
    failure that says so. `log`: where its whole stdout and stderr go (kept for a failure's
    diagnosis: the result keeps only the tail). `env`: variables set for it on top of ours."""
    timeout = BUDGET.timeout(timeout)
    if timeout < Budget.MIN_STAGE:
        proc = subprocess.CompletedProcess(cmd, 0, "", f"not started: the suite's time budget "
                                                       f"({BUDGET.seconds:.0f} s, --budget) is spent")
        proc.skipped = True  # read by _last_json
    else:
        # its own process group: on a timeout the stage and whatever it started (ranks, pytest's
        # workers) are killed together, none left holding the GPU
        with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, env={**os.environ, **env} if env else None) as child:
            try:
                out, err = child.communicate(timeout=timeout)
                proc = subprocess.CompletedProcess(cmd, child.returncode, out, err)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                out, err = child.communicate()
                proc = subprocess.CompletedProcess(cmd, 124, out, err + f"\ntimed out after {timeout:.0f} s")
    if log is not None:
        setting = "".join(f"{k}={v} " for k, v in (env or {}).items())
        log.write_text(f"{setting}$ {' '.join(cmd)}\n[exit {proc.returncode}]\n"
                       f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def run_module(out: Path, log: str, limit: str, module: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """`python -m module args` as a stage (its timeout STAGE_TIMEOUT[limit], its output in
    OUT/<log>.log, `env` set for it) -> its result line, printed."""
    cmd = [sys.executable, "-m", module, *args]
    result = _last_json(stage(cmd, STAGE_TIMEOUT[limit], out / f"{log}.log", env=env) if env else
                        stage(cmd, STAGE_TIMEOUT[limit], out / f"{log}.log"))
    print(json.dumps(result), flush=True)
    return result


def run_case(tokens: int, hidden: int, out: Path, logits: str = "fp32") -> dict:
    result = run_module(out, f"grpo_loss-{tokens}-{hidden}-{logits}", "kernel_case", "bench.kernel_case", "--impl",
                        "fused", "--tokens", str(tokens), "--hidden", str(hidden), "--vocab", str(VOCAB), "--dtype",
                        "bfloat16", "--device", "cuda", "--repeats", "3", "--logits", logits)
    return {"tokens": tokens, "hidden": hidden, "logits": logits, **result} if _not_run(result) else \
        {**result, "logits": logits}


def best_launch(tune) -> str | None:
    """The decode_tune setting with the least shared-prefix time summed over the prompt lengths, as
    $LONGRL_DECODE_LAUNCH text ("waves=2,num_warps=8,num_stages=4,block_n=32"); a setting counts
    only where it ran at every length and matched the default's output. None where that setting
    is the default, or nothing ran."""
    if _not_run(tune) or not isinstance(tune, dict):
        return None
    lengths = [x for x in tune.get("lengths", []) if "error" not in x]
    times: dict[tuple, list[float]] = {}
    for length in lengths:
        for r in length["settings"]:
            diff = r.get("max_abs_diff")
            if "error" not in r and isinstance(diff, float) and diff <= 2e-2:
                times.setdefault((r["waves"], r["num_warps"], r["num_stages"], r["block_n"]), []).append(r["shared_ms"])
    whole = {key: sum(ms) for key, ms in times.items() if len(ms) == len(lengths)}
    if not lengths or not whole:
        return None
    best = min(whole, key=whole.get)
    d = tune["default"]
    if best == (d["waves"], d["num_warps"], d["num_stages"], d["block_n"]):
        return None
    return ",".join(f"{k}={v}" for k, v in zip(("waves", "num_warps", "num_stages", "block_n"), best))


def _not_run(result) -> str | None:
    """'error' or 'skipped' where a case gave no figures, else None."""
    if isinstance(result, dict):
        return "error" if "error" in result else "skipped" if "skipped" in result else None
    return None


def _why(result: dict) -> str:
    kind = _not_run(result)
    return f"{kind}: {result[kind]}"


def main(argv=None) -> int:
    global BUDGET
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / f"gpu-{datetime.date.today()}"))
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--budget", type=float, default=540.0,
                   help="wall-clock seconds for the whole suite (default 540: one call of the device "
                        "machine, whose limit is 600 s a command). Stages run in the order of the list "
                        "above, each within what is left; one that cannot start is reported skipped")
    args = p.parse_args(argv)
    BUDGET = Budget(args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    versions = {"torch": torch.__version__, "triton": _version("triton"), "pytest": _version("pytest"),
                "transformers": _version("transformers"), "flash_attn": _version("flash_attn")}
    if not torch.cuda.is_available():
        # every case needs CUDA: each is reported skipped, the JSON written, exit status 2
        report = {"card": None, "date": datetime.datetime.now().isoformat(timespec="seconds"), **versions,
                  **{name: {"skipped": "needs CUDA"} for name in CASE_NAMES}}
        (out / "gpu_suite.json").write_text(json.dumps(report, indent=2))
        tools = ", ".join(f"{k} {v or 'missing'}" for k, v in versions.items())
        print(f"gpu_suite: no CUDA device here; tools: {tools}")
        for name in CASE_NAMES:
            print(f"{name}: skipped (needs CUDA)")
        print(f"full figures: {out / 'gpu_suite.json'} (exit status 2: nothing ran)")
        return 2
    if versions["triton"] is None:
        print("gpu_suite: triton is not importable; the Triton cases will fail and say so", file=sys.stderr)
    from kernels.rows import chunk_rows, logit_bytes
    from kernels.triton_rows import TritonRows
    card = torch.cuda.get_device_name()
    report = {"card": card, "date": datetime.datetime.now().isoformat(timespec="seconds"), **versions,
              "budget_s": args.budget}

    def save():  # after every stage: a later one that hangs or is cut off loses nothing
        report["elapsed_s"] = round(args.budget - (BUDGET.end - time.monotonic()), 1)
        (out / "gpu_suite.json").write_text(json.dumps(report, indent=2))

    print(f"gpu_suite on {card}: " + ", ".join(f"{k} {v or 'missing'}" for k, v in versions.items())
          + f"; budget {args.budget:.0f} s", flush=True)
    if not args.skip_tests:
        report["tests"] = _guarded(lambda: run_tests(out))
        print(f"tests: {report['tests'].get('summary', report['tests'])}", flush=True)
        save()
    rate = _guarded(bf16_matmul_tflops)
    report["bf16_matmul_tflops"] = rate
    if isinstance(rate, dict):  # the matmul itself failed: no roofline for the loss cases
        print(f"bf16 matmul: {rate}", flush=True)
        rate = float("nan")
    else:
        print(f"bf16 matmul: {rate:.0f} TFLOP/s (8192^3, measured now)", flush=True)

    # the figures not yet measured on a card first (rollout decode, the RL step), then the rest
    report["rollout"] = run_module(out, "rollout", "rollout", "bench.gpu_rollout_case")
    save()
    report["sampler"] = run_module(out, "sampler", "sampler", "bench.gpu_sampler_case")
    save()
    report["decode_tune"] = run_module(out, "decode_tune", "decode_tune", "bench.gpu_decode_tune", *DECODE_TUNE)
    save()
    report["decode_profile"] = run_module(out, "decode_profile", "decode_profile", "bench.gpu_rollout_case",
                                          *DECODE_PROFILE)
    save()
    report["rl_step"] = run_module(out, "rl_step", "rl_step", "bench.train_step_case", "--gpu")
    if not _not_run(report["rl_step"]):
        report["rl_step"]["split_problems"] = split_problems(report["rl_step"])
    save()
    rows = report["grpo_loss"] = []
    # fp32 chunk logits (the default) beside bf16 ones ("compute"): what the precision costs
    for (tokens, hidden), logits in [(case, mode) for case in CASES for mode in ("fp32", "compute")]:
        r = run_case(tokens, hidden, out, logits)
        if not _not_run(r):
            # the bytes a chunk holds a logit (kernels.rows.logit_bytes): fp32 logits + the bf16 gradient, or
            # (compute) the bf16 logits the Triton rows work on in place
            chunk = chunk_rows(tokens, VOCAB, torch.device("cuda"),
                               bytes_per_logit=logit_bytes(TritonRows, torch.bfloat16, logits))
            budget = chunk * VOCAB * 4 + VOCAB * hidden * 4  # fp32 logits' bytes for that chunk + fp32 dW
            r["roofline_fraction"] = 6 * tokens * hidden * VOCAB / r["seconds"] / (rate * 1e12)
            r["memory_budget_bytes"] = budget
            r["memory_vs_budget"] = r["peak_extra_bytes"] / budget
            r["chunk_tokens"] = chunk
        rows.append(r)
        save()
    report["decode_tables"] = run_module(out, "decode_tables", "decode_tables", "bench.decode_tables_case",
                                         "--device", "cuda", "--steps", "32")
    save()
    report["update"] = {}
    for layout in ("shared", "repeated"):
        report["update"][layout] = run_module(out, f"update-{layout}", "update", "bench.update_case", "--gpu",
                                              "--layout", layout, "--repeats", "2",
                                              *[x for k, val in UPDATE.items() for x in (f"--{k}", str(val))])
        save()
    report["ring"] = run_module(out, "ring", "ring", "bench.gpu_ring_case")
    save()
    # last, where the budget allows: the shared-prompt decode again with the decode_tune's best launch
    launch = best_launch(report["decode_tune"])
    if launch is None:
        report["rollout_tuned"] = {"not_needed": "no decode_tune setting beat the default launch (or none ran)"}
    else:
        tuned = run_module(out, "rollout_tuned", "rollout_tuned", "bench.gpu_rollout_case", "--shared-only",
                           "--graph-lens", "--fused-lens", "--lookahead-lens", env={"LONGRL_DECODE_LAUNCH": launch})
        report["rollout_tuned"] = {"launch": launch, **tuned}
    save()
    summary(report, rows, out)
    # the tests by their return code (without pytest the pytest-free check's result stands for them)
    tests = report.get("tests")
    failed = ["tests"] if tests is not None and ("error" in tests or tests.get("returncode", 0) != 0) else []
    # the tuned rollout runs last, where the budget allows: skipped, it is not a failure
    failed += [name for name in CASE_NAMES if name != "tests" and _not_run(report.get(name))
               and (name != "rollout_tuned" or _not_run(report.get(name)) == "error")]
    failed += [f"grpo_loss T={r['tokens']} H={r['hidden']} {r.get('logits', 'fp32')}" for r in rows if _not_run(r)]
    failed += [f"update {k}" for k, u in report["update"].items() if _not_run(u)]
    if failed:
        print(f"failed or skipped cases: {', '.join(failed)} (each stage's output: {out}/<stage>.log)")
    print(f"suite: {report['elapsed_s']:.0f} s of the {args.budget:.0f} s budget")
    # exit status: 0 every case ran and the tests passed; 1 a test or a case failed or was skipped; 2 no CUDA
    return 0 if not failed else 1


def summary(report: dict, rows: list[dict], out: Path) -> None:
    """The short tables, last on the console."""
    gb = 1 << 30
    print("\n== fused GRPO loss, bf16, V=151936: forward+backward ==")
    print(f"{'T':>6} {'H':>5} {'logits':>7} {'time: median [min–max]':>30} {'roofline':>9} {'peak extra':>11} "
          f"{'vs chunk+dW':>12}")
    for r in rows:
        logits = r.get("logits", "fp32")
        if _not_run(r):
            print(f"{r['tokens']:>6} {r['hidden']:>5} {logits:>7}  {_why(r)}")
            continue
        print(f"{r['tokens']:>6} {r['hidden']:>5} {logits:>7} {fmt(r['time'], 1e3, 'ms'):>30} "
              f"{r['roofline_fraction']:8.1%} {r['peak_extra_bytes'] / gb:9.2f}GB {r['memory_vs_budget']:11.2f}x")
    print("targets: roofline >= 85%, peak extra <= 1.10x (one fp32 logits chunk + fp32 dW)")
    ro = report["rollout"]
    if _not_run(ro):
        print(f"\n== rollout decode ==\n{_why(ro)}")
    else:
        print(f"\n== rollout decode, batch {ro['batch']} (8 groups x 8 sharing a prompt), Qwen2-1.5B shape, bf16 ==\n"
              f"copy bandwidth {ro['copy_bandwidth'] / 1e12:.2f} TB/s (measured now); roofline = the bytes a step "
              f"must read (weights + each prompt's KV once + each sample's suffix) at that bandwidth")
        for c in ro["cases"]:
            graphs = "graphs" if c.get("graph_steps") else "eager"
            waves = f"  (mean batch {c['mean_batch']:.1f}: ms per {c['batch']} tokens)" \
                if c["mean_batch"] < c["batch"] - 0.5 else ""
            graphs += "" if c.get("fused", True) else ", torch ops"
            print(f"prompt {c['prompt_len']:>6}  {'shared' if c['share_prefix'] else 'not shared':>10}  {graphs:17s}  "
                  f"{c['batch_step_s'] * 1e3:7.2f} ms/step  {c['decode_tokens_per_s']:8.0f} tok/s  "
                  f"{c['roofline_fraction']:6.1%} of the roofline{waves}")
        print("target: >= 70% with sharing; CUDA graphs vs eager step (same case): "
              + ", ".join(f"prompt {k}: x{v:.2f}" for k, v in ro.get("graphs_speedup", {}).items()))
        if ro.get("fused_speedup"):
            print("fused kernels and stacked projections vs torch's ops (graph step, same case): "
                  + ", ".join(f"prompt {k}: x{v:.2f}" for k, v in ro["fused_speedup"].items()))
        if ro.get("lookahead_speedup"):
            print("lookahead (a step launched before the last one's tokens are read) vs reading first: "
                  + ", ".join(f"prompt {k}: x{v:.2f}" for k, v in ro["lookahead_speedup"].items()))
        for c in ro.get("step_breakdown", []):
            print(f"step breakdown, prompt {c['prompt_len']}, {c['cuda_graphs']:>4} graphs (synced parts, median): "
                  f"{c['step_ms']:.2f} ms = model {c['model_ms']:.2f} + sampler {c['sampler_ms']:.2f} "
                  f"+ rest {c['rest_ms']:.2f}")
    rt = report.get("rollout_tuned", {})
    if "launch" in rt:
        print(f"\n== rollout decode with the decode_tune's best launch (LONGRL_DECODE_LAUNCH={rt['launch']}) ==")
        if _not_run(rt):
            print(_why(rt))
        for c in rt.get("cases", []):
            print(f"prompt {c['prompt_len']:>6}  {'shared':>10}  {c['batch_step_s'] * 1e3:7.2f} ms/step  "
                  f"{c['roofline_fraction']:6.1%} of the roofline")
    sa = report["sampler"]
    print("\n== sampler kernels, 64 rows x 151,936 tokens (median of 20 calls) ==")
    if _not_run(sa):
        print(_why(sa))
    else:
        for c in sa["cases"]:
            ms = c["ms"]
            timed = {k: v for k, v in ms.items() if k.startswith("chunk") and isinstance(v, float)}
            best = min(timed, key=timed.get) if timed else None
            host = c.get("host_ms", {}).get("default launch")
            print(f"{c['setting']:22s}  kernel {ms['default launch']:6.3f} ms  "
                  + (f"(host {host:.3f} ms to issue)  " if host is not None else "")
                  + (f"best {best} {timed[best]:6.3f} ms  " if best else "")
                  + f"torch sampler {ms['torch sampler']:6.3f} ms")
    tu = report["decode_tune"]
    print("\n== paged decode kernels alone, one layer, 8 groups x 8 sharing a prompt: launch settings ==")
    if _not_run(tu):
        print(_why(tu))
    else:
        d = tu["default"]
        for length in tu["lengths"]:
            if "error" in length:
                print(f"prompt {length['prompt_len']:>6}: {length['error']}")
                continue
            rows = {(r["waves"], r["num_warps"], r["num_stages"], r["block_n"]): r for r in length["settings"]}
            mine = rows.get((d["waves"], d["num_warps"], d["num_stages"], d["block_n"]), {})
            best = length["best"] or {}
            nan = float("nan")
            print(f"prompt {length['prompt_len']:>6}: default {mine.get('shared_ms', nan):.3f} ms "
                  f"({mine.get('roofline_fraction') or 0:.1%} of the roofline); best {best.get('shared_ms', nan):.3f} "
                  f"ms ({best.get('roofline_fraction') or 0:.1%}) at waves {best.get('waves')}, warps "
                  f"{best.get('num_warps')}, stages {best.get('num_stages')}, block_n {best.get('block_n')}")
        print("apply a setting: LONGRL_DECODE_LAUNCH=waves=4,num_warps=8 (kernels/triton_paged.py LAUNCH)")
    pr = report["decode_profile"]
    print("\n== an eager decode step's kernels, batch 64 (8 x 8), by device time a step (torch.profiler) ==")
    if _not_run(pr):
        print(_why(pr))
    else:
        for c in pr["cases"]:
            print(f"prompt {c['prompt_len']:>6} {'shared' if c['share_prefix'] else 'not shared':>10}: "
                  f"{c['device_ms_per_step']:.2f} ms on the device a step; "
                  + ", ".join(f"{name.split('(')[0][:48]} {ms:.3f}" for name, ms in c["top_ms_per_step"].items()))
    dt = report["decode_tables"]
    print("\n== decode block tables + context, host work per step (8 x 8 sequences, block 16) ==")
    if _not_run(dt):
        print(_why(dt))
    else:
        for c in dt["cases"]:
            print(f"prompt {c['prompt_len']:>6} {c['backend']:6s}  rebuilt from lists {c['lists']['median_ms']:7.2f} ms"
                  f"  device tables {c['device']['median_ms']:6.2f} ms  x{c['speedup']:.1f}")
    st = report["rl_step"]
    print("\n== one RL step, Qwen2-1.5B shape, bf16, 8 prompts x 8 samples, 256 new tokens ==")
    print(_why(st) if _not_run(st) else
          f"{st['time/step']:.1f}s: rollout {st['time/rollout']:.1f}s, reward {st['time/reward']:.2f}s, "
          f"old logprobs {st.get('time/old_logprob', 0):.1f}s, ref logprobs {st.get('time/ref_logprob', 0):.1f}s, "
          f"update {st.get('time/update', 0):.1f}s; rollout {st['rollout_tokens_per_s']:.0f} tok/s, "
          f"update {st.get('update_tokens_per_s', 0):.0f} tok/s\n"
          f"time split: {'; '.join(st['split_problems']) or 'parts add up to the step (90-100%)'}")
    ri = report["ring"]
    print("\n== ring attention, 4 x 8,192 tokens, 12/2 heads, d 128, bf16 ==")
    print(_why(ri) if _not_run(ri) else
          f"W={ri['world']}: fwd+bwd {ri['seconds'] * 1e3:.1f} ms, worst relative error {ri['rel_error']:.2e} "
          f"against one-GPU causal attention")
    up = report["update"]
    p_, r_, g_ = UPDATE["prompt"], UPDATE["response"], UPDATE["group"]
    target = 0.7 * g_ * (p_ + r_) / (p_ + g_ * r_)
    print(f"\n== shared-prefix update, one group P={p_} R={r_} G={g_}, 1.5B shape, bf16 ==")
    for layout in ("shared", "repeated"):
        u = up[layout]
        print(f"{layout}: " + (_why(u) if _not_run(u) else
                               f"{fmt(u['time'])}, {u['tokens']} tokens, peak {u['peak_extra_bytes'] / gb:.1f} GB"))
    if not any(_not_run(u) for u in up.values()):
        speedup = up["repeated"]["seconds"] / up["shared"]["seconds"]
        print(f"speed-up x{speedup:.3f} (target >= x{target:.3f}: {'met' if speedup >= target else 'not met'})")
    if "tests" in report:
        print(f"tests on CUDA: {report['tests'].get('summary') or _why(report['tests'])}")
    print(f"full figures: {out / 'gpu_suite.json'}")


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
