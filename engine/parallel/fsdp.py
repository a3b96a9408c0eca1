"""FSDP2 over a data × sequence mesh, applied from outside the model.

    mesh = make_mesh(sp=2)                    # DeviceMesh ("dp", "sp") over the world
    model = parallelize(model, mesh)          # fully_shard per decoder layer and at the root

Parameters are sharded over every rank (dp × sp flattened); the sequence-parallel group is
mesh["sp"] (ring attention's group). Gradients are SUMMED across ranks, not averaged: each
rank's loss already carries the batch's global normalisation (global token and sequence
counts), so the sum of the ranks' gradients is the one-process gradient. The root keeps its
parameters unsharded between forward and backward: the fused loss reads `lm_head_weight`
(the embedding itself when tied) outside the model's forward.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard


def make_mesh(sp: int = 1, device_type: str = "cpu", timeout_s: float | None = None) -> DeviceMesh:
    """A 2-D mesh ("dp", "sp") over the whole world: dp = world / sp. timeout_s: every group of
    the mesh times out after it, as the default group does (the dimensions over the whole world,
    and shard_mesh's flattened one, are the default group); DeviceMesh would otherwise give the
    groups it creates torch's default (30 min on gloo, 10 on NCCL): a stuck rank of a dp x sp
    job held its ring for that long."""
    world = dist.get_world_size()
    if sp < 1 or world % sp:
        raise ValueError(f"parallel.sp = {sp} must divide the world size {world}")
    # a dimension over the whole world is the default group, which has the timeout already (and an
    # override would open a second communicator over every rank); the smaller ones get it here
    opts = None if timeout_s is None else _group_options(timeout_s)
    sizes = {"dp": world // sp, "sp": sp}
    override = {dim: opts for dim, size in sizes.items() if opts is not None and size < world}
    return init_device_mesh(device_type, (world // sp, sp), mesh_dim_names=("dp", "sp"),
                            backend_override=override or None)


def _group_options(timeout_s: float):
    """The options a new process group of the default backend takes its timeout from."""
    if dist.get_backend() == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
    else:
        opts = dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    return opts


def shard_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh of every rank, over which parameters are sharded."""
    return mesh._flatten("dp_sp") if mesh.ndim > 1 else mesh


def _sum_gradients(module) -> None:
    """Reduce-scatter by plain SUM with no division: a divide factor alone would ask for
    PREMUL_SUM, which gloo lacks; forcing sum reduction makes it a SUM on every backend."""
    if hasattr(module, "set_gradient_divide_factor"):
        module.set_gradient_divide_factor(1.0)
    else:  # older torch
        module.set_reduce_scatter_divide_factor(1.0)
    if hasattr(module, "set_force_sum_reduction_for_comms"):
        module.set_force_sum_reduction_for_comms(True)


def parallelize(model, mesh: DeviceMesh, compute_dtype=None):
    """FSDP2: each decoder layer one unit, the rest (embeddings, final norm, lm_head) at the
    root; gradients summed over the mesh (see the module docstring). compute_dtype (bf16):
    the sharded fp32 weights are gathered and cast to it for compute, gradients reduced in
    fp32 (MixedPrecisionPolicy). Returns the model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    flat = shard_mesh(mesh)
    mp = MixedPrecisionPolicy() if compute_dtype is None else \
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mesh=flat, mp_policy=mp)
        _sum_gradients(layer)
    fully_shard(model, mesh=flat, reshard_after_forward=False, mp_policy=mp)
    _sum_gradients(model)
    return model


def full_model_state(model, cpu: bool = False) -> dict:
    """The full (unsharded) model state dict (a collective: every rank calls it): on every
    rank, on the model's device (what an unsharded copy loads to generate); cpu=True: on
    rank 0 alone, in CPU memory (what a checkpoint export writes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu))


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    """A full optimizer state dict keyed by parameter name (one process's checkpoint) into the
    sharded optimizer: every rank takes its shard of `state`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
