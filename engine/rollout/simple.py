"""Plain generation over a contiguous KV cache: one [B, Hkv, max_len, D] buffer per layer.

This is the first generator: it exists so that `longrl generate` and the demo work and so
that the decoder's cache seam is exercised. It batches B prompts, prefills them in one
packed forward pass and decodes all unfinished rows together. The paged engine (block
tables, group sharing, continuous batching) replaces it for RL rollouts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.attention import causal_sdpa
from ..model.model import Decoder


class ContiguousKVCache:
    """An attention context (see engine.model.attention) that appends to and reads from a
    per-row contiguous cache. Before each forward pass `begin` says which rows receive how
    many new tokens (packed in that order); `commit` advances their lengths afterwards."""

    def __init__(self, model: Decoder, batch: int, max_len: int):
        cfg = model.config
        w = model.embed_tokens.weight
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        # zeros, not empty: masked-out slots still meet V in the weighted sum (0 · NaN = NaN)
        self.k = [torch.zeros(shape, device=w.device, dtype=w.dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=w.device, dtype=w.dtype) for _ in range(cfg.num_layers)]
        self.lengths = [0] * batch
        self.max_len = max_len
        self.rows: list[int] = []
        self.new: list[int] = []

    def begin(self, rows: list[int], new_tokens: list[int]) -> torch.Tensor:
        """-> position ids [sum(new_tokens)] of the new tokens."""
        for r, n in zip(rows, new_tokens):
            if self.lengths[r] + n > self.max_len:
                raise ValueError(f"KV cache row {r}: {self.lengths[r]} + {n} tokens exceed max_len {self.max_len}")
        self.rows, self.new = rows, new_tokens
        device = self.k[0].device
        return torch.cat([torch.arange(self.lengths[r], self.lengths[r] + n, device=device)
                          for r, n in zip(rows, new_tokens)])

    def commit(self) -> None:
        for r, n in zip(self.rows, self.new):
            self.lengths[r] += n

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.k[layer], self.v[layer]
        scale = q.shape[-1] ** -0.5
        if all(n == 1 for n in self.new):
            return self._decode(kc, vc, q, k, v, scale)
        outs, start = [], 0
        for r, n in zip(self.rows, self.new):
            past = self.lengths[r]
            kc[r, :, past:past + n] = k[start:start + n].transpose(0, 1)
            vc[r, :, past:past + n] = v[start:start + n].transpose(0, 1)
            keys = kc[r, :, :past + n].transpose(0, 1)
            values = vc[r, :, :past + n].transpose(0, 1)
            outs.append(causal_sdpa(q[start:start + n], keys, values, scale, q_offset=past))
            start += n
        return torch.cat(outs)

    def _decode(self, kc, vc, q, k, v, scale) -> torch.Tensor:
        """One new token per row: write it, then one batched attention with a length mask."""
        rows = torch.tensor(self.rows, device=q.device)
        pos = torch.tensor([self.lengths[r] for r in self.rows], device=q.device)
        kc[rows, :, pos] = k
        vc[rows, :, pos] = v
        span = int(pos.max()) + 1
        keys, values = kc[rows, :, :span], vc[rows, :, :span]  # [B, Hkv, span, D]
        mask = torch.arange(span, device=q.device)[None, :] <= pos[:, None]  # [B, span]
        out = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None, :], keys, values, attn_mask=mask[:, None, None, :], scale=scale,
            enable_gqa=q.shape[1] != k.shape[1])
        return out[:, :, 0, :]


@dataclass
class SimpleSampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    seed: int = 0
    stop_token_ids: list[int] = field(default_factory=list)


def pick_next(logits: torch.Tensor, params: SimpleSampling, gen: torch.Generator) -> torch.Tensor:
    """logits [B, V] (fp32) -> next token ids [B]."""
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


@torch.inference_mode()
def generate_simple(model: Decoder, prompts: list[list[int]], params: SimpleSampling,
                    progress=None) -> list[list[int]]:
    """prompts (token ids) -> generated ids per prompt, without the prompt, stop token kept."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    device = model.embed_tokens.weight.device
    max_len = max(len(p) for p in prompts) + params.max_new_tokens
    cache = ContiguousKVCache(model, len(prompts), max_len)
    gen = torch.Generator().manual_seed(params.seed)
    stops = set(params.stop_token_ids)
    outputs: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))
    ids = torch.tensor([t for p in prompts for t in p], device=device)
    lengths = [len(p) for p in prompts]
    while rows and params.max_new_tokens > 0:
        positions = cache.begin(rows, lengths)
        hidden = model(ids, position_ids=positions, attn=cache)
        cache.commit()
        last = torch.tensor(lengths, device=device).cumsum(0) - 1
        logits = model.logits(hidden[last]).float()
        next_ids = pick_next(logits, params, gen).tolist()
        still = []
        for r, tok in zip(rows, next_ids):
            outputs[r].append(tok)
            if tok not in stops and len(outputs[r]) < params.max_new_tokens:
                still.append(r)
        if progress is not None:
            progress(len(rows))
        rows = still
        ids = torch.tensor([outputs[r][-1] for r in rows], device=device)
        lengths = [1] * len(rows)
    return outputs
