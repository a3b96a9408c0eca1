"""A packed batch over a sequence-parallel group: each sequence padded at its end to a
multiple of 2·SP and spread in the zigzag layout (rank r holds chunks r and 2·SP−1−r of
every sequence), positions kept, padding never in the loss.

Per-token tensors of the whole packed batch (ids, targets, loss weights, ...) are built as
on one process — a token's target is the next token of its sequence, wherever that lands —
and then `take` hands each rank its rows. `put` is the inverse for tests and outputs.
"""
from __future__ import annotations

from typing import Sequence

import torch

from kernels.ring_attention import zigzag_indices


class SequenceShard:
    def __init__(self, lengths: Sequence[int], sp_size: int, sp_rank: int):
        """lengths: the real length of each packed sequence (cu_seqlens differences)."""
        if sp_size < 1 or not 0 <= sp_rank < sp_size:
            raise ValueError(f"sequence parallel: rank {sp_rank} of {sp_size} is not a valid position")
        if any(n <= 0 for n in lengths):
            raise ValueError(f"sequence parallel: every sequence needs >= 1 token, got lengths {list(lengths)}")
        self.lengths = [int(n) for n in lengths]
        self.sp_size, self.sp_rank = sp_size, sp_rank
        unit = 2 * sp_size
        self.padded = [-(-n // unit) * unit for n in self.lengths]  # global lengths after padding
        starts = torch.tensor([0, *self.padded]).cumsum(0)[:-1]
        # where each real token sits in the padded layout
        self.real_index = torch.cat([torch.arange(s, s + n) for s, n in zip(starts.tolist(), self.lengths)])
        self.index = zigzag_indices(self.padded, sp_size, sp_rank)  # this rank's rows of the padded layout
        real = torch.zeros(sum(self.padded), dtype=torch.bool)
        real[self.real_index] = True
        self.real = real[self.index]  # [T_local] True where the row is a real token
        positions = torch.cat([torch.arange(n) for n in self.padded])
        self.positions = positions[self.index]

    @property
    def local_tokens(self) -> int:
        return int(self.index.numel())

    def pad(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """Per-token tensor of the real packed batch [T, ...] -> the padded layout [T_pad, ...]."""
        if x.shape[0] != len(self.real_index):
            raise ValueError(f"expected {len(self.real_index)} rows (the packed batch), got {x.shape[0]}")
        out = x.new_full((sum(self.padded), *x.shape[1:]), fill)
        out[self.real_index] = x
        return out

    def take(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """This rank's rows of a per-token tensor of the real packed batch (padding filled)."""
        return self.pad(x, fill)[self.index.to(x.device)]

    def put(self, local: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write this rank's rows back into `out` [T, ...] (the real packed batch), padding dropped."""
        padded_pos = self.index[self.real]  # padded-layout positions of this rank's real rows
        where = torch.searchsorted(self.real_index, padded_pos)  # their rows in the real batch
        out[where.to(out.device)] = local[self.real.to(local.device)]
        return out
