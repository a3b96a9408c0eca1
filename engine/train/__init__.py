"""Training: the SFT warm-up loop, the GRPO/DAPO phases, checkpoints and metrics.

`run_sft` (`longrl sft`) and `run_rl` share one scaffold (engine.train.loop): seed and model
load, resume from the newest checkpoint of train.out_dir, one JSON row per step, a progress
bar, checkpoints every train.save_every steps, at phase ends and on Ctrl-C, advice on out
of memory. This package is the one place that wires model, rollout, rewards (and the
judge), curriculum and kernels together.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from ..config import Config
from .checkpoint import (checkpoint_name, latest_checkpoint, load_checkpoint_state, read_trainer_state, restore_rng,
                         save_checkpoint)
from .loop import Interrupted, Precision, TrainingStopped, guarded, oom_advice, progress_bar, start_model
from .metrics import MetricsLog, metrics_rows
from .sft import SFTTrainer, sft_examples

__all__ = ["run_sft", "run_rl", "run_pipeline", "run_report", "holdout_eval", "build_reward", "SFTTrainer",
           "sft_examples",
           "save_checkpoint", "latest_checkpoint", "MetricsLog", "TrainingStopped", "oom_advice"]


def run_sft(cfg: Config, *, resume: bool = False, progress: bool = True, stop_after: int | None = None,
            fresh_log: bool | None = None) -> Path:
    """-> the final checkpoint directory. stop_after: return after that many steps of this
    call without a final checkpoint, as a killed run would (tests use it)."""
    from ..data import load_records

    if not cfg.sft.data:
        raise ValueError("sft.data lists no files: give at least one doc-QA file (--sft.data='[\"a.jsonl\"]')")
    run_dir = Path(cfg.train.out_dir)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {run_dir}")
    par = start_parallel(cfg)
    model, tokenizer = start_model(cfg, ckpt / "model" if ckpt else cfg.model.path)
    precision = Precision.of(cfg, model.embed_tokens.weight.device)
    if par is not None:
        from ..parallel import parallelize
        parallelize(model, par.mesh, precision.compute)
    records = [r for path in cfg.sft.data for r in load_records(path, format=cfg.sft.format)]
    max_input = cfg.sft.max_input_tokens or model.config.context_window - 64
    examples = sft_examples(records, tokenizer, template=cfg.data.template, max_input_tokens=max_input,
                            chat=cfg.data.chat_template, think=cfg.rl.think)
    trainer = SFTTrainer(model, examples, cfg.train, cfg.sft, parallel=par, precision=precision, kernels=cfg.kernels)
    if ckpt:
        optimizer_state, rng, state = load_checkpoint_state(ckpt)
        trainer.load_state_dict(state, optimizer_state)
        restore_rng(rng)
    main = par is None or par.is_main  # only rank 0 prints, draws the bar and writes metrics
    fresh = ckpt is None if fresh_log is None else fresh_log
    log = MetricsLog(run_dir, "sft", fresh=fresh, resume_after_step=trainer.state.step if ckpt else None) \
        if main else NullLog()
    bar = progress_bar(trainer.total_steps, trainer.state.step, "sft", progress and main)

    def save(export: bool = False):  # export: the full weights too, where several ranks hold shards
        return save_checkpoint(run_dir, trainer.state.step, model, tokenizer, trainer.optimizer,
                               trainer.state_dict(), cfg.train.keep_last, parallel=par, export=export)

    def saved_now() -> bool:  # the newest checkpoint is of the step just finished
        return last is not None and last.name == checkpoint_name(trainer.state_dict(), trainer.state.step)

    last, done_here = ckpt, 0
    with guarded(bar, par, lambda: last) as interrupts:
        while not trainer.done() and (stop_after is None or done_here < stop_after):
            row = trainer.step()
            log.write(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            done_here += 1
            if cfg.train.save_every and trainer.state.step % cfg.train.save_every == 0:
                last = save()
            if interrupts.requested():
                raise Interrupted(last if saved_now() else save())
    bar.close()
    if stop_after is not None and not trainer.done():
        return last  # a simulated kill: whatever the periodic checkpoints left
    if not saved_now() or par is not None:
        last = save(export=True)  # the end of SFT: a model transformers (and RL) loads
    return last


class NullLog:
    """The metrics log of a rank other than 0: rows are global, rank 0 writes them."""

    def write(self, row: dict) -> None:
        pass


def start_parallel(cfg: Config):
    """engine.parallel.Parallel for a run started by torchrun (None for one process)."""
    from ..model.weights import default_device
    from ..parallel.runtime import Parallel
    return Parallel.from_env(cfg.parallel, default_device(cfg.model.device))


def build_reward(cfg: Config, think: str):
    """The hybrid reward of the [reward] section: rule checks, and the judge it names (an
    HTTP endpoint, or a local checkpoint generated in-process through the rollout engine)."""
    from ..rewards import HybridReward, build_judge

    generate = local_judge_generate(cfg) if cfg.reward.judge == "local" else None
    return HybridReward(build_judge(cfg.reward, generate), think=think, judge_tasks=cfg.reward.judge_tasks)


def local_judge_generate(cfg: Config):
    """A generate function (chat messages in, reply texts out) over the judge checkpoint:
    greedy, batched, stopping by the judge's own stop rule, within judge_max_tokens."""
    from ..data.template import encode_messages
    from ..model import load_model
    from ..model.model import fuse_projections
    from ..rollout import Generator, SamplingParams

    model, tokenizer = load_model(cfg.reward.judge_path, device=cfg.model.device, dtype=cfg.model.dtype,
                                  attn_backend=cfg.model.attn_backend)
    if tokenizer is None:
        raise ValueError(f"reward.judge_path {cfg.reward.judge_path}: the judge needs its tokenizer files")
    fuse_projections(model.requires_grad_(False).eval())  # it only generates: q / k / v, gate / up one product each
    generator = Generator(model, tokenizer, cfg.rollout.cache_config())
    params = SamplingParams(max_new_tokens=cfg.reward.judge_max_tokens, temperature=0.0)  # the judge's stop rule

    def generate(chats: list[list[dict]]) -> list[str]:
        outs = generator.generate([encode_messages(tokenizer, m) for m in chats], n=1, params=params)
        return [tokenizer.decode(g[0].token_ids, skip_special_tokens=True) for g in outs]
    return generate


def _reference_model(cfg: Config, run_dir: Path, model, tokenizer, resuming: bool, precision: Precision,
                     parallel=None):
    """The frozen starting weights for the KL term: saved once under RUN_DIR/reference at the
    start of RL, so a resumed run compares against the same reference. `model` unsharded;
    under several ranks rank 0 writes and every rank reads. Loaded as the policy computes
    (engine.train.rl.reference_copy: fp32 with bf16 linear layers in one process, bf16 under
    FSDP2), not in `model.dtype`: on a GPU `auto` is bf16 everywhere, another function than
    fp32 weights under autocast."""
    from ..model import load_model, save_model
    from .rl import reference_copy

    ref_dir = run_dir / "reference"
    device = "cpu" if cfg.rl.ref_device == "cpu" else cfg.model.device
    if not resuming or not (ref_dir / "config.json").is_file():
        if resuming:
            raise FileNotFoundError(f"--resume with rl.kl_coef > 0: the reference weights {ref_dir} are missing")
        if parallel is None or parallel.is_main:
            save_model(model, tokenizer, ref_dir)
    if parallel is not None:
        parallel.barrier()
    # under FSDP2 with bf16 compute every weight ends in bf16 (the saved copy is the bf16 one): loaded so
    dtype = precision.compute if parallel is not None and precision.compute is not None else "float32"
    ref, _ = load_model(ref_dir, device=device, dtype=dtype, attn_backend=cfg.model.attn_backend)
    return reference_copy(ref, precision, sharded=parallel is not None)


def run_rl(cfg: Config, *, resume: bool = False, progress: bool = True, stop_after: int | None = None,
           start_from: str | Path | None = None, reward=None, evaluate=None, fresh_log: bool | None = None) -> Path:
    """The RL phases of the curriculum, in order, each from the previous phase's weights,
    with hard examples carried forward. start_from: a model to begin with (the SFT result);
    resume: continue from the newest RL checkpoint of train.out_dir."""
    from ..curriculum import DifficultyTracker, phase_members
    from ..data import check_unique_ids, load_records, prompt_lengths
    from ..data.template import resolve_think
    from .rl import GRPOTrainer

    rl = cfg.rl
    if not rl.data:
        raise ValueError("rl.data lists no files: give at least one doc-QA file")
    sources = [(path, list(load_records(path, format=rl.format))) for path in rl.data]
    check_unique_ids(sources, "rl.data")
    records = [r for _, part in sources for r in part]
    run_dir = Path(cfg.train.out_dir)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {run_dir}")
    if ckpt and read_trainer_state(ckpt).get("stage") != "rl":
        ckpt = None  # the newest checkpoint is SFT's: RL starts fresh from it
        start_from = latest_checkpoint(run_dir) / "model"
    state = load_checkpoint_state(ckpt) if ckpt else None
    par = start_parallel(cfg)
    main = par is None or par.is_main  # only rank 0 prints, draws the bar and writes metrics
    model, tokenizer = start_model(cfg, ckpt / "model" if ckpt else (start_from or cfg.model.path))
    precision = Precision.of(cfg, model.embed_tokens.weight.device)
    rollout_model = None
    if par is not None:  # an unsharded copy generates (in the compute dtype); the trained model is sharded
        from ..parallel import parallelize
        from .rl import rollout_copy
        rollout_model = rollout_copy(model, precision)
        parallelize(model, par.mesh, precision.compute)
    lengths = prompt_lengths(records, tokenizer, template=cfg.data.template, chat=cfg.data.chat_template,
                             cache_path=run_dir / "lengths.json")
    members = phase_members(lengths, rl.phases)
    longest = rl.phases[-1].max_input_tokens
    over = sum(n > longest for n in lengths)
    if over and main:
        print(f"rl.data: {over} of {len(records)} examples have prompts over the last phase's {longest} tokens "
              f"(template and chat wrapping included) and are left out of training", file=sys.stderr, flush=True)
    for k, (phase, own) in enumerate(zip(rl.phases, members)):
        if not own and (k == 0 or rl.carry_ratio == 0):  # nothing carried could fill it
            low = rl.phases[k - 1].max_input_tokens if k else 0
            raise ValueError(f"rl.phases[{k}] ({phase.name!r}): no example has a prompt of {low + 1}-"
                             f"{phase.max_input_tokens} tokens; the rl.data prompts are {min(lengths)}-"
                             f"{max(lengths)} tokens (template and chat wrapping included): move the phase's "
                             f"max_input_tokens")
    total = sum(p.steps for p in rl.phases)
    reward = reward or build_reward(cfg, resolve_think(rl.think, tokenizer, cfg.data.chat_template))
    ref = _reference_model(cfg, run_dir, rollout_model or model, tokenizer, state is not None, precision, par) \
        if rl.kl_coef > 0 else None
    trainer = GRPOTrainer(model, tokenizer, records, rl, cfg.train, total_steps=total, reward=reward,
                          data=cfg.data, rollout=cfg.rollout, kernels=cfg.kernels, ref_model=ref,
                          parallel=par, rollout_model=rollout_model, precision=precision)
    tracker = DifficultyTracker(cap=rl.difficulty_cap)
    phase_k, carried, sampler_state = 0, [], None
    if state:
        optimizer_state, rng, tstate = state
        trainer.load_state_dict(tstate["trainer"], optimizer_state)
        tracker.load_state_dict(tstate["tracker"])
        phase_k, carried, sampler_state = tstate["phase"], tstate["carried"], tstate["sampler"]
        restore_rng(rng)
    fresh = (state is None and start_from is None) if fresh_log is None else fresh_log
    # resumed: drop what was logged after the checkpoint; started after SFT in a run's folder: any
    # rows of an RL attempt killed before its first checkpoint (RL steps, evaluations after step 0)
    log = MetricsLog(run_dir, "rl", fresh=fresh, resume_after_step=trainer.step_count if state else 0) \
        if main else NullLog()
    bar = progress_bar(total, trainer.step_count, "rl", progress and main)
    # where the run is, for saves; the last checkpoint to resume from (the SFT one RL started from)
    position = {"phase": phase_k, "carried": carried, "last": ckpt or (Path(start_from).parent if start_from else None)}

    def save(sampler=None, phase=None, carried_now=None) -> Path:
        if phase is not None:
            position.update(phase=phase, carried=carried_now)
        tstate = {"stage": "rl", "phase": position["phase"], "carried": position["carried"],
                  "trainer": trainer.state_dict(), "tracker": tracker.state_dict(),
                  "sampler": sampler.state_dict() if sampler else None}
        # a phase's end exports the full weights (what transformers loads)
        position["last"] = save_checkpoint(run_dir, trainer.step_count, model, tokenizer, trainer.optimizer, tstate,
                                           cfg.train.keep_last, parallel=par, export=phase is not None)
        return position["last"]

    with guarded(bar, par, lambda: position["last"]) as interrupts:
        last = _rl_phases(cfg, rl, records, members, trainer, tracker, phase_k, carried, sampler_state, log, bar,
                          save, interrupts, evaluate, stop_after, ckpt)
    bar.close()
    return last


def _rl_phases(cfg, rl, records, members, trainer, tracker, phase_k, carried, sampler_state, log, bar, save,
               interrupts, evaluate, stop_after, last):
    from ..curriculum import PhaseSampler, carry_over

    model, tokenizer = trainer.model, trainer.tokenizer
    done_here = 0
    while phase_k < len(rl.phases):
        phase = rl.phases[phase_k]
        ids = [records[i].id for i in members[phase_k]]
        balance = None
        if rl.balance != "none":
            by_id = {r.id: r for r in records}
            balance = {i: getattr(by_id[i], rl.balance) for i in [*ids, *carried]}
        sampler = PhaseSampler(ids, carried=carried, carry_ratio=rl.carry_ratio if phase_k else 0.0,
                               tracker=tracker, seed=cfg.train.seed + phase_k, balance_by=balance)
        if sampler_state:
            sampler.load_state_dict(sampler_state)
            sampler.tracker = tracker
            sampler_state = None
        phase_end = sum(p.steps for p in rl.phases[: phase_k + 1])
        while trainer.step_count < phase_end:
            if stop_after is not None and done_here >= stop_after:
                return last  # a simulated kill
            row = trainer.step(sampler, max_input=phase.max_input_tokens)
            row["phase"] = phase.name
            log.write(row)
            bar.update(1)
            bar.set_postfix(phase=phase.name, reward=f"{row['reward/mean']:.3f}")
            done_here += 1
            saved = cfg.train.save_every and trainer.step_count % cfg.train.save_every == 0
            if saved:
                last = save(sampler)
            if evaluate and cfg.eval.every and trainer.step_count % cfg.eval.every == 0 \
                    and trainer.step_count < phase_end:
                evaluate(trainer.eval_model(), tokenizer, f"rl-step-{trainer.step_count}", trainer.step_count, log)
            if interrupts.requested():  # Ctrl-C: a checkpoint of this finished step (mid-phase: its sampler too)
                raise Interrupted(last if saved else save(sampler))
        carried = carry_over(tracker, ids, rl.carry_threshold, previous=carried)
        phase_k += 1
        last = save(None, phase_k, carried)
        if evaluate:
            evaluate(trainer.eval_model(), tokenizer, f"after-{phase.name}", trainer.step_count, log)
        if interrupts.requested():  # Ctrl-C during the phase's save or evaluation: its checkpoint is written
            raise Interrupted(last)
    return last


def holdout_eval(cfg: Config, model, tokenizer, label: str, step: int | None, log: MetricsLog | None,
                 parallel=None) -> dict:
    """Score the [eval] sets now; log a row {stage: eval, label, accuracy, ...} and print a line.
    parallel: every rank calls this with an unsharded model and scores its share of the
    items; rank 0 logs and prints (the others return {})."""
    from ..data import load_records
    from ..eval import run_eval

    benches = {}
    for spec in cfg.eval.sets:
        name, sep, path = spec.partition("=")
        if not sep or spec.startswith("synthetic:"):
            name, path = (Path(spec).stem if not spec.startswith("synthetic:") else "synthetic"), spec
        benches[name] = load_records(path)
    # held-out figures use the rule score alone, so every point of a run is scored alike
    rank, world = (0, 1) if parallel is None else (parallel.rank, parallel.world)
    out = Path(cfg.train.out_dir) / "eval" / label
    if rank == 0:  # these weights' figures, never a killed attempt's rows (its metrics rows were dropped too)
        shutil.rmtree(out, ignore_errors=True)
    if parallel is not None:
        parallel.barrier()
    table = run_eval(model, tokenizer, benches, cfg.eval, out, progress=False,
                     data=cfg.data, rollout=cfg.rollout, rank=rank, world=world,
                     barrier=None if parallel is None else parallel.barrier)
    if rank != 0:
        return {}
    row = {"stage": "eval", "label": label, "step": step, "accuracy": table["average"]["accuracy"],
           **{f"accuracy/{b}": e["accuracy"] for b, e in table.items() if b != "average"}}
    if log is not None:
        log.write(row)
    detail = ", ".join(f"{b} {e['accuracy']:.1f}%" for b, e in table.items() if b != "average")
    print(f"eval [{label}]: held-out accuracy {row['accuracy']:.1f}% ({detail})", flush=True)
    return row


def run_pipeline(cfg: Config, *, resume: bool = False, progress: bool = True, stop_after: int | None = None,
                 reward=None) -> Path:
    """Held-out eval, SFT warm-up (when sft.data is set), eval, then the RL phases with an
    eval after each; one recipe, one command (`longrl train`)."""
    from ..model import load_model

    run_dir = Path(cfg.train.out_dir)
    latest = latest_checkpoint(run_dir) if resume else None
    if resume and latest is None:  # starting over would delete the run's metrics
        raise FileNotFoundError(f"--resume: no complete checkpoint under {run_dir} (run without --resume to start "
                                f"over)")
    in_rl = latest is not None and read_trainer_state(latest).get("stage") == "rl"

    par = start_parallel(cfg)
    main = par is None or par.is_main

    def evaluate(model, tokenizer, label, step, log):
        holdout_eval(cfg, model, tokenizer, label, step, log, parallel=par)

    def evaluate_dir(path, label):
        from ..model.model import fuse_projections
        model, tokenizer = load_model(path, device=cfg.model.device, dtype=cfg.model.dtype,
                                      attn_backend=cfg.model.attn_backend)
        fuse_projections(model.requires_grad_(False).eval())  # evaluated only: q / k / v, gate / up one product each
        evaluate(model, tokenizer, label, 0, MetricsLog(run_dir, "eval") if main else NullLog())

    if latest is None:
        if main:
            MetricsLog(run_dir, "eval", fresh=True)  # a new run: one metrics file for every stage
            shutil.rmtree(run_dir / "eval", ignore_errors=True)  # and its held-out results, not an old run's
        if par is not None:
            par.barrier()
        if cfg.eval.sets:
            evaluate_dir(cfg.model.path, "before")
    start = None
    if cfg.sft.data and not in_rl:
        start = run_sft(cfg, resume=latest is not None, progress=progress, fresh_log=False) / "model"
        # a resume after SFT's end has it already (every rank reads the same file: all decide alike)
        if cfg.eval.sets and not any(r.get("stage") == "eval" and r.get("label") == "after-sft"
                                     for r in metrics_rows(run_dir)):
            evaluate_dir(start, "after-sft")
    if not cfg.rl.data:
        last = start.parent if start else latest
    else:
        last = run_rl(cfg, resume=in_rl, progress=progress, start_from=start, stop_after=stop_after, reward=reward,
                      evaluate=evaluate if cfg.eval.sets else None, fresh_log=False)
    if stop_after is None and main:
        print(run_report(run_dir), flush=True)
    return last


SPARK = "▁▂▃▄▅▆▇█"


def _spark(values: list[float]) -> str:
    """Rewards in [0, 1] as one character each (▁ = 0, █ = 1)."""
    return "".join(SPARK[min(len(SPARK) - 1, max(0, int(v * len(SPARK))))] for v in values)


def run_report(run_dir: str | Path) -> str:
    """The end-of-run summary `longrl train` prints and writes to RUN_DIR/report.md: held-out
    accuracy per stage, the training reward of each RL phase as a text curve, whether the
    last figure beats the after-SFT one by more than noise (paired bootstrap over items, sign
    test), and RUN_DIR/metrics.png (when matplotlib is installed)."""
    from ..eval.paired import describe, item_scores, paired_gain
    from .plot import eval_points, phase_spans, read_rows

    run = Path(run_dir)
    rows = read_rows(run)
    lines = ["## Run summary", ""]
    evals = eval_points(rows)
    if evals:
        lines += ["| stage | RL step | held-out accuracy |", "|---|---:|---:|"]
        lines += [f"| {label} | {step} | {acc:.1f}% |" for label, step, acc in evals]
        lines.append("")
    for name, first, last in phase_spans(rows):
        rewards = [r["reward/mean"] for r in rows if r.get("stage") == "rl" and first <= r["step"] <= last
                   and r.get("reward/mean") is not None]
        if rewards:
            lines.append(f"training reward, phase {name} (steps {first}-{last}): {_spark(rewards)}  "
                         f"{rewards[0]:.2f} -> {rewards[-1]:.2f} (mean {sum(rewards) / len(rewards):.2f})")
    labels = [label for label, _, _ in evals]
    if "after-sft" in labels and labels[-1] != "after-sft":
        base, final = run / "eval" / "after-sft", run / "eval" / labels[-1]
        if (base / "items.jsonl").is_file() and (final / "items.jsonl").is_file():
            lines += ["", describe(paired_gain(item_scores(base), item_scores(final)), "after-sft", labels[-1])]
    try:
        from .plot import plot_run
        lines += ["", f"curves: {plot_run(run)}"]
    except ImportError:
        lines += ["", f"curves: install matplotlib (pip install -e '.[plot]'), then longrl plot {run}"]
    text = "\n".join(lines)
    (run / "report.md").write_text(text + "\n")
    return text
