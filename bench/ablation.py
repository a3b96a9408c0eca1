"""The paper's curriculum ablation in miniature (QwenLong-L1, arXiv 2505.17667, Fig. 5): from
one SFT checkpoint and at one RL step budget,

  single   single-stage RL on every length at once (one phase, the longest input limit)
  phased   the recipe's phases, no examples carried between them (carry_ratio = 0)
  retro    the recipe's phases with difficulty-aware retrospective sampling (its carry_ratio)

each with the recipe's held-out evaluation every eval.every RL steps and after each phase.
Writes OUT/sft (the shared warm-up), OUT/<arm>/ (a run dir each: metrics, report.md,
metrics.png), OUT/ablation.md (the table) and OUT/ablation.png (the curves side by side).
An arm with a report.md is done and skipped; an interrupted arm resumes from its newest
checkpoint.

    python -m bench.ablation recipes/learn_cpu.toml --out runs/ablation
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

ARMS = ("single", "phased", "retro")


def arm_config(cfg, arm: str, out: Path, sft_model: Path):
    """The recipe's config for one arm: RL only, from the shared SFT model."""
    from engine.config import PhaseConfig

    rl = cfg.rl
    if arm == "single":
        steps = sum(p.steps for p in rl.phases)
        longest = max(p.max_input_tokens for p in rl.phases)
        rl = replace(rl, phases=[PhaseConfig(name="all", max_input_tokens=longest, steps=steps)])
    elif arm == "phased":
        rl = replace(rl, carry_ratio=0.0)
    elif arm == "retro":
        rl = replace(rl, carry_ratio=rl.carry_ratio or 0.5)
    else:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    return replace(cfg, model=replace(cfg.model, path=str(sft_model)), sft=replace(cfg.sft, data=[]), rl=rl,
                   train=replace(cfg.train, out_dir=str(out / arm)))


def _seed_arm(arm_dir: Path, sft_dir: Path) -> None:
    """A fresh arm starts its metrics with the shared warm-up's held-out rows (and their items),
    so its curve begins at the after-SFT figure without evaluating the same model again."""
    arm_dir.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (sft_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    (arm_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("stage") == "eval"))
    for label in ("before", "after-sft"):
        if (sft_dir / "eval" / label).is_dir():
            shutil.copytree(sft_dir / "eval" / label, arm_dir / "eval" / label, dirs_exist_ok=True)


def run_arm(cfg, arm: str, out: Path, sft_dir: Path) -> dict:
    from engine.train import holdout_eval, latest_checkpoint, load_checkpoint_state, run_report, run_rl

    arm_dir = out / arm
    if (arm_dir / "report.md").is_file():
        print(f"[{arm}] done before: {arm_dir / 'report.md'}")
    else:
        acfg = arm_config(cfg, arm, out, latest_checkpoint(sft_dir) / "model")
        ckpt = latest_checkpoint(arm_dir)
        resume = ckpt is not None and load_checkpoint_state(ckpt)[2].get("stage") == "rl"
        if not resume:
            shutil.rmtree(arm_dir, ignore_errors=True)
            _seed_arm(arm_dir, sft_dir)
        start = time.perf_counter()
        run_rl(acfg, resume=resume, start_from=None if resume else acfg.model.path, fresh_log=False,
               evaluate=lambda m, t, label, step, log: holdout_eval(acfg, m, t, label, step, log))
        print(run_report(arm_dir))
        print(f"[{arm}] {time.perf_counter() - start:.0f} s")
    from engine.train.plot import eval_points, read_rows
    points = eval_points(read_rows(arm_dir))
    return {"arm": arm, "dir": arm_dir, "points": points}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Single-stage vs phased vs phased + retrospective RL from one SFT "
                                            "checkpoint at one step budget (the paper's Fig. 5, in miniature).")
    p.add_argument("recipe", nargs="?", default="recipes/learn_cpu.toml", help="a recipe with [sft], [rl] phases "
                   "and [eval] sets (default recipes/learn_cpu.toml)")
    p.add_argument("--out", default="runs/ablation", help="output folder (default runs/ablation)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. --rl.lr=1e-5 (after --)")
    a = p.parse_args(argv)
    from engine.config import load_config
    from engine.eval.paired import describe, item_scores, paired_gain
    from engine.train import latest_checkpoint, run_pipeline
    from engine.train.plot import plot_runs

    cfg = load_config(a.recipe, a.overrides)
    if not cfg.sft.data or not cfg.rl.data or not cfg.eval.sets:
        raise SystemExit(f"{a.recipe}: the ablation needs [sft] data, [rl] data and [eval] sets")
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    bad = [x for x in arms if x not in ARMS]
    if bad:
        raise SystemExit(f"--arms: unknown {bad}; choose from {', '.join(ARMS)}")
    out = Path(a.out)
    sft_dir = out / "sft"
    sft_ckpt = latest_checkpoint(sft_dir)
    if sft_ckpt is None or not (sft_dir / "eval" / "after-sft" / "summary.json").is_file():
        shutil.rmtree(sft_dir, ignore_errors=True)
        run_pipeline(replace(cfg, rl=replace(cfg.rl, data=[]), train=replace(cfg.train, out_dir=str(sft_dir))))
    results = [run_arm(cfg, arm, out, sft_dir) for arm in arms]
    lines = [f"# Ablation: {a.recipe}, {sum(ph.steps for ph in cfg.rl.phases)} RL steps per arm, "
             f"from {sft_dir}", "", "| arm | after SFT | " + " | ".join(
                 f"{label} (step {step})" for label, step, _ in results[0]["points"][2:]) + " | gain over SFT |",
             "|---|" + "---:|" * (len(results[0]["points"]) - 1 + 1)]
    for r in results:
        pts = r["points"]
        sft_acc = next(acc for label, _, acc in pts if label == "after-sft")
        g = paired_gain(item_scores(sft_dir / "eval" / "after-sft"), item_scores(r["dir"] / "eval" / pts[-1][0]))
        r["gain"] = g
        lines.append(f"| {r['arm']} | {sft_acc:.1f}% | " + " | ".join(f"{acc:.1f}%" for _, _, acc in pts[2:])
                     + f" | {g['gain']:+.1f} [{g['low']:+.1f}, {g['high']:+.1f}] |")
    lines += ["", "Gain: last evaluation vs after SFT, in points, with a paired bootstrap 95% interval over items."]
    lines += [f"- {r['arm']}: {describe(r['gain'], 'after-sft', r['points'][-1][0])}" for r in results]
    for x, y in (("phased", "single"), ("retro", "phased"), ("retro", "single")):
        rx = next((r for r in results if r["arm"] == x), None)
        ry = next((r for r in results if r["arm"] == y), None)
        if rx and ry:
            g = paired_gain(item_scores(ry["dir"] / "eval" / ry["points"][-1][0]),
                            item_scores(rx["dir"] / "eval" / rx["points"][-1][0]))
            lines.append(f"- {describe(g, y, x)}")
    try:
        lines += ["", f"curves: {plot_runs({r['arm']: r['dir'] for r in results}, out / 'ablation.png')}"]
    except ImportError:
        lines += ["", "curves: install matplotlib to draw them"]
    text = "\n".join(lines)
    (out / "ablation.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
