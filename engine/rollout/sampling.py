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
    # None: the model's own stop rule (engine.data.template.stop_token_ids: generation_config's
    # eos ids and the chat template's end of turn), as transformers and vLLM stop by default
    stop_token_ids: list[int] | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (need the tokenizer)
    ignore_eos: bool = False  # True: generate max_new_tokens, stopping only at explicit stop_token_ids / stop

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
    """logits [V] fp32 -> (token, behaviour log-prob): sample_batch for one row."""
    tokens, logprobs = sample_batch(logits[None], [params], [generator])
    return tokens[0], logprobs[0]


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> tuple[list[int], list[float]]:
    """logits [B, V] fp32 -> tokens and behaviour log-probs, one row per sequence.

    Rows are drawn by inverse CDF with a uniform from each row's own generator, so a
    sequence's samples depend only on its seed, not on what else is in the batch; the
    arithmetic over [B, V] runs once for all rows that share their settings."""
    tokens = [0] * len(params)
    logprobs = [0.0] * len(params)
    by_setting: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        by_setting.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
    for (temperature, top_k, top_p), rows in by_setting.items():
        sub = logits[rows]
        if temperature == 0:
            picked = sub.argmax(-1)
            lp = torch.log_softmax(sub, -1)
        else:
            scaled = sub / temperature
            lp = torch.log_softmax(scaled, -1)
            support = scaled
            if top_k > 0 or top_p < 1.0:
                support = torch.stack([truncate_logits(r, top_k, top_p) for r in scaled])
            cdf = torch.softmax(support, -1).cumsum(-1)
            u = torch.stack([torch.rand((), generator=generators[i]) for i in rows]).to(cdf.device)
            # scaled by the total so cumsum rounding never leaves u past the end; kept above 0 so
            # the first index with cdf >= u is always a token of positive probability
            u = (u.to(cdf.dtype) * cdf[:, -1]).clamp(min=torch.finfo(cdf.dtype).tiny)
            picked = torch.searchsorted(cdf, u[:, None]).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
        chosen = lp.gather(-1, picked[:, None]).squeeze(-1)
        for row, tok, val in zip(rows, picked.tolist(), chosen.tolist()):
            tokens[row], logprobs[row] = tok, val
    return tokens, logprobs
