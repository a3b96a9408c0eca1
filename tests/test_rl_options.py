"""The RL options of [rl], [data], [rollout] and [kernels] on the trainer's real code path:
DAPO's accuracy filter under overlong shaping, oversampled generation rounds, the three
shortfall policies, the frozen KL reference (its gradient held to the k3 formula, its copy
under RUN_DIR/reference on resume), AEPO, task-normalised advantages, recipe keys that must
reach the trainer, and one phase-2 step of the flagship recipe scaled down."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import tiny_hf_model
from test_rl_train import LetterTokenizer, ToyReward, tiny_setup  # noqa: F401 (tiny_setup: a fixture)

from engine.config import ConfigError, DataConfig, RLConfig, TrainConfig, load_config
from engine.curriculum import PhaseSampler
from engine.data import synthetic, write_docqa
from engine.data.lengths import record_prompt_ids
from engine.rewards import RewardResult
from engine.rl import ShortBatchError, grpo_advantages
from engine.rollout.sampling import Completion, SamplingParams
from engine.train.rl import GRPOTrainer, Group

RECIPES = Path(__file__).parents[1] / "recipes"


# ---- helpers ---------------------------------------------------------------------------
class AllZero:
    """Every completion wrong: accuracy 0 everywhere."""

    def __call__(self, items):
        return [RewardResult(0.0, 0.0, None, None) for _ in items]


class FirstGroupVaries:
    """Accuracy 0, 1, 0, 1, ... within the first group of each reward call (one generation
    round), 0 everywhere else: dynamic sampling keeps exactly one group per round."""

    def __init__(self, group_size: int):
        self.g = group_size

    def __call__(self, items):
        return [RewardResult(float(i < self.g and i % 2), float(i < self.g and i % 2), None, None)
                for i in range(len(items))]


def scripted_generate(lengths, logprob=-2.0):
    """A stand-in for Generator.generate: sample i of every prompt has lengths[i] tokens (never
    the stop token), each with behaviour log-prob `logprob`."""
    def generate(prompts, n=1, params=None):
        params = params[0] if isinstance(params, list) else params  # per-prompt params: same budget
        out = []
        for _ in prompts:
            comps = []
            for i in range(n):
                k = lengths[i % len(lengths)]
                comps.append(Completion([(3 + i + j) % 15 for j in range(k)], [logprob] * k,
                                        "length" if k >= params.max_new_tokens else "stop"))
            out.append(comps)
        return out
    return generate


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    """(checkpoint dir of a tiny 16-token Llama, 6 records)."""
    path = tmp_path_factory.mktemp("letters")
    tiny_hf_model("llama", vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  max_position_embeddings=1024).save_pretrained(str(path))
    records = synthetic.generate(6, 12, seed=3, kinds=("lookup",))
    return path, records


def letters_trainer(letters, reward, *, records=None, train=None, **rl_kw) -> GRPOTrainer:
    from engine.model import load_model

    path, recs = letters
    model, _ = load_model(path, device="cpu", dtype="float32")
    rl = RLConfig(**{"group_size": 4, "batch_prompts": 2, "max_new_tokens": 6, "temperature": 1.0,
                     "top_p": 1.0, "max_rounds": 1, **rl_kw})
    return GRPOTrainer(model, LetterTokenizer(), records or recs, rl, train or TrainConfig(lr=1e-2, seed=0),
                       reward=reward, total_steps=2, data=DataConfig(template="plain"))


def sampler_for(trainer) -> PhaseSampler:
    return PhaseSampler(list(trainer.records), seed=0)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def capture_updates(trainer) -> list:
    """Wrap trainer._update so each train batch (list of Groups) is recorded."""
    seen, real = [], trainer._update

    def update(batch, timing):
        seen.append(list(batch))
        return real(batch, timing)
    trainer._update = update
    return seen


# ---- 1. DAPO filters on accuracy, not on the shaped reward ----------------------------
def test_dynamic_sampling_filters_on_accuracy_not_overlong_shaped_reward(letters):
    trainer = letters_trainer(letters, AllZero(), max_new_tokens=6, overlong_buffer=6, max_rounds=2, oversample=2)
    trainer.generator.generate = scripted_generate([1, 3, 5, 6])  # lengths hit the buffer differently
    rolled, real_rollout = [], trainer._rollout

    def rollout(*args):
        groups = real_rollout(*args)
        rolled.extend(groups)
        return groups
    trainer._rollout = rollout
    before = weights(trainer.model)
    row = trainer.step(sampler_for(trainer), max_input=1024)
    # the shaped rewards differ within every group (so a filter on them would keep it) ...
    assert rolled and all(len(set(g.rewards)) == 4 and set(g.correct) == {0.0} for g in rolled)
    # ... but every sample is wrong: DAPO drops every group and nothing is learnt
    assert row["dynamic/rounds"] == 2 and len(rolled) == 2 * 2 * 2
    assert row["dynamic/kept_groups"] == 0 and row["dynamic/dropped_groups"] == len(rolled)
    assert "loss" not in row and same(before, weights(trainer.model))


# ---- 2. oversampled generation rounds ----------------------------------------------------
def test_oversampling_draws_oversample_times_batch_prompts_per_round(letters):
    trainer = letters_trainer(letters, FirstGroupVaries(4), oversample=3, batch_prompts=2, max_rounds=3,
                              max_new_tokens=4)
    sampler = sampler_for(trainer)
    draws, real_sample = [], sampler.sample
    sampler.sample = lambda n: draws.append(n) or real_sample(n)
    updates = capture_updates(trainer)
    row = trainer.step(sampler, max_input=1024)
    assert draws == [6, 6] and row["dynamic/rounds"] == 2  # one group kept per round: two rounds for two
    assert len(row["examples"]) == 6 * row["dynamic/rounds"]
    assert row["dynamic/kept_groups"] == 2 and row["dynamic/dropped_groups"] == 10
    assert len(updates) == 1 and [g.record.id for g in updates[0]] == [row["examples"][0], row["examples"][6]]
    assert "loss" in row


# ---- 3. on_shortfall --------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["skip", "error", "log"])
def test_on_shortfall_policies(letters, policy):
    trainer = letters_trainer(letters, FirstGroupVaries(4), batch_prompts=2, max_rounds=1, on_shortfall=policy,
                              max_new_tokens=4)
    before = weights(trainer.model)
    if policy == "error":
        with pytest.raises(ShortBatchError):
            trainer.step(sampler_for(trainer), max_input=1024)
        return
    row = trainer.step(sampler_for(trainer), max_input=1024)
    assert row["dynamic/kept_groups"] == 1 and row["dynamic/shortfall"] == 1  # a short batch
    if policy == "skip":
        assert row["dynamic/skipped_update"] == 1 and "loss" not in row
        assert same(before, weights(trainer.model))
    else:  # log: trains on the short batch
        assert "dynamic/skipped_update" not in row and math.isfinite(row["loss"])
        assert not same(before, weights(trainer.model))


# ---- 4. the KL reference ---------------------------------------------------------------
def test_reference_model_is_a_frozen_copy_only_with_kl(letters):
    assert letters_trainer(letters, FirstGroupVaries(4), kl_coef=0.0).ref_model is None
    trainer = letters_trainer(letters, FirstGroupVaries(4), kl_coef=0.5, batch_prompts=1, max_new_tokens=4)
    start = weights(trainer.model)
    ref = trainer.ref_model
    assert ref is not None and ref is not trainer.model
    assert all(not p.requires_grad for p in ref.parameters()) and same(start, weights(ref))
    row = trainer.step(sampler_for(trainer), max_input=1024)
    assert "loss" in row and "policy/kl" in row
    assert not same(start, weights(trainer.model)) and same(start, weights(ref))  # the policy moves, ref stays


def test_kl_gradient_matches_the_k3_formula(letters):
    """With every advantage 0 the loss is kl_coef · token-mean k3 KL to the reference; the
    lm_head gradient the trainer's _update produces must equal autograd of that formula from
    materialised float64 logits."""
    from engine.data.packing import pack

    kl_coef, temp = 0.3, 0.7
    trainer = letters_trainer(letters, AllZero(), kl_coef=kl_coef, temperature=temp, batch_prompts=3,
                              kl_estimator="k3", aggregation="token-mean", max_new_tokens=6,
                              train=TrainConfig(lr=1e-2, seed=0, token_budget=250))  # several micro-batches
    assert trainer.model.lm_head is not None  # untied: the lm_head gradient is the loss's alone
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the policy drifts away from the reference
        for p in trainer.model.parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
    recs = list(trainer.records.values())[:3]
    prompts = [record_prompt_ids(r, trainer.tokenizer, template="plain", chat=False)[0] for r in recs]
    comps = scripted_generate([2, 6, 4, 5])(prompts, 4, SamplingParams(max_new_tokens=6))
    batch = [Group(r, p, c, [0.0] * 4, [0.0] * 4) for r, p, c in zip(recs, prompts, comps)]
    grads = []

    def capture(step, total, loss_total):
        grads.append(trainer.model.lm_head_weight.grad.detach().clone())
        return {"lr": 0.0, "grad_norm": 0.0, "skipped": False}
    trainer.opt_step = capture
    trainer._update(batch, defaultdict(float))
    assert len(grads) == 1

    samples, adv, in_loss, _ = trainer._samples(batch)
    assert all(a == 0 for a in adv) and all(in_loss)
    chosen = list(range(len(samples)))
    assert len(trainer._micro_batches(trainer.model, batch, samples, chosen)) > 1
    table = trainer._response_logprobs(trainer.ref_model, batch, samples, chosen)
    ref = table.flat.double()  # every chosen sample's response tokens, in order
    seqs = [(g.prompt + c.token_ids, [0] * len(g.prompt) + [1] * len(c.token_ids)) for g in batch
            for c in g.completions]
    packed = pack(seqs)
    rows = packed.loss_rows
    with torch.no_grad():
        hidden = trainer.model(packed.input_ids, packed.cu_seqlens)[rows].double()
    w = trainer.model.lm_head_weight.detach().double().requires_grad_(True)
    logp = torch.log_softmax(hidden @ w.t() / temp, -1).gather(-1, packed.targets[rows, None]).squeeze(-1)
    x = ref - logp
    assert x.abs().mean() > 0.05  # the policy really differs from the reference
    (kl_coef * (torch.exp(x) - x - 1).mean()).backward()
    expected = w.grad
    rel = (grads[0].double() - expected).norm() / expected.norm()
    assert rel < 1e-5, rel


def test_run_rl_saves_the_reference_and_resume_loads_it(tiny_setup, tmp_path, monkeypatch):
    from engine.model import load_model
    from engine.train import latest_checkpoint, run_rl
    from engine.train import rl as rl_mod

    config, _ = tiny_setup
    cfg = config("kl", phases=((400, 2),), kl_coef=0.1)
    cfg.train.save_every = 1
    run_rl(cfg, progress=False, reward=ToyReward(), stop_after=1)
    run_dir = Path(cfg.train.out_dir)
    start = weights(load_model(cfg.model.path, device="cpu", dtype="float32")[0])
    assert (run_dir / "reference" / "config.json").is_file()
    assert same(start, weights(load_model(run_dir / "reference", device="cpu", dtype="float32")[0]))
    ckpt = latest_checkpoint(run_dir)
    resumed = weights(load_model(ckpt / "model", device="cpu", dtype="float32")[0])
    assert not same(start, resumed)  # step 1 moved the policy

    built, real_init = [], rl_mod.GRPOTrainer.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        built.append(self)
    monkeypatch.setattr(rl_mod.GRPOTrainer, "__init__", init)
    run_rl(cfg, resume=True, progress=False, reward=ToyReward(), stop_after=0)
    (trainer,) = built
    assert trainer.step_count == 1 and same(resumed, weights(trainer.model))
    assert same(start, weights(trainer.ref_model))  # the saved start, not the resumed weights
    assert all(not p.requires_grad for p in trainer.ref_model.parameters())


# ---- 5. AEPO ------------------------------------------------------------------------------
def test_aepo_drops_negative_advantage_samples_while_entropy_is_high(letters):
    trainer = letters_trainer(letters, FirstGroupVaries(4), aepo_high=1e-6, aepo_low=0.0, batch_prompts=1)
    trainer.generator.generate = scripted_generate([3, 4, 5, 6], logprob=-2.0)  # entropy estimate 2 > 1e-6
    updates = capture_updates(trainer)
    row = trainer.step(sampler_for(trainer), max_input=1024)
    assert row["aepo/dropping"] == 1 and row["aepo/entropy"] == pytest.approx(2.0)
    assert row["aepo/dropped_samples"] == 2 and "loss" in row
    _, adv, in_loss, _ = trainer._samples(updates[0])
    assert sorted(a > 0 for a in adv) == [False, False, True, True]
    assert in_loss == [a >= 0 for a in adv]  # the negative-advantage samples leave the loss

    off = letters_trainer(letters, FirstGroupVaries(4), batch_prompts=1)
    off.generator.generate = scripted_generate([3, 4, 5, 6], logprob=-2.0)
    updates = capture_updates(off)
    row = off.step(sampler_for(off), max_input=1024)
    assert off.aepo is None and not [k for k in row if k.startswith("aepo/")]
    _, _, in_loss, _ = off._samples(updates[0])
    assert all(in_loss)


# ---- 6. task-normalised advantages ------------------------------------------------------
def test_task_advantage_scale_uses_each_tasks_spread(letters):
    recs = synthetic.generate(3, 12, seed=4, kinds=("lookup",))
    recs[0].task, recs[1].task, recs[2].task = "qa", "math", "qa"
    trainer = letters_trainer(letters, AllZero(), records=recs, advantage_scale="task", batch_prompts=3)
    rewards = [[0.0, 1.0, 0.0, 1.0], [0.0, 0.1, 0.2, 0.3], [1.0, 1.0, 0.0, 1.0]]
    batch = [Group(r, [1], [], rw, rw) for r, rw in zip(recs, rewards)]
    adv, keep, info = trainer._advantages(batch)
    assert all(keep) and info == {}
    flat = torch.tensor([x for rw in rewards for x in rw], dtype=torch.float64)
    tasks = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0])
    expected = []
    for k, rw in enumerate(rewards):
        rw = torch.tensor(rw, dtype=torch.float64)
        std = flat[tasks == tasks[4 * k]].std(unbiased=True)
        expected += ((rw - rw.mean()) / (std + 1e-6)).tolist()
    assert adv == pytest.approx(expected, rel=1e-5)
    assert adv == pytest.approx(grpo_advantages(flat.float(), torch.arange(3).repeat_interleave(4), scale="task",
                                                task_ids=tasks).tolist(), rel=1e-6)
    group = grpo_advantages(flat.float(), torch.arange(3).repeat_interleave(4), scale="group").tolist()
    assert adv != pytest.approx(group, rel=1e-3)  # the setting matters here


# ---- 7. recipe keys reach the trainer ----------------------------------------------------
def test_recipe_keys_reach_the_trainer(tiny_setup, tmp_path, monkeypatch):
    from kernels.rows import rows_for_budget

    from engine.train import rl as rl_mod
    from engine.train import run_rl

    config, data = tiny_setup
    model_dir = config("x").model.path
    monkeypatch.delenv("LONGRL_CHUNK_MB", raising=False)
    monkeypatch.delenv("LONGRL_KERNEL_BACKEND", raising=False)
    cfg = load_config(None, [f"--model.path={model_dir}", f"--rl.data=['{data}']", f"--train.out_dir={tmp_path / 'k'}",
                             "--rl.phases=[{name='all', max_input_tokens=400, steps=1}]", "--rl.group_size=2",
                             "--rl.max_new_tokens=4", "--train.token_budget=1024", "--data.template=plain",
                             "--data.chat_template=false", "--rollout.block_size=32", "--rollout.max_num_seqs=7",
                             "--rollout.max_prefill_tokens=333", "--kernels.backend=triton",
                             "--kernels.chunk_mb=100"])
    built, real_init = [], rl_mod.GRPOTrainer.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        built.append(self)
    monkeypatch.setattr(rl_mod.GRPOTrainer, "__init__", init)
    run_rl(cfg, progress=False, reward=ToyReward(), stop_after=0)
    (trainer,) = built
    cache = trainer.generator.cache_cfg
    assert (cache.block_size, cache.max_num_seqs, cache.max_prefill_tokens) == (32, 7, 333)
    vocab = trainer.model.lm_head_weight.shape[0]
    assert rows_for_budget(vocab, 100) != rows_for_budget(vocab, 200)
    assert trainer.kernel_args == {"backend": "triton", "chunk_tokens": rows_for_budget(vocab, 100), "logits": "fp32"}

    prompts_seen = []
    trainer.generator.generate = lambda prompts, n, params: prompts_seen.extend(prompts) or \
        scripted_generate([2])(prompts, n, params)
    recs = list(trainer.records.values())[:2]
    trainer._rollout([r.id for r in recs], 400, 0, defaultdict(float))
    tok = trainer.tokenizer
    assert prompts_seen == [record_prompt_ids(r, tok, template="plain", max_tokens=400, chat=False)[0] for r in recs]
    assert prompts_seen != [record_prompt_ids(r, tok, max_tokens=400, chat=False)[0] for r in recs]
    assert prompts_seen != [record_prompt_ids(r, tok, template="plain", max_tokens=400)[0] for r in recs]

    monkeypatch.setenv("LONGRL_CHUNK_MB", "200")
    monkeypatch.setenv("LONGRL_KERNEL_BACKEND", "torch")
    again = GRPOTrainer(trainer.model, tok, recs, cfg.rl, cfg.train, reward=ToyReward(), data=cfg.data,
                        rollout=cfg.rollout, kernels=cfg.kernels)
    assert again.kernel_args == {"backend": "torch", "chunk_tokens": rows_for_budget(vocab, 200), "logits": "fp32"}


# ---- 8. the flagship recipe, scaled down ----------------------------------------------------
class WordTokenizer:
    """One token per word or punctuation mark over a closed vocabulary (the records and the
    template): prompts of a few dozen tokens and a vocabulary of a few hundred, so a step of
    the recipe's shape runs in seconds on a CPU."""
    chat_template = None
    unk_token_id, name_or_path = 0, "words"
    eos_token_id = 2

    def __init__(self, texts):
        import re
        self.split = re.compile(r"\w+|[^\w\s]").findall
        words = sorted({w for t in texts for w in self.split(t)})
        self.vocab = ["<unk>", "<bos>", "<eos>", *words]
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self):
        return len(self.vocab)

    def encode(self, text, add_special_tokens=True):
        return [self.index.get(w, 0) for w in self.split(text)]

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(self.vocab[i] for i in ids if not (skip_special_tokens and i < 3))

    def convert_tokens_to_ids(self, token):
        return None


def test_flagship_recipe_scaled_down_runs_a_phase_2_step(tmp_path):
    from engine.curriculum import phase_members
    from engine.data import prompt_lengths
    from engine.data.template import TEMPLATES
    from engine.model import load_model

    recipe = RECIPES / "qwenlong_l1_32b.toml"
    full = load_config(recipe)
    assert full.rl.mini_batches > 1 and full.rl.dynamic_sampling and full.rl.overlong_buffer
    with pytest.raises(ConfigError, match=r"train\.token_budget"):
        load_config(recipe, ["--train.token_budget=69999"])

    recs = synthetic.generate(16, (30, 60), seed=5, kinds=("lookup",))
    tok = WordTokenizer([*TEMPLATES.values(), *(f"{r.context} {r.question} {' '.join(r.answers)}" for r in recs)])
    model_dir = tmp_path / "tiny"
    tiny_hf_model("llama", vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=512).save_pretrained(str(model_dir))
    data = tmp_path / "flag.jsonl"
    write_docqa(recs, data)
    factor = 500

    def scaled(n: int) -> int:
        return max(1, round(n / factor))
    phases = ", ".join(f"{{name='{p.name}', max_input_tokens={scaled(p.max_input_tokens)}, steps=1}}"
                       for p in full.rl.phases)
    cfg = load_config(recipe, [f"--model.path={model_dir}", "--model.dtype=float32", "--model.device=cpu",
                               f"--train.out_dir={tmp_path / 'flag'}", f"--rl.data=['{data}']",
                               f"--rl.phases=[{phases}]", f"--rl.max_new_tokens={scaled(full.rl.max_new_tokens)}",
                               f"--rl.overlong_buffer={scaled(full.rl.overlong_buffer)}",
                               f"--train.token_budget={scaled(full.train.token_budget)}",
                               "--rl.batch_prompts=4", "--rl.mini_batches=4", "--rl.max_rounds=2"])
    rl = cfg.rl
    assert [p.max_input_tokens for p in rl.phases] == [40, 120] and rl.max_new_tokens == 20
    assert cfg.train.token_budget == 147 and rl.overlong_buffer == 2
    for key in ("group_size", "clip_low", "clip_high", "temperature", "top_p", "kl_coef", "dynamic_sampling",
                "oversample", "on_shortfall", "think", "aggregation", "advantage_scale"):
        assert getattr(rl, key) == getattr(full.rl, key), key
    assert rl.group_size == 8 and rl.oversample == 3 and rl.mini_batches > 1 and cfg.model.activation_checkpointing

    model, _ = load_model(cfg.model.path, device=cfg.model.device, dtype=cfg.model.dtype)
    model.set_activation_checkpointing(cfg.model.activation_checkpointing)  # as start_model does
    lengths = prompt_lengths(recs, tok, template=cfg.data.template, chat=cfg.data.chat_template)
    members = phase_members(lengths, rl.phases)
    assert len(members[1]) >= rl.batch_prompts, lengths  # phase 2: prompts of 41..120 tokens
    trainer = GRPOTrainer(model, tok, recs, rl, cfg.train, total_steps=2, reward=ToyReward(), data=cfg.data,
                          rollout=cfg.rollout, kernels=cfg.kernels)
    trainer.step_count = rl.phases[0].steps  # phase 1 is done
    steps, real_opt = [], trainer.opt_step
    trainer.opt_step = lambda *a: steps.append(a) or real_opt(*a)
    before = weights(model)
    row = trainer.step(PhaseSampler([recs[i].id for i in members[1]], seed=0),
                       max_input=rl.phases[1].max_input_tokens)
    assert len(row["examples"]) == rl.oversample * rl.batch_prompts * row["dynamic/rounds"]
    assert row["dynamic/kept_groups"] >= rl.batch_prompts
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
    assert len(steps) == rl.mini_batches and row["time/old_logprob"] > 0  # 4 updates, old log-probs
    assert not same(before, weights(model))


# ---- task-balanced sampling reaches the phase sampler ------------------------------------
@pytest.mark.parametrize("balance", ["task", "data_source"])
def test_balance_gives_each_task_its_share_of_every_batch(tiny_setup, tmp_path, balance):
    """rl.balance: each step's prompts split evenly over the tasks (or data sources) of the
    phase, although one task has 6 examples and the other 2."""
    import json

    from engine.train import run_rl

    config, _ = tiny_setup
    lookups = synthetic.generate(6, 40, seed=4, kinds=("lookup",))
    choices = synthetic.generate(2, 40, seed=5, kinds=("choice",))
    for i, r in enumerate(choices):
        r.id, r.data_source = f"choice-{i}", "choices"
    data = tmp_path / "mixed.jsonl"
    write_docqa(lookups + choices, data)
    cfg = config(f"balance-{balance}", phases=((400, 3),), balance=balance, dynamic_sampling=False)
    cfg.rl.data = [str(data)]
    run_rl(cfg, progress=False, reward=ToyReward())
    rows = [json.loads(l) for l in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["examples"] for r in rows if r["stage"] == "rl"]
    assert len(steps) == 3
    assert all(sum(i.startswith("choice-") for i in ids) == 1 and len(ids) == 2 for ids in steps), steps
