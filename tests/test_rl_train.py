"""The GRPO/DAPO loop: learnability on a toy reward, and SFT -> phase 1 -> phase 2 with
carry-over, dynamic-sampling refill, checkpoints, a kill and an exact resume."""
from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import tiny_hf_model, tiny_model_with_tokenizer

from engine.config import PhaseConfig, RLConfig, SFTConfig, TrainConfig, load_config
from engine.data import DataError, synthetic, write_docqa
from engine.rewards import RewardResult
from engine.train import latest_checkpoint, run_pipeline


class ToyReward:
    """Reward = share of the completion's characters that are 'e': learnable by a tiny model."""

    def __call__(self, items):
        out = []
        for it in items:
            text = it.completion.replace(" ", "")
            score = text.count("e") / max(len(text), 1)
            out.append(RewardResult(reward=score, rule=score, judge=None, answer=None))
        return out


@pytest.fixture
def tiny_setup(tmp_path, smollm):
    model_dir = tiny_model_with_tokenizer(tmp_path / "tiny", smollm[1])
    short = synthetic.generate(6, 40, seed=1, kinds=("lookup",))
    long = synthetic.generate(6, 140, seed=2, kinds=("lookup",))
    for i, r in enumerate(long):
        r.id = f"long-{i}"
    data = tmp_path / "rl.jsonl"
    write_docqa(short + long, data)

    def config(out: str, phases=((150, 2), (400, 2)), **rl):
        cfg = load_config(None, [f"--model.path={model_dir}"])
        cfg.train = TrainConfig(lr=2e-3, token_budget=2048, out_dir=str(tmp_path / out), seed=0, keep_last=3)
        cfg.rl = RLConfig(**{"data": [str(data)], "phases": [PhaseConfig(f"p{i}", n, s) for i, (n, s) in
                                                              enumerate(phases)],
                             "group_size": 4, "batch_prompts": 2, "max_new_tokens": 6, "temperature": 1.0,
                             "top_p": 1.0, "carry_ratio": 0.5, "max_rounds": 2, **rl})
        return cfg
    return config, data


def _rows(run_dir, stage="rl"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage]


class LetterTokenizer:
    """16 tokens, one per letter a..p: small enough for a tiny model to learn in a few steps."""
    chat_template = None
    eos_token_id, unk_token_id, name_or_path = 15, None, "letters"

    def __len__(self):
        return 16

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 16 for c in text if not c.isspace()]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i) for i in ids)

    def convert_tokens_to_ids(self, token):
        return None


def test_rl_learns_a_toy_reward(tmp_path):
    from engine.curriculum import PhaseSampler
    from engine.model import load_model
    from engine.train.rl import GRPOTrainer

    hf = tiny_hf_model("llama", vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       max_position_embeddings=2048)
    hf.save_pretrained(str(tmp_path / "letters"))
    model, _ = load_model(tmp_path / "letters", device="cpu", dtype="float32")
    records = synthetic.generate(4, 20, seed=3, kinds=("lookup",))
    rl = RLConfig(group_size=8, batch_prompts=4, max_new_tokens=8, temperature=1.0, top_p=1.0)
    trainer = GRPOTrainer(model, LetterTokenizer(), records, rl, TrainConfig(lr=2e-2, seed=0), reward=ToyReward(),
                          total_steps=12)
    sampler = PhaseSampler([r.id for r in records], seed=0)
    rewards = [trainer.step(sampler, max_input=2048)["reward/mean"] for _ in range(12)]
    before, after = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert before < 0.15  # about chance, 1/16
    assert after > before + 0.2, rewards


def test_pipeline_phases_carry_over_refill_and_exact_resume(tiny_setup, tmp_path):
    config, data = tiny_setup
    straight = config("straight", carry_threshold=1.0)  # every phase-1 example counts as hard
    straight.sft = SFTConfig(data=[str(data)], max_steps=2, batch_examples=4)
    straight.train.save_every = 1
    final = run_pipeline(straight, progress=False, reward=ToyReward())
    rows = _rows(tmp_path / "straight")
    assert [r["phase"] for r in rows] == ["p0", "p0", "p1", "p1"]
    assert len(_rows(tmp_path / "straight", "sft")) == 2
    state = json.loads((final / "trainer.json").read_text())
    assert state["stage"] == "rl" and state["phase"] == 2
    # phase 1 drew only short examples; phase 2 its long ones plus short ones carried over
    assert all(not i.startswith("long-") for r in rows[:2] for i in r["examples"])
    assert any(not i.startswith("long-") for i in state["carried"])  # carried on from phase 1
    p1 = [i for r in rows[2:] for i in r["examples"]]
    assert any(i.startswith("long-") for i in p1) and any(not i.startswith("long-") for i in p1)

    broken = config("broken", carry_threshold=1.0)
    broken.sft = straight.sft
    broken.train.save_every = 1
    run_pipeline(broken, progress=False, reward=ToyReward(), stop_after=3)  # killed inside phase 2
    assert json.loads((latest_checkpoint(tmp_path / "broken") / "trainer.json").read_text())["phase"] == 1
    run_pipeline(broken, resume=True, progress=False, reward=ToyReward())
    keys = ("reward/mean", "loss", "grad_norm", "dynamic/kept_groups")
    assert [[r.get(k) for k in keys] for r in _rows(tmp_path / "broken")] == \
           [[r.get(k) for k in keys] for r in rows]
    # killed in RL before its first checkpoint: the resume starts RL again from SFT's, and the
    # killed attempt's row is not left beside the new one
    early = config("early", carry_threshold=1.0)
    early.sft = straight.sft
    early.train.save_every = 2
    run_pipeline(early, progress=False, reward=ToyReward(), stop_after=1)
    assert json.loads((latest_checkpoint(tmp_path / "early") / "trainer.json").read_text())["stage"] == "sft"
    run_pipeline(early, resume=True, progress=False, reward=ToyReward())
    assert [[r.get(k) for k in keys] for r in _rows(tmp_path / "early")] == [[r.get(k) for k in keys] for r in rows]


def test_dynamic_sampling_refills_and_reports_shortfall(tiny_setup, tmp_path):
    config, _ = tiny_setup

    class AllZero:
        def __call__(self, items):
            return [RewardResult(0.0, 0.0, None, None) for _ in items]

    cfg = config("zero", phases=((400, 1),))
    run_pipeline(cfg, progress=False, reward=AllZero())
    row = _rows(tmp_path / "zero")[0]
    assert row["dynamic/rounds"] == 2 and row["dynamic/kept_groups"] == 0 and row["dynamic/shortfall"] == 2
    assert "loss" not in row  # nothing to learn from: no update


@pytest.mark.parametrize("recipe", sorted((__import__("pathlib").Path(__file__).parents[1] / "recipes").glob("*.toml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe):
    cfg = load_config(recipe)
    assert cfg.rl.phases and cfg.train.out_dir


def test_train_command_runs_the_ci_recipe_with_held_out_evals(tiny_setup, tmp_path, capsys):
    from pathlib import Path

    from engine.cli import main
    config, _ = tiny_setup
    model_dir = config("x").model.path
    recipe = Path(__file__).parents[1] / "recipes" / "ci_tiny.toml"
    out = tmp_path / "ci"
    assert main(["train", str(recipe), f"--model.path={model_dir}", f"--train.out_dir={out}"]) == 0
    printed = capsys.readouterr().out
    for label in ("before", "after-sft", "after-short", "after-long"):
        assert f"eval [{label}]: held-out accuracy" in printed
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows].count("eval") == 4
    assert [r["stage"] for r in rows].count("sft") == 2 and [r["stage"] for r in rows].count("rl") == 4
    assert (out / "eval" / "after-long" / "summary.md").is_file()


class SignalsMidStep(ToyReward):
    """ToyReward that sends this process `signals` SIGINTs at its `at`-th call: a Ctrl-C in the
    middle of a step, after its rollout (the sampler has moved on) and before its update."""

    def __init__(self, at: int, signals: int):
        self.calls, self.at, self.signals = 0, at, signals

    def __call__(self, items):
        import os
        import signal
        self.calls += 1
        if self.calls == self.at:
            for _ in range(self.signals):
                os.kill(os.getpid(), signal.SIGINT)
        return super().__call__(items)


def test_ctrl_c_finishes_the_step_then_checkpoints(tiny_setup, tmp_path, capsys, ctrl_c_on):
    """A real SIGINT mid-step: the step finishes, a checkpoint of it is written and the run stops.
    Resumed, a second SIGINT right after the first stops at once: nothing of the cut step is
    saved, the checkpoint stays. Resumed again, the run draws, rewards and trains as one that
    never stopped."""
    from engine.train import run_rl
    from engine.train.loop import Interrupted

    config, data = tiny_setup
    phases = ((150, 2),)
    copy = tmp_path / "copy.jsonl"  # another file with the same ids
    copy.write_text(data.read_text())
    with pytest.raises(DataError, match=r"rl.data: the id 'synth-1-0' is used in .*rl.jsonl and in .*copy.jsonl"):
        run_rl(config("twice", phases=phases, data=[str(data), str(copy)]), progress=False, reward=ToyReward())
    run_rl(config("straight", phases=phases), progress=False, reward=ToyReward())
    # the long examples are over the only phase's length: left out, and said so
    left = re.search(r"rl.data: (\d+) of 12 examples have prompts over the last phase's 150 tokens",
                     capsys.readouterr().err)
    assert left and int(left.group(1)) >= 6
    cfg = config("ctrlc", phases=phases)
    with pytest.raises(Interrupted):
        run_rl(cfg, progress=False, reward=SignalsMidStep(at=1, signals=1))
    state = json.loads((latest_checkpoint(tmp_path / "ctrlc") / "trainer.json").read_text())
    assert state["trainer"]["step"] == 1 and state["sampler"] is not None  # mid-phase, resumable
    assert len(_rows(tmp_path / "ctrlc")) == 1
    with pytest.raises(KeyboardInterrupt) as stopped:
        run_rl(cfg, resume=True, progress=False, reward=SignalsMidStep(at=1, signals=2))
    assert not isinstance(stopped.value, Interrupted)
    assert latest_checkpoint(tmp_path / "ctrlc").name == "rl-step-000001"
    assert len(_rows(tmp_path / "ctrlc")) == 1
    run_rl(cfg, resume=True, progress=False, reward=ToyReward())
    straight, resumed = _rows(tmp_path / "straight"), _rows(tmp_path / "ctrlc")
    assert [r["examples"] for r in resumed] == [r["examples"] for r in straight] and len(straight) == 2
    for a, b in zip(straight, resumed):
        for key in ("reward/mean", "loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


def test_ctrl_c_during_a_phase_end_stops_with_its_checkpoint(tiny_setup, tmp_path, ctrl_c_on):
    """A SIGINT during the phase-end evaluation: the run stops there (its checkpoint is the phase
    end's), not after another step of the next phase. With Ctrl-C turned off (SIG_IGN, as under
    `nohup ... &`), it stays off."""
    import os
    import signal

    from engine.train import run_rl
    from engine.train.loop import Interrupted, Interrupts
    config, _ = tiny_setup
    cfg = config("phase-end", phases=((150, 1), (400, 1)))
    with pytest.raises(Interrupted):
        run_rl(cfg, progress=False, reward=ToyReward(), evaluate=lambda *a: os.kill(os.getpid(), signal.SIGINT))
    state = json.loads((latest_checkpoint(tmp_path / "phase-end") / "trainer.json").read_text())
    assert state["phase"] == 1 and state["trainer"]["step"] == 1 and len(_rows(tmp_path / "phase-end")) == 1
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with Interrupts():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_out_of_memory_gives_advice(tiny_setup, monkeypatch):
    from engine.train import TrainingStopped, run_rl
    from engine.train import rl as rl_mod

    config, _ = tiny_setup

    def oom(self, sampler, max_input):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(rl_mod.GRPOTrainer, "step", oom)
    with pytest.raises(TrainingStopped, match="train.token_budget"):
        run_rl(config("oom"), progress=False, reward=ToyReward())


def test_step_metrics_report_the_time_split(tiny_setup, tmp_path):
    """The figures a step logs are consistent with each other, not merely present."""
    config, _ = tiny_setup
    cfg = config("split", phases=((400, 1),), mini_batches=2)
    run_pipeline(cfg, progress=False, reward=ToyReward())
    row = _rows(tmp_path / "split")[0]
    parts = [row[k] for k in ("time/rollout", "time/reward", "time/update", "time/old_logprob")]
    assert all(p > 0 for p in parts) and sum(parts) <= row["time/step"] <= sum(parts) + 2.0
    assert row["rollout_tokens_per_s"] == pytest.approx(
        row["response/mean_len"] * len(row["examples"]) * cfg.rl.group_size / row["time/rollout"], rel=1e-6)
    assert row["accuracy/synthetic"] == pytest.approx(row["accuracy"])  # one data source: the same figure
    assert 0 <= row["response/truncated"] <= 1 and 0 < row["response/mean_len"] <= row["response/max_len"] <= 6
    assert row["policy/entropy"] > 0 and 0 <= row["policy/clip_high"] <= 1
    assert row["lr"] == cfg.train.lr and row["grad_norm"] > 0


def test_a_phase_no_example_falls_in_is_named(tiny_setup):
    from engine.train import run_rl
    config, _ = tiny_setup
    with pytest.raises(ValueError, match=r"rl.phases\[0\] \('p0'\): no example has a prompt of 1-20 tokens; "
                                         r"the rl.data prompts are \d+-\d+ tokens"):
        run_rl(config("empty-phase", phases=((20, 1), (400, 1))), progress=False, reward=ToyReward())


def test_ablation_script_runs_three_arms_from_one_sft(tmp_path, smollm):
    """bench/ablation.py on a CI-sized recipe: one shared SFT, three RL arms at one step budget
    (single-stage = one phase over every length; phased without carry; phased with carry),
    each arm's curve starting at the shared after-SFT figure, a table and a comparison plot."""
    pytest.importorskip("matplotlib")
    from bench import ablation

    model_dir = tiny_model_with_tokenizer(tmp_path / "tiny", smollm[1])
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'''
[model]
path = "{model_dir}"
[train]
lr = 1e-3
token_budget = 1024
seed = 0
[sft]
data = ["synthetic:n=4,tokens=20-40,seed=1,kinds=lookup,reasoning=0"]
max_steps = 1
batch_examples = 2
[rl]
data = ["synthetic:n=8,tokens=15-90,seed=4,kinds=lookup"]
phases = [{{ name = "short", max_input_tokens = 170, steps = 1 }},
          {{ name = "long", max_input_tokens = 300, steps = 1 }}]
group_size = 2
batch_prompts = 2
max_new_tokens = 4
dynamic_sampling = false
entropy_coef = 0.01
carry_ratio = 0.5
carry_threshold = 1.0
[eval]
sets = ["h=synthetic:n=2,tokens=20-40,seed=9,kinds=lookup"]
max_new_tokens = 4
temperature = 0.0
every = 1
''')
    out = tmp_path / "abl"
    assert ablation.main([str(recipe), "--out", str(out)]) == 0
    table = (out / "ablation.md").read_text()
    for arm in ("single", "phased", "retro"):
        rows = [json.loads(line) for line in (out / arm / "metrics.jsonl").read_text().splitlines()]
        rl = [r for r in rows if r["stage"] == "rl"]
        assert [r["step"] for r in rl] == [1, 2] and f"| {arm} |" in table
        assert [r["label"] for r in rows if r["stage"] == "eval"][:2] == ["before", "after-sft"]
        assert (out / arm / "report.md").is_file()
    phases = {arm: [r["phase"] for r in map(json.loads, (out / arm / "metrics.jsonl").read_text().splitlines())
                    if r["stage"] == "rl"] for arm in ("single", "phased", "retro")}
    assert phases == {"single": ["all", "all"], "phased": ["short", "long"], "retro": ["short", "long"]}
    mixes = {arm: [r for r in map(json.loads, (out / arm / "metrics.jsonl").read_text().splitlines())
                   if r["stage"] == "rl"][1] for arm in ("phased", "retro")}
    assert not mixes["phased"].get("curriculum/carried") and mixes["retro"].get("curriculum/carried")
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert "gain over SFT" in table and "- retro vs phased: " in table
    first = (out / "single" / "metrics.jsonl").stat().st_mtime
    assert ablation.main([str(recipe), "--out", str(out), "--arms", "single"]) == 0  # done arms are skipped
    assert (out / "single" / "metrics.jsonl").stat().st_mtime == first
