"""Repeated rounds and their summary, shared by the benches, the case scripts and the GPU
suite. No pytest here: the GPU machine promises only torch, triton, transformers and
safetensors.

    LONGRL_BENCH_ROUNDS=N   rounds per timed case (default 3; 1 for a fast, spread-less pass)

One round is a noisy figure on a shared 2-core machine: a single slow or fast run would
decide a ratio. Every timed figure is the median of its rounds, shown with its min–max.
"""
from __future__ import annotations

import os
import statistics


def rounds(default: int = 3) -> int:
    n = int(os.environ.get("LONGRL_BENCH_ROUNDS", default))
    if n < 1:
        raise ValueError(f"LONGRL_BENCH_ROUNDS must be >= 1, got {n}")
    return n


def spread(values: list[float]) -> dict:
    """-> {"median", "min", "max", "rounds", "all"}: what a figure's row keeps of its rounds."""
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "rounds": len(vals), "all": vals}


def fmt(s: dict, scale: float = 1.0, unit: str = "s", digits: int = 4) -> str:
    """'101.2s [99.81–103.2]' (median [min–max], `digits` significant figures); one round
    says so instead of showing a range it does not have."""
    def num(x):
        return f"{x * scale:.{digits}g}"
    if s["rounds"] == 1:
        return f"{num(s['median'])}{unit} [1 round]"
    return f"{num(s['median'])}{unit} [{num(s['min'])}–{num(s['max'])}]"


def median_ms(fn, device: str, repeats: int) -> float:
    """fn's median time in ms over `repeats` calls after one untimed call (compiles, tunes): CUDA
    events around each call on a GPU, the wall clock elsewhere."""
    import time

    import torch

    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
