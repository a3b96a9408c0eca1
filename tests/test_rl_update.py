"""The GRPO update held to independent references: off-policy mini-batches (old log-probs,
clipping, the loss against engine.rl.policy_loss), behaviour log-probs under top-p, the
lm_head gradient of every aggregation mode, advantage scale and the dual clip against
autograd through materialised logits, token-budget micro-batches against one big batch,
the optimizer's moments across a kill and resume, a carry-over threshold that separates
solved from unsolved examples, and a train batch filled by a refill round."""
from __future__ import annotations

import copy
import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import tiny_hf_model
from test_rl_options import capture_updates as capture_batches
from test_rl_options import scripted_generate
from test_rl_train import LetterTokenizer, ToyReward, tiny_setup  # noqa: F401 (tiny_setup: a fixture)

from engine.config import DataConfig, RLConfig, TrainConfig
from engine.curriculum import PhaseSampler
from engine.data import load_records, synthetic
from engine.data.packing import pack
from engine.rewards import RewardResult
from engine.rl.policy_loss import GRPOLossConfig, policy_loss
from engine.rollout.sampling import truncate_logits
from engine.train import rl as rl_mod
from engine.train.rl import GRPOTrainer
from kernels import linear_logprob

F64 = torch.float64


# ---- helpers ---------------------------------------------------------------------------
class Scripted:
    """Accuracy by position within each reward call (one generation round): rounds[k] for the
    k-th call (the last one repeats), value j for the j-th item (cycling)."""

    def __init__(self, *rounds):
        self.rounds, self.calls = rounds, 0

    def __call__(self, items):
        values = self.rounds[min(self.calls, len(self.rounds) - 1)]
        self.calls += 1
        return [RewardResult(float(values[j % len(values)]), float(values[j % len(values)]), None, None)
                for j in range(len(items))]


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    """(checkpoint dir of a tiny 16-token Llama with an untied lm_head, 6 records)."""
    path = tmp_path_factory.mktemp("letters-update")
    tiny_hf_model("llama", vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  max_position_embeddings=1024).save_pretrained(str(path))
    return path, synthetic.generate(6, 12, seed=3, kinds=("lookup",))


def make_trainer(letters, reward, *, records=None, train=None, scripted=(2, 6, 4, 5), **rl_kw) -> GRPOTrainer:
    from engine.model import load_model

    path, recs = letters
    model, _ = load_model(path, device="cpu", dtype="float32")
    rl = RLConfig(**{"group_size": 4, "batch_prompts": 2, "max_new_tokens": 6, "temperature": 1.0,
                     "top_p": 1.0, "max_rounds": 1, **rl_kw})
    trainer = GRPOTrainer(model, LetterTokenizer(), records or recs, rl, train or TrainConfig(lr=1e-2, seed=0),
                          reward=reward, total_steps=4, data=DataConfig(template="plain"))
    assert trainer.model.lm_head is not None  # untied: the lm_head gradient is the loss's alone
    if scripted:
        trainer.generator.generate = scripted_generate(list(scripted))
    return trainer


def sampler_for(trainer, ids=None) -> PhaseSampler:
    return PhaseSampler(list(ids or trainer.records), seed=0)


def capture_loss_calls(monkeypatch) -> list[dict]:
    """Wrap the trainer's linear_grpo_loss: each call's inputs (detached copies) and outputs."""
    calls, real = [], rl_mod.linear_grpo_loss

    def wrapped(hidden, weight, targets, **kw):
        loss, stats = real(hidden, weight, targets, **kw)
        calls.append({"hidden": hidden.detach().clone(), "weight": weight.detach().clone(), "targets": targets.clone(),
                      **{k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kw.items()},
                      "loss": loss.detach().clone(), "stats": {k: v.clone() for k, v in stats.items()}})
        return loss, stats
    monkeypatch.setattr(rl_mod, "linear_grpo_loss", wrapped)
    return calls


def seqs_of(groups) -> list:
    """(prompt + response ids, loss flags on the response), built here, not by the trainer."""
    return [(g.prompt + c.token_ids, [0] * len(g.prompt) + [1] * len(c.token_ids)) for g in groups
            for c in g.completions]


def naive_logprob(model, seqs, temperature, weight=None):
    """-> (log-prob [T] in fp64 through materialised logits, owner sequence [T], targets [T])
    over the response tokens of `seqs`; `weight` (a leaf) stands in for the lm_head."""
    packed = pack(seqs)
    rows = packed.loss_rows
    with torch.no_grad():
        hidden = model(packed.input_ids, packed.cu_seqlens)[rows].to(F64)
    w = model.lm_head_weight.detach().to(F64) if weight is None else weight
    logits = hidden @ w.t() / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, packed.targets[rows, None]).squeeze(-1)
    return logp, packed.seq_index[rows], packed.targets[rows]


def reference_advantages(batch, scale: str, eps: float = 1e-6) -> list[float]:
    """GRPO advantages written out here: centred per group, divided by the group's, the
    batch's or the task's unbiased std, or by nothing."""
    rewards = [torch.tensor(g.rewards, dtype=F64) for g in batch]
    flat = torch.cat(rewards)
    out = []
    for g, r in zip(batch, rewards):
        centred = r - r.mean()
        if scale == "group":
            centred = centred / (r.std() + eps)
        elif scale == "batch":
            centred = centred / (flat.std() + eps)
        elif scale == "task":
            same = torch.cat([rr for gg, rr in zip(batch, rewards) if gg.record.task == g.record.task])
            centred = centred / (same.std() + eps)
        out += centred.tolist()
    return out


def reference_weights(owner: torch.Tensor, mode: str, norm_len: int) -> torch.Tensor:
    """Token weights of one mini-batch (every loss token of it), written out per mode."""
    n_seq = int(owner.unique().numel())
    per_seq = torch.bincount(owner).to(F64)[owner]
    return {"token-mean": torch.full_like(per_seq, 1.0 / owner.numel()),
            "seq-mean-token-mean": 1.0 / (per_seq * n_seq),
            "seq-mean-token-sum": torch.full_like(per_seq, 1.0 / n_seq),
            "seq-mean-token-sum-norm": torch.full_like(per_seq, 1.0 / (n_seq * norm_len))}[mode]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm().clamp(min=1e-30))


# ---- 1. mini-batches: the second update is off-policy ------------------------------------
def test_second_mini_batch_is_off_policy_and_matches_the_reference_loss(letters, monkeypatch):
    trainer = make_trainer(letters, Scripted([1, 0, 1, 0]), mini_batches=2, batch_prompts=2,
                           train=TrainConfig(lr=0.05, seed=0))
    start = copy.deepcopy(trainer.model)
    batches = capture_batches(trainer)
    calls = capture_loss_calls(monkeypatch)
    row = trainer.step(sampler_for(trainer), max_input=1024)
    (batch,) = batches
    assert len(batch) == 2 and len(calls) == 2  # one group per mini-batch, one micro-batch each
    cfg = GRPOLossConfig(temperature=1.0, clip_low=0.2, clip_high=0.28)
    adv = reference_advantages(batch, "group")
    for k, call in enumerate(calls):
        seqs = seqs_of(batch[k:k + 1])
        old, owner, targets = naive_logprob(start, seqs, 1.0)  # the behaviour policy: weights before the step
        assert torch.equal(call["targets"], targets)
        # old log-probs: those of the weights before the step, for every mini-batch
        assert call["old_logprob"] is not None, "several mini-batches need old log-probs"
        torch.testing.assert_close(call["old_logprob"].to(F64), old, atol=2e-5, rtol=0)
        a = torch.tensor(adv[4 * k: 4 * k + 4], dtype=F64)[owner]
        torch.testing.assert_close(call["advantages"].to(F64), a, atol=1e-5, rtol=1e-5)
        w = reference_weights(owner, "token-mean", 6)
        torch.testing.assert_close(call["token_weight"].to(F64), w, atol=1e-9, rtol=1e-6)
        logp = torch.log_softmax(call["hidden"].to(F64) @ call["weight"].to(F64).t(), -1) \
            .gather(-1, call["targets"][:, None]).squeeze(-1)
        loss, stats = policy_loss(logp, a, w, old_logprob=old, cfg=cfg)
        assert float(call["loss"]) == pytest.approx(float(loss), rel=1e-5, abs=1e-7)
        for key in ("ratio", "clip_low", "clip_high"):
            assert float(call["stats"][key]) == pytest.approx(float(stats[key]), rel=1e-4, abs=1e-6), key
        if k == 0:  # the first update is on-policy
            assert float(stats["ratio"]) == pytest.approx(1.0, abs=1e-5)
            assert float(stats["clip_low"]) == float(stats["clip_high"]) == 0
        else:  # the first update moved the policy: the ratio leaves 1 and the clip engages
            assert abs(float(stats["ratio"]) - 1) > 0.05
            assert float(stats["clip_low"]) > 0 and float(stats["clip_high"]) > 0
    assert row["policy/clip_low"] > 0 and row["policy/clip_high"] > 0
    assert row["loss"] == pytest.approx(sum(float(c["loss"]) for c in calls) / 2, rel=1e-6)


# ---- 2. top-p < 1: behaviour log-probs are the untruncated ones ----------------------------
def test_top_p_rollouts_report_the_trainers_log_probs(letters, monkeypatch):
    temp = 0.7
    trainer = make_trainer(letters, Scripted([1, 0, 0, 1]), scripted=None, top_p=0.9, temperature=temp,
                           batch_prompts=3, mini_batches=3)
    checked = {}
    real_update = trainer._update

    def update(batch, timing):  # before any update: the weights that sampled
        seqs = seqs_of(batch)
        packed = pack(seqs)
        rows = packed.loss_rows
        with torch.no_grad():
            hidden = trainer.model(packed.input_ids, packed.cu_seqlens)[rows]
            logp, _ = linear_logprob(hidden, trainer.model.lm_head_weight, packed.targets[rows], temperature=temp)
            scaled = (hidden @ trainer.model.lm_head_weight.t()) / temp
            support = torch.stack([truncate_logits(z, 0, 0.9) for z in scaled])
            truncated = torch.log_softmax(support, -1).gather(-1, packed.targets[rows, None]).squeeze(-1)
        checked.update(behaviour=torch.tensor([lp for g in batch for c in g.completions for lp in c.logprobs]),
                       fused=logp, truncated=truncated, n=len(batch))
        return real_update(batch, timing)
    trainer._update = update
    calls = capture_loss_calls(monkeypatch)
    row = trainer.step(sampler_for(trainer), max_input=1024)
    assert checked["n"] == 3 and "loss" in row
    behaviour, fused, truncated = checked["behaviour"], checked["fused"], checked["truncated"]
    assert behaviour.numel() >= 40
    # every sampled token lies in the top-p support, and top-p really cut mass at most positions
    assert torch.isfinite(truncated).all()
    assert ((truncated - fused).abs() > 1e-3).float().mean() > 0.5
    # the behaviour log-prob is the trainer's (temperature-scaled, untruncated) log-prob
    torch.testing.assert_close(behaviour, fused, atol=1e-4, rtol=0)
    # so the first update's ratio against the behaviour policy is 1
    first = calls[0]
    n0 = first["targets"].numel()
    cur = torch.log_softmax(first["hidden"].to(F64) @ first["weight"].to(F64).t() / temp, -1) \
        .gather(-1, first["targets"][:, None]).squeeze(-1)
    torch.testing.assert_close(torch.exp(cur - behaviour[:n0].to(F64)), torch.ones(n0, dtype=F64), atol=2e-4, rtol=0)
    assert float(first["stats"]["ratio"]) == pytest.approx(1.0, abs=1e-5)


# ---- 3. the lm_head gradient of every option against autograd --------------------------------
CASES = [  # aggregation, advantage scale, clip_c, mini-batches
    ("token-mean", "group", None, 1),
    ("seq-mean-token-mean", "group", None, 1),
    ("seq-mean-token-sum", "group", None, 1),
    ("seq-mean-token-sum-norm", "group", None, 1),
    ("token-mean", "batch", None, 1),
    ("token-mean", "none", None, 1),
    ("token-mean", "task", None, 1),
    ("seq-mean-token-mean", "batch", None, 3),
    ("token-mean", "group", 1.05, 3),
]


@pytest.mark.parametrize("aggregation,scale,clip_c,minis", CASES,
                         ids=[f"{a}-{s}-c{c}-mb{m}" for a, s, c, m in CASES])
def test_lm_head_gradient_matches_autograd_of_the_reference(letters, aggregation, scale, clip_c, minis):
    _, recs = letters
    recs = copy.deepcopy(recs[:3])
    recs[1].task = "math"  # two tasks: "task" differs from "batch"
    # group 2 punishes samples 1 and 3, which group 1's update (mini-batch 1) made likelier:
    # their ratios are above 1 with negative advantages, where the dual clip acts
    rewards = [[0, 1, 0, 1], [1, 0, 0.5, 0.2], [0, 1, 1, 1]]
    reward = Scripted([x for r in rewards for x in r])
    temp = 0.8
    trainer = make_trainer(letters, reward, records=recs, batch_prompts=3, mini_batches=minis, aggregation=aggregation,
                           advantage_scale=scale, clip_c=clip_c, temperature=temp, clip_low=0.2, clip_high=0.28,
                           train=TrainConfig(lr=0.2 if clip_c else 1e-2, seed=0))
    start = copy.deepcopy(trainer.model)
    batches = capture_batches(trainer)
    cfg = GRPOLossConfig(temperature=temp, clip_low=0.2, clip_high=0.28, clip_c=clip_c)
    compared, real_step = [], trainer.opt_step

    def opt_step(step, total, loss_total):  # before clipping and AdamW: the accumulated gradient
        (batch,) = batches
        k, per = len(compared), len(batch) // minis
        groups = batch[k * per:(k + 1) * per]
        w = trainer.model.lm_head_weight.detach().to(F64).requires_grad_(True)
        logp, owner, _ = naive_logprob(trainer.model, seqs_of(groups), temp, weight=w)
        old = naive_logprob(start, seqs_of(groups), temp)[0] if minis > 1 else None
        adv = torch.tensor(reference_advantages(batch, scale)[k * per * 4:(k + 1) * per * 4], dtype=F64)[owner]
        loss, stats = policy_loss(logp, adv, reference_weights(owner, aggregation, 6), old_logprob=old, cfg=cfg)
        loss.backward()
        compared.append((trainer.model.lm_head_weight.grad.detach().clone(), w.grad, stats))
        return real_step(step, total, loss_total)
    trainer.opt_step = opt_step
    row = trainer.step(sampler_for(trainer), max_input=1024)
    assert len(compared) == minis and len({g.record.task for g in batches[0]}) == 2
    for k, (got, expected, _) in enumerate(compared):
        err = rel(got, expected)
        assert err < 1e-5, f"mini-batch {k}: lm_head gradient off the reference by {err:.2e} (relative)"
    if clip_c:
        assert row["policy/clip_dual"] > 0  # the dual clip acted on this step
    # the case discriminates: its advantages differ from those of the group scale
    if scale != "group":
        assert reference_advantages(batches[0], scale) != pytest.approx(reference_advantages(batches[0], "group"),
                                                                          rel=1e-3)


def test_mini_batches_are_as_many_as_asked_and_near_equal():
    from engine.train.rl import mini_batch_bounds
    assert mini_batch_bounds(5, 4) == [(0, 2), (2, 3), (3, 4), (4, 5)]  # ceil(5 / 4) = 2 a part gave 3 parts
    assert mini_batch_bounds(4, 3) == [(0, 2), (2, 3), (3, 4)]
    assert mini_batch_bounds(6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert mini_batch_bounds(2, 3) == [(0, 1), (1, 2)] and mini_batch_bounds(3, 1) == [(0, 3)]
    assert mini_batch_bounds(0, 2) == []


# ---- 4. token-budget micro-batches = one batch ---------------------------------------------
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("shared", [True, False], ids=["group-rows", "repeated"])
def test_micro_batches_accumulate_the_gradient_of_one_batch(letters, monkeypatch, aggregation, shared):
    reward = [1, 0, 0.5, 0.2]
    grads, counts, rows = {}, {}, {}
    calls = capture_loss_calls(monkeypatch)
    # prompts of 95..106 tokens + responses of 2..6: with repeated prompts 120 puts one sequence
    # in each micro-batch; a group row is P + 13 = 108..119 tokens, so 111 splits most groups
    # into parts (the prompt repeated per part); 4096 holds the whole batch
    small = 111 if shared else 120
    for budget in (small, 4096):
        trainer = make_trainer(letters, Scripted(reward), batch_prompts=2, aggregation=aggregation,
                               shared_prefix=shared, train=TrainConfig(lr=1e-2, seed=0, token_budget=budget))
        real_step, n_before = trainer.opt_step, len(calls)

        def opt_step(step, total, loss_total, trainer=trainer, real_step=real_step, budget=budget):
            grads[budget] = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
            return real_step(step, total, loss_total)
        trainer.opt_step = opt_step
        rows[budget] = trainer.step(sampler_for(trainer), max_input=1024)
        counts[budget] = len(calls) - n_before
    assert counts[small] >= 3 and counts[4096] == 1
    # the logged figures are the batch's token means too, however unequal the micro-batches
    stats = [k for k in rows[4096] if k.startswith("policy/") and not k.startswith("policy/max_")]
    assert "policy/entropy" in stats and "policy/logprob" in stats
    for key in stats:
        assert rows[small][key] == pytest.approx(rows[4096][key], rel=1e-5, abs=1e-7), key
    small, big = grads[small], grads[4096]
    assert small.keys() == big.keys()
    for name in big:
        diff, err = float((small[name] - big[name]).abs().max()), rel(small[name], big[name])
        assert diff <= 1e-5 and err < 1e-5, f"{name}: max diff {diff:.2e}, relative {err:.2e}"


# ---- 5. resume restores the optimizer, not only the weights ---------------------------------
def test_resume_restores_weights_and_adamw_moments_exactly(tiny_setup, tmp_path, monkeypatch):
    from engine.train import run_rl

    config, _ = tiny_setup
    built, steps = [], defaultdict(int)
    real_init, real_step = rl_mod.GRPOTrainer.__init__, rl_mod.GRPOTrainer.step

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        built.append(self)

    def step(self, *a, **kw):
        steps[id(self)] += 1
        return real_step(self, *a, **kw)
    monkeypatch.setattr(rl_mod.GRPOTrainer, "__init__", init)
    monkeypatch.setattr(rl_mod.GRPOTrainer, "step", step)
    # short prompts, one generation round a step: 8 cheap steps in all; on the CPU, where
    # every step is deterministic
    straight = config("straight", phases=((150, 4),), dynamic_sampling=False)
    straight.model.device = "cpu"
    run_rl(straight, progress=False, reward=ToyReward())
    broken = config("broken", phases=((150, 4),), dynamic_sampling=False)
    broken.model.device = "cpu"
    broken.train.save_every = 1
    run_rl(broken, progress=False, reward=ToyReward(), stop_after=2)
    run_rl(broken, resume=True, progress=False, reward=ToyReward())
    a, killed, b = built
    assert a.step_count == b.step_count == 4 and killed.step_count == 2
    assert [steps[id(t)] for t in built] == [4, 2, 2]  # the resumed run went on from step 2
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    n_params = sum(1 for p in a.model.parameters() if p.requires_grad)
    assert len(sa["state"]) == len(sb["state"]) == n_params
    for i, st in sa["state"].items():  # every parameter's AdamW state, as if never killed
        assert float(st["step"]) == 4.0 and float(sb["state"][i]["step"]) == 4.0, (i, sb["state"][i]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb["state"][i][key], st[key], atol=1e-7, rtol=0,
                                       msg=lambda m, i=i, key=key: f"param {i} {key}: {m}")
    assert [g["lr"] for g in sb["param_groups"]] == [g["lr"] for g in sa["param_groups"]]
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-7, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


# ---- 6. carry-over by a threshold that separates examples -----------------------------------
def test_carry_threshold_carries_exactly_the_unsolved_examples(tiny_setup, tmp_path):
    from engine.train import latest_checkpoint, run_rl

    config, data = tiny_setup
    records = load_records(str(data))
    short = [r for r in records if not r.id.startswith("long-")]
    solved = {r.id for r in short[::2]}
    key = {(r.question, tuple(r.answers)): r.id for r in records}
    assert len(key) == len(records)  # every record recognisable from its reward item

    class SolvesSome:
        def __call__(self, items):
            out = []
            for it in items:
                v = float(key[(it.question, tuple(it.gold))] in solved)
                out.append(RewardResult(v, v, None, None))
            return out

    # phase 1 (prompts of 131..153 tokens): 2 steps of 3 prompts, no refills: one epoch of the
    # 6 short examples; phase 2: the long ones, with the carried ones a third of its epoch
    cfg = config("carry", phases=((160, 2), (400, 2)), carry_threshold=0.0, dynamic_sampling=False,
                 batch_prompts=3, group_size=2)
    cfg.train.keep_last = 5
    run_rl(cfg, progress=False, reward=SolvesSome())
    run_dir = Path(cfg.train.out_dir)
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    p0 = [i for r in rows if r["phase"] == "p0" for i in r["examples"]]
    assert sorted(p0) == sorted(r.id for r in short)  # every phase-1 example seen once
    unsolved = {r.id for r in short} - solved
    after_p1 = json.loads((run_dir / "rl-step-000002" / "trainer.json").read_text())
    assert after_p1["phase"] == 1
    assert sorted(after_p1["carried"]) == sorted(unsolved)  # exactly the unsolved, each once
    p1 = [i for r in rows if r["phase"] == "p1" for i in r["examples"]]
    drawn = {i for i in p1 if not i.startswith("long-")}
    assert drawn and drawn <= unsolved  # phase 2 draws carried examples, never the solved ones
    assert sum(r["curriculum/carried"] for r in rows if r["phase"] == "p1") == len([i for i in p1 if i in unsolved])
    final = json.loads((latest_checkpoint(run_dir) / "trainer.json").read_text())
    assert unsolved <= set(final["carried"]) and not solved & set(final["carried"])


# ---- 7. dynamic sampling: the train batch takes refill groups ------------------------------
def test_dynamic_sampling_trains_on_groups_of_the_refill_round(tiny_setup, tmp_path, monkeypatch):
    from engine.train import run_rl

    config, _ = tiny_setup
    # round 1: the first group varies, the second does not (dropped); round 2: both vary
    reward = Scripted([0, 1, 0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1, 1, 0])
    rolled, updated = [], []
    real_rollout, real_update = rl_mod.GRPOTrainer._rollout, rl_mod.GRPOTrainer._update

    def rollout(self, *a):
        groups = real_rollout(self, *a)
        rolled.append(groups)
        return groups

    def update(self, batch, timing):
        updated.append(list(batch))
        return real_update(self, batch, timing)
    monkeypatch.setattr(rl_mod.GRPOTrainer, "_rollout", rollout)
    monkeypatch.setattr(rl_mod.GRPOTrainer, "_update", update)
    cfg = config("refill", phases=((400, 1),), max_rounds=3)
    run_rl(cfg, progress=False, reward=reward)
    row = json.loads((Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()[0])
    assert row["dynamic/rounds"] == 2 and row["dynamic/dropped_groups"] == 1 and "loss" in row
    assert len(rolled) == 2 and len(updated) == 1
    (batch,) = updated
    origin = {id(g): (r, k) for r, groups in enumerate(rolled) for k, g in enumerate(groups)}
    assert [origin.get(id(g)) for g in batch] == [(0, 0), (1, 0)]  # (round, group): the refill fills the batch
    assert [g.record.id for g in batch] == [row["examples"][0], row["examples"][2]]
    assert batch[1].correct == [1, 0, 0, 0] and rolled[0][1] not in batch
