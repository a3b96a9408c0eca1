"""One GRPO / DAPO step, as DESIGN.md's data path:

curriculum sampler -> rollout (G samples per prompt, the prompt prefilled once) -> hybrid
reward (+ overlong shaping) -> dynamic sampling (drop zero-variance groups, generate more)
-> group-relative advantages -> packed token-budget micro-batches -> old log-probs (fused,
no grad; only when a batch is split into several optimizer steps) -> fused GRPO loss with
the batch's global normalisation -> optimizer step(s) -> per-example difficulty.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from kernels import GRPOLossConfig, aggregation_weights, linear_grpo_loss, linear_logprob

from ..config import RLConfig, TrainConfig
from ..data.lengths import record_prompt_ids
from ..data.packing import budget_batches, pack
from ..rewards import HybridReward, RewardItem
from ..rl import DynamicSampler, grpo_advantages, overlong_penalty
from ..rollout import Generator, SamplingParams
from .metrics import efficiency
from .optim import lr_at, make_optimizer
from .sft import TrainingStopped


@dataclass
class Group:
    record: object
    prompt: list[int]
    completions: list  # rollout Completions
    rewards: list[float]
    correct: list[float]  # the reward before shaping (1 = solved)


class GRPOTrainer:
    def __init__(self, model, tokenizer, records, rl: RLConfig, train: TrainConfig, *,
                 reward: HybridReward | None = None, total_steps: int = 1):
        self.model, self.tokenizer = model, tokenizer
        self.records = {r.id: r for r in records}
        if rl.lr:
            train = dataclasses.replace(train, lr=rl.lr)
        self.rl, self.cfg = rl, train
        self.reward = reward or HybridReward(think=rl.think)
        self.optimizer = make_optimizer(model, train)
        self.generator = Generator(model, tokenizer)
        self.loss_cfg = GRPOLossConfig(temperature=rl.temperature, clip_low=rl.clip_low, clip_high=rl.clip_high,
                                       clip_c=rl.clip_c, kl_coef=rl.kl_coef, kl_estimator=rl.kl_estimator,
                                       entropy_coef=rl.entropy_coef)
        self.step_count = 0
        self.total_steps = total_steps
        self.bad_steps = 0
        eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.stop_ids = [t for t in {tokenizer.eos_token_id, eot} if isinstance(t, int) and t >= 0
                         and t != tokenizer.unk_token_id]

    # ---- rollout and reward -------------------------------------------------------------
    def _rollout(self, ids: list[str], max_input: int, round_seed: int, timing) -> list[Group]:
        recs = [self.records[i] for i in ids]
        prompts = [record_prompt_ids(r, self.tokenizer, max_tokens=max_input)[0] for r in recs]
        params = SamplingParams(max_new_tokens=self.rl.max_new_tokens, temperature=self.rl.temperature,
                                top_p=self.rl.top_p, seed=round_seed, stop_token_ids=self.stop_ids)
        self.model.eval()
        t0 = time.perf_counter()
        outs = self.generator.generate(prompts, n=self.rl.group_size, params=params)
        timing["rollout"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        groups = []
        for rec, prompt, comps in zip(recs, prompts, outs):
            texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in comps]
            scored = self.reward([RewardItem(t, rec.answers, rec.task, rec.question) for t in texts])
            correct = [s.reward for s in scored]
            rewards = list(correct)
            if self.rl.overlong_buffer:
                lengths = torch.tensor([len(c.token_ids) for c in comps])
                pen = overlong_penalty(lengths, self.rl.max_new_tokens, self.rl.overlong_buffer,
                                       self.rl.overlong_factor)
                rewards = [r + p for r, p in zip(rewards, pen.tolist())]
            groups.append(Group(rec, prompt, comps, rewards, correct))
        timing["reward"] += time.perf_counter() - t0
        return groups

    # ---- the step -----------------------------------------------------------------------
    def step(self, sampler, max_input: int) -> dict:
        started = time.perf_counter()
        timing = defaultdict(float)
        dyn = DynamicSampler(target_groups=self.rl.batch_prompts,
                             max_rounds=self.rl.max_rounds if self.rl.dynamic_sampling else 1,
                             on_shortfall=self.rl.on_shortfall)
        seen: list[Group] = []
        rollout_tokens = 0
        drawn: list[str] = []
        while dyn.need_more():
            ids = sampler.sample(dyn.missing() if dyn.rounds else self.rl.batch_prompts)
            drawn += ids
            groups = self._rollout(ids, max_input, self.cfg.seed * 100_003 + self.step_count * 97 + dyn.rounds, timing)
            rollout_tokens += sum(len(c.token_ids) for g in groups for c in g.completions)
            seen += groups
            if self.rl.dynamic_sampling:
                dyn.add(groups, values=lambda g: g.rewards)
            else:
                dyn.kept += groups
                dyn.rounds += 1
        batch = dyn.finish()
        for g in seen:  # every rollout informs the curriculum, kept or not
            sampler.tracker.update(g.record.id, g.correct)
        row = {"stage": "rl", "step": self.step_count + 1, **dyn.metrics(), "time/rollout": timing["rollout"],
               "time/reward": timing["reward"],
               "rollout_tokens_per_s": rollout_tokens / max(timing["rollout"], 1e-9), "examples": drawn}
        row.update(self._batch_metrics(seen))
        if batch:
            row.update(self._update(batch, timing))
        self.step_count += 1
        row["time/step"] = time.perf_counter() - started
        row.update(efficiency(self.model, row.get("update_tokens", 0), timing["update"], self.cfg.peak_tflops))
        return row

    def _batch_metrics(self, groups: list[Group]) -> dict:
        rows = [(g.record.data_source, r, c, len(comp.token_ids), comp.finish_reason)
                for g in groups for r, c, comp in zip(g.rewards, g.correct, g.completions)]
        out = {"reward/mean": sum(r[1] for r in rows) / len(rows), "accuracy": sum(r[2] for r in rows) / len(rows),
               "response/mean_len": sum(r[3] for r in rows) / len(rows),
               "response/max_len": max(r[3] for r in rows),
               "response/truncated": sum(r[4] == "length" for r in rows) / len(rows)}
        by_source = defaultdict(list)
        for src, _, c, _, _ in rows:
            by_source[src].append(c)
        out.update({f"accuracy/{s}": sum(v) / len(v) for s, v in by_source.items()})
        return out

    def _sequences(self, batch: list[Group]):
        rewards = torch.tensor([r for g in batch for r in g.rewards])
        group_ids = torch.tensor([i for i, g in enumerate(batch) for _ in g.rewards])
        adv = grpo_advantages(rewards, group_ids, scale=self.rl.advantage_scale).tolist()
        seqs, seq_adv, k = [], [], 0
        for g in batch:
            for comp in g.completions:
                flags = [0] * len(g.prompt) + [1] * len(comp.token_ids)
                if self.rl.overlong_filter and comp.finish_reason == "length":
                    flags = [0] * len(flags)
                seqs.append((g.prompt + comp.token_ids, flags))
                seq_adv.append(adv[k])
                k += 1
        return seqs, seq_adv

    def _update(self, batch: list[Group], timing) -> dict:
        model, weight = self.model, self.model.lm_head_weight
        device = weight.device
        seqs, seq_adv = self._sequences(batch)
        n_seq = len(seqs)
        global_tokens = sum(sum(f[1:]) for _, f in seqs)
        # mini-batches of whole groups; several of them make the later updates off-policy
        per_mini = math.ceil(len(batch) / self.rl.mini_batches) * self.rl.group_size
        minis = [list(range(i, min(i + per_mini, n_seq))) for i in range(0, n_seq, per_mini)]
        old = None
        if len(minis) > 1:
            t0 = time.perf_counter()
            old = self._old_logprobs(seqs)
            timing["old_logprob"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        stats_sum, n_stats, losses, norms = defaultdict(float), 0, [], []
        model.train()
        for mini in minis:
            mini_tokens = sum(sum(seqs[i][1][1:]) for i in mini) if len(minis) > 1 else global_tokens
            mini_seqs = len(mini)
            loss_total = 0.0
            for part in budget_batches([len(seqs[i][0]) for i in mini], self.cfg.token_budget):
                idx = [mini[j] for j in part]
                packed = pack([seqs[i] for i in idx]).to(device)
                rows = packed.loss_rows
                if rows.numel() == 0:
                    continue
                w = aggregation_weights(packed.loss_mask, packed.seq_index, self.rl.aggregation,
                                        global_tokens=mini_tokens, global_seqs=mini_seqs,
                                        norm_len=self.rl.max_new_tokens)
                adv_tok = torch.tensor([seq_adv[i] for i in idx], device=device)[packed.seq_index]
                old_tok = None
                if old is not None:
                    old_tok = torch.cat([old[i] for i in idx]).to(device)
                hidden = model(packed.input_ids, packed.cu_seqlens)
                loss, stats = linear_grpo_loss(hidden[rows], weight, packed.targets[rows],
                                               advantages=adv_tok[rows], token_weight=w[rows],
                                               old_logprob=None if old_tok is None else old_tok[rows],
                                               cfg=self.loss_cfg)
                loss.backward()
                loss_total += loss.item()
                for key, val in stats.items():
                    stats_sum[key] += float(val)
                n_stats += 1
            lr = lr_at(self.step_count, self.cfg, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            params = [p for p in model.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or float("inf"))) if params else 0.0
            if not (math.isfinite(loss_total) and math.isfinite(norm)):
                self.optimizer.zero_grad(set_to_none=True)
                self.bad_steps += 1
                if self.bad_steps >= self.cfg.max_bad_steps:
                    raise TrainingStopped(f"{self.bad_steps} non-finite losses in a row; lower train.lr")
                continue
            self.bad_steps = 0
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss_total)
            norms.append(norm)
        timing["update"] += time.perf_counter() - t0
        out = {"loss": sum(losses) / max(len(losses), 1), "grad_norm": sum(norms) / max(len(norms), 1),
               "lr": lr_at(self.step_count, self.cfg, self.total_steps), "time/update": timing["update"],
               "time/old_logprob": timing["old_logprob"],
               "update_tokens": sum(len(s[0]) for s in seqs) * (2 if old is not None else 1),
               "update_tokens_per_s": sum(len(s[0]) for s in seqs) / max(timing["update"], 1e-9)}
        out.update({f"policy/{k}": v / max(n_stats, 1) for k, v in stats_sum.items() if k != "tokens"})
        return out

    @torch.no_grad()
    def _old_logprobs(self, seqs) -> list[torch.Tensor]:
        """Per sequence, the log-prob of each next token under the weights before any update."""
        model, weight = self.model, self.model.lm_head_weight
        out = []
        for part in budget_batches([len(s[0]) for s in seqs], self.cfg.token_budget):
            packed = pack([seqs[i] for i in part]).to(weight.device)
            logp, _ = linear_logprob(model(packed.input_ids, packed.cu_seqlens), weight, packed.targets,
                                     temperature=self.rl.temperature)
            bounds = packed.cu_seqlens.tolist()
            out += [logp[a:b].cpu() for a, b in zip(bounds[:-1], bounds[1:])]
        return out

    def state_dict(self) -> dict:
        return {"step": self.step_count, "bad_steps": self.bad_steps}

    def load_state_dict(self, state: dict, optimizer_state: dict | None = None) -> None:
        self.step_count, self.bad_steps = int(state["step"]), int(state.get("bad_steps", 0))
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
