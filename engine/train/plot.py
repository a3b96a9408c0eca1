"""`longrl plot RUN_DIR`: PNG curves of a run's metrics.jsonl (matplotlib, headless)."""
from __future__ import annotations

import json
from pathlib import Path

PANELS = [("loss", "loss"), ("reward/mean", "reward"), ("accuracy", "accuracy (rollouts)"),
          ("response/mean_len", "response length"), ("policy/entropy", "entropy"), ("grad_norm", "grad norm"),
          ("lr", "learning rate"), ("time/step", "seconds per step")]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run} a longrl run directory?)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: empty")
    fig, axes = plt.subplots(3, 3, figsize=(13, 10))
    for ax, (key, title) in zip(axes.flat, PANELS):
        for stage in ("sft", "rl"):
            pts = [(r["step"], r[key]) for r in rows if r.get("stage") == stage and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=stage)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    evals = [r for r in rows if r.get("stage") == "eval"]
    ax = axes.flat[-1]
    if evals:
        ax.bar(range(len(evals)), [r["accuracy"] for r in evals])
        ax.set_xticks(range(len(evals)), [r["label"] for r in evals], rotation=30, fontsize=8)
    ax.set_title("held-out accuracy (%)")
    fig.tight_layout()
    target = Path(out) if out else run / "metrics.png"
    fig.savefig(target, dpi=90)
    plt.close(fig)
    return target
