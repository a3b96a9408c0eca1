"""A decode step's linear layers on CPU: F.linear (x @ W.T) against the engine's weight-major
`engine.model.model.linear` ((W @ x.T).T, chunked), at the embedded model's shapes.

    python -m bench.linear_case [--rows 64 --repeats 15 --layers 30]

SmolLM2-135M's decode products with --rows tokens (a batch of 64 sequences by default):
q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536, lm_head 49,152x576. Each
shape is timed in a chain of --layers distinct weights (the whole model's weights do not fit
in cache during decode, so a product reads its weight from memory, as it does in a step),
the two sides alternating round by round; per shape the median and min of --repeats rounds,
and the ratio of medians. The step line is one decode step's worth: --layers layers of the
seven layer products plus the lm_head. Every product is timed as a `linear` call, its result
transposed back to [rows, out]; the engine's MLP skips two of those three transposes (its
activations stay weight-major), so for gate / up / down this is the lower bound of its gain.
fp32, the process's torch threads, under inference mode (where the engine takes this path).
Prints a table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SHAPES = {"q_proj/o_proj": (576, 576, 2), "k_proj/v_proj": (192, 576, 2), "gate/up": (1536, 576, 2),
          "down": (576, 1536, 1), "lm_head": (49_152, 576, None)}  # (out, in, per layer; None: once)


def run(rows: int, repeats: int, layers: int) -> dict:
    import torch
    import torch.nn.functional as F

    from engine.model.model import linear, weight_major
    from engine.rollout import hostmem

    hostmem.tune()
    g = torch.Generator().manual_seed(0)
    out = {"rows": rows, "repeats": repeats, "layers": layers, "threads": torch.get_num_threads(), "shapes": {}}
    totals = {"linear": 0.0, "weight_major": 0.0}
    with torch.inference_mode():
        for name, (n_out, n_in, per_layer) in SHAPES.items():
            count = layers if per_layer else 1
            ws = [torch.randn(n_out, n_in, generator=g) * 0.02 for _ in range(count)]
            x = torch.randn(rows, n_in, generator=g)
            assert weight_major(x, ws[0]), "the weight-major path is not taken at these rows"
            sides = {"linear": lambda w: F.linear(x, w), "weight_major": lambda w: linear(x, w)}
            times = {k: [] for k in sides}
            for _ in range(repeats + 1):  # the first round warms up, untimed
                for side, fn in sides.items():
                    t0 = time.perf_counter()
                    for w in ws:
                        fn(w)
                    times[side].append((time.perf_counter() - t0) / count)
            row = {}
            for side, ts in times.items():
                ts = ts[1:]
                row[side] = {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3}
                totals[side] += statistics.median(ts) * (per_layer * layers if per_layer else 1)
            row["speedup"] = row["linear"]["median_ms"] / row["weight_major"]["median_ms"]
            row["gflops_weight_major"] = 2 * rows * n_out * n_in / (row["weight_major"]["median_ms"] * 1e6)
            out["shapes"][name] = row
    out["step_ms"] = {k: v * 1e3 for k, v in totals.items()}
    out["speedup"] = totals["linear"] / totals["weight_major"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64, help="tokens per product (a decode batch)")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per shape and side")
    p.add_argument("--layers", type=int, default=30, help="distinct weights per layer shape (the model's depth)")
    a = p.parse_args(argv)
    if a.rows < 1 or a.repeats < 1 or a.layers < 1:
        p.error("--rows, --repeats and --layers must be >= 1")
    r = run(a.rows, a.repeats, a.layers)
    print(f"linear layers of a decode step, {r['rows']} rows, fp32, {r['threads']} threads "
          f"(median of {r['repeats']} [min]):")
    for name, row in r["shapes"].items():
        lin, wm = row["linear"], row["weight_major"]
        print(f"  {name:14s} F.linear {lin['median_ms']:7.3f} ms [{lin['min_ms']:.3f}]  weight-major "
              f"{wm['median_ms']:7.3f} ms [{wm['min_ms']:.3f}]  x{row['speedup']:.2f}  "
              f"({row['gflops_weight_major']:.0f} GFLOP/s)")
    print(f"  one step ({r['layers']} layers + lm_head): F.linear {r['step_ms']['linear']:.1f} ms, weight-major "
          f"{r['step_ms']['weight_major']:.1f} ms, x{r['speedup']:.2f}")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
