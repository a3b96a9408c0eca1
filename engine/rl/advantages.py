"""Group-relative advantages (GRPO) and their variants.

    A_i = (r_i − mean(r_group)) / (std(r_group) + eps)         scale = "group"   (GRPO)
    A_i = (r_i − mean(r_group)) / (std(r_batch) + eps)         scale = "batch"
    A_i =  r_i − mean(r_group)                                 scale = "none"    (Dr. GRPO)
    A_i = (r_i − mean(r_group)) / (std(r_same_task) + eps)     scale = "task"    (QwenLong-L1.5)

std is the unbiased (n − 1) standard deviation, as in DeepSeekMath's GRPO and most
implementations that follow it. A group of one has no baseline: it keeps its raw reward.
A group whose rewards are all equal gets advantages of exactly 0.
"""
from __future__ import annotations

import torch

SCALES = ("group", "batch", "none", "task")


def _unbiased_std(values: torch.Tensor) -> torch.Tensor:
    return values.std(unbiased=True) if values.numel() > 1 else torch.zeros((), dtype=values.dtype)


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, scale: str = "group", eps: float = 1e-6,
                    task_ids: torch.Tensor | None = None) -> torch.Tensor:
    """rewards [N], group_ids [N] (any integer labels) -> advantages [N] (float32)."""
    if scale not in SCALES:
        raise ValueError(f"advantage scale {scale!r} unknown; choose one of {', '.join(SCALES)}")
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards and group_ids must both be [N], got {tuple(rewards.shape)} and "
                         f"{tuple(group_ids.shape)}")
    if scale == "task" and (task_ids is None or task_ids.shape != rewards.shape):
        raise ValueError("scale='task' needs task_ids [N] (one task label per sample)")
    r = rewards.detach().to(torch.float64).cpu()
    groups = group_ids.cpu()
    adv = torch.empty_like(r)
    singleton = torch.zeros_like(r, dtype=torch.bool)
    for g in torch.unique(groups):
        idx = (groups == g).nonzero().squeeze(-1)
        if idx.numel() == 1:
            adv[idx] = r[idx]
            singleton[idx] = True
            continue
        centred = r[idx] - r[idx].mean()
        if scale == "group":
            centred = centred / (_unbiased_std(r[idx]) + eps)
        adv[idx] = centred
    if scale == "batch":
        adv[~singleton] = adv[~singleton] / (_unbiased_std(r) + eps)
    elif scale == "task":
        tasks = task_ids.cpu()
        for t in torch.unique(tasks):
            idx = ((tasks == t) & ~singleton).nonzero().squeeze(-1)
            adv[idx] = adv[idx] / (_unbiased_std(r[tasks == t]) + eps)
    return adv.to(torch.float32).to(rewards.device)
