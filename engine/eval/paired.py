"""Is a held-out gain more than noise? Two evaluations of the same items, compared item by
item: the gain in accuracy points, a paired bootstrap interval over items, and the exact
two-sided sign test on the items that changed (fixed vs broken).

    python -m engine.eval.paired RUN/eval/after-sft RUN/eval/after-long
"""
from __future__ import annotations

import argparse
import json
import random
from math import comb
from pathlib import Path

from ..data.jsonl import jsonl_lines


def item_scores(eval_dir: str | Path) -> dict[tuple[str, str], float]:
    """(benchmark, id) -> mean score over the item's samples, from an eval dir's items.jsonl."""
    path = Path(eval_dir) / "items.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no per-item results (is {eval_dir} a `longrl eval` output dir?)")
    sums: dict[tuple[str, str], list[float]] = {}
    for n, line in enumerate(jsonl_lines(path.read_text(encoding="utf-8")), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key, score = (row["benchmark"], row["id"]), float(row["score"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected a JSON row with benchmark, id and score ({e})") from None
        sums.setdefault(key, []).append(score)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def sign_test(fixed: int, broken: int) -> float:
    """Two-sided exact binomial p-value of `fixed` successes in fixed + broken fair trials."""
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(fixed, broken) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_gain(before: dict, after: dict, *, resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """Compare two item -> score maps over the items they share (accuracy in points)."""
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"resamples must be >= 1 and level in (0, 1), got {resamples} and {level}")
    keys = sorted(set(before) & set(after))
    if not keys:
        raise ValueError("the two evaluations share no items: compare runs of the same held-out set")
    diffs = [after[k] - before[k] for k in keys]
    n = len(keys)
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    fixed = sum(d > 0 for d in diffs)
    broken = sum(d < 0 for d in diffs)
    return {"items": n, "before": 100 * sum(before[k] for k in keys) / n,
            "after": 100 * sum(after[k] for k in keys) / n, "gain": 100 * sum(diffs) / n,
            "low": 100 * lo, "high": 100 * hi, "level": level, "fixed": fixed, "broken": broken,
            "sign_p": sign_test(fixed, broken)}


def describe(g: dict, before: str = "before", after: str = "after") -> str:
    return (f"{after} vs {before}: {g['after']:.1f}% vs {g['before']:.1f}% on {g['items']} items, "
            f"gain {g['gain']:+.1f} points (paired bootstrap {int(g['level'] * 100)}% interval "
            f"[{g['low']:+.1f}, {g['high']:+.1f}]); {g['fixed']} fixed, {g['broken']} broken, "
            f"sign test p = {g['sign_p']:.2g}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Compare two evaluations of the same items: gain, paired bootstrap "
                                            "interval over items, sign test on the items that changed.")
    p.add_argument("before", help="an eval output dir (holds items.jsonl)")
    p.add_argument("after", help="an eval output dir of the same items")
    p.add_argument("--resamples", type=int, default=10_000)
    a = p.parse_args(argv)
    if a.resamples < 1:
        p.error(f"--resamples must be at least 1, got {a.resamples}")
    g = paired_gain(item_scores(a.before), item_scores(a.after), resamples=a.resamples)
    print(describe(g, Path(a.before).name, Path(a.after).name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
