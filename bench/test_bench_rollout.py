"""Rollout throughput vs transformers' generate on a GRPO-shaped workload (CPU fp32):
8 prompts x 8 samples, 1,024-token prompts, 128 new tokens, temperature 1.

    python -m pytest bench/test_bench_rollout.py -q --benchmark-only
    LONGRL_BENCH_QUICK=1   2 prompts x 4 samples, 256 + 32 tokens
    LONGRL_BENCH_TINY=1    2 prompts x 2 samples, 32 + 4 tokens: checks the bench itself
    LONGRL_BENCH_ROUNDS=N  generate runs per side (default 1 at full size: transformers'
                           side alone takes ~10 min a round on 2 cores; 3 when shrunk)

Each side runs in its own process (bench/rollout_case.py, whose docstring says how the
split is measured), one after the other. The figures are split into prefill and decode:
ours prefills each group's prompt once, transformers' num_return_sequences=G prefills it
G times, so end to end compares unequal work. The headline ratio, and the target, is
decode tokens/s (equal work on both sides); end to end is printed with both sides'
prefill token counts next to it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.spread import fmt, rounds

ROOT = Path(__file__).resolve().parents[1]
QUICK = bool(os.environ.get("LONGRL_BENCH_QUICK"))
TINY = bool(os.environ.get("LONGRL_BENCH_TINY"))
SHAPE = (["--prompts", "2", "--n", "2", "--prompt-len", "32", "--new", "4"] if TINY else
         ["--prompts", "2", "--n", "4", "--prompt-len", "256", "--new", "32"] if QUICK else [])
ROUNDS = rounds(3 if QUICK or TINY else 1)


def _case(impl: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.rollout_case", "--impl", impl, *SHAPE, "--rounds", str(ROUNDS)],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _lines(ours: dict, hf: dict, decode_x: float, e2e_x: float) -> str:
    shape = (f"{ours['prompts']}x{ours['n']} prompt={ours['prompt_len']} new={ours['new_tokens']}, "
             f"median of {ours['rounds']} round(s) [min–max]")

    def side(name, r, phase, tokens, what):
        return (f"{name} {r[tokens]:>6,} {what} {fmt(r[phase + '_time'])} "
                f"{r[phase + '_tokens_per_s']:7.1f} tok/s")

    return "\n".join([
        f"rollout {shape}",
        f"  prefill     {side('ours', ours, 'prefill', 'prefill_tokens', 'prompt tokens')} ({ours['prefills']}) | "
        f"{side('transformers', hf, 'prefill', 'prefill_tokens', 'prompt tokens')} ({hf['prefills']})",
        f"  decode      {side('ours', ours, 'decode', 'decode_tokens', 'new tokens')} | "
        f"{side('transformers', hf, 'decode', 'decode_tokens', 'new tokens')} | x{decode_x:.2f} (equal work: headline)",
        f"  end to end  ours {fmt(ours['time'])} for {ours['prefill_tokens']:,} prompt + {ours['generated']:,} new "
        f"| transformers {fmt(hf['time'])} for {hf['prefill_tokens']:,} prompt + {hf['generated']:,} new "
        f"| x{e2e_x:.2f} (unequal prefill)"])


def test_rollout_vs_transformers(benchmark, record):
    hf = _case("hf")
    ours = {}
    benchmark.pedantic(lambda: ours.update(_case("ours")), rounds=1, iterations=1)
    assert ours["decode_tokens"] == hf["decode_tokens"] and ours["generated"] == hf["generated"], (ours, hf)
    decode_x = ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
    e2e_x = hf["time"]["median"] / ours["time"]["median"]
    line = _lines(ours, hf, decode_x, e2e_x)
    row = {"suite": "rollout", "case": "rollout", "ours": ours, "transformers": hf, "decode_speedup": decode_x,
           "end_to_end_speedup": e2e_x, "line": line}
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "line"})
    record(row)
    if not (QUICK or TINY):
        assert decode_x >= 5.0, line  # the target on the full workload, on the equal-work figure


def test_decode_against_the_matmul_roofline(benchmark, record):
    """Decode of the same workload at top-p 0.95 (the RL recipes' setting) and 1.0, each as new
    tokens/s against the matmul roofline: 2 x parameters FLOPs per token at the fp32 matmul rate
    the case process measures before and after its rounds (the higher). Target at full size: >= 50% at top-p 0.95."""
    runs = {}

    def both():
        for top_p in (0.95, 1.0):
            out = subprocess.run([sys.executable, "-m", "bench.rollout_case", "--impl", "ours", *SHAPE,
                                  "--rounds", str(ROUNDS), "--top-p", str(top_p)],
                                 cwd=ROOT, capture_output=True, text=True, check=True)
            runs[top_p] = json.loads(out.stdout.strip().splitlines()[-1])
    benchmark.pedantic(both, rounds=1, iterations=1)
    r = runs[0.95]
    head = (f"decode vs matmul roofline {r['prompts']}x{r['n']} prompt={r['prompt_len']} new={r['new_tokens']} "
            f"({r['params'] / 1e6:.1f}M params, fp32)")
    line = "\n".join([head] + [
        f"  top-p {p:<4}  {x['decode_tokens_per_s']:7.1f} tok/s  roofline {x['roofline_tokens_per_s']:6.1f} tok/s "
        f"({x['matmul_gflops']:.0f} GFLOP/s)  {x['roofline_fraction']:6.1%}" for p, x in runs.items()])
    row = {"suite": "rollout", "case": "decode_roofline", "runs": {str(k): v for k, v in runs.items()},
           "roofline_fraction": r["roofline_fraction"], "line": line}
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "line"})
    record(row)
    if not (QUICK or TINY):
        assert r["roofline_fraction"] >= 0.5, line


def _json_case(module: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_weight_major_linear_layers(benchmark, record):
    """A decode step's linear layers (embedded model, 64 rows): F.linear against the weight-major
    products the engine uses on CPU (bench/linear_case.py). Target: the step's sum >= 1.1x."""
    args = ["--repeats", "3", "--layers", "4"] if (QUICK or TINY) else []
    r = {}
    benchmark.pedantic(lambda: r.update(_json_case("bench.linear_case", *args)), rounds=1, iterations=1)
    line = "\n".join([f"linear layers, {r['rows']} rows, fp32 (median of {r['repeats']}):"] + [
        f"  {name:14s} F.linear {row['linear']['median_ms']:7.3f} ms  weight-major "
        f"{row['weight_major']['median_ms']:7.3f} ms  x{row['speedup']:.2f}" for name, row in r["shapes"].items()]
        + [f"  step: F.linear {r['step_ms']['linear']:.1f} ms, weight-major {r['step_ms']['weight_major']:.1f} ms, "
           f"x{r['speedup']:.2f}"])
    row = {"suite": "rollout", "case": "weight_major_linear", "result": r, "speedup": r["speedup"], "line": line}
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "line"})
    record(row)
    if not (QUICK or TINY):
        assert r["speedup"] >= 1.1, line


def test_decode_tables_on_device(benchmark, record):
    """A decode step's block tables and context at 16K- and 60K-token shared prompts, 8 x 8
    sequences: rebuilt from Python lists each step against DecodeTables (bench/decode_tables_case.py).
    Target: >= 5x less host time on the Triton path's tables at 60K."""
    args = ["--prompt-len", "512", "--steps", "8"] if TINY else ["--steps", "16"] if QUICK else []
    r = {}
    benchmark.pedantic(lambda: r.update(_json_case("bench.decode_tables_case", *args)), rounds=1, iterations=1)
    line = "\n".join(["decode block tables + context, per step (median):"] + [
        f"  prompt {c['prompt_len']:>6} {c['backend']:6s} lists {c['lists']['median_ms']:7.2f} ms  device tables "
        f"{c['device']['median_ms']:6.2f} ms  x{c['speedup']:.1f}" for c in r["cases"]])
    row = {"suite": "rollout", "case": "decode_tables", "result": r, "line": line}
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "line"})
    record(row)
    if not (QUICK or TINY):
        long_triton = next(c for c in r["cases"] if c["prompt_len"] == 60000 and c["backend"] == "triton")
        assert long_triton["speedup"] >= 5.0, line
