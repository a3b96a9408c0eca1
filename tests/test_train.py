"""SFT warm-up: packing, schedule, learning, checkpoints (atomic, pruned), resume equality,
non-finite losses, and the `longrl sft` command."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import tiny_model_with_tokenizer

from engine.cli import main
from engine.config import SFTConfig, TrainConfig, load_config
from engine.data import synthetic, write_docqa
from engine.data.packing import budget_batches, pack
from engine.train import TrainingStopped, latest_checkpoint, run_sft
from engine.train import checkpoint as ckpt_mod
from engine.train import sft as sft_mod
from engine.train.optim import lr_at


def test_pack_targets_and_mask():
    p = pack([([5, 6, 7], [0, 1, 1]), ([8, 9], [0, 1])])
    assert p.input_ids.tolist() == [5, 6, 7, 8, 9]
    assert p.cu_seqlens.tolist() == [0, 3, 5]
    assert p.targets.tolist() == [6, 7, 0, 9, 0]  # the next token; none after a sequence's end
    assert p.loss_mask.tolist() == [1, 1, 0, 1, 0]  # a position counts when its target is flagged
    assert p.seq_index.tolist() == [0, 0, 0, 1, 1] and p.loss_rows.tolist() == [0, 1, 3]


def test_budget_batches():
    assert budget_batches([3, 4, 2, 5, 1], 6) == [[0], [1, 2], [3, 4]]
    with pytest.raises(ValueError, match="over the micro-batch token budget of 4"):
        budget_batches([3, 5], 4)


def test_lr_schedules():
    cfg = TrainConfig(lr=1.0, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert [lr_at(s, cfg, 12) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, cfg, 12) == pytest.approx(1.0)
    assert lr_at(7, cfg, 12) == pytest.approx(0.55)  # half way: floor + half the range
    assert lr_at(12, cfg, 12) == pytest.approx(0.1)
    assert lr_at(5, TrainConfig(lr=0.3, warmup_steps=2, schedule="warmup"), 10) == 0.3


@pytest.fixture
def tiny_run(tmp_path, smollm):
    """A tiny Llama with the embedded tokenizer, synthetic doc-QA data, and a config."""
    model_dir = tiny_model_with_tokenizer(tmp_path / "tiny", smollm[1], hidden=64)
    data = tmp_path / "synth.jsonl"
    write_docqa(synthetic.generate(12, 60, seed=0, kinds=("lookup",)), data)

    def config(out: str, **train):
        cfg = load_config(None, [f"--model.path={model_dir}", f"--train.out_dir={tmp_path / out}"])
        cfg.train = TrainConfig(**{"lr": 3e-3, "token_budget": 400, "out_dir": str(tmp_path / out), **train})
        cfg.sft = SFTConfig(data=[str(data)], batch_examples=4, max_steps=6)
        return cfg
    return config


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_learns_and_checkpoints_load_in_transformers(tiny_run, tmp_path):
    cfg = tiny_run("learn")
    cfg.sft.max_steps = 24
    final = run_sft(cfg, progress=False)
    losses = _losses(tmp_path / "learn")
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4  # well beyond noise
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(final / "model"))
    assert latest_checkpoint(tmp_path / "learn") == final


def test_resume_gives_the_losses_of_an_uninterrupted_run(tiny_run, tmp_path):
    straight = tiny_run("straight", save_every=2)
    run_sft(straight, progress=False)
    broken = tiny_run("broken", save_every=2)
    run_sft(broken, progress=False, stop_after=3)  # killed after step 3; the last checkpoint is step 2
    assert latest_checkpoint(tmp_path / "broken").name == "step-000002"
    assert len(_losses(tmp_path / "broken")) == 3
    run_sft(broken, resume=True, progress=False)
    assert _losses(tmp_path / "broken") == _losses(tmp_path / "straight")


def test_ctrl_c_mid_step_checkpoints_that_step_whole(tiny_run, tmp_path, monkeypatch, ctrl_c_on):
    """A SIGINT inside step 3's forward: the step finishes and is saved (its data position with
    it); the resumed run's losses are those of a run that never stopped."""
    import os
    import signal

    from engine.train.loop import Interrupted
    straight = tiny_run("straight")
    run_sft(straight, progress=False)
    real, real_step, calls = sft_mod.linear_logprob, sft_mod.SFTTrainer.step, {"step": 0, "sent": False}

    def counted(self):
        calls["step"] += 1
        return real_step(self)

    def signalled(*a, **k):
        if calls["step"] == 3 and not calls["sent"]:
            calls["sent"] = True
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    cfg = tiny_run("ctrlc")
    monkeypatch.setattr(sft_mod.SFTTrainer, "step", counted)
    monkeypatch.setattr(sft_mod, "linear_logprob", signalled)
    with pytest.raises(Interrupted):
        run_sft(cfg, progress=False)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "ctrlc").name == "step-000003" and len(_losses(tmp_path / "ctrlc")) == 3
    run_sft(cfg, resume=True, progress=False)
    assert _losses(tmp_path / "ctrlc") == _losses(tmp_path / "straight")


def test_checkpoint_write_is_atomic_and_pruned(tiny_run, tmp_path, monkeypatch):
    cfg = tiny_run("atomic", save_every=1, keep_last=2)
    cfg.sft.max_steps = 3
    run_sft(cfg, progress=False)
    run_dir = tmp_path / "atomic"
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-000002", "step-000003"]
    real_save = torch.save

    def dies_midway(obj, path, *a, **k):
        if str(path).endswith("rng.pt"):
            raise KeyboardInterrupt("killed while writing")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", dies_midway)
    cfg.sft.max_steps = 4
    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg, resume=True, progress=False)
    assert latest_checkpoint(run_dir).name == "step-000003"  # the previous checkpoint is whole
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".step-")]


def test_a_gpu_checkpoint_loads_into_host_memory(tmp_path, monkeypatch):
    """A one-GPU run's optimizer state is tagged cuda:0: every rank of a resumed multi-GPU job
    would load it whole onto GPU 0, and a CPU machine not at all. It is read to host memory;
    the CUDA generators restored are those this machine has."""
    import torch.serialization as ser

    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4)}},
             "param_groups": [{"lr": 1e-5, "params": [0]}]}
    monkeypatch.setattr(ser, "location_tag", lambda storage: "cuda:0")  # as torch.save tags a tensor on cuda:0
    torch.save(state, tmp_path / "optimizer.pt")
    torch.save({"cpu": torch.get_rng_state(), "cuda": [torch.zeros(8, dtype=torch.uint8)] * 4}, tmp_path / "rng.pt")
    monkeypatch.undo()
    (tmp_path / "trainer.json").write_text(json.dumps({"stage": "rl", "step": 3}))
    optimizer, rng, trainer = ckpt_mod.load_checkpoint_state(tmp_path)
    assert optimizer["state"][0]["exp_avg"].device.type == "cpu" and trainer["step"] == 3
    assert ckpt_mod.read_trainer_state(tmp_path) == {"stage": "rl", "step": 3}
    restored = []  # saved with 4 GPUs visible, resumed with 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append(i))
    ckpt_mod.restore_rng(rng)
    assert restored == [0, 1]


def test_checkpoint_of_a_step_saved_twice_and_per_stage_pruning(tmp_path, monkeypatch):
    """The same step saved again (a periodic save, then the phase end's) never leaves the run
    without it: killed between moving the older copy aside and renaming the new one in, the
    older copy is taken back. SFT's and RL's checkpoints (RL counts from 0 again) keep their own
    `keep_last`, and a resume with nothing to resume refuses instead of starting over."""
    from pathlib import Path

    from engine.train import run_pipeline

    def fake_model(model, tokenizer, path, state_dict=None):
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")

    monkeypatch.setattr(ckpt_mod, "save_model", fake_model)
    run = tmp_path / "run"

    def save(step, stage, tag):
        return ckpt_mod._write_checkpoint(run, step, None, None, {}, {"stage": stage, "tag": tag}, 2)

    def tag(path):
        return json.loads((path / "trainer.json").read_text())["tag"]

    synced, real_fsync, real_open, opened = [], ckpt_mod.os.fsync, ckpt_mod.os.open, {}

    def record_open(path, flags, *a, **kw):
        fd = real_open(path, flags, *a, **kw)
        opened[fd] = Path(path).name
        return fd

    monkeypatch.setattr(ckpt_mod.os, "open", record_open)
    monkeypatch.setattr(ckpt_mod.os, "fsync", lambda fd: synced.append(opened.get(fd)) or real_fsync(fd))
    for step in (50, 100):
        save(step, "sft", "sft")
    # flushed to disk before the renames that make it the checkpoint: its files, its folder, the pointer
    assert {"trainer.json", "rng.pt", "optimizer.pt", "config.json", ".latest.tmp", "run"} <= set(synced)
    for step in (10, 20, 30):
        save(step, "rl", "periodic")
    assert sorted(p.name for p in run.iterdir()) == ["latest", "rl-step-000020", "rl-step-000030", "step-000050",
                                                     "step-000100"]
    real_rename = Path.rename

    def killed(self, target):
        if self.name.startswith(".rl-step-000030.tmp"):
            raise KeyboardInterrupt("killed between the renames")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        save(30, "rl", "phase end")
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not (run / "rl-step-000030").exists()
    from engine.model.weights import resolve_checkpoint  # what eval, convert and load_model read
    assert resolve_checkpoint(run) == run / "rl-step-000030" / "model" and tag(run / "rl-step-000030") == "periodic"
    save(30, "rl", "phase end")
    assert tag(latest_checkpoint(run)) == "phase end"
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run_pipeline(load_config(None, [f"--train.out_dir={tmp_path / 'empty'}"]), resume=True, progress=False)
    stale = tmp_path / "again" / "eval" / "before"  # a fresh run in an old run's folder: its held-out results go
    stale.mkdir(parents=True)
    (stale / "settings.json").write_text('{"model": "an old run"}')
    run_pipeline(load_config(None, [f"--train.out_dir={tmp_path / 'again'}"]), progress=False, stop_after=0)
    assert not (tmp_path / "again" / "eval").exists()


def test_non_finite_losses_skip_then_stop(tiny_run, monkeypatch):
    cfg = tiny_run("nan", max_bad_steps=2)

    def nan_logprob(hidden, weight, targets, **kw):
        return (hidden.sum(-1) * float("nan")), None

    monkeypatch.setattr(sft_mod, "linear_logprob", nan_logprob)
    with pytest.raises(TrainingStopped, match="2 non-finite losses in a row"):
        run_sft(cfg, progress=False)


def test_sft_command(tiny_run, tmp_path, capsys):
    cfg = tiny_run("cli")
    recipe = tmp_path / "sft.toml"
    recipe.write_text(f'[model]\npath = "{cfg.model.path}"\n[train]\nlr = 0.003\ntoken_budget = 400\n'
                      f'out_dir = "{tmp_path / "cli"}"\n[sft]\ndata = ["{cfg.sft.data[0]}"]\nmax_steps = 2\n'
                      f'batch_examples = 4\n')
    assert main(["sft", "--recipe", str(recipe)]) == 0
    assert "sft done" in capsys.readouterr().out
    assert len(_losses(tmp_path / "cli")) == 2
    assert main(["sft", "--recipe", str(recipe), "--train.lr=-1"]) == 2
    assert "train.lr: expected a number > 0" in capsys.readouterr().err


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"stage": "sft", "step": i, "loss": 2.0 / i, "grad_norm": 1.0, "lr": 1e-5} for i in range(1, 5)]
    rows += [{"stage": "rl", "step": i, "loss": 0.1, "reward/mean": 0.1 * i, "accuracy": 0.1 * i} for i in range(1, 4)]
    rows += [{"stage": "eval", "label": "before", "step": 0, "accuracy": 10.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(tmp_path)]) == 0
    png = (tmp_path / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert main(["plot", str(tmp_path / "nowhere")]) == 2


def test_plot_phases_evals_and_comparison(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from engine.train.plot import eval_points, phase_spans

    rows = [{"stage": "eval", "label": "before", "step": 0, "accuracy": 5.0},
            {"stage": "sft", "step": 1, "loss": 1.0},
            {"stage": "eval", "label": "after-sft", "step": 0, "accuracy": 40.0}]
    rows += [{"stage": "rl", "step": i, "phase": "short" if i <= 3 else "long", "reward/mean": 0.1 * i,
              "loss": 0.0} for i in range(1, 7)]
    rows.insert(6, {"stage": "eval", "label": "after-short", "step": 3, "accuracy": 60.0})
    rows.append({"stage": "eval", "label": "after-long", "step": 6, "accuracy": 70.0})
    assert phase_spans(rows) == [("short", 1, 3), ("long", 4, 6)]
    assert eval_points(rows) == [("before", 0, 5.0), ("after-sft", 0, 40.0), ("after-short", 3, 60.0),
                                 ("after-long", 6, 70.0)]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"


def test_paired_gain_interval_and_sign_test(tmp_path):
    from engine.eval.paired import item_scores, paired_gain, sign_test

    assert sign_test(12, 0) == pytest.approx(2 / 2 ** 12)
    assert sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(1, 4) == pytest.approx(2 * (1 + 5) / 32)
    before = {("b", str(i)): float(i < 20) for i in range(40)}
    same = paired_gain(before, dict(before))
    assert same["gain"] == 0 and same["low"] == 0 == same["high"] and same["sign_p"] == 1.0
    after = {k: 1.0 for k in before}  # 20 fixed, none broken
    g = paired_gain(before, after)
    assert (g["before"], g["after"], g["gain"], g["fixed"], g["broken"]) == (50.0, 100.0, 50.0, 20, 0)
    assert 30 < g["low"] < 50 < g["high"] < 70
    mixed = dict(after)
    mixed.update({("b", str(i)): 0.0 for i in range(20)})  # every right one broken, every wrong one fixed
    m = paired_gain(before, mixed)
    assert m["gain"] == 0 and m["fixed"] == 20 and m["broken"] == 20 and m["low"] < -15 and m["high"] > 15
    with pytest.raises(ValueError, match="share no items"):
        paired_gain(before, {("x", "1"): 1.0})
    (tmp_path / "items.jsonl").write_text('{"benchmark": "b", "id": "1", "score": 1}\n'
                                          '{"benchmark": "b", "id": "1", "score": 0}\n{"id": 2}\n')
    with pytest.raises(ValueError, match="items.jsonl:3"):
        item_scores(tmp_path)
    (tmp_path / "items.jsonl").write_text('{"benchmark": "b", "id": "1", "score": 1}\n'
                                          '{"benchmark": "b", "id": "1", "score": 0}\n')
    assert item_scores(tmp_path) == {("b", "1"): 0.5}


def test_metrics_log_resume_and_tensorboard(tmp_path):
    from engine.train import MetricsLog
    log = MetricsLog(tmp_path, "rl", fresh=True)
    log.write({"stage": "eval", "step": 0, "accuracy": 0.5})
    log.write({"stage": "sft", "step": 3, "loss": 1.0})  # an earlier stage: its own steps
    for i in range(1, 5):
        log.write({"stage": "rl", "step": i, "loss": float(i)})
        log.write({"stage": "eval", "step": i, "accuracy": 1.0})
    resumed = MetricsLog(tmp_path, "rl", resume_after_step=2)  # rows after the checkpoint go, evaluations too
    assert [(r["stage"], r["step"]) for r in resumed.rows()] == [("eval", 0), ("sft", 3), ("rl", 1), ("eval", 1),
                                                                 ("rl", 2), ("eval", 2)]
    log.write({"stage": "rl", "step": 3, "loss": float("nan")})
    assert resumed.rows()[-1]["loss"] is None  # JSON has no NaN
    with open(tmp_path / "metrics.jsonl", "a") as f:  # killed while writing step 4's row: a resume drops it
        f.write('{"stage": "rl", "st')
    again = MetricsLog(tmp_path, "rl", resume_after_step=3)
    assert [(r["stage"], r["step"]) for r in again.rows()][-2:] == [("eval", 2), ("rl", 3)]
    if log.tb is not None:  # TensorBoard event files when the package is installed
        assert list((tmp_path / "tb").glob("events.*"))


def test_plot_reads_a_torn_last_row_and_refuses_ambiguous_labels(tmp_path, capsys, monkeypatch):
    from engine.train.plot import read_rows
    run = tmp_path / "a" / "demo"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"stage": "sft", "step": 1, "loss": 1.0}\n{"stage": "sft", "st')
    assert read_rows(run) == [{"stage": "sft", "step": 1, "loss": 1.0}]  # a run killed mid-write
    (run / "metrics.jsonl").write_text('{"stage": "sft", "st\n{"stage": "sft", "step": 1, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: not a JSON row"):
        read_rows(run)
    monkeypatch.setenv("HOME", str(tmp_path))
    (run / "metrics.jsonl").write_text('{"stage": "sft", "step": 1, "loss": 1.0}\n')
    assert read_rows("~/a/demo") == [{"stage": "sft", "step": 1, "loss": 1.0}]  # ~ is the home folder
    from engine.model.weights import cache_dir
    monkeypatch.setenv("LONGRL_CACHE", "~/cache")
    assert cache_dir() == tmp_path / "cache"
    real_find = importlib.util.find_spec
    monkeypatch.setattr("engine.cli.importlib.util.find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find(name, *a))
    assert main(["plot", str(run)]) == 2 and "pip install -e '.[plot]'" in capsys.readouterr().err
    monkeypatch.undo()
    other = tmp_path / "b" / "demo"
    other.mkdir(parents=True)
    if importlib.util.find_spec("matplotlib") is not None:
        assert main(["plot", str(run), str(other), "--out", str(tmp_path / "x.png")]) == 2
        assert "runs with the same folder name" in capsys.readouterr().err


def test_run_report_tables_curves_and_noise(tmp_path):
    pytest.importorskip("matplotlib")
    from engine.train import run_report

    rows = [{"stage": "eval", "label": "before", "step": 0, "accuracy": 0.0},
            {"stage": "eval", "label": "after-sft", "step": 0, "accuracy": 25.0}]
    rows += [{"stage": "rl", "step": i, "phase": "short" if i <= 2 else "long", "reward/mean": r}
             for i, r in enumerate([0.0, 0.5, 0.99, 1.0], 1)]
    rows.append({"stage": "eval", "label": "after-long", "step": 4, "accuracy": 75.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for label, right in (("after-sft", 2), ("after-long", 6)):
        (tmp_path / "eval" / label).mkdir(parents=True)
        (tmp_path / "eval" / label / "items.jsonl").write_text("".join(
            json.dumps({"benchmark": "h", "id": str(i), "score": float(i < right)}) + "\n" for i in range(8)))
    text = run_report(tmp_path)
    assert "| after-sft | 0 | 25.0% |" in text and "| after-long | 4 | 75.0% |" in text
    assert "phase short (steps 1-2): ▁▅  0.00 -> 0.50" in text and "phase long (steps 3-4): ██" in text
    assert "gain +50.0 points" in text and "4 fixed, 0 broken" in text
    assert (tmp_path / "metrics.png").is_file() and (tmp_path / "report.md").read_text().strip() == text


def test_a_run_dir_or_step_dir_stands_for_its_model(tmp_path):
    from engine.model.weights import resolve_checkpoint

    model = tmp_path / "run" / "step-000004" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (tmp_path / "run" / "latest").write_text("step-000004\n")
    assert resolve_checkpoint(tmp_path / "run") == model
    assert resolve_checkpoint(tmp_path / "run" / "step-000004") == model
    assert resolve_checkpoint(model) == model
