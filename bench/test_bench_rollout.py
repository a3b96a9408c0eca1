"""Rollout throughput vs transformers' generate on a GRPO-shaped workload (CPU fp32):
8 prompts x 8 samples, 1,024-token prompts, 128 new tokens, temperature 1.

    python -m pytest bench/test_bench_rollout.py -q --benchmark-only

Each side runs in its own process (bench/rollout_case.py), one after the other.
LONGRL_BENCH_QUICK=1 shrinks the workload (2 prompts x 4 samples, 256 + 32 tokens).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK = bool(os.environ.get("LONGRL_BENCH_QUICK"))
SHAPE = ["--prompts", "2", "--n", "4", "--prompt-len", "256", "--new", "32"] if QUICK else []


def _case(impl: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.rollout_case", "--impl", impl, *SHAPE], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_rollout_vs_transformers(benchmark, record):
    hf = _case("hf")
    ours = {}
    benchmark.pedantic(lambda: ours.update(_case("ours")), rounds=1, iterations=1)
    speedup = ours["new_tokens_per_s"] / hf["new_tokens_per_s"]
    shape = f"{ours['prompts']}x{ours['n']} prompt={ours['prompt_len']} new={ours['new_tokens']}"
    line = (f"rollout {shape:<34} ours {ours['new_tokens_per_s']:7.1f} tok/s ({ours['seconds']:.0f}s) | "
            f"transformers {hf['new_tokens_per_s']:7.1f} tok/s ({hf['seconds']:.0f}s) | x{speedup:.2f}")
    row = {"suite": "rollout", "case": "rollout", "ours": ours, "transformers": hf, "speedup": speedup, "line": line}
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "line"})
    record(row)
    if not QUICK:
        assert speedup >= 5.0, line  # the target on the full workload
