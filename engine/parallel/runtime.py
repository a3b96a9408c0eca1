"""The ranks of a run: started by a launcher (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), grouped into a ("dp", "sp") mesh by [parallel] sp.

    par = Parallel.from_env(cfg.parallel, device)   # None when the run is one process
    par.dp, par.dp_rank, par.sp, par.sp_rank, par.sp_group, par.is_main
    par.sum(x)  par.max(n)                          # figures over every rank
    par.gather(obj)                                 # every rank's object, on every rank

Every collective times out after parallel.timeout_s: a rank that dies ends the job with an
error on the others instead of a hang.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Parallel:
    mesh: object
    world: int
    rank: int
    dp: int
    dp_rank: int
    sp: int
    sp_rank: int
    sp_group: object
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, cfg, device: torch.device | str = "cpu") -> "Parallel | None":
        """The run's ranks from the launcher's environment; None for a single process (then
        parallel.sp must be 1)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1 and not dist.is_initialized():
            if cfg.sp != 1:
                raise ValueError(f"parallel.sp = {cfg.sp} needs {cfg.sp} processes at least: launch with "
                                 f"`torchrun --nproc-per-node N -m engine.cli ...` (or `longrl train --nproc N`)")
            return None
        device = torch.device(device)
        if not dist.is_initialized():
            backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
            if device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))
        from .fsdp import make_mesh
        mesh = make_mesh(cfg.sp, "cuda" if device.type == "cuda" else "cpu", cfg.timeout_s)
        return cls(mesh, dist.get_world_size(), dist.get_rank(), mesh["dp"].size(), mesh["dp"].get_local_rank(),
                   mesh["sp"].size(), mesh["sp"].get_local_rank(), mesh["sp"].get_group(), device)

    def sum(self, x: float) -> float:
        t = torch.tensor(float(x), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def max(self, n: int) -> int:
        t = torch.tensor(int(n), dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()
