"""Ring attention on the GPUs of this machine (run by bench/gpu_suite.py).

    python3 -m bench.gpu_ring_case            one process per GPU, W = number of GPUs (1 checks the path)

Each rank takes the zigzag share of 4 sequences of 8,192 tokens (Qwen2-1.5B attention shape:
12 query heads, 2 KV heads, head dim 128, bf16), runs ring attention forward + backward,
and compares its rows with single-GPU causal attention (kernels.attention_block) computed by
every rank; prints one JSON line: the worst relative error and the ring's median time over 3
rounds.
"""
from __future__ import annotations

import json
import os
import sys
import time


def _rank(rank: int, world: int) -> dict:
    import torch

    from kernels import attention_block
    from kernels.ring_attention import ring_attention, zigzag_indices
    torch.cuda.set_device(rank)
    seqlens, hq, hkv, d = [8192] * 4, 12, 2, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    t = sum(seqlens)
    q, k, v = (torch.randn(t, h, d, device="cuda", generator=g, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    dout = torch.randn(t, hq, d, device="cuda", generator=g, dtype=torch.bfloat16)
    idx = zigzag_indices(seqlens, world, rank).cuda()
    times = []
    for _ in range(3):
        ql, kl, vl = (x[idx].clone().requires_grad_() for x in (q, k, v))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = ring_attention(ql, kl, vl, seqlens)
        (out.float() * dout[idx].float()).sum().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    outs, a = [], 0
    for n in seqlens:
        outs.append(attention_block(qr[a:a + n], kr[a:a + n], vr[a:a + n], causal=True)[0])
        a += n
    ref = torch.cat(outs)
    (ref.float() * dout.float()).sum().backward()
    err = 0.0
    for got, want in ((out, ref), (ql.grad, qr.grad), (kl.grad, kr.grad), (vl.grad, vr.grad)):
        w = want[idx] if want.shape[0] == t else want
        err = max(err, float((got.float() - w.float()).norm() / w.float().norm()))
    return {"rank": rank, "seconds": sorted(times)[1], "rel_error": err}


def main() -> int:
    import torch
    world = torch.cuda.device_count()
    if world == 0:
        print("gpu_ring_case: no CUDA device", file=sys.stderr)
        return 2
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from engine.parallel.spawn import run_ranks
    if world == 1:  # one process: a group of one, the ring's code path with no hop
        import torch.distributed as dist
        from engine.parallel.spawn import free_port
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("nccl", rank=0, world_size=1)
        ranks = [_rank(0, 1)]
        dist.destroy_process_group()
    else:
        ranks = run_ranks(_rank, world, timeout=300, backend="nccl")
    print(json.dumps({"world": world, "tokens": 4 * 8192, "seconds": max(r["seconds"] for r in ranks),
                      "rel_error": max(r["rel_error"] for r in ranks)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
