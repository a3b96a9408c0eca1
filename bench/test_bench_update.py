"""The shared-prefix update against the repeated layout: one GRPO group's update
(forward + backward of every micro-batch), CPU fp32, the embedded model, each layout in
its own process (bench/update_case.py).

    python -m pytest bench/test_bench_update.py -q --benchmark-only -s
    LONGRL_BENCH_TINY=1   a toy-sized group (P=64, R=8, G=4): checks the bench itself, no target
    LONGRL_BENCH_ROUNDS=N rounds per layout (default 3; median with min–max)

Target: speed-up >= 0.7 x G(P+R) / (P+G·R), the ratio of tokens through the model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.spread import fmt, rounds

ROOT = Path(__file__).resolve().parents[1]
GROUP, RESPONSE = 8, 64
PROMPTS = [512, 2048]
TINY = bool(os.environ.get("LONGRL_BENCH_TINY"))
if TINY:
    GROUP, RESPONSE, PROMPTS = 4, 8, [64]
GB = 1 << 30


def _case(layout: str, prompt: int) -> dict:
    cmd = [sys.executable, "-m", "bench.update_case", "--layout", layout, "--prompt", str(prompt),
           "--response", str(RESPONSE), "--group", str(GROUP), "--repeats", str(rounds())]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("prompt", PROMPTS, ids=[f"P{p}" for p in PROMPTS])
def test_shared_prefix_update(benchmark, record, prompt):
    got = {}
    benchmark.pedantic(lambda: got.update(shared=_case("shared", prompt)), rounds=1, iterations=1)
    shared, repeated = got["shared"], _case("repeated", prompt)
    speedup = repeated["seconds"] / shared["seconds"]
    token_ratio = GROUP * (prompt + RESPONSE) / (prompt + GROUP * RESPONSE)
    target = 0.7 * token_ratio
    line = (f"update P={prompt} R={RESPONSE} G={GROUP}: shared {fmt(shared['time'])} "
            f"{shared['peak_extra_bytes'] / GB:.2f} GiB, {shared['tokens']} tokens | repeated {fmt(repeated['time'])} "
            f"{repeated['peak_extra_bytes'] / GB:.2f} GiB, {repeated['tokens']} tokens | speed-up x{speedup:.2f} "
            f"(target >= x{target:.2f} = 0.7 x {token_ratio:.2f})")
    benchmark.extra_info.update(shared=shared, repeated=repeated, speedup=speedup, target=target)
    record({"suite": "update", "case": f"P{prompt}", "shared": shared, "repeated": repeated, "speedup": speedup,
            "target": target, "line": line})
    print("\n" + line)
    if not TINY:  # a toy group is all fixed cost (the lm_head's dW, the optimizer's zeroing): no target
        assert speedup >= target, line
