"""One forward+backward of the policy loss, in this process, with its time and peak memory.

    python -m bench.kernel_case --impl fused|naive --tokens 8192 --hidden 1536 --vocab 151936

Prints one JSON line. Run one case per process: peak memory is the process's peak RSS
(CPU) or torch's peak allocation (CUDA) minus what the inputs already held, so every
case starts from a clean slate. The benches and the GPU suite call this.

--repeats N times N rounds on the same inputs in this process (after a warm-up on tiny
shapes): "seconds" is their median and "time" keeps median, min, max and every round,
so no single lucky or unlucky round decides a ratio. Peak memory is over all rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from bench.spread import spread


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(impl: str, tokens: int, hidden: int, vocab: int, dtype: str = "float32", device: str = "cpu",
        chunk_tokens: int | None = None, repeats: int = 1, logits: str = "fp32") -> dict:
    import torch

    from kernels import GRPOLossConfig, linear_grpo_loss, linear_logprob
    from kernels.reference import naive_grpo_loss, naive_logprob

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    dev = torch.device(device)
    cfg = GRPOLossConfig()

    def make(t, h, v):
        g = torch.Generator(device=dev).manual_seed(0)
        hid = (torch.randn(t, h, device=dev, generator=g) * 0.5).to(dt).requires_grad_()
        w = (torch.randn(v, h, device=dev, generator=g) / h ** 0.5).to(dt).requires_grad_()
        y = torch.randint(0, v, (t,), device=dev, generator=g)
        adv = torch.randn(t, device=dev, generator=g)
        tw = torch.full((t,), 1.0 / t, device=dev)
        return hid, w, y, adv, tw

    def step(hid, w, y, adv, tw):
        if impl == "fused":
            loss, _ = linear_grpo_loss(hid, w, y, advantages=adv, token_weight=tw, cfg=cfg, chunk_tokens=chunk_tokens,
                                       logits=logits)
        elif impl == "fused-logprob":  # log-probs with autograd through them (recompute in backward)
            logp, _ = linear_logprob(hid, w, y, chunk_tokens=chunk_tokens, logits=logits)
            loss = (logp * tw).sum()
        elif impl == "naive-logprob":
            loss = (naive_logprob(hid, w, y)[0] * tw.to(dt)).sum()
        else:
            loss = naive_grpo_loss(hid, w, y, advantages=adv.to(dt), token_weight=tw.to(dt), cfg=cfg)
        loss.backward()
        return loss

    # warm on few tokens at the real vocabulary: compiles, and times the row kernels' launch
    # settings (kernels.triton_rows.launch_config) before the memory baseline is taken
    step(*make(64, *((hidden, vocab) if dev.type == "cuda" else (16, 32))))
    inputs = make(tokens, hidden, vocab)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for _ in range(repeats):
        inputs[0].grad = inputs[1].grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(*inputs)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    time_ = spread(times)
    return {"impl": impl, "tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": dtype, "device": device,
            "logits": logits, "seconds": time_["median"], "time": time_, "peak_extra_bytes": max(0, peak - base),
            "baseline_bytes": base,
            "grad_bytes": (tokens * hidden + vocab * hidden) * inputs[0].element_size(), "row_launch": _row_launch()}


def _row_launch() -> dict:
    """The row kernels' launch settings chosen in this process, {"stats V=… bfloat16": [BLOCK_V, warps]}."""
    import sys
    mod = sys.modules.get("kernels.triton_rows")
    if mod is None:
        return {}
    return {f"{k[0]} V={k[1]} {str(k[2]).removeprefix('torch.')}": list(v) for k, v in mod._LAUNCH.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["fused", "naive", "fused-logprob", "naive-logprob"], required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-tokens", type=int)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--logits", default="fp32", choices=["fp32", "compute"],
                   help="the fused ops' chunk logits for bf16 inputs: fp32 (default) or bf16 (compute)")
    a = p.parse_args(argv)
    print(json.dumps(run(a.impl, a.tokens, a.hidden, a.vocab, a.dtype, a.device, a.chunk_tokens, a.repeats,
                         a.logits)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
