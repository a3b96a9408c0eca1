"""Small helpers shared by tests (imported as `from helpers import ...`)."""
from __future__ import annotations

import torch


def pack(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """token lists -> (input_ids [T], cu_seqlens [S+1])."""
    ids = torch.tensor([t for s in seqs for t in s])
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0).to(torch.int32)
    return ids, cu


@torch.no_grad()
def max_logit_diff_vs_hf(model, hf, seqs: list[list[int]]) -> float:
    """Run `model` once on the packed batch and `hf` on each sequence alone; the largest
    absolute logit difference over all tokens."""
    ids, cu = pack(seqs)
    logits = model.logits(model(ids, cu))
    worst = 0.0
    for i, s in enumerate(seqs):
        ref = hf(torch.tensor([s])).logits[0]
        worst = max(worst, (logits[cu[i]:cu[i + 1]] - ref).abs().max().item())
    return worst
