"""Shared fixtures: the embedded model (ours and transformers'), tiny random checkpoints."""
from __future__ import annotations

import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    # before anything imports triton: without a GPU the Triton kernels run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

torch.set_num_threads(max(1, os.cpu_count() or 1))

if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("LONGRL_TRITON_BOUNDS", "1") != "0":
    try:
        import triton  # noqa: F401
    except ImportError:  # no triton: nothing to check
        pass
    else:  # every interpreted load and store checked against the launch's tensors (tests/triton_bounds.py)
        import triton_bounds
        triton_bounds.install()
if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("LONGRL_TRITON_PATCH_ONCE", "1") != "0":
    import triton_patch_once  # helper calls inside a launch skip the interpreter's redundant swap
    triton_patch_once.install()

try:  # the decode kernels' partials filled with values that show if a slot nobody wrote is read
    import kernels.triton_paged
except ImportError:  # no triton
    pass
else:
    kernels.triton_paged.POISON_SCRATCH = True


@pytest.fixture(scope="session")
def smollm():
    """(our Decoder, tokenizer) of the embedded SmolLM2-135M-Instruct, fp32 CPU."""
    from engine.model import load_model
    return load_model("smollm2-135m-instruct", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def hf_smollm(smollm):
    """transformers' model read from the same cached checkpoint directory."""
    from transformers import AutoModelForCausalLM
    model, _ = smollm
    return AutoModelForCausalLM.from_pretrained(str(model.checkpoint_dir), dtype=torch.float32).eval()


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (biases and norm weights included, which HF initialises to
    constants) random values, so that a wrongly applied bias or norm changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


TINY = dict(vocab_size=331, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)


def tiny_hf_model(kind: str, **overrides):
    """A random transformers model of family `kind` (llama | qwen2 | qwen3), fp32, eval mode."""
    import transformers
    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "qwen3": transformers.Qwen3Config}[kind]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "qwen3": transformers.Qwen3ForCausalLM}[kind]
    cfg = cfg_cls(**{**TINY, **overrides})
    torch.manual_seed(0)
    model = model_cls(cfg).float().eval()
    randomize_(model)
    return model


def tiny_decoder(path, kind: str = "qwen2", **overrides):
    """Our Decoder (fp32, CPU) of a tiny random transformers checkpoint written to `path`."""
    from engine.model import load_model
    tiny_hf_model(kind, **overrides).save_pretrained(str(path))
    return load_model(path, device="cpu", dtype="float32")[0]


def letters_checkpoint(path, max_positions: int = 1024) -> str:
    """Save a tiny 16-token Llama (untied lm_head) for the letter tokenizer's tests; -> path."""
    tiny_hf_model("llama", vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  max_position_embeddings=max_positions).save_pretrained(str(path))
    return str(path)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: kind, **config overrides -> (checkpoint dir written by transformers, HF model)."""
    def make(kind: str, **overrides):
        hf = tiny_hf_model(kind, **overrides)
        path = tmp_path / f"{kind}-ckpt"
        hf.save_pretrained(str(path))
        return path, hf
    return make


def tiny_model_with_tokenizer(path, tokenizer, hidden: int = 48) -> str:
    """Save a random tiny Llama that uses `tokenizer` (its vocabulary size, its files) to path."""
    hf = tiny_hf_model("llama", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=2, max_position_embeddings=1024, tie_word_embeddings=True)
    hf.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.fixture
def ctrl_c_on():
    """Ctrl-C as at a terminal: a test run in the background (a non-interactive shell's `&`)
    inherits SIGINT ignored, and the training loop leaves an ignored SIGINT alone."""
    import signal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
