"""One full RL step on a CI-sized batch (CPU, embedded model): the step's time split and
tokens/s, in its own process.

    python -m pytest bench/test_bench_train.py -q --benchmark-only
    LONGRL_BENCH_TINY=1   toy-sized step (bench/train_step_case.py --tiny): checks the bench itself

One round: a second step would train a changed model on other samples, not repeat the
first. What makes the figure trustworthy instead is that the split is checked: the timed
parts (rollout, reward, old and ref log-probs, update) must add up to between 90% and
100% of the step, and each must be > 0 exactly when it ran (train_step_case.split_problems).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.train_step_case import PARTS, split_problems

ROOT = Path(__file__).resolve().parents[1]
TINY = bool(os.environ.get("LONGRL_BENCH_TINY"))


def test_one_rl_step(benchmark, record):
    out = {}

    def run():
        cmd = [sys.executable, "-m", "bench.train_step_case", *(["--tiny"] if TINY else [])]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    parts = sum(out.get(k, 0.0) for k in PARTS)
    shape = "toy step" if TINY else "2 prompts x 4 samples, 32 new tokens"
    line = (f"rl step (cpu, {shape}): {out['time/step']:.2f}s; rollout {out['time/rollout']:.2f}s + reward "
            f"{out['time/reward']:.3f}s + old logprobs {out.get('time/old_logprob', 0):.2f}s + ref logprobs "
            f"{out.get('time/ref_logprob', 0):.2f}s + update {out.get('time/update', 0):.2f}s = {parts:.2f}s "
            f"({parts / out['time/step']:.1%} of the step); rollout {out['rollout_tokens_per_s']:.0f} tok/s, "
            f"update {out.get('update_tokens_per_s', 0):.0f} tok/s")
    benchmark.extra_info.update(out)
    problems = split_problems(out)
    record({"suite": "train", "case": "rl_step", **out, "split_problems": problems, "line": line})
    assert out["dynamic/kept_groups"] >= 1, line
    assert not problems, f"{line}\n" + "\n".join(problems)
