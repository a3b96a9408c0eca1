"""Warm-up SFT on (document, question, answer) triplets.

Each example is the QwenLong-L1 prompt (chat-templated, document truncated in its middle)
followed by the target in the model's own format (engine.data.template.sft_target: the
reasoning trace, closed by `</think>` when the template opens a thought, then the answer
sentence the rule reward reads) and the end-of-turn token. Only target tokens count in
the loss. Examples are packed, without padding, into micro-batches of at
most `train.token_budget` tokens; the log-probs come from `kernels.linear_logprob` on the
answer positions only (no full logits); the loss is the token mean over the whole
optimizer step (every micro-batch divides by the step's total answer tokens), so gradient
accumulation gives exactly the large-batch gradient.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from kernels import linear_logprob

from ..config import KernelsConfig, SFTConfig, TrainConfig
from ..data.lengths import record_prompt_ids
from ..data.packing import budget_batches, pack
from ..data.template import end_of_turn_id, opens_thinking, resolve_think, sft_target
from .loop import OptimizerStep, TrainingStopped
from .metrics import efficiency, reset_peak_memory
from .optim import make_optimizer

__all__ = ["SFTTrainer", "SFTState", "sft_examples", "TrainingStopped"]


def sft_examples(records, tokenizer, *, template: str = "qwenlong", max_input_tokens: int = 0,
                 chat: bool = True, think: str = "auto"):
    """-> [(token ids, loss flags)] with flags 1 on the target and its end-of-turn token."""
    eot = end_of_turn_id(tokenizer)
    eot = tokenizer.eos_token_id if eot is None else eot
    opens = opens_thinking(tokenizer, chat)
    think = resolve_think(think, tokenizer, chat)
    out = []
    for rec in records:
        prompt, _ = record_prompt_ids(rec, tokenizer, template=template, max_tokens=max_input_tokens, chat=chat)
        target = tokenizer.encode(sft_target(rec, opens_thought=opens, think=think), add_special_tokens=False)
        out.append((prompt + target + [eot], [0] * len(prompt) + [1] * (len(target) + 1)))
    return out


@dataclass
class SFTState:
    step: int = 0
    epoch: int = 0
    pos: int = 0  # examples of the current epoch's order already used


class SFTTrainer:
    def __init__(self, model, examples, train_cfg: TrainConfig, sft_cfg: SFTConfig, parallel=None, precision=None,
                 kernels: KernelsConfig | None = None):
        """parallel: engine.parallel.Parallel when the run has several ranks (the model is
        already sharded by engine.parallel.parallelize): each step's examples are split over
        the data-parallel ranks and each sequence over the sequence-parallel group.
        precision: engine.train.loop.Precision (default fp32). kernels: the [kernels] section
        (the fused log-prob's row backend and chunk budget)."""
        from .loop import Precision, kernel_args
        if not examples:
            raise ValueError("SFT needs at least one example")
        self.model, self.examples = model, examples
        self.parallel = parallel
        self.precision = precision or Precision(None, model.embed_tokens.weight.device.type)
        self.cfg, self.sft = train_cfg, sft_cfg
        self.kernel_args = kernel_args(kernels, model.lm_head_weight, self.precision)
        self.optimizer = make_optimizer(model, train_cfg)
        self.opt_step = OptimizerStep(model, self.optimizer, train_cfg)
        self.state = SFTState()
        per_epoch = math.ceil(len(examples) / sft_cfg.batch_examples)
        self.total_steps = sft_cfg.max_steps or per_epoch * sft_cfg.epochs

    # ---- data order: a seeded permutation per epoch, so a resumed run sees the same batches
    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def _next_examples(self) -> list[int]:
        st = self.state
        order = self._order(st.epoch)
        if st.pos >= len(order):
            st.epoch, st.pos = st.epoch + 1, 0
            order = self._order(st.epoch)
        chosen = order[st.pos: st.pos + self.sft.batch_examples]
        st.pos += len(chosen)
        return chosen

    def done(self) -> bool:
        return self.state.step >= self.total_steps

    def step(self) -> dict:
        started = time.perf_counter()
        reset_peak_memory()
        model = self.model
        device = model.embed_tokens.weight.device
        chosen = [self.examples[i] for i in self._next_examples()]
        answer_tokens = sum(sum(flags[1:]) for _, flags in chosen)  # over the whole step, every rank's share
        par = self.parallel
        mine = chosen if par is None else chosen[par.dp_rank::par.dp]
        batches = budget_batches([len(ids) for ids, _ in mine], self.cfg.token_budget) if mine else []
        # under FSDP every rank runs the same number of forward/backward passes (their collectives
        # pair up): a rank with fewer micro-batches runs empty ones
        n_micro = len(batches) if par is None else par.max(len(batches))
        total_loss = 0.0
        model.train()
        for j in range(n_micro):
            packed = pack([mine[i] for i in batches[j]]).to(device) if j < len(batches) else None
            with self.precision.autocast():
                hidden, rows, targets = self._forward(packed, device)
            weight = model.lm_head_weight  # after the forward: under FSDP2 the root's weights are gathered now
            cast = self.precision.cast
            logp, _ = linear_logprob(cast(hidden[rows]), cast(weight), targets, **self.kernel_args)
            loss = -logp.sum() / max(answer_tokens, 1)
            if par is not None:
                loss = loss + 0.0 * hidden[:1].sum()  # a backward on every rank, even without loss rows
            loss.backward()
            total_loss += loss.item()
        if par is not None:
            total_loss = par.sum(total_loss)
        result = self.opt_step(self.state.step, self.total_steps, total_loss)
        row = {"stage": "sft", "step": self.state.step + 1, "loss": total_loss, "grad_norm": result["grad_norm"],
               "lr": result["lr"], "answer_tokens": answer_tokens, "tokens": sum(len(ids) for ids, _ in chosen)}
        if result["skipped"]:
            row["skipped"] = True
        self.state.step += 1
        row["seconds"] = time.perf_counter() - started
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        row.update(efficiency(model, row["seconds"], self.cfg.peak_tflops, train_tokens=row["tokens"],
                              devices=1 if par is None else par.world))
        return row

    def _forward(self, packed, device):
        """-> (hidden of this rank's tokens, loss rows among them, their targets). packed None:
        an empty micro-batch (2·SP padding tokens, no loss rows)."""
        par, model = self.parallel, self.model
        if par is None or par.sp == 1:
            if packed is None:
                packed = pack([([0, 0], [0, 0])]).to(device)
            hidden = model(packed.input_ids, packed.cu_seqlens)
            rows = packed.loss_rows
            return hidden, rows, packed.targets[rows]
        from ..model.attention import RingAttention
        from ..parallel import SequenceShard
        if packed is None:
            packed = pack([([0] * 2 * par.sp, [0] * 2 * par.sp)]).to(device)
        shard = SequenceShard((packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).tolist(), par.sp, par.sp_rank)
        hidden = model(shard.take(packed.input_ids), position_ids=shard.positions.to(device),
                       attn=RingAttention(shard.padded, group=par.sp_group))
        mask = shard.take(packed.loss_mask, fill=0.0)
        rows = mask.nonzero().squeeze(-1)
        return hidden, rows, shard.take(packed.targets)[rows]

    def state_dict(self) -> dict:
        return {"stage": "sft", **self.state.__dict__, "bad_steps": self.opt_step.bad_steps,
                "total_steps": self.total_steps}

    def load_state_dict(self, state: dict, optimizer_state: dict) -> None:
        """optimizer_state as a checkpoint holds it, written by one process or by several."""
        from .checkpoint import load_optimizer_state
        self.state = SFTState(step=state["step"], epoch=state["epoch"], pos=state["pos"])
        self.opt_step.bad_steps = state.get("bad_steps", 0)
        load_optimizer_state(self.model, self.optimizer, optimizer_state, self.parallel)
