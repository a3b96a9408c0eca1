"""SFT warm-up: packing, schedule, learning, checkpoints (atomic, pruned), resume equality,
non-finite losses, and the `longrl sft` command."""
from __future__ import annotations

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


def test_metrics_log_resume_and_tensorboard(tmp_path):
    from engine.train import MetricsLog
    log = MetricsLog(tmp_path, "sft", fresh=True)
    for i in range(1, 5):
        log.write({"stage": "sft", "step": i, "loss": float(i)})
    log.write({"stage": "eval", "step": 3, "accuracy": 1.0})
    resumed = MetricsLog(tmp_path, "sft", resume_after_step=2)  # rows after the checkpoint go
    assert [(r["stage"], r["step"]) for r in resumed.rows()] == [("sft", 1), ("sft", 2), ("eval", 3)]
    log.write({"stage": "sft", "step": 3, "loss": float("nan")})
    assert resumed.rows()[-1]["loss"] is None  # JSON has no NaN
    if log.tb is not None:  # TensorBoard event files when the package is installed
        assert list((tmp_path / "tb").glob("events.*"))
