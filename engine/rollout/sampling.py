"""Sampling parameters, completions, and the batched sampler.

Behaviour log-probs: every sampled token comes with log softmax(logits / T)[token], the
log-prob under the temperature-scaled distribution *before* top-k / top-p truncation. That
is the distribution `kernels.linear_logprob(..., temperature=T)` computes for the trainer,
so the importance ratio of the first update of an on-policy step is exactly 1 whatever
top-p does. (Truncation changes which tokens can be drawn, not the log-prob reported.) With
temperature 0 (greedy) the log-prob is taken at T = 1.

`sample_batch` draws one token for every row of a batch in one set of tensor ops on the
logits' device, each row with its own settings (greedy rows are temperature 0).

Support: top-k keeps every token whose logit is >= the k-th largest (ties at the k-th value
kept); top-p then keeps, on the top-k-truncated distribution sorted by probability, the
smallest prefix whose mass reaches top_p (a token is dropped when the mass before it is
already >= top_p), and with it every token tied with the prefix's last one: a tie at the
boundary is kept whole, as top-k keeps its own, so the support never depends on how a sort
orders equal logits. Either way the support is {scaled logit >= a per-row threshold}. The
threshold comes from a partial sort (topk) of `_CANDIDATES` tokens; a row whose support may
reach past its candidates retries, batched with the others, at a width that the mass its
candidates lack says it needs at least, or, past a quarter of the vocabulary, with the whole
row sorted. Choosing those rows costs a few host syncs per call, none per row.

Draw: inverse CDF over the support in vocabulary order (as a cumsum over the whole row
would), with a uniform that is a hash of the sequence's 64-bit seed and the token's index
(`uniforms`). A sequence's tokens therefore depend on its seed and its logits only: not on
the rest of the batch, its row, the partial-sort width, or any generator's state. (On CPU
bit for bit; on a GPU, scans and reductions of other widths may round differently in the
last bit, which moves a draw only when u lands within an ulp of a token's CDF boundary.)
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import torch

from .hostmem import to_device


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None  # per request; sample i draws from seed * 1_000_003 + i (sequence_seed)
    # None: the model's own stop rule (engine.data.template.stop_token_ids: generation_config's
    # eos ids and the chat template's end of turn), as transformers and vLLM stop by default
    stop_token_ids: list[int] | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (need the tokenizer); the token completing one stays
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
    """logits [V] with everything outside the top-k / top-p support set to −inf: the reference
    for `sample_batch`'s support (module docstring). top-p keeps the smallest set of most likely
    tokens whose mass reaches top_p, and every token tied with the least likely of them."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits = logits.sort(descending=True).values
        probs = sorted_logits.softmax(-1)
        kept = int(((probs.cumsum(-1) - probs) < top_p).sum())  # mass before the token not yet enough
        logits = logits.masked_fill(logits < sorted_logits[kept - 1], float("-inf"))
    return logits


# ---- per-sequence seeds and counter-based uniforms -------------------------------------------
_M32 = 0xFFFFFFFF


def item_seed(seed: int | None, key: str) -> int | None:
    """A request's seed from a run's seed and the item's own name (its id): the requests of one
    call then draw independent streams (sample j of every request with the same seed draws the
    same uniforms, so duplicate prompts gave copies and the items' draws moved together), and an
    item's stream does not depend on its batch or its place in the file. None stays None."""
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 33  # 31 bits


def sequence_seed(seed: int | None, sample: int) -> int:
    """A sample's 64-bit seed, as a signed int64: seed * 1_000_003 + sample (wrapped) for a seeded
    request, else 63 fresh bits from os.urandom. Never torch's global generators: reseeding them
    would clobber the trainer's RNG stream and what a resume restores."""
    if seed is None:
        return int.from_bytes(os.urandom(8), "little") >> 1
    bits = (seed * 1_000_003 + sample) & (2 ** 64 - 1)
    return bits - 2 ** 64 if bits >= 2 ** 63 else bits


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x in [0, 2**32), in int64: c taken as its signed 32-bit twin keeps
    |x * c| < 2**63, so the product never overflows (torch has no unsigned 64-bit arithmetic)."""
    return (x * (c - 2 ** 32 if c >= 2 ** 31 else c)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' triple32 (nullprogram.com/blog/2018/07/31, public domain): a bijection on 32-bit
    words (held in int64, so >> is a logical shift) with near-ideal avalanche."""
    x = x ^ (x >> 17)
    x = _mul32(x, 0xED5AD4BB)
    x = x ^ (x >> 11)
    x = _mul32(x, 0xAC4C1B51)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x31848BAB)
    return x ^ (x >> 14)


def uniforms(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """seeds [B] int64, steps [B] int64 -> u [B] fp32 in [0, 1), a pure function of (seed, step).

    The step is hashed first and each 32-bit half of the seed folded in after it: for a fixed
    seed, steps map one-to-one to words, and for a fixed step so does each seed half; nor is one
    seed's stream another's shifted by some steps, as with seed + step · γ schemes. 24 bits, the
    resolution of the fp32 CDF they meet, so k / 2**24 is exact in fp32 ((k + ½) / 2**24 would
    need 25 bits and can round to 1); u = 0 stands for 0+ (`_inverse_cdf` keeps targets above 0)."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    h = _hash32(lo ^ _hash32(hi ^ _hash32((steps & _M32) ^ 0x9E3779B9)))  # constant: step 0 of seed 0 is not 0
    return (h >> 8).to(torch.float32) * 2.0 ** -24


# ---- the batched sampler -----------------------------------------------------------------------
_CANDIDATES = 64  # first partial-sort width: holds the nucleus of most rows at top_p 0.95
_WIDEN = 16  # a retry sorts at least this many times more candidates


def sampling_tensors(params: list[SamplingParams], seeds: list[int | None], steps: list[int],
                     device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """Per-row arguments of `sample_batch` (temperature, top_k, top_p, seeds, steps), built with
    two host-to-device copies (hostmem.to_device: they do not wait for the device's queue). seeds: None
    for greedy rows; steps: tokens generated so far."""
    floats = to_device(torch.tensor([[p.temperature for p in params], [p.top_p for p in params]],
                                    dtype=torch.float32), device)
    ints = to_device(torch.tensor([[p.top_k for p in params], [s or 0 for s in seeds], steps], dtype=torch.int64),
                     device)
    return floats[0], ints[0], floats[1], ints[1], ints[2]


def sample_batch(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 seeds: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B] int64, behaviour log-probs [B] fp32), every row at once.

    temperature [B] (0: greedy, the lowest-id argmax), top_k [B] int64 (0: off), top_p [B]
    (1: off), seeds [B] int64 (`sequence_seed`), steps [B] int64 (the index of the token being
    drawn among the sequence's generated tokens); all on the logits' device."""
    logits = logits.float()
    b, vocab = logits.shape
    greedy = temperature <= 0
    inv = torch.where(greedy, 1.0, temperature)
    scaled = logits if bool((inv == 1).all()) else logits / inv[:, None]  # T = 1 (and greedy): no [B, V] copy
    top = scaled.amax(-1, keepdim=True)  # [B, 1]
    weights = torch.exp(scaled - top)  # [B, V] unnormalised softmax(scaled)
    z = weights.sum(-1)
    u = uniforms(seeds, steps).masked_fill(greedy, 0.0)  # u = 0: the support's first token
    thr = torch.full_like(z, float("-inf"))  # support: scaled >= thr
    tokens = torch.zeros_like(seeds)
    done = torch.zeros_like(greedy)
    plain = ~greedy & ((top_k <= 0) | (top_k >= vocab)) & (top_p >= 1)  # support: the whole row
    rows = (~plain).nonzero().squeeze(1)
    width = _CANDIDATES
    by_sort = []  # rows whose support is found in the whole row sorted
    by_bucket = []  # top-p rows whose nucleus is wider than the candidates
    while rows.numel():
        if 4 * width > vocab:  # a partial sort past a quarter of the vocabulary costs about a full one
            by_sort.append(rows)
            break
        vals, ids = (scaled if rows.numel() == b else scaled[rows]).topk(width)
        thr[rows], ok, need = _threshold(vals, greedy[rows], top_k[rows], top_p[rows], z[rows], vocab)
        hit = ok.nonzero().squeeze(1)
        if hit.numel():
            ids, order = ids[hit].sort(-1)  # vocabulary order: the draw must not depend on topk's order of ties
            vals, r = vals[hit].gather(1, order), rows[hit]
            picked = _inverse_cdf(torch.exp(vals - top[r]) * (vals >= thr[r, None]), u[r])
            tokens[r] = ids.gather(1, picked[:, None]).squeeze(1)
            done[r] = True
        rows, need = rows[~ok], need[~ok].clamp(min=width * _WIDEN)
        # top-p alone: the exact threshold from the mass histogram (a wider topk retry cost more: a
        # 1,024-wide one takes ~17 ms at B = 64, V = 49,152 here, and most such rows need more)
        # (a greedy row's threshold is its maximum, whatever its top-p: the full sort's, never the histogram's)
        no_k = ((top_k[rows] <= 0) | (top_k[rows] >= vocab)) & ~greedy[rows]
        by_bucket.append(rows[no_k])
        rows, need = rows[~no_k], need[~no_k]
        far = 4 * need > vocab
        by_sort.append(rows[far])
        rows, need = rows[~far], need[~far]
        if rows.numel():  # as wide as the widest support still out of view needs, at least
            width = 1 << (int(need.max()) - 1).bit_length()
    rows = torch.cat(by_bucket) if by_bucket else rows[:0]
    if rows.numel():
        whole, args = _select(rows, b, scaled, weights, z, top_p, top)
        t = _nucleus_threshold(*args)
        thr[rows] = t[rows] if whole else t
    rows = torch.cat(by_sort) if by_sort else rows[:0]
    if rows.numel():
        thr[rows] = _threshold(scaled[rows].sort(-1, descending=True).values, greedy[rows], top_k[rows], top_p[rows],
                               z[rows], vocab)[0]
    rows = (~done).nonzero().squeeze(1)
    if rows.numel():  # drawn over the whole row: plain rows, and rows whose threshold came from the
        # histogram or the full sort
        whole, (sub, w, t, uu) = _select(rows, b, scaled, weights, thr, u)
        if bool((t > float("-inf")).any()):
            w = w.mul_(sub >= t[:, None])  # weights are not read again: in place (a bool factor: ~2x masked_fill_)
        drawn = _inverse_cdf(w, uu)
        tokens[rows] = drawn[rows] if whole else drawn
    logprobs = scaled.gather(1, tokens[:, None]).squeeze(1) - top.squeeze(1) - z.log()
    return tokens, logprobs


_SAMPLERS = ("auto", "torch", "triton")


def sampler_backend(device: torch.device) -> str:
    """"triton" (kernels/triton_sample.py: the whole sampler in Triton, no host sync) on a GPU, else
    "torch" (sample_batch); $LONGRL_SAMPLER = torch | triton chooses (triton on CPU runs the
    kernel under the interpreter: tests)."""
    choice = os.environ.get("LONGRL_SAMPLER", "auto")
    if choice not in _SAMPLERS:
        raise ValueError(f"LONGRL_SAMPLER must be one of {', '.join(_SAMPLERS)}, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return choice


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, steps: torch.Tensor,
           params: list[SamplingParams] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What the engine calls: sample_batch's function by the backend `sampler_backend` picks.
    `params` (the rows' settings, as sampling_tensors took them) lets the kernel skip a search no
    row needs without reading the device tensors."""
    if sampler_backend(logits.device) == "triton":
        from kernels.triton_sample import sample_rows_triton
        uses = None if params is None else searches(params)
        return sample_rows_triton(logits, temperature, top_k, top_p, seeds, steps, uses=uses)
    return sample_batch(logits, temperature, top_k, top_p, seeds, steps)


def searches(params: list[SamplingParams]) -> tuple[bool, bool]:
    """(some sampled row has top-k, some has top-p): the threshold searches a batch needs."""
    drawn = [p for p in params if p.temperature > 0]
    return any(p.top_k > 0 for p in drawn), any(p.top_p < 1 for p in drawn)


def _select(rows: torch.Tensor, b: int, *xs: torch.Tensor) -> tuple[bool, list[torch.Tensor]]:
    """xs restricted to `rows` -> (False, [x[rows], ...]); or, when the rows are most of the batch
    of b, (True, xs) whole: computing every row then costs less than copying these rows out."""
    whole = 2 * rows.numel() > b
    return whole, [x if whole else x[rows] for x in xs]


def _threshold(vals: torch.Tensor, greedy: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               z: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vals [R, W]: a row's W largest scaled logits, descending; z [R]: its softmax normaliser.
    -> (thr [R], ok [R], need [R]): the support is {scaled >= thr}; ok where the W candidates hold
    all of it (always at W = vocab); need: a lower bound on the candidates it takes where not."""
    w = vals.shape[1]
    first, last = vals[:, 0], vals[:, -1]
    has_k = ~greedy & (top_k > 0) & (top_k < vocab)
    kth = torch.where(has_k, vals.gather(1, (top_k.clamp(1, w) - 1)[:, None]).squeeze(1), float("-inf"))
    in_k = vals >= kth[:, None]
    mass = (torch.exp(vals - first[:, None]) * in_k).cumsum(-1)
    total = torch.where(has_k, mass[:, -1], z)  # top-p runs on the top-k-truncated distribution
    # kept: the candidates whose mass *before* them is < top_p, i.e. one more than those whose mass
    # through them is (mass is a cumsum of non-negative weights: the kept ones are a prefix)
    nucleus = (mass / total[:, None] < top_p[:, None]).sum(-1) + 1
    n = torch.where(top_p >= 1, in_k.sum(-1), nucleus).clamp(1, w)
    thr = torch.where(greedy, first, vals.gather(1, n[:, None] - 1).squeeze(1))
    ok = torch.where(has_k, (top_k <= w) & (last < kth), last < thr) | (w >= vocab)  # top-k's mass all in view
    # the mass still missing, at most the last candidate's weight per token out of view
    short = (top_p * total - mass[:, -1]).clamp(min=0) / torch.exp(last - first).clamp(min=torch.finfo(z.dtype).tiny)
    need = torch.where(has_k, top_k.clamp(min=w + 1).to(short.dtype), w + 1 + short)
    return thr, ok, need


_BUCKETS = 2048  # mass histogram of a row by distance from its max logit ...
_SPAN = 32.0  # ... over its range, or over this many nats where wider (everything further down shares the last)


def _nucleus_threshold(scaled: torch.Tensor, weights: torch.Tensor, z: torch.Tensor, top_p: torch.Tensor,
                       top: torch.Tensor) -> torch.Tensor:
    """The exact top-p threshold of rows without top-k, no sort of the row: [R, V] scaled logits,
    their weights exp(scaled - top), normaliser z [R], top [R, 1] -> thr [R] (support: scaled >= thr).

    The mass is histogrammed by (top - scaled) in _BUCKETS buckets over the row's range. IEEE
    subtraction and multiplication round monotonically, so the buckets cut the sorted order into
    consecutive runs: every token of a bucket before the one where the mass reaches top_p is kept,
    every token after it dropped. Only the boundary bucket's tokens (a few, or the tail past
    _SPAN nats when the boundary lies there) are sorted, all rows' together, to find the last
    token whose preceding mass is still < top_p."""
    r = scaled.shape[0]
    # the buckets cover the row's own range, at most _SPAN nats: a flat row (logits within a fraction
    # of a nat) spreads over all of them instead of piling into one
    span = (top.squeeze(1) - scaled.amin(-1)).clamp(min=1e-30, max=_SPAN)
    bucket = ((top - scaled) * (_BUCKETS / span)[:, None]).clamp_(max=_BUCKETS - 1).to(torch.int64)
    cum = torch.zeros(r, _BUCKETS, dtype=weights.dtype, device=weights.device).scatter_add_(1, bucket, weights)
    cum = cum.cumsum(-1)
    target = top_p * z
    edge = (cum < target[:, None]).sum(-1).clamp(max=_BUCKETS - 1)  # the bucket where the mass reaches top_p
    above = torch.where(edge > 0, cum.gather(1, (edge - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
    rows, cols = (bucket == edge[:, None]).nonzero(as_tuple=True)  # row-major: grouped by row
    vals = scaled[rows, cols]
    order = vals.argsort(descending=True, stable=True)
    order = order[rows[order].argsort(stable=True)]  # by row, then by value descending
    rows, vals = rows[order], vals[order]
    w = weights[rows, cols[order]].double()
    before = w.cumsum(0) - w  # mass before each candidate, from the first candidate of all rows
    counts = torch.bincount(rows, minlength=r)
    starts = counts.cumsum(0) - counts
    before = before - before[starts][rows] + above[rows].double()  # ... from the row's own max
    kept = torch.bincount(rows, weights=(before < target[rows].double()).double(), minlength=r).long()
    return vals[starts + kept.clamp(min=1) - 1]


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """weights [R, N] >= 0 (overwritten), u [R] in [0, 1) -> [R] the first position whose cumulative weight
    reaches u · total. u is scaled by the total so cumsum rounding never leaves it past the end,
    and kept above 0 so the position found always has positive weight."""
    cdf = weights.cumsum_(-1)  # in place: every caller hands over a buffer it does not read again
    target = (u * cdf[:, -1]).clamp(min=torch.finfo(cdf.dtype).tiny)
    return torch.searchsorted(cdf, target[:, None]).squeeze(1).clamp(max=cdf.shape[1] - 1)
