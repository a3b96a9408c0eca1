"""Checkpoints: a model directory transformers can load, plus optimizer, RNG and trainer state.

Layout of RUN_DIR:
    step-000100/model/        config.json, safetensors, tokenizer (engine.model.save_model)
    step-000100/optimizer.pt  torch.save of the optimizer's state dict (tensors and numbers only;
                              read back with weights_only=True, so nothing arbitrary is unpickled)
    step-000100/rng.pt        torch's CPU (and CUDA) generator states
    step-000100/trainer.json  step, data position, schedule, curriculum: plain JSON
    latest                    the name of the newest complete checkpoint

A run on several ranks (engine.parallel) writes the model and optimizer sharded instead:

    step-000100/dcp/          torch.distributed.checkpoint: {"model": …, "optim": …}, each rank
                              its own shards, keyed by parameter name (loads at any world size)
    step-000100/model/        config and tokenizer; the gathered weights too (what transformers
                              loads) only where the save asks for an export: the end of SFT
                              and of each RL phase

`longrl convert` (and load_model) read the weights of either kind.

RL's checkpoints are named rl-step-000100 (its steps count from 0 again after SFT's, in the same
RUN_DIR), and each stage keeps its own `keep_last`.

A checkpoint is written into a temporary directory and renamed into place, and `latest` is
replaced atomically after that: a kill at any moment leaves the previous checkpoint whole. A
step saved twice (a periodic save, then the phase end's) moves the older copy aside first, and
`latest_checkpoint` takes it back if a kill came between the two renames.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..model import save_model


def save_checkpoint(run_dir: str | os.PathLike, step: int, model, tokenizer, optimizer, trainer_state: dict,
                    keep_last: int = 2, parallel=None, export: bool = True) -> Path:
    """Write step-NNNNNN atomically. Under engine.parallel (FSDP2) every rank must call this:
    each writes its shards of the model and optimizer (torch.distributed.checkpoint), rank 0
    the rest, and the ranks meet before returning; export: also gather the full weights into
    model/ (what transformers loads)."""
    if parallel is None:
        return _write_checkpoint(run_dir, step, model, tokenizer, optimizer.state_dict(), trainer_state, keep_last)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from ..parallel.fsdp import full_model_state
    run = Path(run_dir)
    final = run / checkpoint_name(trainer_state, step)
    tmp = run / f".{final.name}.tmp-sharded"  # one name every rank knows
    if parallel.is_main:
        run.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    parallel.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "dcp"))
    full = full_model_state(model, cpu=True) if export else {}  # a collective: every rank gathers
    if parallel.is_main:
        _write_checkpoint(run_dir, step, model, tokenizer, None, trainer_state, keep_last, full, tmp=tmp)
    parallel.barrier()
    return final


def _write_checkpoint(run_dir, step: int, model, tokenizer, optimizer_state: dict | None, trainer_state: dict,
                      keep_last: int, model_state: dict | None = None, tmp: Path | None = None) -> Path:
    """tmp: a temporary directory already holding part of the checkpoint (the sharded states)."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    final = run / checkpoint_name(trainer_state, step)
    if tmp is None:
        tmp = run / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        save_model(model, tokenizer, tmp / "model", state_dict=model_state)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
        _flush_to_disk(tmp)  # on disk before the renames make it the checkpoint (a power loss, not only a kill)
        aside = _aside(final)
        if final.exists():  # the same step again: the older copy stays whole until the new one is in place
            shutil.rmtree(aside, ignore_errors=True)
            final.rename(aside)
        tmp.rename(final)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = run / ".latest.tmp"
    pointer.write_text(final.name)
    _flush_to_disk(pointer)
    pointer.replace(run / "latest")
    _flush_to_disk(run, whole=False)  # the renames
    prefix = final.name[: -len(f"{step:06d}")]  # prune this stage's checkpoints only
    for old in sorted(run.glob(f"{prefix}*"))[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _flush_to_disk(path: Path, whole: bool = True) -> None:
    """fsync a file, or a folder (its entries: renames) and, when `whole`, everything under it."""
    paths = [*path.rglob("*"), path] if whole and path.is_dir() else [path]
    for item in paths:
        try:
            fd = os.open(item, os.O_RDONLY)
        except OSError:  # a folder some platforms do not open
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def checkpoint_name(trainer_state: dict, step: int) -> str:
    """step-000100 for SFT, rl-step-000100 for RL (its steps count from 0 again)."""
    return f"{'rl-' if trainer_state.get('stage') == 'rl' else ''}step-{step:06d}"


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    run = Path(run_dir)
    pointer = run / "latest"
    if not pointer.is_file():
        return None
    path = run / pointer.read_text().strip()
    if not path.exists() and (_aside(path) / "trainer.json").is_file():
        try:  # killed between moving the older copy aside and renaming the new one in
            _aside(path).rename(path)
        except FileNotFoundError:  # another rank took it back first
            pass
    return path if (path / "trainer.json").is_file() else None


def read_trainer_state(path: str | os.PathLike) -> dict:
    """A checkpoint directory's trainer state (trainer.json) alone: its stage, step, phase."""
    path = Path(path)
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no trainer.json)")
    return json.loads((path / "trainer.json").read_text())


def load_checkpoint_state(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """-> (optimizer state, rng states, trainer state) of a checkpoint directory. Tensors are read
    into host memory, wherever they were saved (a one-GPU run's state is tagged cuda:0: every
    rank of a resumed multi-GPU job would otherwise put the whole state on GPU 0, and a CPU
    machine could not read it); loading them into the optimizer moves them to its device."""
    path = Path(path)
    trainer = read_trainer_state(path)
    if (path / "optimizer.pt").is_file():
        optimizer = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    else:  # written by several ranks: read into the live optimizer by load_optimizer_state
        optimizer = {SHARDED: str(path / "dcp")}
    rng = torch.load(path / "rng.pt", weights_only=True, map_location="cpu")
    return optimizer, rng, trainer


def restore_rng(rng: dict) -> None:
    """The saved generators' states, those this machine has: a checkpoint of a machine with more
    visible GPUs restores the first ones (the CUDA states are per device)."""
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        states = rng["cuda"][:torch.cuda.device_count()]
        for i, state in enumerate(states):
            torch.cuda.set_rng_state(state, i)


# ---- optimizer states across world sizes ---------------------------------------------------
SHARDED = "sharded_checkpoint"


def load_optimizer_state(model, optimizer, state: dict, parallel=None) -> None:
    """A checkpoint's optimizer state (load_checkpoint_state's) into `optimizer`, whichever
    world size wrote it and whichever reads it: one process's state dict keyed by index,
    a gathered one keyed by name, or the sharded torch.distributed.checkpoint of several ranks
    (each rank reads the shards it needs)."""
    if SHARDED in state:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
        live = {"optim": get_optimizer_state_dict(model, optimizer)}  # initialised: the structure to fill
        dcp.load(live, checkpoint_id=state[SHARDED], no_dist=parallel is None)
        set_optimizer_state_dict(model, optimizer, live["optim"])
    elif parallel is None:
        optimizer.load_state_dict(indexed_optimizer_state(model, optimizer, state))
    else:
        from ..parallel.fsdp import load_full_optimizer_state
        load_full_optimizer_state(model, optimizer, named_optimizer_state(model, optimizer, state))


def named_optimizer_state(model, optimizer, state: dict) -> dict:
    """An optimizer state dict keyed by parameter index (what one process's optimizer writes)
    -> keyed by parameter name (what engine.parallel reads and writes). Names pass through."""
    if all(isinstance(k, str) for k in state["state"]) and all(
            isinstance(i, str) for g in state["param_groups"] for i in g["params"]):
        return state
    names = {id(p): n for n, p in model.named_parameters()}
    mapping = {sid: names[id(p)] for saved, group in zip(state["param_groups"], optimizer.param_groups)
               for sid, p in zip(saved["params"], group["params"])}
    return {"state": {mapping[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [mapping[i] for i in g["params"]]} for g in state["param_groups"]]}


def indexed_optimizer_state(model, optimizer, state: dict) -> dict:
    """The inverse of named_optimizer_state, for `optimizer.load_state_dict` in one process."""
    if not any(isinstance(i, str) for g in state["param_groups"] for i in g["params"]):
        return state
    params = dict(model.named_parameters())
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    mapping = {name: index[id(params[name])] for g in state["param_groups"] for name in g["params"]}
    return {"state": {mapping[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [mapping[n] for n in g["params"]]} for g in state["param_groups"]]}
