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

__all__ = ["run_sft", "SFTTrainer", "sft_examples", "save_checkpoint", "latest_checkpoint", "MetricsLog",
           "TrainingStopped"]


def run_sft(cfg: Config, *, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> Path:
    """-> the final checkpoint directory. stop_after: return after that many steps of this
    call without a final checkpoint, as a killed run would (tests use it)."""
    import torch
    from tqdm import tqdm

    from ..data import load_docqa
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
    records = [r for path in cfg.sft.data for r in load_docqa(path, format=cfg.sft.format)]
    max_input = cfg.sft.max_input_tokens or model.config.max_position_embeddings - 64
    examples = sft_examples(records, tokenizer, template=cfg.data.template, max_input_tokens=max_input)
    trainer = SFTTrainer(model, examples, cfg.train, cfg.sft)
    if ckpt:
        optimizer_state, rng, state = load_checkpoint_state(ckpt)
        trainer.load_state_dict(state, optimizer_state)
        restore_rng(rng)
    log = MetricsLog(run_dir, resume_after_step=trainer.state.step if ckpt else None)
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
