"""One full RL step on a CI-sized batch (CPU, embedded model): the step's time split and
tokens/s, in its own process.

    python -m pytest bench/test_bench_train.py -q --benchmark-only
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_one_rl_step(benchmark, record):
    out = {}

    def run():
        proc = subprocess.run([sys.executable, "-m", "bench.train_step_case"], cwd=ROOT, capture_output=True,
                              text=True, check=True)
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    line = (f"rl step (cpu, 2 prompts x 4 samples, 32 new tokens): {out['time/step']:.1f}s = rollout "
            f"{out['time/rollout']:.1f}s + reward {out['time/reward']:.2f}s + old logprobs "
            f"{out['time/old_logprob']:.1f}s + update {out['time/update']:.1f}s; rollout "
            f"{out['rollout_tokens_per_s']:.0f} tok/s, update {out['update_tokens_per_s']:.0f} tok/s")
    benchmark.extra_info.update(out)
    record({"suite": "train", "case": "rl_step", **out, "line": line})
    assert out["time/update"] > 0 and out["dynamic/kept_groups"] >= 1
