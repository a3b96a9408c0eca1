"""Host work of a decode step's block tables: rebuilt from Python lists every step against kept
on the device and written incrementally (engine.rollout.paged.DecodeTables).

    python -m bench.decode_tables_case [--groups 8 --n 8 --prompt-len 16384 60000 --block-size 16
                                        --steps 64 --device cpu]

The GRPO decode shape: --groups prompts of --prompt-len tokens, each shared by --n samples
(the prompt's blocks in every sample's table), every sample --steps tokens into its answer
(1,000 generated before the first step timed). Each step every sample grows by one token, a
new block every --block-size; per step both sides produce the batch's [B, longest] int32 table
on --device and the decode context is built (`PagedAttention`, torch backend: the CPU path's
suffix plan; triton backend: the table the kernels read). Times are per step, median over
--steps steps (min-max); the ratio is of the medians. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from types import SimpleNamespace


class _Seq:  # what DecodeTables reads of a Sequence (hashed by identity, as Sequence is)
    def __init__(self, table: list[int], cached: int, group: int):
        self.table, self.resets, self.cached, self.group = table, 0, cached, group


def _case(groups: int, n: int, prompt_len: int, bs: int, steps: int, device: str, backend: str) -> dict:
    import torch

    from engine.rollout.paged import DecodeTables, PagedAttention, _block_table

    seqs, next_block, generated = [], 0, 1000
    for g in range(groups):
        prompt = list(range(next_block, next_block + -(-prompt_len // bs)))
        next_block += len(prompt)
        for _ in range(n):
            own = -(-(prompt_len + generated) // bs) - len(prompt)
            seqs.append(_Seq(prompt + list(range(next_block, next_block + own)), prompt_len + generated, g))
            next_block += own
    # what PagedAttention reads of a cache; gqa_group 6: the 1.5B shape's 12 query heads over 2 KV heads
    cache = SimpleNamespace(block_size=bs, k=torch.zeros(1, 1, bs, 1, 1, device=device), decode_backend=backend,
                            share_prefix=True, prefix_store={}, gqa_group=6)
    tables = DecodeTables(device)
    tables.gather(seqs)  # the rows start out written (the first decode step writes them once)
    times = {"lists": [], "device": []}
    for _ in range(steps):
        for s in seqs:  # the step's token: a new block when the last one is full
            if s.cached % bs == 0:
                s.table.append(next_block)
                next_block += 1
            s.cached += 1
        args = ([s.table for s in seqs], [s.cached - 1 for s in seqs], [1] * len(seqs),
                [prompt_len] * len(seqs), [s.group for s in seqs])
        for side in times:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if side == "lists":
                bt = _block_table(args[0], torch.int32).to(device)
            else:
                bt = tables.gather(seqs)
            PagedAttention(cache, *args, block_tables=bt)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[side].append(time.perf_counter() - t0)
    out = {"groups": groups, "n": n, "prompt_len": prompt_len, "block_size": bs, "backend": backend,
           "width": max(len(s.table) for s in seqs)}
    for side, ts in times.items():
        out[side] = {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3}
    out["speedup"] = out["lists"]["median_ms"] / out["device"]["median_ms"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, nargs="+", default=[16384, 60000])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if min(a.groups, a.n, a.block_size, a.steps, *a.prompt_len) < 1:
        p.error("every size must be >= 1")
    rows = [_case(a.groups, a.n, plen, a.block_size, a.steps, a.device, backend)
            for plen in a.prompt_len for backend in ("torch", "triton")]
    print(f"decode step block tables + context, {a.groups}x{a.n} sequences, block {a.block_size}, "
          f"{a.device} (per step, median of {a.steps} [min-max]):")
    for r in rows:
        lists, dev = r["lists"], r["device"]
        print(f"  prompt {r['prompt_len']:>6} ({r['width']} blocks) {r['backend']:6s}  rebuilt from lists "
              f"{lists['median_ms']:7.2f} ms [{lists['min_ms']:.2f}-{lists['max_ms']:.2f}]  device tables "
              f"{dev['median_ms']:6.2f} ms [{dev['min_ms']:.2f}-{dev['max_ms']:.2f}]  x{r['speedup']:.1f}")
    print(json.dumps({"device": a.device, "cases": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
