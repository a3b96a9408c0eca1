"""Checkpoints: save -> transformers loads the same model; damaged input -> clear errors."""
from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import max_logit_diff_vs_hf

from engine.model import CheckpointError, UnsupportedModelError, cache_dir, load_model, save_model
from engine.model.weights import embedded_gguf_path, import_gguf, resolve_checkpoint


def _hf_load(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_save_embedded_model_loads_in_transformers(smollm, tmp_path):
    model, tok = smollm
    out = save_model(model, tok, tmp_path / "smol")
    hf = _hf_load(out)
    seq = tok.encode("Long documents need long contexts.")
    assert max_logit_diff_vs_hf(model, hf, [seq]) <= 1e-4
    # the tokenizer travels too, chat template included
    from transformers import AutoTokenizer
    tok2 = AutoTokenizer.from_pretrained(str(out))
    assert tok2.encode("hello world") == tok.encode("hello world")
    assert tok2.chat_template == tok.chat_template
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True


def test_sharded_save_round_trip(tiny_checkpoint, tmp_path):
    path, hf = tiny_checkpoint("qwen3", head_dim=24)
    model, _ = load_model(path, device="cpu", dtype="float32")
    out = save_model(model, None, tmp_path / "sharded", max_shard_bytes=40_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    reloaded, _ = load_model(out, device="cpu", dtype="float32")
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert max_logit_diff_vs_hf(reloaded, _hf_load(out), [[1, 2, 3, 4, 5, 6]]) <= 1e-4


def test_save_replaces_an_old_checkpoint_but_not_other_directories(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint("llama")
    model, _ = load_model(path, device="cpu", dtype="float32")
    out = tmp_path / "ckpt"
    save_model(model, None, out)
    save_model(model, None, out)  # replacing a checkpoint is fine
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]  # no temp dirs left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        save_model(model, None, other)
    assert (other / "keep.txt").read_text() == "mine"


def test_bf16_load(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen2")
    model, _ = load_model(path, device="cpu", dtype="bfloat16")
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model(torch.tensor([1, 2, 3])).dtype == torch.bfloat16


# ---- errors ----------------------------------------------------------------------
def test_missing_safetensors_file(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama")
    os.remove(path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        load_model(path)


def test_missing_shard_named_in_index(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint("llama")
    model, _ = load_model(path)
    out = save_model(model, None, tmp_path / "sh", max_shard_bytes=40_000)
    os.remove(sorted(out.glob("model-*.safetensors"))[1])
    with pytest.raises(CheckpointError, match="missing"):
        load_model(out)


def test_truncated_safetensors_file(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen2")
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_model(path)


def test_pickled_weights_are_refused(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama")
    os.remove(path / "model.safetensors")
    (path / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        load_model(path)


def test_unsupported_architecture(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*llama, qwen2, qwen3"):
        load_model(path)


def test_tensor_missing_from_checkpoint(tiny_checkpoint):
    from safetensors.torch import load_file, save_file
    path, _ = tiny_checkpoint("llama")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="layers.1.mlp.up_proj.weight"):
        load_model(path)


def test_shape_mismatch(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(path)


def test_unknown_model_name():
    with pytest.raises(FileNotFoundError, match="embedded: smollm2-135m-instruct"):
        resolve_checkpoint("no-such-model-anywhere")


def test_broken_config_json(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama")
    (path / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(path)


# ---- GGUF and the cache ----------------------------------------------------------
def test_cache_dir_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGRL_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LONGRL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "longrl"


def test_embedded_gguf_is_imported_once(smollm):
    model, _ = smollm
    gguf = embedded_gguf_path("smollm2-135m-instruct")
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 50e6
    ckpt = import_gguf(gguf)
    assert ckpt == model.checkpoint_dir
    mtime = (ckpt / "model.safetensors").stat().st_mtime_ns
    assert import_gguf(gguf) == ckpt  # a second call reuses the cached import
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == mtime
    cfg = model.config
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads) == ("llama", 30, 576, 3)


def test_damaged_gguf_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGRL_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="broken.gguf: cannot import GGUF"):
        load_model(bad)
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_convert_refuses_to_wipe_other_files_and_writes_readable_folders(smollm, tmp_path):
    """convert replaces an existing checkpoint directory whole: one holding other files (a
    LICENSE, a .git) is refused by name, a file as OUT too; the folder is readable by others
    (mkdtemp makes it owner-only); a sharded GGUF import is found in the cache again."""
    import os
    import stat

    from engine.model import load_model, save_model
    from engine.model.weights import CheckpointError, import_gguf
    model, tok = smollm
    out = tmp_path / "ckpt"
    save_model(model, tok, out)
    assert stat.S_IMODE(out.stat().st_mode) & 0o055 == 0o055 & ~os.umask(os.umask(0))
    (out / "LICENSE").write_text("mine")
    with pytest.raises(CheckpointError, match=r"holds files that are not part of a checkpoint \(LICENSE\)"):
        save_model(model, tok, out)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is a file"):
        save_model(model, tok, tmp_path / "afile")
    cache = tmp_path / "cache"
    sharded = tmp_path / "sharded"
    save_model(model, tok, sharded, max_shard_bytes=64 << 20)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert import_gguf(tmp_path / "none.gguf", out_dir=sharded) == sharded  # found: nothing imported
    load_model(sharded, device="cpu")
    # a source config's old `torch_dtype` does not travel (a reader that prefers it would load that dtype)
    config = json.loads((sharded / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (sharded / "config.json").write_text(json.dumps(config))
    again, _ = load_model(sharded, device="cpu")
    save_model(again, tok, tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert "torch_dtype" not in written and written["dtype"] == "float32"
