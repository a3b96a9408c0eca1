"""One GRPO / DAPO step, as DESIGN.md's data path:

curriculum sampler -> rollout (G samples per prompt, the prompt prefilled once) -> hybrid
reward max(rule, judge) (+ overlong shaping) -> dynamic sampling on accuracy (drop groups
whose samples all score the same, generate more) -> group-relative advantages (+ AEPO) ->
packed token-budget micro-batches -> old and reference log-probs over response tokens
(fused, no grad; old ones only when a batch is split into several optimizer steps,
reference ones only when rl.kl_coef > 0) -> fused GRPO loss with the batch's global
normalisation -> optimizer step(s) -> per-example difficulty.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from kernels import GRPOLossConfig, aggregation_weights, linear_grpo_loss, linear_logprob

from ..config import DataConfig, KernelsConfig, RLConfig, RolloutConfig, TrainConfig
from ..data.lengths import record_prompt_ids
from ..data.packing import budget_batches, group_batches, pack, pack_groups
from ..data.template import resolve_think
from ..model.attention import GroupAttention, VarlenAttention, resolve_backend
from ..rewards import HybridReward, RewardItem
from ..rewards.judge import merge_reward_metrics
from ..rl import AEPOController, DynamicSampler, grpo_advantages, overlong_penalty
from ..rollout import Generator, SamplingParams
from .loop import OptimizerStep, kernel_args
from .metrics import efficiency, reset_peak_memory
from .optim import make_optimizer


@dataclass
class _Micro:
    """One micro-batch through the model: the forward's inputs and its loss rows."""
    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None  # the repeated layout's sequences
    position_ids: torch.Tensor | None  # the group layout's positions (responses continue from P)
    attn: object | None  # the group layout's attention context
    rows: torch.Tensor  # [N] loss rows (positions in input_ids; the group layout may repeat one)
    targets: torch.Tensor  # [N]
    samples: torch.Tensor  # [N] the sample (numbered over the batch) each row belongs to
    within: torch.Tensor  # [N] which of its sample's response tokens each row predicts (0, 1, ...)


def rollout_copy(model, precision):
    """A frozen copy of (unsharded) `model` in the compute dtype, for the rollout to generate
    with; GRPOTrainer refreshes its weights once per step."""
    from ..model.model import fuse_projections
    # q / k / v and gate / up stacked: one product each in the rollout's decode steps on a GPU
    return fuse_projections(copy.deepcopy(model).requires_grad_(False).eval().to(precision.compute or torch.float32))


def reference_copy(model, precision, sharded: bool = False):
    """`model` (fp32 weights, as the policy starts RL) turned in place into the frozen KL
    reference: a model that computes the policy's start-of-RL log-probs exactly, in the least
    memory. fp32 compute: as is. bf16-mixed in one process (fp32 weights run under autocast):
    each linear layer's weights in bf16, the values autocast rounds them to anyway; embeddings
    and norms stay fp32, as the policy's do. bf16-mixed under FSDP2 (whose policy casts every
    gathered weight to bf16): every weight in bf16."""
    from torch import nn
    model.requires_grad_(False).eval()
    compute = precision.compute
    if compute is not None:
        if sharded:
            model.to(compute)
        else:
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    module.to(compute)
    model.set_activation_checkpointing(False)
    return model


@dataclass
class Group:
    record: object
    prompt: list[int]
    completions: list  # rollout Completions
    rewards: list[float]  # what the advantages see: accuracy + overlong shaping
    correct: list[float]  # the unshaped score (max(rule, judge); 1 = solved): what DAPO filters on


class GRPOTrainer:
    def __init__(self, model, tokenizer, records, rl: RLConfig, train: TrainConfig, *,
                 reward: HybridReward | None = None, total_steps: int = 1, data: DataConfig | None = None,
                 rollout: RolloutConfig | None = None, kernels: KernelsConfig | None = None, ref_model=None,
                 parallel=None, rollout_model=None, precision=None):
        """ref_model: the frozen reference policy when rl.kl_coef > 0 (default: a copy of
        `model` as it is now, the start of RL); with kl_coef = 0 there is none.

        parallel: engine.parallel.Parallel when the run has several ranks; `model` is then
        sharded (engine.parallel.parallelize) and `rollout_model` is an unsharded copy of it
        that generates: its weights are gathered from the shards once per step, before the
        step's rollouts. Every rank generates for its share of each round's prompts; the
        groups are gathered, so every rank sees the whole batch (exact group statistics) and
        updates on its data-parallel share of the groups, each group row sharded over the
        sequence-parallel ranks.

        precision: engine.train.loop.Precision (default fp32). With a bf16 compute dtype the
        update runs under it and a bf16 copy of the weights (made here unless rollout_model
        is given) generates, refreshed from the fp32 master weights once per step."""
        from .loop import Precision
        if parallel is not None and rollout_model is None:
            raise ValueError("GRPOTrainer(parallel=...): give rollout_model, an unsharded copy of the model")
        self.model, self.tokenizer = model, tokenizer
        self.parallel = parallel
        self.precision = precision or Precision(None, model.lm_head_weight.device.type)
        if rollout_model is None and self.precision.compute is not None:
            rollout_model = rollout_copy(model, self.precision)
        self.rollout_model = rollout_model
        self.records = {r.id: r for r in records}
        if rl.lr:
            train = dataclasses.replace(train, lr=rl.lr)
        self.rl, self.cfg = rl, train
        self.data = data or DataConfig()
        self.think = resolve_think(rl.think, tokenizer, self.data.chat_template)
        self.reward = reward or HybridReward(think=self.think)
        self.optimizer = make_optimizer(model, train)
        self.opt_step = OptimizerStep(model, self.optimizer, train)
        self.generator = Generator(rollout_model if rollout_model is not None else model, tokenizer,
                                   (rollout or RolloutConfig()).cache_config())
        self.loss_cfg = GRPOLossConfig(temperature=rl.temperature, clip_low=rl.clip_low, clip_high=rl.clip_high,
                                       clip_c=rl.clip_c, kl_coef=rl.kl_coef, kl_estimator=rl.kl_estimator,
                                       entropy_coef=rl.entropy_coef, tis_cap=rl.tis_cap or None)
        self.kernel_args = kernel_args(kernels, model.lm_head_weight, self.precision)
        self.aepo = AEPOController(rl.aepo_high, rl.aepo_low) if rl.aepo_high > 0 else None
        self.ref_model = None
        if rl.kl_coef > 0:
            self.ref_model = ref_model if ref_model is not None else self._frozen_copy(rl.ref_device)
        self.step_count = 0
        self.total_steps = total_steps

    def _frozen_copy(self, where: str):
        """The reference policy: the weights as they are now (the start of RL), frozen (under
        several ranks: of the unsharded copy)."""
        # under several ranks the unsharded copy: its weights are in the compute dtype, FSDP2's policy's
        ref = reference_copy(copy.deepcopy(self.model if self.parallel is None else self.rollout_model),
                             self.precision, sharded=self.parallel is not None)
        return ref.to("cpu") if where == "cpu" else ref

    @property
    def bad_steps(self) -> int:
        return self.opt_step.bad_steps

    # ---- rollout and reward -------------------------------------------------------------
    def _rollout(self, ids: list[str], max_input: int, round_seed: int, timing) -> list[Group]:
        """Generate and score G samples for each prompt of `ids`. Prompt i of the round draws
        from its own seed (round seed, i), so a sample does not depend on which rank made
        it or on what else was in its batch; under several ranks each generates and scores
        prompts i = rank, rank + world, ... and every rank receives every group."""
        par = self.parallel
        mine = list(range(len(ids))) if par is None else list(range(par.rank, len(ids), par.world))
        recs = [self.records[ids[i]] for i in mine]
        prompts = [record_prompt_ids(r, self.tokenizer, template=self.data.template, max_tokens=max_input,
                                     chat=self.data.chat_template)[0] for r in recs]
        params = [SamplingParams(max_new_tokens=self.rl.max_new_tokens, temperature=self.rl.temperature,
                                 top_p=self.rl.top_p, seed=round_seed * 1_000_033 + i)  # stops: the model's own
                  for i in mine]
        self.generator.model.eval()
        t0 = time.perf_counter()
        outs = self.generator.generate(prompts, n=self.rl.group_size, params=params) if prompts else []
        timing["rollout"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        items = [RewardItem(self.tokenizer.decode(c.token_ids, skip_special_tokens=True), rec.answers, rec.task,
                            rec.question) for rec, comps in zip(recs, outs) for c in comps]
        scored = self.reward(items) if items else []  # one call: the judge sees the whole batch at once
        g = self.rl.group_size
        groups = []
        for k, (rec, prompt, comps) in enumerate(zip(recs, prompts, outs)):
            correct = [s.reward for s in scored[k * g:(k + 1) * g]]
            rewards = list(correct)
            if self.rl.overlong_buffer:
                lengths = torch.tensor([len(c.token_ids) for c in comps])
                pen = overlong_penalty(lengths, self.rl.max_new_tokens, self.rl.overlong_buffer,
                                       self.rl.overlong_factor)
                rewards = [r + p for r, p in zip(rewards, pen.tolist())]
            groups.append(Group(rec, prompt, comps, rewards, correct))
        timing["reward"] += time.perf_counter() - t0
        if par is not None:
            groups = self._gather_groups(groups, mine, len(ids))
        return groups

    def _gather_groups(self, groups: list[Group], mine: list[int], n: int) -> list[Group]:
        """Every rank's groups, in prompt order, on every rank (records travel by id)."""
        parts = self.parallel.gather([(i, g.record.id, g.prompt, g.completions, g.rewards, g.correct)
                                      for i, g in zip(mine, groups)])
        by_index = {i: Group(self.records[rid], prompt, comps, rewards, correct)
                    for part in parts for i, rid, prompt, comps, rewards, correct in part}
        return [by_index[i] for i in range(n)]

    def _collect(self, sampler, max_input: int, timing) -> tuple[list[Group], list[Group], DynamicSampler, dict]:
        """Generation batches until dynamic sampling has its train batch (or its rounds run out)."""
        rl = self.rl
        dyn = DynamicSampler(target_groups=rl.batch_prompts, max_rounds=rl.max_rounds if rl.dynamic_sampling else 1,
                             on_shortfall="error" if rl.on_shortfall == "error" else "log")
        per_round = rl.batch_prompts * (rl.oversample if rl.dynamic_sampling else 1)
        seen: list[Group] = []
        mix = defaultdict(int)
        while dyn.need_more():
            ids = sampler.sample(per_round)
            for key, n in getattr(sampler, "last_mix", {}).items():
                mix[key] += n
            seed = self.cfg.seed * 100_003 + self.step_count * 97 + dyn.rounds
            groups = self._rollout(ids, max_input, seed, timing)
            seen += groups
            if rl.dynamic_sampling:
                dyn.add(groups, values=lambda g: g.correct)  # DAPO filters on accuracy, not the shaped reward
            else:
                dyn.kept += groups
                dyn.rounds += 1
        return dyn.finish(), seen, dyn, dict(mix)

    # ---- the step -----------------------------------------------------------------------
    def step(self, sampler, max_input: int) -> dict:
        started = time.perf_counter()
        timing = defaultdict(float)
        reset_peak_memory()
        if self.rollout_model is not None:
            t0 = time.perf_counter()
            self._sync_rollout_weights()
            timing["weight_sync"] = time.perf_counter() - t0
        batch, seen, dyn, mix = self._collect(sampler, max_input, timing)
        for g in seen:  # every rollout informs the curriculum, kept or not
            sampler.tracker.update(g.record.id, g.correct)
        rollout_tokens = sum(len(c.token_ids) for g in seen for c in g.completions)
        row = {"stage": "rl", "step": self.step_count + 1, **dyn.metrics(), "time/rollout": timing["rollout"],
               "time/reward": timing["reward"],
               **({"time/weight_sync": timing["weight_sync"]} if self.rollout_model is not None else {}),
               "rollout_tokens_per_s": rollout_tokens / max(timing["rollout"], 1e-9),
               "examples": [g.record.id for g in seen], **{f"curriculum/{k}": v for k, v in mix.items()}}
        row.update(self._batch_metrics(seen))
        if hasattr(self.reward, "metrics"):
            metrics = self.reward.metrics()  # this rank's prompts' rewards: every rank's, under several
            row.update(metrics if self.parallel is None else merge_reward_metrics(self.parallel.gather(metrics)))
        if len(batch) < self.rl.batch_prompts and self.rl.on_shortfall == "skip":
            row["dynamic/skipped_update"] = 1
            batch = []
        if batch:
            row.update(self._update(batch, timing))
        self.step_count += 1
        row["time/step"] = time.perf_counter() - started
        work = row.pop("_work", (0, 0))  # (tokens forward + backward, tokens forward only)
        row.update(efficiency(self.model, timing["update"] + timing["old_logprob"] + timing["ref_logprob"],
                              self.cfg.peak_tflops, train_tokens=work[0], forward_tokens=work[1],
                              devices=1 if self.parallel is None else self.parallel.world))
        return row

    def _sync_rollout_weights(self) -> None:
        """The current weights into the rollout copy, cast to its dtype; under several ranks
        gathered from the shards (a collective: every rank calls it)."""
        if self.parallel is None:
            self.rollout_model.load_state_dict(self.model.state_dict())
            return
        from ..parallel.fsdp import full_model_state
        self.rollout_model.load_state_dict(full_model_state(self.model))

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

    def _advantages(self, batch: list[Group]) -> tuple[list[float], list[bool], dict]:
        """-> (advantage per sample, whether the sample enters the loss (AEPO), metrics)."""
        rewards = torch.tensor([r for g in batch for r in g.rewards])
        group_ids = torch.tensor([i for i, g in enumerate(batch) for _ in g.rewards])
        tasks = {t: i for i, t in enumerate(sorted({g.record.task for g in batch}))}
        task_ids = torch.tensor([tasks[g.record.task] for g in batch for _ in g.rewards])
        adv = grpo_advantages(rewards, group_ids, scale=self.rl.advantage_scale, task_ids=task_ids)
        keep = torch.ones_like(adv, dtype=torch.bool)
        info = {}
        if self.aepo is not None:
            # the rollout's own entropy estimate: mean −log π_behaviour over the sampled tokens
            logps = [lp for g in batch for c in g.completions for lp in c.logprobs]
            entropy = -sum(logps) / max(len(logps), 1)
            self.aepo.update(entropy)
            keep = self.aepo.sample_mask(adv)
            info = {"aepo/entropy": entropy, "aepo/dropping": int(self.aepo.dropping),
                    "aepo/dropped_samples": int((~keep).sum())}
        return adv.tolist(), keep.tolist(), info

    def _samples(self, batch: list[Group]):
        """-> (samples [(group index, completion)] numbered over the batch, advantage and
        whether each enters the loss, metrics). Overlong-filtered and AEPO-dropped samples
        stay numbered (they count in seq-mean normalisation) but get no loss rows."""
        adv, keep, info = self._advantages(batch)
        samples = [(gi, comp) for gi, g in enumerate(batch) for comp in g.completions]
        in_loss = [keep[k] and not (self.rl.overlong_filter and comp.finish_reason == "length")
                   for k, (_, comp) in enumerate(samples)]
        return samples, adv, in_loss, info

    def _micro_batches(self, model, batch: list[Group], samples, chosen: list[int]) -> list[_Micro]:
        """Token-budget micro-batches for `model` over the samples `chosen` (whole groups, in
        order), in the layout rl.shared_prefix picks; only loss samples go through the model.
        Under sequence parallelism each micro-batch is this rank's share of it."""
        device = model.lm_head_weight.device
        # the policy's attention backend for every model (policy, old, reference): a bf16 reference
        # on flash-attn against an fp32 policy on SDPA would compute another function
        w = self.model.lm_head_weight
        backend = resolve_backend(getattr(self.model, "attn_backend", "auto"), device, w.dtype)
        budget = self.cfg.token_budget
        micros = []
        if self.rl.shared_prefix:
            by_group: dict[int, list[int]] = defaultdict(list)
            for k in chosen:
                by_group[samples[k][0]].append(k)
            order = list(by_group)
            prompts = [batch[gi].prompt for gi in order]
            lens = [[len(samples[k][1].token_ids) for k in by_group[gi]] for gi in order]
            for part in group_batches([len(p) for p in prompts], lens, budget):
                gr = pack_groups([(prompts[j], [(by_group[order[j]][i], samples[by_group[order[j]][i]][1].token_ids)
                                                for i in resp]) for j, resp in part])
                if self._sp > 1:
                    micros.append(self._sp_micro(gr.input_ids, gr.position_ids, gr.layout, None, gr.rows,
                                                 gr.targets, gr.seq_index, device))
                    continue
                gr = gr.to(device)
                micros.append(_Micro(gr.input_ids, None, gr.position_ids, GroupAttention(gr.layout, backend),
                                     gr.rows, gr.targets, gr.seq_index, _within(gr.seq_index)))
            return micros
        seqs = [(batch[samples[k][0]].prompt + samples[k][1].token_ids,
                 [0] * len(batch[samples[k][0]].prompt) + [1] * len(samples[k][1].token_ids)) for k in chosen]
        for part in budget_batches([len(s[0]) for s in seqs], budget):
            packed = pack([seqs[j] for j in part])
            rows = packed.loss_rows
            owner = torch.tensor([chosen[j] for j in part])[packed.seq_index[rows]]
            if self._sp > 1:
                micros.append(self._sp_micro(packed.input_ids, None, None, packed.cu_seqlens, rows,
                                             packed.targets[rows], owner, device))
                continue
            packed = packed.to(device)
            rows = rows.to(device)
            micros.append(_Micro(packed.input_ids, packed.cu_seqlens, None, VarlenAttention(packed.cu_seqlens, backend),
                                 rows, packed.targets[rows], owner.to(device), _within(owner).to(device)))
        return micros

    @property
    def _sp(self) -> int:
        return 1 if self.parallel is None else self.parallel.sp

    def _sp_micro(self, input_ids, position_ids, layout, cu_seqlens, rows, targets, samples, device) -> _Micro:
        """This rank's share of one micro-batch under sequence parallelism: each sequence (a
        group row [P | R1 … RG], or a prompt + response) padded and spread in the zigzag
        layout, attention by the ring (a group row's responses see the prompt and themselves
        only: segment ids), the loss rows that fall on this rank, in their order."""
        from ..model.attention import RingAttention
        from ..parallel import SequenceShard

        par = self.parallel
        if layout is not None:
            lengths = [p + sum(resp) for _, p, resp in layout]
            seg = torch.cat([torch.cat([torch.zeros(p, dtype=torch.long)]
                                       + [torch.full((n,), i + 1, dtype=torch.long) for i, n in enumerate(resp)])
                             for _, p, resp in layout])
        else:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            seg = None
        shard = SequenceShard(lengths, par.sp, par.sp_rank)
        within = _within(samples)
        local_of = torch.full((sum(shard.padded),), -1, dtype=torch.long)
        local_of[shard.index] = torch.arange(shard.local_tokens)
        local = local_of[shard.real_index[rows]]
        keep = local >= 0
        positions = shard.take(position_ids) if position_ids is not None else shard.positions
        segments = None if seg is None else shard.pad(seg, fill=1 << 30).to(device)
        attn = RingAttention(shard.padded, group=par.sp_group, segments=segments)
        return _Micro(shard.take(input_ids).to(device), None, positions.to(device), attn, local[keep].to(device),
                      targets[keep].to(device), samples[keep].to(device), within[keep].to(device))

    def _empty_micro(self, device) -> _Micro:
        """A micro-batch with no loss rows: a rank with fewer micro-batches than the others runs
        these, so every rank makes the same FSDP (and ring) collectives."""
        empty = torch.zeros(0, dtype=torch.long)
        if self._sp > 1:
            n = 2 * self._sp
            return self._sp_micro(torch.zeros(n, dtype=torch.long), None, None, torch.tensor([0, n]), empty, empty,
                                  empty, device)
        return _Micro(torch.zeros(2, dtype=torch.long, device=device), torch.tensor([0, 2], device=device), None, None,
                      empty.to(device), empty.to(device), empty.to(device), empty.to(device))

    def _my_micro_batches(self, model, batch, samples, chosen: list[int]) -> list[_Micro]:
        """This rank's micro-batches over `chosen`: its data-parallel share of the groups (group
        gi on dp rank gi mod dp), padded with empty ones to the most any rank has."""
        par = self.parallel
        if par is None:
            return self._micro_batches(model, batch, samples, chosen)
        mine = [k for k in chosen if samples[k][0] % par.dp == par.dp_rank]
        micros = self._micro_batches(model, batch, samples, mine) if mine else []
        most = par.max(len(micros))
        device = model.lm_head_weight.device
        return micros + [self._empty_micro(device) for _ in range(most - len(micros))]

    def _update(self, batch: list[Group], timing) -> dict:
        model = self.model
        device = model.lm_head_weight.device
        par = self.parallel
        samples, seq_adv, in_loss, out = self._samples(batch)
        n_samples = len(samples)
        loss_samples = [k for k in range(n_samples) if in_loss[k]]
        n_tokens = [len(comp.token_ids) if in_loss[k] else 0 for k, (_, comp) in enumerate(samples)]
        global_tokens = sum(n_tokens)
        # rl.mini_batches of whole groups, as equal as the groups allow (fewer only when there are
        # fewer groups); several of them make the later updates off-policy
        minis = [[k for k, (gi, _) in enumerate(samples) if a <= gi < b]  # groups may differ in size
                 for a, b in mini_batch_bounds(len(batch), self.rl.mini_batches)]
        old = ref = None
        if len(minis) > 1:
            t0 = time.perf_counter()
            old = self._response_logprobs(self.model, batch, samples, loss_samples)
            timing["old_logprob"] += time.perf_counter() - t0
        if self.ref_model is not None:
            t0 = time.perf_counter()
            ref = self._reference_logprobs(batch, samples, loss_samples, device)
            timing["ref_logprob"] += time.perf_counter() - t0
        behaviour = _Table(samples, loss_samples, device)
        behaviour.flat.copy_(torch.tensor([lp for k in loss_samples for lp in samples[k][1].logprobs]))
        adv_all = torch.tensor(seq_adv, device=device)
        seq_tokens = torch.tensor(n_tokens, dtype=torch.float64)  # whole responses: under SP a rank holds a part
        t0 = time.perf_counter()
        stats_sum, stats_max, n_stats, losses, norms, through = defaultdict(float), {}, 0, [], [], 0
        model.train()
        for mini in minis:
            mini_tokens = sum(n_tokens[k] for k in mini) if len(minis) > 1 else global_tokens
            loss_total = 0.0
            for m in self._my_micro_batches(model, batch, samples, [k for k in mini if in_loss[k]]):
                if m.rows.numel() == 0 and par is None:
                    continue
                w = aggregation_weights(torch.ones_like(m.rows, dtype=torch.float32), m.samples, self.rl.aggregation,
                                        global_tokens=mini_tokens, global_seqs=len(mini),
                                        norm_len=self.rl.max_new_tokens, seq_tokens=seq_tokens)
                with self.precision.autocast():
                    hidden = model(m.input_ids, m.cu_seqlens, position_ids=m.position_ids, attn=m.attn)
                through += m.input_ids.numel()
                weight = model.lm_head_weight  # after the forward: under FSDP2 the root's weights are gathered now
                if m.rows.numel() == 0:  # no loss rows here: a backward all the same, through every
                    (0.0 * hidden.sum() + 0.0 * weight.sum()).backward()  # parameter (FSDP's collectives)
                    continue
                cast = self.precision.cast
                loss, stats = linear_grpo_loss(
                    cast(hidden[m.rows]), cast(weight), m.targets, advantages=adv_all[m.samples], token_weight=w,
                    old_logprob=None if old is None else old.at(m), ref_logprob=None if ref is None else ref.at(m),
                    behaviour_logprob=behaviour.at(m), cfg=self.loss_cfg, **self.kernel_args)
                loss.backward()
                loss_total += loss.item()
                tokens = float(stats["tokens"])  # the stats are means over this micro-batch's loss tokens
                for key, val in stats.items():
                    if key.startswith("max_"):
                        stats_max[key] = max(stats_max.get(key, float("-inf")), float(val))
                    elif key != "tokens":
                        stats_sum[key] += float(val) * tokens
                n_stats += tokens
            if par is not None:
                loss_total = par.sum(loss_total)
            result = self.opt_step(self.step_count, self.total_steps, loss_total)
            if not result["skipped"]:
                losses.append(loss_total)
                norms.append(result["grad_norm"])
        timing["update"] += time.perf_counter() - t0
        if par is not None:  # figures over every rank (each rank's rows are a disjoint share; a rank
            parts = par.gather((through, n_stats, dict(stats_sum), stats_max))  # with only empty ones has no stats)
            through, n_stats = sum(p[0] for p in parts), sum(p[1] for p in parts)
            stats_sum, stats_max = defaultdict(float), {}
            for _, _, sums, maxes in parts:
                for key, val in sums.items():
                    stats_sum[key] += val
                for key, val in maxes.items():
                    stats_max[key] = max(stats_max.get(key, float("-inf")), val)
        repeated = sum(len(batch[samples[k][0]].prompt) + len(samples[k][1].token_ids) for k in loss_samples)
        passes = 1 + (old is not None) + (ref is not None)
        out.update({"loss": sum(losses) / max(len(losses), 1), "grad_norm": sum(norms) / max(len(norms), 1),
                    "lr": result["lr"], "time/update": timing["update"], "time/old_logprob": timing["old_logprob"],
                    "time/ref_logprob": timing["ref_logprob"], "update_tokens": through * passes,
                    "update_tokens_per_s": through / max(timing["update"], 1e-9),
                    "update/shared_prefix_saving": repeated / max(through, 1),
                    "_work": (through, through * (passes - 1))})
        renamed = {"mismatch_abs": "mismatch/mean_abs", "max_mismatch_abs": "mismatch/max_abs",
                   "mismatch_over": "mismatch/over_0.1", "tis_weight": "tis/mean_weight", "tis_capped": "tis/capped"}
        stats_mean = {k: v / max(n_stats, 1) for k, v in stats_sum.items()}  # token means over the batch
        for key, val in {**stats_mean, **stats_max}.items():
            out[renamed.get(key, f"policy/{key}")] = val
        return out

    def _reference_logprobs(self, batch, samples, chosen, device) -> "_Table":
        """The reference's log-probs (_response_logprobs). A reference kept elsewhere (rl.ref_device =
        "cpu": host memory between steps) is brought to the training device for the pass and sent
        back after it, so its table and its compute are on the policy's device."""
        ref = self.ref_model
        if ref.lm_head_weight.device == device:
            return self._response_logprobs(ref, batch, samples, chosen)
        params = list(ref.parameters())  # frozen: the host copies stay; device copies for the pass only
        host = [p.data for p in params]
        try:
            for p, h in zip(params, host):
                p.data = h.to(device, non_blocking=True)
            return self._response_logprobs(ref, batch, samples, chosen)
        finally:
            for p, h in zip(params, host):
                p.data = h

    @torch.no_grad()
    def _response_logprobs(self, model, batch, samples, chosen) -> "_Table":
        """Per loss sample, the log-prob of each response token under `model` (under several
        ranks: the entries of the rows this rank holds; the rest stay 0), over loss rows only
        (the lm_head never sees a prompt row), in the update's layout."""
        out = _Table(samples, chosen, model.lm_head_weight.device)
        cast = self.precision.cast
        for m in self._my_micro_batches(model, batch, samples, chosen):
            with self.precision.autocast():
                hidden = model(m.input_ids, m.cu_seqlens, position_ids=m.position_ids, attn=m.attn)
            if m.rows.numel() == 0:
                continue
            logp, _ = linear_logprob(cast(hidden[m.rows]), cast(model.lm_head_weight), m.targets,
                                     temperature=self.rl.temperature, **self.kernel_args)
            out.put(m, logp)
        return out

    def state_dict(self) -> dict:
        state = {"step": self.step_count, "bad_steps": self.bad_steps}
        if self.aepo is not None:
            state["aepo"] = self.aepo.state_dict()
        if hasattr(self.reward, "state_dict"):
            state["reward"] = self.reward.state_dict()
        return state

    def eval_model(self):
        """The model to evaluate now: the trained one, or (several ranks, bf16 compute) the copy
        that generates, with the current weights (under several ranks a collective: every rank
        calls it)."""
        if self.rollout_model is None:
            return self.model
        self._sync_rollout_weights()
        return self.rollout_model

    def load_state_dict(self, state: dict, optimizer_state: dict | None = None) -> None:
        """optimizer_state as a checkpoint holds it, written by one process or by several."""
        from .checkpoint import load_optimizer_state
        self.step_count, self.opt_step.bad_steps = int(state["step"]), int(state.get("bad_steps", 0))
        if self.aepo is not None and "aepo" in state:
            self.aepo.load_state_dict(state["aepo"])
        if "reward" in state and hasattr(self.reward, "load_state_dict"):
            self.reward.load_state_dict(state["reward"])
        if optimizer_state is not None:
            load_optimizer_state(self.model, self.optimizer, optimizer_state, self.parallel)


def _within(samples: torch.Tensor) -> torch.Tensor:
    """For loss rows grouped by sample (each sample's rows contiguous, in order): each row's
    index within its sample."""
    if samples.numel() == 0:
        return samples.clone()
    starts = torch.ones_like(samples, dtype=torch.bool)
    starts[1:] = samples[1:] != samples[:-1]
    first = torch.cummax(torch.where(starts, torch.arange(len(samples), device=samples.device), 0), 0).values
    return torch.arange(len(samples), device=samples.device) - first


def mini_batch_bounds(groups: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) group ranges of `parts` mini-batches (at most one per group) whose sizes differ
    by at most one: 5 groups in 4 -> 2, 1, 1, 1."""
    if groups <= 0:
        return []
    parts = max(1, min(parts, groups))
    size, extra = divmod(groups, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


class _Table:
    """A value per response token of each sample in `chosen` (old, reference or behaviour
    log-probs), one flat tensor on `device`; read and written at a micro-batch's loss rows
    by (sample, index within the sample)."""

    def __init__(self, samples, chosen: list[int], device):
        sizes = torch.tensor([len(samples[k][1].token_ids) for k in chosen], dtype=torch.long)
        self.offset = torch.zeros(len(samples), dtype=torch.long)
        if chosen:
            self.offset[torch.tensor(chosen)] = torch.cumsum(sizes, 0) - sizes
        self.offset = self.offset.to(device)
        self.flat = torch.zeros(int(sizes.sum()), device=device)

    def _index(self, m: _Micro) -> torch.Tensor:
        return self.offset[m.samples] + m.within

    def at(self, m: _Micro) -> torch.Tensor:
        return self.flat[self._index(m)]

    def put(self, m: _Micro, values: torch.Tensor) -> None:
        self.flat[self._index(m)] = values.to(self.flat.dtype)
