"""The paged decode kernels alone, one layer, against the bandwidth roofline, for each launch
setting of kernels.triton_paged.LAUNCH: which waves, warps, pipeline stages and tile width read
a shared prompt fastest on this card.

    python3 -m bench.gpu_decode_tune [--prompt-lens 16384 61440 --groups 8 --n 8 --suffix 16]
                                     [--waves 1 2 4 --warps 4 8 --stages 3 4 5 --block-n 32 64]

One layer of the rollout bench's workload (Qwen2-1.5B: 12 query and 2 KV heads of 128, bf16,
block 16): `groups` prompts of each length, each shared by `n` samples that have `suffix`
tokens of their own, K/V random. For each setting: the shared-prefix launch (prefix + suffix
partials, the merge) and the plain per-sequence launch, timed with CUDA events (median of
--repeats after a launch to compile), and the bytes the shared launch must read (each prompt's
K/V once, each sample's suffix) over its time against the copy bandwidth measured in the same
run. Every setting's output is compared with the default's (a setting that computes something
else is reported, never ranked). Prints the JSON result after each length (the last line is the
whole result; a run cut short leaves the lengths it finished), the best setting per length last.
`--device cpu` runs it under TRITON_INTERPRET=1 at a small size (a check of the code, not a figure).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys

import torch

from bench.gpu_rollout_case import copy_bandwidth
from bench.spread import median_ms


def workload(groups: int, n: int, prompt_len: int, suffix: int, hq: int, hkv: int, d: int, block: int,
             device: str, dtype: torch.dtype, seed: int = 0):
    """Random paged K/V where each group's samples share its prompt's blocks -> the launch inputs."""
    g = torch.Generator(device=device).manual_seed(seed)
    pb = -(-prompt_len // block)
    sb = -(-(prompt_len % block + suffix) // block)  # a sample's own blocks: the copied partial one + its tokens
    num_blocks = groups * pb + groups * n * sb + 1
    k = torch.randn(num_blocks, block, hkv, d, device=device, generator=g).to(dtype)
    v = torch.randn(num_blocks, block, hkv, d, device=device, generator=g).to(dtype)
    width = pb + sb
    tables = torch.zeros(groups * n, width, dtype=torch.int32)
    nxt = groups * pb
    for grp in range(groups):
        for s in range(n):
            row = grp * n + s
            tables[row, :pb] = torch.arange(grp * pb, (grp + 1) * pb)
            full = prompt_len // block  # the prompt's full blocks stay shared; a partial last one is copied
            tables[row, full:full + sb] = torch.arange(nxt, nxt + sb)
            nxt += sb
    lens = torch.full((groups * n,), prompt_len + suffix, dtype=torch.int32)
    prefix = torch.full((groups * n,), prompt_len, dtype=torch.int32)
    group_ids = torch.arange(groups).repeat_interleave(n)
    q = torch.randn(groups * n, hq, d, device=device, generator=g).to(dtype)
    return q, k, v, tables.to(device), lens.to(device), prefix.to(device), group_ids.to(device)


def residency(tp, warps: int, stages: int, block_n: int) -> dict:
    """Programs a SM holds of each partial-kernel variant launched at these settings (prefix, suffix,
    plain), as kernels.triton_paged measured them on the card (empty under the interpreter)."""
    kinds = {}
    for e in tp.resident_programs():
        if (e["num_warps"], e["num_stages"], e["block_n"]) == (warps, stages, block_n):
            kinds["prefix" if e["members"] else "suffix" if e["start"] else "plain"] = e.get("resident")
    return kinds


def tune(prompt_lens, groups, n, suffix, grid, device="cuda", repeats=10, hq=12, hkv=2, d=128, block=16,
         progress: bool = False) -> dict:
    from kernels import triton_paged as tp

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    default = dict(tp.LAUNCH)
    bw = copy_bandwidth() if device == "cuda" else None  # bench.gpu_rollout_case's, 2 GiB copied
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "copy_bandwidth": bw,
           "default": {**default, "block_n": tp._block_n(d, None)}, "lengths": []}
    default_n = tp._block_n(d, None)
    try:
        for plen in prompt_lens:
            q, k, v, bt, lens, prefix, gid = workload(groups, n, plen, suffix, hq, hkv, d, block, device, dtype)
            plan = tp.plan_shared_prefix(bt, lens, prefix, gid, block, hq // hkv)
            kv_token = hkv * d * 2 * k.element_size()  # K and V of one token, this layer
            must_read = (groups * plen + groups * n * suffix) * kv_token
            tp.LAUNCH.update(default)
            try:
                want = tp.shared_prefix_decode_triton(q, k, v, bt, lens, prefix, gid, d ** -0.5, plan=plan)
            except Exception as err:  # noqa: BLE001 - the default itself fails: reported, the other lengths still run
                out["lengths"].append({"prompt_len": plen, "error": f"default: {type(err).__name__}: {err}"[:300],
                                       "settings": [], "best": None})
                continue
            rows = []
            for waves, warps, stages, block_n in grid:
                block_n = block_n or default_n
                tp.LAUNCH.update(waves=waves, num_warps=warps, num_stages=stages)
                row = {"waves": waves, "num_warps": warps, "num_stages": stages, "block_n": block_n}
                try:
                    got = tp.shared_prefix_decode_triton(q, k, v, bt, lens, prefix, gid, d ** -0.5, plan=plan,
                                                         block_n=block_n)
                    diff = float((got.float() - want.float()).abs().max())
                    row["max_abs_diff"] = diff if math.isfinite(diff) else str(diff)  # JSON has no NaN
                    row["shared_ms"] = median_ms(lambda: tp.shared_prefix_decode_triton(
                        q, k, v, bt, lens, prefix, gid, d ** -0.5, plan=plan, block_n=block_n), device, repeats)
                    row["plain_ms"] = median_ms(lambda: tp.paged_decode_triton(q, k, v, bt, lens, d ** -0.5,
                                                                              block_n=block_n), device, repeats)
                    row["roofline_fraction"] = must_read / bw / (row["shared_ms"] / 1e3) if bw else None
                    row["resident"] = residency(tp, warps, stages, block_n)
                except Exception as err:  # noqa: BLE001 - a setting that does not compile or run is reported
                    row["error"] = f"{type(err).__name__}: {err}"[:300]
                rows.append(row)
                print(json.dumps({"prompt_len": plen, **row}), file=sys.stderr, flush=True)
            ok = [r for r in rows if "error" not in r and isinstance(r["max_abs_diff"], float)
                  and r["max_abs_diff"] <= 2e-2]
            best = min(ok, key=lambda r: r["shared_ms"]) if ok else None
            out["lengths"].append({"prompt_len": plen, "must_read_bytes": must_read, "settings": rows, "best": best})
            if progress:  # the figures so far as a whole result: a stage cut off by its timeout keeps them
                print(json.dumps(out), flush=True)
    finally:
        tp.LAUNCH.update(default)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[16384, 61440])
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--suffix", type=int, default=16)
    p.add_argument("--waves", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[3, 4, 5])
    p.add_argument("--block-n", type=int, nargs="+", default=[32, 64])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"skipped": "needs CUDA"}))
        return 2
    grid = list(itertools.product(a.waves, a.warps, a.stages, a.block_n))
    r = tune(a.prompt_lens, a.groups, a.n, a.suffix, grid, a.device, a.repeats, progress=True)
    for length in r["lengths"]:
        b = length["best"]
        print(f"prompt {length['prompt_len']}: best " + (json.dumps(b) if b else "none ran"), file=sys.stderr)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
