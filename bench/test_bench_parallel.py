"""Sequence parallelism on CPU ranks: per-rank peak memory and time of one training step of
a 16K-token sequence at sp = 1, 2, 4 (bench/sp_case.py, each configuration in its own
processes).

    python -m pytest bench/test_bench_parallel.py -q --benchmark-only -s
    LONGRL_BENCH_TINY=1   1,024 tokens: checks the bench itself, no target

Target: each rank's peak memory above the model <= (1/sp + 15%) of sp = 1's. Time is
reported, not held to a target: the ranks share this machine's cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = bool(os.environ.get("LONGRL_BENCH_TINY"))
TOKENS = 1024 if TINY else 16384
GB = 1 << 30
_RESULTS: dict[int, dict] = {}


def _case(sp: int) -> dict:
    if sp not in _RESULTS:
        cmd = [sys.executable, "-m", "bench.sp_case", "--sp", str(sp), "--tokens", str(TOKENS)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        _RESULTS[sp] = json.loads(out.stdout.strip().splitlines()[-1])
    return _RESULTS[sp]


@pytest.mark.parametrize("sp", [2, 4])
def test_sequence_parallel_memory_per_rank(benchmark, record, sp):
    base = _case(1)
    got = {}
    benchmark.pedantic(lambda: got.update(_case(sp)), rounds=1, iterations=1)
    worst = max(got["peak_extra_bytes"])
    ratio = worst / base["peak_extra_bytes"][0]
    target = 1 / sp + 0.15
    line = (f"sp={sp} T={TOKENS}: step {got['seconds']:.1f}s (sp=1: {base['seconds']:.1f}s), per-rank peak "
            f"{', '.join(f'{b / GB:.2f}' for b in got['peak_extra_bytes'])} GiB vs sp=1 "
            f"{base['peak_extra_bytes'][0] / GB:.2f} GiB: x{ratio:.2f} (target <= x{target:.2f})")
    print("\n" + line)
    record({"suite": "parallel", "case": f"sp{sp}-T{TOKENS}", "sp1": base, "spN": got, "ratio": ratio,
            "target": target, "line": line})
    if not TINY:
        assert ratio <= target, line
