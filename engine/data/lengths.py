"""Prompt token lengths (cached on disk) and length buckets for the curriculum."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from .jsonl import replace_text
from .template import build_prompt_ids, encode_prompt


def record_prompt_ids(record, tokenizer, *, template: str = "qwenlong", max_tokens: int = 0,
                      chat: bool = True) -> tuple[list[int], bool]:
    """Token ids of a record's prompt, middle-truncated to max_tokens (0: no limit).

    A record with a pre-rendered `prompt` (verl rows) is encoded as is; when too long its
    token ids lose their middle directly (head and tail kept)."""
    if getattr(record, "prompt", None):
        ids = encode_prompt(tokenizer, record.prompt, chat)
        if max_tokens and len(ids) > max_tokens:
            head = max_tokens // 2
            return ids[:head] + ids[len(ids) - (max_tokens - head):], True
        return ids, False
    return build_prompt_ids(tokenizer, record.context, record.question, template=template,
                            max_tokens=max_tokens, chat=chat)


class LengthCache:
    """record -> prompt token count, stored as JSON and keyed by tokenizer, template and chat
    wrapping, so a dataset is tokenised once across runs. Entries are keyed by a digest of
    what the prompt is made of (`content_key`), not by the record's id: another file or spec
    whose records reuse those ids gets its own lengths."""

    def __init__(self, path: str | os.PathLike | None, tokenizer, template: str, chat: bool = True):
        self.path = Path(path) if path else None
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        sig = f"{name}|{len(tokenizer)}|{template}|chat={chat}"
        self.key = hashlib.sha1(sig.encode()).hexdigest()[:12]
        self.table: dict[str, int] = {}
        if self.path and self.path.is_file():
            try:
                stored = json.loads(self.path.read_text())
                self.table = stored.get(self.key, {})
            except (json.JSONDecodeError, AttributeError):
                self.table = {}  # a damaged cache is rebuilt, never trusted

    def save(self) -> None:
        if not self.path:
            return
        stored = {}
        if self.path.is_file():
            try:
                stored = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                stored = {}
        stored[self.key] = self.table
        self.path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(self.path, json.dumps(stored))  # the ranks of a job save the same cache at once


def prompt_lengths(records: Sequence, tokenizer, *, template: str = "qwenlong", chat: bool = True,
                   cache_path: str | os.PathLike | None = None) -> list[int]:
    """Untruncated prompt length in tokens of every record (cached by content_key)."""
    cache = LengthCache(cache_path, tokenizer, template, chat)
    out = []
    for rec in records:
        key = content_key(rec)
        if key not in cache.table:
            cache.table[key] = len(record_prompt_ids(rec, tokenizer, template=template, chat=chat)[0])
        out.append(cache.table[key])
    cache.save()
    return out


def content_key(record) -> str:
    """A digest of what a record's prompt is built from: its pre-rendered prompt, or its
    document and question."""
    parts = [record.prompt] if getattr(record, "prompt", None) else [record.context, record.question]
    return hashlib.sha1("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:20]


def length_buckets(lengths: Sequence[int], bounds: Sequence[int]) -> list[list[int]]:
    """Indices per bucket k: bounds[k-1] < length <= bounds[k] (bounds[-1] = 0). Lengths
    above the last bound fall in no bucket."""
    if list(bounds) != sorted(bounds) or not bounds or bounds[0] <= 0:
        raise ValueError(f"bucket bounds must be increasing positive lengths, got {list(bounds)}")
    buckets: list[list[int]] = [[] for _ in bounds]
    for i, n in enumerate(lengths):
        low = 0
        for k, high in enumerate(bounds):
            if low < n <= high:
                buckets[k].append(i)
                break
            low = high
    return buckets
