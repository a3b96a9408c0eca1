"""Continuous batching over the paged cache: chunked prefill, decode, preemption.

A sequence's *pending* tokens are those not yet in the cache: the whole prompt before
prefill, one token (the last sampled) during decode. Each step is either a prefill step —
waiting sequences fed up to `max_prefill_tokens` tokens in all, a long prompt split over
several steps — or a decode step, one token for every running sequence. When a decode step
finds no free block, the most recently started sequence is preempted: its blocks are freed
and it waits to be prefilled again from its tokens so far (recompute), ahead of new work.
A preempted sample keeps its group's whole prompt blocks (its siblings hold them anyway):
its recompute starts after them and it still decodes as a member of its group.

While sequences run, waiting work is admitted only when all of its pending tokens fit with a
block to spare for every running and admitted sequence: a prefill that could not finish, or
whose blocks the next decode step would take back, was thrown away and redone again and again
under memory pressure (`python -m bench.preempt_case`). With nothing running, the head of the
queue is always admitted, in chunks if it must, so the rollout moves on.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager, NoFreeBlocks
from .sampling import SamplingParams


@dataclass(eq=False)  # a sequence is itself: `in` / remove() on the running list compare identity, not
class Sequence:        # every field (token lists included) of every sequence ahead of it
    request: int  # index of the prompt
    sample: int  # index among the prompt's n samples (-1: the shared prompt of a group)
    token_ids: list[int]
    prompt_len: int
    params: SamplingParams
    seed: int | None = None  # sampled samples only: the 64-bit seed of its uniforms (sampling.sequence_seed)
    table: list[int] = field(default_factory=list)
    num_cached: int = 0
    computed: int = 0  # the furthest a prefill (or the fork) brought num_cached: prompt below it is recomputed
    logprobs: list[float] = field(default_factory=list)
    fork_into: int = 0  # a group's prompt: fork this many samples when its prefill completes
    shared_prefix: int = 0  # tokens of KV shared with the group's other samples (0: none)
    finish_reason: str | None = None
    resets: int = 0  # times its blocks were given back mid-flight (preemption): DecodeTables rewrites its row

    @property
    def pending(self) -> int:
        return len(self.token_ids) - self.num_cached

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len


class CacheTooSmall(RuntimeError):
    pass


class Scheduler:
    def __init__(self, blocks: BlockManager, max_prefill_tokens: int, max_num_seqs: int):
        self.blocks = blocks
        self.max_prefill_tokens = max_prefill_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.decoding = False  # the last step scheduled was a decode step (else prefill)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[tuple[Sequence, int]], list[tuple[int, int]]]:
        """-> ([(sequence, tokens to feed)], block copies to do first)."""
        batch, copies = self._prefill()
        self.decoding = not batch
        if batch:
            return batch, copies
        batch, copies = self._decode()
        if not batch:
            raise RuntimeError(f"scheduler: nothing schedulable with {len(self.waiting)} waiting and "
                               f"{len(self.running)} running sequences")
        return batch, copies

    def _prefill(self):
        budget, batch, copies = self.max_prefill_tokens, [], []
        slots = self.max_num_seqs - len(self.running)
        spare = len(self.running)  # blocks kept free: one for each running and admitted sequence
        for seq in list(self.waiting):
            # a group larger than max_num_seqs still runs, alone
            if budget <= 0 or (slots < max(seq.fork_into, 1) and (self.running or batch)):
                break
            spare += max(seq.fork_into, 1)
            if (self.running or batch) and \
                    self.blocks.cost(seq.table, seq.num_cached, seq.pending) + spare > self.blocks.num_free:
                break  # it could not finish beside the running sequences: it waits for blocks to free
            n = min(seq.pending, budget, self._fits(seq))
            while n <= 0 and not self.running and not batch and self._unpin(seq):
                n = min(seq.pending, budget, self._fits(seq))
            if n <= 0:
                if not self.running and not batch:
                    self._too_small(seq)
                break
            copies += self.blocks.reserve(seq.table, seq.num_cached, n)
            batch.append((seq, n))
            budget -= n
            if n < seq.pending:
                break  # the rest of this prompt goes in the next step
            slots -= max(seq.fork_into, 1)
        for seq, n in batch:
            if n == seq.pending:
                self.waiting.remove(seq)
        return batch, copies

    def _fits(self, seq: Sequence) -> int:
        """How many of seq's pending tokens the free blocks can hold now."""
        capacity = (len(seq.table) + self.blocks.num_free) * self.blocks.block_size - seq.num_cached
        n = min(seq.pending, capacity)
        while n > 0 and self.blocks.cost(seq.table, seq.num_cached, n) > self.blocks.num_free:
            n -= self.blocks.block_size  # a shared partial block costs one more (copy-on-write)
        return max(n, 0)

    def _decode(self):
        copies = []
        scheduled: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            while True:
                try:
                    copies += self.blocks.reserve(seq.table, seq.num_cached, 1)
                    scheduled.append(seq)
                    break
                except NoFreeBlocks:
                    if queue:  # the most recently started running sequence
                        self._preempt(queue.pop())
                        continue
                    holder = next((w for w in reversed(self.waiting) if self._own_blocks(w)), None)
                    if holder is not None:  # a half-prefilled sequence gives its own blocks back
                        self._give_back(holder)
                        self.preemptions += 1
                        continue
                    if not scheduled:
                        if self._unpin(seq):  # prompt blocks kept by waiting samples of other groups
                            continue
                        self._too_small(seq)
                    self._preempt(seq)
                    break
        return [(s, 1) for s in scheduled], copies

    def _preempt(self, seq: Sequence) -> None:
        self._give_back(seq)
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _kept(self, seq: Sequence) -> int:
        """Blocks of seq's table it keeps when preempted: its group's whole prompt blocks."""
        return seq.shared_prefix // self.blocks.block_size

    def _own_blocks(self, seq: Sequence) -> bool:
        return len(seq.table) > self._kept(seq)

    def _unpin(self, needy: Sequence) -> bool:
        """Free the blocks a waiting sample keeps (the latest queued first) that `needy` does not
        share: when a group's samples all wait, nothing else would ever free its prompt, and the
        last running sequence of another group could not grow. That sample recomputes its prompt
        later. -> whether a table was released."""
        mine = set(needy.table)
        for w in reversed(self.waiting):
            if w is not needy and w.table and not mine.intersection(w.table):
                self._give_back(w, keep=0)
                self.preemptions += 1
                return True
        return False

    def _give_back(self, seq: Sequence, keep: int | None = None) -> None:
        """Free seq's blocks past its group's whole prompt blocks (or past `keep` blocks); it is
        prefilled again from there (the prompt's last partial block too: its copy was its own) and
        decodes with its group."""
        keep = self._kept(seq) if keep is None else keep
        rest = seq.table[keep:]
        self.blocks.release(rest)
        del seq.table[keep:]
        seq.num_cached = keep * self.blocks.block_size
        seq.resets += 1

    def _too_small(self, seq: Sequence) -> None:
        need = self.blocks.blocks_for(len(seq.token_ids) + 1)
        raise CacheTooSmall(f"KV cache too small: a sequence of {len(seq.token_ids)} tokens needs {need} blocks of "
                            f"{self.blocks.block_size}, the cache has {self.blocks.num_blocks}; raise the cache "
                            f"budget (CacheConfig.max_bytes / num_blocks) or shorten the input")
