"""The Triton sampler's time on a GPU, for each chunk length and warp count.

    python3 -m bench.gpu_sampler_case [--rows 64 --vocab 151936] [--module kernels.triton_sample]
                                      [--chunks 4096,8192,262144 --warps 4,8 --pass-blocks 512]

Random fp32 logits (scale 2) of a decode step: `rows` samples over the vocabulary, at
temperature 1 with top-p 0.95 (the RL recipes' setting), with top-k 50 and top-p 0.95, and
greedy. Each (chunk, warps) of --chunks x --warps is timed, and the search passes' tiles of
--pass-blocks at the module's chunk (CUDA events, the median of 20 calls after one
to compile; a call is all of the sampler's launches), the largest chunk being one program a row
(the search's work without the split), then the default (kernels.triton_sample.CHUNK, 4 warps),
and the torch sampler (engine.rollout.sampling.sample_batch) beside them; also the host's
time to issue the default call (`host_ms`: a dozen launches from Python). The engine tells the
kernel which searches a batch needs; so does this case. `--module` times another copy of the
kernel with the same launch function (a baseline in the same run). Prints one JSON line; needs
CUDA.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

from bench.spread import median_ms


def label(chunk: int, warps: int, pass_block: int | None = None) -> str:
    return f"chunk {chunk} x {warps} warps" + (f", pass tile {pass_block}" if pass_block else "")


def host_ms(fn, repeats: int) -> float:
    """The host's time to issue one call (no sync inside the timing; the device drained before):
    above the device time, the sampler would be host bound."""
    import time

    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--module", default="kernels.triton_sample")
    p.add_argument("--device", default="cuda", help="cpu: the same under TRITON_INTERPRET=1 (a check, not a figure)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--chunks", default="4096,8192,262144", help="chunk lengths to time (powers of two)")
    p.add_argument("--warps", default="4,8", help="warps a program to time")
    p.add_argument("--pass-blocks", default="512", help="search-pass tiles to time besides the module's "
                   "PASS_BLOCK, at its CHUNK and each --warps")
    a = p.parse_args(argv)
    grid = [(int(c), int(w), None) for c in a.chunks.split(",") for w in a.warps.split(",")]
    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"skipped": "needs CUDA"}))
        return 2
    from engine.rollout.sampling import SamplingParams, sample_batch, sampling_tensors, searches

    kernel = importlib.import_module(a.module)
    warps = a.warps.split(",")
    grid += [(kernel.CHUNK, int(w), int(pb)) for pb in filter(None, a.pass_blocks.split(",")) for w in warps]
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(a.rows, a.vocab, device=dev, generator=g) * 2
    settings = {"top_p 0.95": SamplingParams(temperature=1.0, top_p=0.95),
                "top_k 50 + top_p 0.95": SamplingParams(temperature=1.0, top_k=50, top_p=0.95),
                "greedy": SamplingParams(temperature=0.0)}
    card = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    out = {"rows": a.rows, "vocab": a.vocab, "module": a.module, "card": card, "cases": []}
    for name, params in settings.items():
        st = sampling_tensors([params] * a.rows, list(range(a.rows)), [3] * a.rows, dev)
        uses = searches([params])
        case = {"setting": name, "ms": {}}
        for chunk, warps, pass_block in grid:
            default_tile = getattr(kernel, "PASS_BLOCK", None)
            try:
                if pass_block:
                    kernel.PASS_BLOCK = pass_block
                case["ms"][label(chunk, warps, pass_block)] = median_ms(
                    lambda: kernel.sample_rows_triton(logits, *st, uses=uses, chunk=chunk, num_warps=warps), dev,
                    a.repeats)
            except TypeError as err:  # a module whose launch takes no such setting (an older copy)
                case["ms"][label(chunk, warps, pass_block)] = f"not timed: {err}"[:200]
            finally:
                kernel.PASS_BLOCK = default_tile
        default = lambda: kernel.sample_rows_triton(logits, *st, uses=uses)  # noqa: E731
        case["ms"]["default launch"] = median_ms(default, dev, a.repeats)
        case["host_ms"] = {"default launch": host_ms(default, a.repeats)}
        case["ms"]["torch sampler"] = median_ms(lambda: sample_batch(logits.clone(), *st), dev, a.repeats)
        out["cases"].append(case)
        print(f"{name}: " + ", ".join(f"{k} {v:.3f} ms" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in case["ms"].items()), file=sys.stderr, flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
