"""How many torch calls one torch-sampler step makes, and how many of them need a device value
on the host (a sync on a GPU): the reason the GPU samples with Triton kernels instead.

    python -m bench.sampler_ops [--rows 64 --vocab 49152 --top-p 0.95 --temperature 1.0]

Counts every torch function and tensor method `sample_batch` calls (TorchFunctionMode) on
random logits on CPU; the syncing kinds are nonzero, boolean-mask indexing, bool / int / item /
tolist conversions. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys


def count(rows: int, vocab: int, top_p: float, temperature: float, scale: float = 2.0) -> dict:
    import torch
    from torch.overrides import TorchFunctionMode

    from engine.rollout.sampling import SamplingParams, sample_batch, sampling_tensors

    calls: collections.Counter = collections.Counter()
    syncs: collections.Counter = collections.Counter()
    syncing = {"nonzero", "__bool__", "__int__", "__index__", "item", "tolist", "bincount"}

    def masked(args) -> bool:
        return any(isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:])

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", str(func))
            calls[name] += 1
            if name in syncing or (name in ("__getitem__", "__setitem__") and masked(args)):
                syncs[name] += 1
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g) * scale
    params = [SamplingParams(temperature=temperature, top_p=top_p, seed=1)] * rows
    settings = sampling_tensors(params, list(range(1, rows + 1)), [5] * rows, "cpu")
    with Count():
        sample_batch(logits, *settings)
    return {"rows": rows, "vocab": vocab, "top_p": top_p, "torch_calls": sum(calls.values()),
            "host_syncs_on_gpu": sum(syncs.values()), "syncs": dict(syncs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--temperature", type=float, default=1.0)
    a = p.parse_args(argv)
    print(json.dumps(count(a.rows, a.vocab, a.top_p, a.temperature)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
