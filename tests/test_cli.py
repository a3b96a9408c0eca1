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


def test_bad_jsonl_row_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "a", "question": "b"}\n{"context": "a"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'question' must be a string \(missing\)"):
        read_docqa_jsonl(path)
    path.write_text('{"context": "a", "question": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
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
