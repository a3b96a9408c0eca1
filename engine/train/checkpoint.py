"""Checkpoints: a model directory transformers can load, plus optimizer, RNG and trainer state.

Layout of RUN_DIR:
    step-000100/model/        config.json, safetensors, tokenizer (engine.model.save_model)
    step-000100/optimizer.pt  torch.save of the optimizer's state dict (tensors and numbers only;
                              read back with weights_only=True, so nothing arbitrary is unpickled)
    step-000100/rng.pt        torch's CPU (and CUDA) generator states
    step-000100/trainer.json  step, data position, schedule, curriculum: plain JSON
    latest                    the name of the newest complete checkpoint

A checkpoint is written into a temporary directory and renamed into place, and `latest` is
replaced atomically after that: a kill at any moment leaves the previous checkpoint whole.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..model import save_model


def save_checkpoint(run_dir: str | os.PathLike, step: int, model, tokenizer, optimizer, trainer_state: dict,
                    keep_last: int = 2) -> Path:
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    final = run / f"step-{step:06d}"
    tmp = run / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_model(model, tokenizer, tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = run / ".latest.tmp"
    pointer.write_text(final.name)
    pointer.replace(run / "latest")
    for old in sorted(run.glob("step-*"))[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    run = Path(run_dir)
    pointer = run / "latest"
    if not pointer.is_file():
        return None
    path = run / pointer.read_text().strip()
    return path if (path / "trainer.json").is_file() else None


def load_checkpoint_state(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """-> (optimizer state, rng states, trainer state) of a checkpoint directory."""
    path = Path(path)
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no trainer.json)")
    optimizer = torch.load(path / "optimizer.pt", weights_only=True)
    rng = torch.load(path / "rng.pt", weights_only=True)
    return optimizer, rng, json.loads((path / "trainer.json").read_text())


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
