"""The one-kernel sampler's time on a GPU, for each launch setting the on-card tuning may pick.

    python3 -m bench.gpu_sampler_case [--rows 64 --vocab 151936] [--module kernels.triton_sample]

Random fp32 logits (scale 2) of a decode step: `rows` samples over the vocabulary, at
temperature 1 with top-p 0.95 (the RL recipes' setting), with top-k 50 and top-p 0.95, and
greedy. Each (tile width, warps) candidate of kernels.triton_rows.LAUNCH_CANDIDATES is timed
(CUDA events, the median of 20 launches after one to compile), then the default launch, which
tunes once and picks one, and the torch sampler (engine.rollout.sampling.sample_batch) beside
them. `--module` times another copy of the kernel with the same launch function (a baseline
in the same run). Prints one JSON line; needs CUDA.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

from bench.spread import median_ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--module", default="kernels.triton_sample")
    p.add_argument("--device", default="cuda", help="cpu: the same under TRITON_INTERPRET=1 (a check, not a figure)")
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args(argv)
    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"skipped": "needs CUDA"}))
        return 2
    from engine.rollout.sampling import SamplingParams, sample_batch, sampling_tensors
    from kernels.triton_rows import LAUNCH_CANDIDATES

    kernel = importlib.import_module(a.module)
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(a.rows, a.vocab, device=dev, generator=g) * 2
    settings = {"top_p 0.95": SamplingParams(temperature=1.0, top_p=0.95),
                "top_k 50 + top_p 0.95": SamplingParams(temperature=1.0, top_k=50, top_p=0.95),
                "greedy": SamplingParams(temperature=0.0)}
    card = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    out = {"rows": a.rows, "vocab": a.vocab, "module": a.module, "card": card, "cases": []}
    for name, params in settings.items():
        st = sampling_tensors([params] * a.rows, list(range(a.rows)), [3] * a.rows, dev)
        case = {"setting": name, "ms": {}}
        for block, warps in LAUNCH_CANDIDATES:
            try:
                case["ms"][f"{block}x{warps}"] = median_ms(
                    lambda: kernel.sample_rows_triton(logits, *st, block=block, num_warps=warps), dev, a.repeats)
            except TypeError as err:  # a module whose launch takes no such setting (an older copy)
                case["ms"][f"{block}x{warps}"] = f"not timed: {err}"[:200]
        case["ms"]["default launch"] = median_ms(lambda: kernel.sample_rows_triton(logits, *st), dev, a.repeats)
        case["ms"]["torch sampler"] = median_ms(lambda: sample_batch(logits.clone(), *st), dev, a.repeats)
        out["cases"].append(case)
        print(f"{name}: " + ", ".join(f"{k} {v:.3f} ms" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in case["ms"].items()), file=sys.stderr, flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
