"""DecoderConfig: the few numbers one decoder needs, read from a Hugging Face config.json.

One class covers the Llama, Qwen2 and Qwen3 families. The differences between them are
flags here, not subclasses: q/k/v bias (Qwen2), q/k RMSNorm with an explicit head_dim
(Qwen3), tied embeddings (SmolLM2, small Qwen models).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# model_type in config.json -> the family flags that the config does not spell out
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint is of an architecture this decoder does not implement."""


@dataclass
class DecoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    rope: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    # the config.json this was read from, kept so that save_model writes it back unchanged
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def context_window(self) -> int:
        """Positions the model handles: max_position_embeddings, or for a RoPE that stretches the
        window (linear, yarn) its original window times the factor when that is more (a Qwen2.5
        config with yarn factor 4 keeps max_position_embeddings at 32,768 and serves 131,072)."""
        if self.rope.get("rope_type") in ("linear", "yarn") and "factor" in self.rope:
            original = int(self.rope.get("original_max_position_embeddings", self.max_position_embeddings))
            return max(self.max_position_embeddings, int(original * float(self.rope["factor"])))
        return self.max_position_embeddings

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "DecoderConfig":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = hf.get("architectures")
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} (architectures {archs}) is not supported; "
                f"longrl's decoder implements {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(f"{source}: sliding-window attention is not supported")

        def need(key: str):
            if key not in hf:
                raise ValueError(f"{source}: required key {key!r} is missing")
            return hf[key]

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        head_dim = hf.get("head_dim") or hidden // heads
        bias = bool(hf.get("attention_bias", False))
        cfg = cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias and no o bias; Llama/Qwen3 put `attention_bias` on all four
            qkv_bias=True if model_type == "qwen2" else bias,
            o_bias=False if model_type == "qwen2" else bias,
            qk_norm=model_type == "qwen3",
            rope=_rope_params(hf, source),
            hf_config=dict(hf),
        )
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"{source}: num_attention_heads {heads} is not a multiple of "
                             f"num_key_value_heads {cfg.num_kv_heads}")
        if hf.get("mlp_bias"):
            raise UnsupportedModelError(f"{source}: mlp_bias=true is not supported")
        return cfg


def _rope_params(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """Normalise the two spellings of RoPE settings into one dict.

    transformers 5 writes `rope_parameters` (with rope_theta inside); older checkpoints
    (QwenLong-L1, R1-Distill) write `rope_theta` at top level and `rope_scaling`.
    """
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = params.pop("type", None) or params.get("rope_type") or "default"
    params["rope_type"] = rope_type
    params.setdefault("rope_theta", float(hf.get("rope_theta", 10000.0)))
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError(f"{source}: partial rotary embeddings are not supported")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{source}: rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type in ("linear", "yarn", "llama3") and "factor" not in params:
        raise ValueError(f"{source}: rope type {rope_type!r} needs a 'factor'")
    if rope_type in ("yarn", "llama3"):
        params.setdefault("original_max_position_embeddings",
                          hf.get("original_max_position_embeddings", hf.get("max_position_embeddings", 4096)))
    return params
