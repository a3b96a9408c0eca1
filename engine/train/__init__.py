"""Training: the SFT warm-up loop, checkpoints and metrics (the RL loop joins here).

`run_sft` is what `longrl sft` runs: load data and model (or resume the newest checkpoint
of train.out_dir), step with a progress bar, log one JSON row per step, checkpoint every
train.save_every steps and at the end (and on Ctrl-C), keep the last train.keep_last.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..config import Config
from .checkpoint import latest_checkpoint, load_checkpoint_state, restore_rng, save_checkpoint
from .metrics import MetricsLog
from .sft import SFTTrainer, TrainingStopped, sft_examples

__all__ = ["run_sft", "run_rl", "run_pipeline", "holdout_eval", "SFTTrainer", "sft_examples", "save_checkpoint",
           "latest_checkpoint", "MetricsLog", "TrainingStopped"]


def run_sft(cfg: Config, *, resume: bool = False, progress: bool = True, stop_after: int | None = None,
            fresh_log: bool | None = None) -> Path:
    """-> the final checkpoint directory. stop_after: return after that many steps of this
    call without a final checkpoint, as a killed run would (tests use it)."""
    import torch
    from tqdm import tqdm

    from ..data import load_records
    from ..model import load_model

    if not cfg.sft.data:
        raise ValueError("sft.data lists no files: give at least one doc-QA file (--sft.data='[\"a.jsonl\"]')")
    run_dir = Path(cfg.train.out_dir)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {run_dir}")
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_model(ckpt / "model" if ckpt else cfg.model.path, device=cfg.model.device,
                                  dtype=cfg.model.dtype, attn_backend=cfg.model.attn_backend)
    if tokenizer is None:
        raise ValueError(f"model {cfg.model.path}: SFT needs the tokenizer files")
    model.set_activation_checkpointing(cfg.model.activation_checkpointing)
    records = [r for path in cfg.sft.data for r in load_records(path, format=cfg.sft.format)]
    max_input = cfg.sft.max_input_tokens or model.config.max_position_embeddings - 64
    examples = sft_examples(records, tokenizer, template=cfg.data.template, max_input_tokens=max_input)
    trainer = SFTTrainer(model, examples, cfg.train, cfg.sft)
    if ckpt:
        optimizer_state, rng, state = load_checkpoint_state(ckpt)
        trainer.load_state_dict(state, optimizer_state)
        restore_rng(rng)
    fresh = ckpt is None if fresh_log is None else fresh_log
    log = MetricsLog(run_dir, "sft", fresh=fresh, resume_after_step=trainer.state.step if ckpt else None)
    bar = tqdm(total=trainer.total_steps, initial=trainer.state.step, desc="sft", unit="step",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    last = ckpt
    done_here = 0
    try:
        while not trainer.done() and (stop_after is None or done_here < stop_after):
            row = trainer.step()
            log.write(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            done_here += 1
            if cfg.train.save_every and trainer.state.step % cfg.train.save_every == 0:
                last = save_checkpoint(run_dir, trainer.state.step, model, tokenizer, trainer.optimizer,
                                       trainer.state_dict(), cfg.train.keep_last)
    except torch.OutOfMemoryError as e:
        raise TrainingStopped(oom_advice(e)) from None
    except KeyboardInterrupt:
        bar.close()
        last = save_checkpoint(run_dir, trainer.state.step, model, tokenizer, trainer.optimizer,
                               trainer.state_dict(), cfg.train.keep_last)
        print(f"\ninterrupted: checkpoint written to {last}; continue with --resume", file=sys.stderr)
        raise
    bar.close()
    if stop_after is not None and not trainer.done():
        return last  # a simulated kill: whatever the periodic checkpoints left
    if last is None or last.name != f"step-{trainer.state.step:06d}":
        last = save_checkpoint(run_dir, trainer.state.step, model, tokenizer, trainer.optimizer,
                               trainer.state_dict(), cfg.train.keep_last)
    return last


def run_rl(cfg: Config, *, resume: bool = False, progress: bool = True, stop_after: int | None = None,
           start_from: str | Path | None = None, reward=None, evaluate=None, fresh_log: bool | None = None) -> Path:
    """The RL phases of the curriculum, in order, each from the previous phase's weights,
    with hard examples carried forward. start_from: a model to begin with (the SFT result);
    resume: continue from the newest RL checkpoint of train.out_dir."""
    import torch
    from tqdm import tqdm

    from ..curriculum import DifficultyTracker, phase_members
    from ..data import load_records, prompt_lengths
    from ..model import load_model
    from .rl import GRPOTrainer

    rl = cfg.rl
    if not rl.data:
        raise ValueError("rl.data lists no files: give at least one doc-QA file")
    run_dir = Path(cfg.train.out_dir)
    ckpt = latest_checkpoint(run_dir) if resume else None
    state = load_checkpoint_state(ckpt) if ckpt else None
    if ckpt and state[2].get("stage") != "rl":
        ckpt, state = None, None  # the newest checkpoint is SFT's: RL starts fresh from it
        start_from = latest_checkpoint(run_dir) / "model"
    torch.manual_seed(cfg.train.seed)
    source = ckpt / "model" if ckpt else (start_from or cfg.model.path)
    model, tokenizer = load_model(source, device=cfg.model.device, dtype=cfg.model.dtype,
                                  attn_backend=cfg.model.attn_backend)
    model.set_activation_checkpointing(cfg.model.activation_checkpointing)
    records = [r for path in rl.data for r in load_records(path, format=rl.format)]
    lengths = prompt_lengths(records, tokenizer, template=cfg.data.template, cache_path=run_dir / "lengths.json")
    members = phase_members(lengths, rl.phases)
    total = sum(p.steps for p in rl.phases)
    trainer = GRPOTrainer(model, tokenizer, records, rl, cfg.train, total_steps=total, reward=reward)
    tracker = DifficultyTracker(cap=rl.difficulty_cap)
    phase_k, carried, sampler_state = 0, [], None
    if state:
        optimizer_state, rng, tstate = state
        trainer.load_state_dict(tstate["trainer"], optimizer_state)
        tracker.load_state_dict(tstate["tracker"])
        phase_k, carried, sampler_state = tstate["phase"], tstate["carried"], tstate["sampler"]
        restore_rng(rng)
    fresh = (state is None and start_from is None) if fresh_log is None else fresh_log
    log = MetricsLog(run_dir, "rl", fresh=fresh, resume_after_step=trainer.step_count if state else None)
    bar = tqdm(total=total, initial=trainer.step_count, desc="rl", unit="step", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    last = ckpt

    position = {"phase": phase_k, "carried": carried, "sampler": None}  # where the run is, for saves

    def save(sampler, phase=None, carried_now=None) -> Path:
        if phase is not None:
            position.update(phase=phase, carried=carried_now)
        tstate = {"stage": "rl", "phase": position["phase"], "carried": position["carried"],
                  "trainer": trainer.state_dict(), "tracker": tracker.state_dict(),
                  "sampler": sampler.state_dict() if sampler else None}
        return save_checkpoint(run_dir, trainer.step_count, model, tokenizer, trainer.optimizer, tstate,
                               cfg.train.keep_last)

    try:
        last = _rl_phases(cfg, rl, records, members, trainer, tracker, phase_k, carried, sampler_state, log, bar,
                          save, position, evaluate, stop_after, last)
    except KeyboardInterrupt:
        bar.close()
        last = save(position["sampler"])
        print(f"\ninterrupted: checkpoint written to {last}; continue with --resume", file=sys.stderr)
        raise
    except torch.OutOfMemoryError as e:
        raise TrainingStopped(oom_advice(e)) from None
    bar.close()
    return last


def _rl_phases(cfg, rl, records, members, trainer, tracker, phase_k, carried, sampler_state, log, bar, save,
               position, evaluate, stop_after, last):
    from ..curriculum import PhaseSampler, carry_over

    model, tokenizer = trainer.model, trainer.tokenizer
    done_here = 0
    while phase_k < len(rl.phases):
        phase = rl.phases[phase_k]
        ids = [records[i].id for i in members[phase_k]]
        sampler = PhaseSampler(ids, carried=carried, carry_ratio=rl.carry_ratio if phase_k else 0.0,
                               tracker=tracker, seed=cfg.train.seed + phase_k)
        if sampler_state:
            sampler.load_state_dict(sampler_state)
            sampler.tracker = tracker
            sampler_state = None
        position["sampler"] = sampler  # the Ctrl-C checkpoint saves it mid-phase
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
            if cfg.train.save_every and trainer.step_count % cfg.train.save_every == 0:
                last = save(sampler)
            if evaluate and cfg.eval.every and trainer.step_count % cfg.eval.every == 0 \
                    and trainer.step_count < phase_end:
                evaluate(model, tokenizer, f"rl-step-{trainer.step_count}", trainer.step_count, log)
        carried = carry_over(tracker, ids, rl.carry_threshold, previous=carried)
        phase_k += 1
        last = save(None, phase_k, carried)
        position["sampler"] = None
        if evaluate:
            evaluate(model, tokenizer, f"after-{phase.name}", trainer.step_count, log)
    return last


def oom_advice(err: Exception) -> str:
    return (f"out of memory ({str(err).splitlines()[0]}). Turn down, in this order: train.token_budget "
            f"(tokens per micro-batch), rl.max_new_tokens or the phase's max_input_tokens, the fused-loss chunk "
            f"($LONGRL_CHUNK_MB), the rollout KV cache (CacheConfig gpu_memory_fraction / max_bytes); or set "
            f"model.activation_checkpointing = true")


def holdout_eval(cfg: Config, model, tokenizer, label: str, step: int | None, log: MetricsLog | None) -> dict:
    """Score the [eval] sets now; log a row {stage: eval, label, accuracy, ...} and print a line."""
    from ..data import load_records
    from ..eval import run_eval

    benches = {}
    for spec in cfg.eval.sets:
        name, sep, path = spec.partition("=")
        if not sep or spec.startswith("synthetic:"):
            name, path = (Path(spec).stem if not spec.startswith("synthetic:") else "synthetic"), spec
        benches[name] = load_records(path)
    table = run_eval(model, tokenizer, benches, cfg.eval, Path(cfg.train.out_dir) / "eval" / label, progress=False)
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
    in_rl = latest is not None and load_checkpoint_state(latest)[2].get("stage") == "rl"

    def evaluate(model, tokenizer, label, step, log):
        holdout_eval(cfg, model, tokenizer, label, step, log)

    def evaluate_dir(path, label):
        model, tokenizer = load_model(path, device=cfg.model.device, dtype=cfg.model.dtype)
        evaluate(model, tokenizer, label, 0, MetricsLog(run_dir, "eval"))

    if latest is None:
        MetricsLog(run_dir, "eval", fresh=True)  # a new run: one metrics file for every stage
        if cfg.eval.sets:
            evaluate_dir(cfg.model.path, "before")
    start = None
    if cfg.sft.data and not in_rl:
        start = run_sft(cfg, resume=latest is not None, progress=progress, fresh_log=False) / "model"
        if cfg.eval.sets:
            evaluate_dir(start, "after-sft")
    if not cfg.rl.data:
        return start.parent if start else latest
    return run_rl(cfg, resume=in_rl, progress=progress, start_from=start, stop_after=stop_after, reward=reward,
                  evaluate=evaluate if cfg.eval.sets else None, fresh_log=False)
