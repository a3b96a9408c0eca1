"""The rollout engine: in-process generation on the trainer's own model object.

    gen = Generator(model, tokenizer)
    groups = gen.generate(prompts, n=8, params=SamplingParams(temperature=0.7, top_p=0.95))
    groups[i][j]: Completion(token_ids, logprobs, finish_reason) of sample j of prompt i

Each prompt is prefilled once (in chunks of at most `max_prefill_tokens`), then forked
into its n samples, which share the prompt's KV blocks (copy-on-write on the last partial
block). Samples decode together with every other running sequence (continuous batching)
and free their blocks the moment they finish. Runs under inference mode; the KV cache is
allocated per call and dropped at its end, and nothing is left in the model.

Lookahead (CacheConfig.lookahead; on by default with CUDA graphs): a decode step replayed
from a graph is launched before the previous step's tokens reach the host. Its input tokens
are copied on the device from the sampler's output, and the host reads the previous step's
tokens (appending them, checking stops, freeing finished samples' blocks) while the device
runs the new step, instead of the device waiting for the host between steps. A sample that
stopped at the previous step has had one more row computed for nothing, which is dropped.
Only when the next step is sure to be a plain decode step (nothing waiting to be prefilled,
a free block for every running sequence: no preemption) does a step go ahead unread; else
the tokens are read first, as without lookahead. Completions are the same either way, up to
float rounding on a GPU: a dropped row may keep a step in a larger graph bucket for once, and
products of another shape may round differently.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from . import hostmem
from .block_manager import BlockManager
from .graphs import DecodeGraphs, graphs_mode
from .paged import CacheConfig, PagedAttention, PagedKVCache, check_lookahead
from .sampling import Completion, SamplingParams, sample, sampling_tensors, sequence_seed
from .scheduler import CacheTooSmall, Scheduler, Sequence


@dataclass
class RolloutStats:
    prompt_tokens: int = 0  # prompt tokens the model prefilled (a group's prompt counts once)
    recomputed_tokens: int = 0  # tokens prefilled again (a preemption, a half-done prefill taken back)
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0
    decode_rows: int = 0  # sequences decoded, summed over the decode steps (/ their number: the mean batch)
    graph_steps: int = 0  # decode steps replayed from a CUDA graph (or run on its static buffers: eager mode)
    graph_captures: int = 0  # graphs captured (each costs about three decode steps; included in decode_seconds)
    graph_replays: int = 0  # decode steps served by replaying a captured graph
    lookahead_steps: int = 0  # decode steps launched before the previous step's tokens were read
    wasted_rows: int = 0  # rows decoded for samples that had stopped at the step before (lookahead)
    capture_seconds: float = 0.0
    preemptions: int = 0
    peak_blocks: int = 0
    cache_blocks: int = 0
    blocks_trace: list[int] = field(default_factory=list)  # blocks in use after each decode step

    def as_dict(self) -> dict[str, float]:
        d = {k: v for k, v in self.__dict__.items() if k != "blocks_trace"}
        d["prefill_tokens_per_s"] = self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0
        d["decode_tokens_per_s"] = self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0
        return d


PENDING = -1  # a token sampled on the device and not read yet (lookahead); never fed to the model


def lookahead_on(graphs: str, configured: str) -> bool:
    """Whether decode steps go ahead of the host (module docstring) for this graphs mode ("capture",
    "on", "eager", "off": graphs_mode) and setting (auto | on | off; $LONGRL_LOOKAHEAD overrides):
    auto: with CUDA graphs captured; on: with any graph step (eager too: how the CPU tests run it).
    Only graph steps go ahead: with graphs off there is none, whatever the setting."""
    choice = check_lookahead(os.environ.get("LONGRL_LOOKAHEAD") or configured)
    return graphs in ("capture", "on") if choice == "auto" else choice == "on" and graphs != "off"


@dataclass
class _Flight:
    """A decode step's draws not read on the host yet: the sampled sequences in the tokens' order,
    the index of each one's PENDING token, the tokens and log-probs (host copies, pinned on a GPU,
    filled once `ready` has passed) and the tokens on the device (the next step's input)."""
    seqs: list[Sequence]
    at: list[int]
    tokens: torch.Tensor
    logprobs: torch.Tensor
    on_device: torch.Tensor
    ready: object = None  # a CUDA event after the copies, or None (on the CPU they are done)


class Generator:
    def __init__(self, model, tokenizer=None, cache_cfg: CacheConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.cache_cfg = cache_cfg or CacheConfig()
        self.stats = RolloutStats()
        self._stop_ids: list[int] | None = None
        self._flight: _Flight | None = None
        self._lookahead = False
        self._warned_window = False
        if next(model.parameters()).device.type == "cpu":
            hostmem.tune()  # freed tensors stay in the heap: a decode step's buffers no longer page-fault in

    def _check_prompts(self, prompts: list[list[int]], per_prompt: list[SamplingParams]) -> None:
        """Token ids inside the vocabulary (an id past it would fail deep in the embedding, on a GPU
        as a device-side assert that ends the process), and a warning, once, for a request longer
        than the model's context window (positions past it are generated, out of what it learnt)."""
        vocab = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            low, high = min(p), max(p)
            if low < 0 or high >= vocab:
                raise ValueError(f"generate: prompt {i} has token id {low if low < 0 else high}, outside the "
                                 f"model's vocabulary of {vocab}")
        window = self.model.config.context_window
        longest = max(len(p) + q.max_new_tokens for p, q in zip(prompts, per_prompt))
        if longest > window and not self._warned_window:
            self._warned_window = True
            print(f"generate: a prompt and its max_new_tokens reach {longest} positions, past the model's "
                  f"{window}-token context window; shorten the input or max_new_tokens", file=sys.stderr)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], n: int = 1,
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[list[Completion]]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        per_prompt = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        per_prompt = [self._with_stops(p) for p in per_prompt]
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        if any(p.stop for p in per_prompt) and self.tokenizer is None:
            raise ValueError("stop strings need the tokenizer: Generator(model, tokenizer)")
        self._check_prompts(prompts, per_prompt)
        self.stats = RolloutStats()
        bs = self.cache_cfg.block_size
        # what the rollout needs without preemption: each prompt once, and per sample its new
        # tokens plus a copied partial block; a smaller budget makes the scheduler preempt
        bound = sum(-(-len(p) // bs) + n * (-(-q.max_new_tokens // bs) + 1) for p, q in zip(prompts, per_prompt))
        device = next(self.model.parameters()).device
        mode = graphs_mode(device, self.cache_cfg.cuda_graphs, self.cache_cfg.decode_backend)
        cache = PagedKVCache(self.model, self.cache_cfg, max_blocks=bound, spare=mode != "off")
        graphs = None
        self._lookahead = lookahead_on(mode, self.cache_cfg.lookahead)
        self._flight = None
        if mode != "off":
            # a group larger than max_num_seqs still decodes, alone
            max_batch = min(len(prompts) * n, max(self.cache_cfg.max_num_seqs, n))
            max_len = max(len(p) + q.max_new_tokens for p, q in zip(prompts, per_prompt))
            graphs = DecodeGraphs(self.model, cache, max_batch, max_len, mode)
        blocks = BlockManager(cache.num_blocks, cache.block_size)
        # a request the cache cannot hold whole is refused now, not after the rest of the call has run
        # (the last new token is sampled, never written: prompt + max_new_tokens − 1 positions)
        need, i = max((blocks.blocks_for(len(p) + q.max_new_tokens - 1), i) for i, (p, q) in
                      enumerate(zip(prompts, per_prompt)))
        if need > cache.num_blocks:
            raise CacheTooSmall(f"KV cache too small: prompt {i} ({len(prompts[i])} tokens) with max_new_tokens "
                                f"{per_prompt[i].max_new_tokens} needs {need} blocks of {cache.block_size}, the cache "
                                f"has {cache.num_blocks}; raise the cache budget (CacheConfig.max_bytes / num_blocks), "
                                f"or shorten the input or max_new_tokens")
        sched = Scheduler(blocks, self.cache_cfg.max_prefill_tokens, self.cache_cfg.max_num_seqs)
        self.stats.cache_blocks = cache.num_blocks
        results: list[list[Completion | None]] = [[None] * n for _ in prompts]
        for i, (prompt, p) in enumerate(zip(prompts, per_prompt)):
            sched.add(self._new_seq(i, -1, list(prompt), len(prompt), p, fork_into=n))
        try:
            while sched.has_work():
                self._step(sched, cache, blocks, results, graphs)
            if self._flight is not None:  # the last step's draws: decode time
                started = time.perf_counter()
                self._resolve(sched, cache, blocks, results)
                self.stats.decode_seconds += time.perf_counter() - started
        finally:
            self._flight = None
            if graphs is not None:
                st = self.stats
                st.graph_captures, st.graph_replays, st.capture_seconds = (len(graphs.graphs), graphs.replays,
                                                                           graphs.capture_seconds)
            del cache, graphs  # the memory (the cache, the graphs' pool) goes back before the update
        self.stats.preemptions = sched.preemptions
        return results  # type: ignore[return-value]

    def _with_stops(self, params: SamplingParams) -> SamplingParams:
        """Fill in the model's stop rule where the request names no stop tokens."""
        if params.stop_token_ids is not None:
            return params
        stops = [] if params.ignore_eos else self.default_stop_ids()
        return dataclasses.replace(params, stop_token_ids=stops)

    def default_stop_ids(self) -> list[int]:
        if self._stop_ids is None:
            from ..data.template import stop_token_ids
            self._stop_ids = stop_token_ids(self.tokenizer, getattr(self.model, "checkpoint_dir", None))
        return self._stop_ids

    def _new_seq(self, request, sample, tokens, prompt_len, params, fork_into=0) -> Sequence:
        seed = sequence_seed(params.seed, sample) if sample >= 0 and params.temperature > 0 else None
        return Sequence(request, sample, tokens, prompt_len, params, seed, fork_into=fork_into)

    def _step(self, sched: Scheduler, cache: PagedKVCache, blocks: BlockManager, results,
              graphs: DecodeGraphs | None = None) -> None:
        if self._flight is not None and not self._may_look_ahead(sched, blocks, graphs):
            started = time.perf_counter()  # the next step may prefill or preempt: read first (the last decode
            self._resolve(sched, cache, blocks, results)  # step's time)
            self.stats.decode_seconds += time.perf_counter() - started
            if not sched.has_work():  # those draws finished the last samples
                return
        started = time.perf_counter()
        flight = self._flight
        batch, copies = sched.schedule()
        cache.copy_blocks(copies)
        decode = sched.decoding  # a prompt's last prefill chunk may be one token too: still prefill
        logits = tables = None
        if decode:
            seqs = [s for s, _ in batch]
            tables = cache.tables.gather(seqs)
            if graphs is not None:
                logits = graphs.step(seqs, tables, feed=self._feed(flight, seqs))
        if logits is None and flight is not None:  # graphs went off at this step: the ordinary step needs
            self._resolve(sched, cache, blocks, results)  # the tokens on the host
            flight = None
            batch = [(s, n) for s, n in batch if s.finish_reason is None]
            seqs = [s for s, _ in batch]
            tables = cache.tables.gather(seqs) if decode and batch else None
        graph_step = logits is not None
        if graph_step:  # the whole step ran from the static buffers
            for seq in seqs:
                seq.num_cached += 1
            ready = seqs
            self.stats.graph_steps += 1
        elif batch:
            logits, ready = self._forward(batch, decode, cache, tables)
        else:
            ready = []
        if ready:
            device = cache.k.device
            samplers, rows = [], []
            for r, seq in enumerate(ready):
                if seq.fork_into:  # a group's prompt: its samples draw their first token from its logits
                    children = self._fork(seq, sched, blocks)
                    samplers += children
                    rows += [r] * len(children)
                else:
                    if seq not in sched.running:
                        sched.running.append(seq)
                    samplers.append(seq)
                    rows.append(r)
            params = [s.params for s in samplers]
            settings = sampling_tensors(params, [s.seed for s in samplers], [s.num_generated for s in samplers], device)
            # decode steps sample every row once, in order: no [rows, vocab] copy then
            same = len(rows) == logits.shape[0] and rows == list(range(len(rows)))
            tokens, logprobs = sample(logits if same else logits[rows], *settings, params=params)
            if graph_step and self._lookahead:  # read at the next step, while the device runs it
                self._flight = self._take_off(samplers, tokens, logprobs, sched)
                if flight is not None:
                    self.stats.lookahead_steps += 1
                    self._resolve(sched, cache, blocks, results, flight)
            else:
                for seq, token, logprob in zip(samplers, tokens.tolist(), logprobs.tolist()):
                    self._append(seq, token, logprob, sched, cache, blocks, results)
        elapsed = time.perf_counter() - started
        if decode:
            self.stats.decode_seconds += elapsed
            self.stats.decode_rows += len(batch)
            self.stats.blocks_trace.append(blocks.num_used)
        else:
            self.stats.prefill_seconds += elapsed
        self.stats.steps += 1
        self.stats.peak_blocks = max(self.stats.peak_blocks, blocks.num_used)

    # ---- lookahead (module docstring) ----------------------------------------------------------------
    def _may_look_ahead(self, sched: Scheduler, blocks: BlockManager, graphs: DecodeGraphs | None) -> bool:
        """Whether the next step is sure to be a graph decode step of the running sequences alone:
        nothing waiting, a free block for each (a new block or a copy-on-write: no preemption), a
        graph bucket for them all."""
        return (graphs is not None and graphs.disabled is None and not sched.waiting and bool(sched.running)
                and len(sched.running) <= graphs.max_batch and blocks.num_free >= len(sched.running))

    @staticmethod
    def _feed(flight: _Flight | None, seqs: list[Sequence]):
        """The rows of `seqs` whose token is still on the device, and where: DecodeGraphs.step's feed."""
        if flight is None:
            return None
        where = {seq: i for i, seq in enumerate(flight.seqs)}  # sequences hash by identity
        to = [r for r, seq in enumerate(seqs) if seq in where]
        return flight.on_device, to, [where[seqs[r]] for r in to]

    def _take_off(self, samplers: list[Sequence], tokens: torch.Tensor, logprobs: torch.Tensor,
                  sched: Scheduler) -> _Flight:
        """Leave this step's draws on the device: PENDING tokens in their place, the copies to the host
        started. A sample at its token limit leaves the running list now (it must not be scheduled
        again); it finishes when its last token is read."""
        ready = None
        host_t, host_lp = tokens, logprobs
        if tokens.device.type == "cuda":
            host_t = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host_lp = torch.empty(logprobs.shape, dtype=logprobs.dtype, pin_memory=True)
            host_t.copy_(tokens, non_blocking=True)
            host_lp.copy_(logprobs, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        at = []
        for seq in samplers:
            at.append(len(seq.token_ids))
            seq.token_ids.append(PENDING)
            seq.logprobs.append(float("nan"))
            if seq.num_generated >= seq.params.max_new_tokens and seq in sched.running:
                sched.running.remove(seq)
        return _Flight(samplers, at, host_t, host_lp, tokens, ready)

    def _resolve(self, sched: Scheduler, cache: PagedKVCache, blocks: BlockManager, results,
                 flight: _Flight | None = None) -> None:
        """Read a flight's draws (default: the one in the air, which is then gone): each PENDING token
        gets its value, and stops are checked as _append does; a sample that stopped at an earlier
        step (its row computed for nothing) is skipped."""
        if flight is None:
            flight, self._flight = self._flight, None
        if flight.ready is not None:
            flight.ready.synchronize()
        for seq, at, token, logprob in zip(flight.seqs, flight.at, flight.tokens.tolist(), flight.logprobs.tolist()):
            if seq.finish_reason is not None:
                self.stats.wasted_rows += 1
                continue
            seq.token_ids[at] = token
            seq.logprobs[at - seq.prompt_len] = logprob
            self._settle(seq, at, sched, cache, blocks, results)

    def _forward(self, batch, decode: bool, cache: PagedKVCache, tables: torch.Tensor | None):
        """The model on one scheduled step -> (logits [ready, V] fp32 or None, the sequences whose
        pending tokens are all in the cache now, in batch order)."""
        device = cache.k.device
        ids = torch.tensor([t for s, n in batch for t in s.token_ids[s.num_cached:s.num_cached + n]], device=device)
        positions = torch.tensor([p for s, n in batch for p in range(s.num_cached, s.num_cached + n)], device=device)
        ctx = PagedAttention(cache, [s.table for s, _ in batch], [s.num_cached for s, _ in batch],
                             [n for _, n in batch], prefix_lens=[s.shared_prefix for s, _ in batch],
                             groups=[s.request for s, _ in batch], block_tables=tables)
        hidden = self.model(ids, position_ids=positions, attn=ctx)
        ends, ready = [], []
        offset = 0
        for seq, n in batch:
            if not decode:  # prompt positions past the furthest its cache ever reached: prefilled the first time
                fresh = max(0, min(seq.num_cached + n, seq.prompt_len) - max(seq.num_cached, seq.computed))
                self.stats.prompt_tokens += fresh
                self.stats.recomputed_tokens += n - fresh
                seq.computed = max(seq.computed, seq.num_cached + n)  # decode only runs past the prompt
            seq.num_cached += n
            offset += n
            if seq.pending == 0:
                ends.append(offset - 1)
                ready.append(seq)
        if not ready:
            return None, ready
        last = hidden if len(ends) == hidden.shape[0] else hidden[torch.tensor(ends, device=device)]
        return self.model.logits(last).float(), ready

    def _fork(self, parent: Sequence, sched, blocks) -> list[Sequence]:
        """The group's prompt is prefilled: its samples share its blocks from here on."""
        children = []
        for j in range(parent.fork_into):
            child = self._new_seq(parent.request, j, list(parent.token_ids), parent.prompt_len, parent.params)
            child.table = blocks.fork(parent.table)
            child.num_cached = child.computed = parent.num_cached
            child.shared_prefix = parent.num_cached if parent.fork_into > 1 else 0
            sched.running.append(child)
            children.append(child)
        blocks.release(parent.table)
        return children

    def _append(self, seq: Sequence, token: int, logprob: float, sched, cache, blocks, results) -> bool:
        """Add a sampled token; True when it finished the sequence."""
        seq.token_ids.append(token)
        seq.logprobs.append(logprob)
        return self._settle(seq, len(seq.token_ids) - 1, sched, cache, blocks, results)

    def _settle(self, seq: Sequence, at: int, sched, cache, blocks, results) -> bool:
        """The token at index `at` is read: True when it finished the sequence, which then ends
        there (a PENDING token after it is dropped), gives its blocks and its block-table row back
        and leaves the running list."""
        self.stats.generated_tokens += 1
        token = seq.token_ids[at]
        reason = None
        if token in seq.params.stop_token_ids or self._hits_stop_string(seq, at + 1):
            reason = "stop"
        elif at + 1 - seq.prompt_len >= seq.params.max_new_tokens:
            reason = "length"
        if reason:
            del seq.token_ids[at + 1:]
            del seq.logprobs[at + 1 - seq.prompt_len:]
            seq.finish_reason = reason
            results[seq.request][seq.sample] = Completion(seq.token_ids[seq.prompt_len:], seq.logprobs, reason)
            if seq in sched.running:
                sched.running.remove(seq)
            blocks.release(seq.table)  # finished samples free their memory at once
            cache.tables.drop(seq)
        return reason is not None

    def _hits_stop_string(self, seq: Sequence, end: int) -> bool:
        """Whether a stop string is in the text of the last few tokens before index `end`."""
        if not seq.params.stop:
            return False
        # a window of recent tokens wide enough to hold any stop string: a token carries at least one
        # byte of text (byte-level vocabularies split a 4-byte character into up to 4 tokens)
        longest = max(len(s.encode("utf-8")) for s in seq.params.stop)
        window = seq.token_ids[max(seq.prompt_len, end - longest - 8):end]
        text = self.tokenizer.decode(window, skip_special_tokens=False)
        return any(s in text for s in seq.params.stop)
