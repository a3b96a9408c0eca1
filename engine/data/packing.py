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


# ---- shared-prefix group rows ----------------------------------------------------------
@dataclass
class GroupRows:
    """GRPO groups packed as one row each, [P | R1 | … | RG], the prompt once.

    A response's last token predicts nothing and nothing attends to it, so a row holds
    R_i − 1 tokens of response i. Positions of each response continue from P, as in the
    repeated layout. The loss rows are positions in the packed tokens: the prompt's last
    token once per response (it predicts that response's first token), then the response's
    own tokens; `rows` may repeat a position, and each sample's rows are contiguous, in order.
    """
    input_ids: torch.Tensor  # [T] long
    position_ids: torch.Tensor  # [T] long
    layout: list[tuple[int, int, tuple[int, ...]]]  # per row: (start, prompt length, response lengths in the row)
    rows: torch.Tensor  # [N] long: loss rows (positions in the packed tokens)
    targets: torch.Tensor  # [N] long: the token each loss row predicts
    seq_index: torch.Tensor  # [N] long: the sample each loss row belongs to (numbered as given)

    def to(self, device) -> "GroupRows":
        return GroupRows(self.input_ids.to(device), self.position_ids.to(device), self.layout,
                         self.rows.to(device), self.targets.to(device), self.seq_index.to(device))


def pack_groups(groups: Sequence[tuple[Sequence[int], Sequence[tuple[int, Sequence[int]]]]]) -> GroupRows:
    """[(prompt ids, [(sample number, response ids), …])] -> one packed batch of group rows.

    Only the responses listed enter the row (leave out those without loss). Sample numbers
    become `seq_index`, so a caller can number the samples of a whole batch once."""
    ids, pos, layout, rows, targets, seq = [], [], [], [], [], []
    for k, (prompt, responses) in enumerate(groups):
        if not prompt:
            raise ValueError(f"group {k}: empty prompt (a group row needs at least one prompt token)")
        start, p = len(ids), len(prompt)
        ids += list(prompt)
        pos += range(p)
        lens = []
        for sample, resp in responses:
            if not resp:
                raise ValueError(f"group {k}, sample {sample}: empty response")
            first = len(ids)
            rows += [start + p - 1] + list(range(first, first + len(resp) - 1))
            targets += list(resp)
            seq += [sample] * len(resp)
            ids += list(resp[:-1])
            pos += range(p, p + len(resp) - 1)
            lens.append(len(resp) - 1)
        layout.append((start, p, tuple(lens)))
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return GroupRows(as_long(ids), as_long(pos), layout, as_long(rows), as_long(targets), as_long(seq))


def group_batches(prompt_lens: Sequence[int], response_lens: Sequence[Sequence[int]],
                  budget: int) -> list[list[tuple[int, list[int]]]]:
    """Micro-batches of group rows within `budget` tokens: [[(group, [response indices]), …], …].

    A row costs P + Σ(R_i − 1) tokens. A group whose row is over the budget is split into
    parts, each with the prompt repeated and whole responses (exact: responses never see
    each other); a single prompt + response over the budget is an error."""
    units: list[tuple[int, list[int], int]] = []
    for g, (p, lens) in enumerate(zip(prompt_lens, response_lens)):
        part, used = [], p
        for i, r in enumerate(lens):
            if p + r - 1 > budget:
                raise ValueError(f"group {g}: prompt ({p} tokens) + response {i} ({r} tokens) is over the "
                                 f"micro-batch token budget of {budget}; raise train.token_budget or lower the "
                                 f"phase's max_input_tokens / rl.max_new_tokens")
            if part and used + r - 1 > budget:
                units.append((g, part, used))
                part, used = [], p
            part.append(i)
            used += r - 1
        if part:
            units.append((g, part, used))
    return [[units[i][:2] for i in batch] for batch in budget_batches([n for _, _, n in units], budget)]
