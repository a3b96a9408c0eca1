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

from ..config import SFTConfig, TrainConfig
from ..data.lengths import record_prompt_ids
from ..data.packing import budget_batches, pack
from ..data.template import end_of_turn_id, opens_thinking, resolve_think, sft_target
from .loop import OptimizerStep, TrainingStopped
from .metrics import efficiency
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
    def __init__(self, model, examples, train_cfg: TrainConfig, sft_cfg: SFTConfig):
        if not examples:
            raise ValueError("SFT needs at least one example")
        self.model, self.examples = model, examples
        self.cfg, self.sft = train_cfg, sft_cfg
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
        model, weight = self.model, self.model.lm_head_weight
        device = weight.device
        chosen = [self.examples[i] for i in self._next_examples()]
        answer_tokens = sum(sum(flags[1:]) for _, flags in chosen)
        total_loss = 0.0
        model.train()
        for batch in budget_batches([len(ids) for ids, _ in chosen], self.cfg.token_budget):
            packed = pack([chosen[i] for i in batch]).to(device)
            hidden = model(packed.input_ids, packed.cu_seqlens)
            rows = packed.loss_rows
            logp, _ = linear_logprob(hidden[rows], weight, packed.targets[rows])
            loss = -logp.sum() / max(answer_tokens, 1)
            loss.backward()
            total_loss += loss.item()
        result = self.opt_step(self.state.step, self.total_steps, total_loss)
        row = {"stage": "sft", "step": self.state.step + 1, "loss": total_loss, "grad_norm": result["grad_norm"],
               "lr": result["lr"], "answer_tokens": answer_tokens, "tokens": sum(len(ids) for ids, _ in chosen)}
        if result["skipped"]:
            row["skipped"] = True
        self.state.step += 1
        row["seconds"] = time.perf_counter() - started
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        row.update(efficiency(model, row["tokens"], row["seconds"], self.cfg.peak_tflops))
        return row

    def state_dict(self) -> dict:
        return {"stage": "sft", **self.state.__dict__, "bad_steps": self.opt_step.bad_steps,
                "total_steps": self.total_steps}

    def load_state_dict(self, state: dict, optimizer_state: dict) -> None:
        self.state = SFTState(step=state["step"], epoch=state["epoch"], pos=state["pos"])
        self.opt_step.bad_steps = state.get("bad_steps", 0)
        self.optimizer.load_state_dict(optimizer_state)
