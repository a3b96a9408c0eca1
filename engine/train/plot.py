"""`longrl plot RUN_DIR [RUN_DIR ...]`: PNG curves of runs' metrics.jsonl (matplotlib, headless).

One run: SFT and RL on separate axes; RL steps numbered across phases, with the phase
boundaries marked on every RL curve; held-out evaluations drawn as points against the RL
step they were taken at (the before-training and after-SFT figures at step 0). Several
runs (an ablation): held-out accuracy, training reward and response length side by side.
"""
from __future__ import annotations

from pathlib import Path

RL_PANELS = [("reward/mean", "training reward (rollouts)"), ("response/mean_len", "response length (tokens)"),
             ("policy/entropy", "entropy"), ("grad_norm", "grad norm"), ("dynamic/kept_groups", "groups kept"),
             ("time/step", "seconds per RL step")]


def read_rows(run_dir: str | Path) -> list[dict]:
    from .metrics import metrics_rows

    path = Path(run_dir).expanduser() / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a longrl run directory?)")
    rows = metrics_rows(run_dir)  # a torn last row left out
    if not rows:
        raise ValueError(f"{path}: empty")
    return rows


def phase_spans(rows: list[dict]) -> list[tuple[str, int, int]]:
    """(phase name, first RL step, last RL step) in order, from the RL rows' phase field."""
    spans: list[list] = []
    for r in rows:
        if r.get("stage") != "rl" or "phase" not in r:
            continue
        if spans and spans[-1][0] == r["phase"]:
            spans[-1][2] = r["step"]
        else:
            spans.append([r["phase"], r["step"], r["step"]])
    return [tuple(s) for s in spans]


def _mark_phases(ax, spans) -> None:
    for k, (name, first, last) in enumerate(spans):
        if k:
            ax.axvline(first - 0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.text((first + last) / 2, 0.98, name, transform=ax.get_xaxis_transform(), ha="center", va="top",
                fontsize=8, color="grey").set_in_layout(False)


def _curve(ax, rows: list[dict], stage: str, key: str, title: str, color: str) -> None:
    pts = [(r["step"], r[key]) for r in rows if r.get("stage") == stage and r.get(key) is not None]
    if pts:
        ax.plot(*zip(*pts), marker=".", color=color)
    else:
        ax.text(0.5, 0.5, f"no {stage.upper()} steps in this run", transform=ax.transAxes, ha="center",
                color="grey")
    ax.set_title(title)
    ax.set_xlabel(f"{stage.upper()} step")


def eval_points(rows: list[dict]) -> list[tuple[str, int, float]]:
    """(label, RL step, held-out accuracy) of every eval row, in log order."""
    return [(r["label"], r.get("step") or 0, r["accuracy"]) for r in rows
            if r.get("stage") == "eval" and r.get("accuracy") is not None]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(run_dir)
    spans = phase_spans(rows)
    fig, axes = plt.subplots(3, 3, figsize=(14, 10))
    _curve(axes[0, 0], rows, "sft", "loss", "SFT loss", "tab:green")
    ax = axes[0, 1]
    evals = eval_points(rows)
    if evals:
        rl_points = [(s, a) for label, s, a in evals if label not in ("before", "after-sft")]
        start = [(s, a) for label, s, a in evals if label == "after-sft"][-1:]  # the curve starts at SFT's figure
        rl_points = start + rl_points if rl_points else rl_points
        if rl_points:
            ax.plot(*zip(*rl_points), marker="o", color="tab:blue", label="after RL steps")
        for label, marker, color in (("before", "x", "tab:red"), ("after-sft", "s", "tab:green")):
            for lab, s, a in evals:
                if lab == label:
                    ax.plot([s], [a], marker=marker, color=color, linestyle="", label=label)
        ax.legend(fontsize=7)
    ax.set_ylim(-2, 102)
    ax.set_title("held-out accuracy (%)")
    ax.set_xlabel("RL step")
    _mark_phases(ax, spans)
    for ax, (key, title) in zip([axes[0, 2], *axes[1], *axes[2]], [*RL_PANELS, ("loss", "RL loss")]):
        _curve(ax, rows, "rl", key, title, "tab:purple" if key == "loss" else "tab:blue")
        _mark_phases(ax, spans)
    fig.tight_layout()
    target = Path(out) if out else Path(run_dir) / "metrics.png"
    fig.savefig(target, dpi=90)
    plt.close(fig)
    return target


def plot_runs(runs: dict[str, str | Path], out: str | Path) -> Path:
    """Several runs on shared axes: held-out accuracy against RL step (the after-SFT figure
    at step 0), training reward and response length; phase boundaries of each run marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for k, (name, run_dir) in enumerate(runs.items()):
        rows = read_rows(run_dir)
        color = f"C{k}"
        pts = [(s, a) for label, s, a in eval_points(rows) if label != "before"]
        if pts:
            axes[0].plot(*zip(*pts), marker="o", color=color, label=name)
        for ax, key in zip(axes[1:], ("reward/mean", "response/mean_len")):
            rl = [(r["step"], r[key]) for r in rows if r.get("stage") == "rl" and r.get(key) is not None]
            if rl:
                ax.plot(*zip(*rl), marker=".", color=color, label=name)
        for ax in axes:
            for j, (_, first, _) in enumerate(phase_spans(rows)):
                if j:
                    ax.axvline(first - 0.5, color=color, linestyle="--", linewidth=0.8, alpha=0.6)
    for ax, title in zip(axes, ("held-out accuracy (%)", "training reward (rollouts)", "response length (tokens)")):
        ax.set_title(title)
        ax.set_xlabel("RL step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)
