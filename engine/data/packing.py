"""Packing variable-length sequences into token-budget micro-batches, without padding.

A sequence is token ids x_0 .. x_{L-1} with per-token loss flags (1 on tokens the model
must learn to produce, e.g. the answer). Packed, position t of a sequence predicts x_{t+1}
and counts in the loss when x_{t+1} is flagged; the last position of each sequence predicts
nothing. `loss_rows` lists the positions that count, so the loss kernels see only those.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Packed:
    input_ids: torch.Tensor  # [T] long
    cu_seqlens: torch.Tensor  # [S+1] int32
    targets: torch.Tensor  # [T] long: the next token (0 where there is none)
    loss_mask: torch.Tensor  # [T] float: 1 where the target counts
    seq_index: torch.Tensor  # [T] long: which of the S sequences each position belongs to

    @property
    def loss_rows(self) -> torch.Tensor:
        return self.loss_mask.nonzero().squeeze(-1)

    def to(self, device) -> "Packed":
        return Packed(*(t.to(device) for t in (self.input_ids, self.cu_seqlens, self.targets, self.loss_mask,
                                               self.seq_index)))


def pack(sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Packed:
    """[(token ids, loss flags per token)] -> one packed batch."""
    ids, targets, mask, seq, lengths = [], [], [], [], []
    for s, (tokens, flags) in enumerate(sequences):
        if len(tokens) != len(flags) or not tokens:
            raise ValueError(f"sequence {s}: {len(tokens)} tokens and {len(flags)} loss flags (need equal, > 0)")
        ids += list(tokens)
        targets += list(tokens[1:]) + [0]
        mask += [float(f) for f in flags[1:]] + [0.0]
        seq += [s] * len(tokens)
        lengths.append(len(tokens))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return Packed(torch.tensor(ids), cu, torch.tensor(targets), torch.tensor(mask), torch.tensor(seq))


def budget_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped in order into batches of at most `budget` tokens each."""
    batches: list[list[int]] = []
    used = budget + 1
    for i, n in enumerate(lengths):
        if n > budget:
            raise ValueError(f"sequence {i} has {n} tokens, over the micro-batch token budget of {budget}; "
                             f"raise the budget or lower the maximum input length")
        if used + n > budget:
            batches.append([])
            used = 0
        batches[-1].append(i)
        used += n
    return batches
