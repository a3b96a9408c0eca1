"""Sampling parameters, completions, and the per-sequence sampler.

Behaviour log-probs: every sampled token comes with log softmax(logits / T)[token], the
log-prob under the temperature-scaled distribution *before* top-k / top-p truncation. That
is the distribution `kernels.linear_logprob(..., temperature=T)` computes for the trainer,
so the importance ratio of the first update of an on-policy step is exactly 1 whatever
top-p does. (Truncation changes which tokens can be drawn, not the log-prob reported.) With
temperature 0 (greedy) the log-prob is taken at T = 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None  # per request; sample i of a request uses seed + i
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings (need the tokenizer)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # behaviour log-prob of each token (see the module docstring)
    finish_reason: str  # "stop" (stop token or string) or "length"


def truncate_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] with everything outside the top-k / top-p support set to −inf. top-p keeps
    the smallest set of most likely tokens whose mass reaches top_p."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p  # mass before this token already enough
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[int, float]:
    """logits [V] fp32 -> (token, behaviour log-prob)."""
    if params.temperature == 0:
        token = int(logits.argmax())
        return token, float(torch.log_softmax(logits, -1)[token])
    scaled = logits / params.temperature
    logprobs = torch.log_softmax(scaled, -1)
    support = truncate_logits(scaled, params.top_k, params.top_p)
    probs = torch.softmax(support, -1)
    token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
    return token, float(logprobs[token])
