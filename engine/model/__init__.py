"""The decoder (Llama / Qwen2 / Qwen3) and its checkpoints."""
from .attention import VarlenAttention, causal_sdpa, resolve_backend
from .config import DecoderConfig, UnsupportedModelError
from .model import Decoder, positions_from_cu_seqlens
from .weights import (EMBEDDED_MODELS, CheckpointError, cache_dir, import_gguf, load_model,
                      resolve_checkpoint, save_model)

__all__ = [
    "Decoder", "DecoderConfig", "UnsupportedModelError", "CheckpointError", "VarlenAttention",
    "causal_sdpa", "resolve_backend", "positions_from_cu_seqlens", "load_model", "save_model",
    "import_gguf", "resolve_checkpoint", "cache_dir", "EMBEDDED_MODELS",
]
