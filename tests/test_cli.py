"""The `longrl` command: help, convert, generate, and error exits."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.cli import main
from engine.data import build_prompt_ids
from engine.data.jsonl import DataError, read_docqa_jsonl


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "engine.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "convert" in out.stdout and "generate" in out.stdout and "--section.key=value" in out.stdout


def test_console_script_installed():
    script = Path(sys.executable).parent / "longrl"  # the venv's bin, active or not
    out = subprocess.run([str(script), "generate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--input" in out.stdout


def test_convert_then_generate(smollm, tmp_path, capsys):
    out_dir = tmp_path / "smol"
    assert main(["convert", "smollm2-135m-instruct", str(out_dir)]) == 0
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file()
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "q1", "context": "Tom keeps his bicycle in the red shed.",
                                 "question": "Where does Tom keep his bicycle?", "answers": ["red shed"]}) + "\n")
    results = tmp_path / "out.jsonl"
    code = main(["generate", "--input", str(items), "--output", str(results), f"--model.path={out_dir}",
                 "--generate.max_new_tokens=16", "--bench"])
    assert code == 0
    row = json.loads(results.read_text())
    assert row["id"] == "q1" and row["completion"] and 0 < row["completion_tokens"] <= 16
    printed = capsys.readouterr().out
    assert "[q1] A: " + row["completion"] in printed and "decode" in printed and "tokens/s" in printed


def test_bad_override_exits_with_message(capsys):
    assert main(["generate", "--prompt", "hi", "--generate.temprature=1"]) == 2
    assert "unknown key generate.'temprature'" in capsys.readouterr().err
    assert main(["generate", "--prompt", " "]) == 2 and "--prompt is empty" in capsys.readouterr().err


def test_bad_jsonl_row_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "a", "question": "b"}\n{"context": "a"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'question' must be a string \(missing\)"):
        read_docqa_jsonl(path)
    path.write_text('{"context": "a", "question": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        read_docqa_jsonl(path)
    # generate's reader: a pre-rendered prompt stands in for context and question
    path.write_text('{"prompt": "Say hi."}\n{"context": "a"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'question' .* \(or give a pre-rendered 'prompt'\)"):
        read_docqa_jsonl(path, prompt_ok=True)
    path.write_text('{"prompt": ""}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'prompt' must be a non-empty string"):
        read_docqa_jsonl(path, prompt_ok=True)
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'context' must be a string \(missing\)$"):
        read_docqa_jsonl(path)


def test_middle_truncation_keeps_head_tail_and_question(smollm):
    _, tok = smollm
    doc = "HEADMARK opens the file. " + "Filler sentence number x. " * 400 + "TAILMARK closes it."
    ids, cut = build_prompt_ids(tok, doc, "What closes the file?", max_tokens=300)
    assert cut and len(ids) <= 300
    text = tok.decode(ids)
    assert "HEADMARK" in text and "TAILMARK" in text and "What closes the file?" in text
    ids_full, cut_full = build_prompt_ids(tok, doc, "What closes the file?")
    assert not cut_full and len(ids_full) > 1000
    assert torch.tensor(ids_full).numel() > len(ids)


def test_command_line_traps_are_named(capsys, tmp_path):
    """A dotted override without '=' says how to write it; `train` takes its recipe as
    `--recipe` too; every config-reading subcommand's help tells of the overrides."""
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--data", "x.json", "--out", str(tmp_path), "--eval.limit", "2"])
    assert stop.value.code == 2 and "write --eval.limit=2" in capsys.readouterr().err
    assert main(["train", "--recipe", str(tmp_path / "none.toml")]) == 2  # read as the recipe: no such file
    assert "none.toml: no such file" in capsys.readouterr().err
    for command in ("generate", "sft", "train", "eval"):
        out = subprocess.run([sys.executable, "-m", "engine.cli", command, "--help"], capture_output=True, text=True)
        assert "--section.key=value (the = is required)" in " ".join(out.stdout.split()), command


def test_generate_keeps_inputs_inside_the_window(smollm, tmp_path, capsys):
    """data.max_input_tokens past the model's window is cut to the window (and said so); a row
    with a pre-rendered prompt is truncated in its middle like any other. Each item samples from
    its own stream: a question given twice gets two draws, not one copied."""
    from conftest import tiny_model_with_tokenizer
    model_dir = tiny_model_with_tokenizer(tmp_path / "tiny", smollm[1])  # a 1,024-token window
    items = tmp_path / "items.jsonl"
    long = "Filler sentence number x. " * 400
    twice = json.dumps({"id": "d", "context": "A short note.", "question": "What?"}) + "\n"
    items.write_text(json.dumps({"id": "p", "prompt": long + "Where?"}) + "\n" + twice + twice)
    results = tmp_path / "out.jsonl"
    assert main(["generate", "--input", str(items), "--output", str(results), f"--model.path={model_dir}",
                 "--generate.max_new_tokens=6", "--data.max_input_tokens=100000", "--generate.temperature=1.0"]) == 0
    assert "inputs are cut to 1018 tokens" in capsys.readouterr().err
    row, first, second = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["truncated_input"] and row["prompt_tokens"] == 1018
    assert first["completion"] != second["completion"]


def test_nproc_launch_waits_through_ctrl_c_for_the_checkpoint(monkeypatch, ctrl_c_on):
    """`--nproc N` runs torchrun and, on Ctrl-C, keeps waiting for it (torchrun passes the
    interrupt on to the processes, which finish their step and save) instead of killing it;
    torchrun is told to wait long enough for that."""
    import os
    import signal
    import threading

    from engine import cli
    seen = {}

    class FakeTorchrun:
        def __init__(self, cmd, env):
            seen.update(cmd=cmd, env=env)
            self.calls = 0

        def wait(self):
            self.calls += 1
            if self.calls == 1:  # Ctrl-C lands while we wait
                os.kill(os.getpid(), signal.SIGINT)
                threading.Event().wait(1.0)  # the handler raises KeyboardInterrupt in here
            return 130

    monkeypatch.setattr(cli.subprocess, "Popen", FakeTorchrun)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    assert cli._relaunch(["train", "r.toml", "--nproc", "2"], 2) == 130
    assert seen["cmd"][-3:] == ["engine.cli", "train", "r.toml"] and "--nproc-per-node=2" in seen["cmd"]
    assert seen["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(cli.SHUTDOWN_WAIT_S)
