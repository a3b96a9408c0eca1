"""The loaders that read the formats long-document QA comes in, into doc-QA records.

One record (engine.data.records.DocQARecord, re-exported here): (id, data_source, task,
context, question, answers[, reasoning]). `load_docqa(path)` reads a file in any of these
layouts (detected from the first row, or named with `format=`):

  docqa       our JSONL: context, question, answers (+ id, data_source, task, reasoning)
  longbench   LongBench JSONL: context, input, answers (+ _id, dataset)
  hotpotqa    HotpotQA / 2WikiMultihopQA, original ([title, sentences] pairs, `_id`) or the
              Hugging Face layout ({title: [...], sentences: [[...]]})
  musique     MuSiQue: paragraphs [{title, paragraph_text}], answer, answer_aliases
  lciteeval   L-CiteEval: question, answer, docs [{title, text}] (or a full `context`)
  leval       L-Eval: input (document), instructions [questions], outputs [answers]:
              one record per question
  docmath     DocMath-Eval: paragraphs, question, ground_truth (task math unless the
              source's name routes elsewhere)
  frames      FRAMES: Prompt (or Question), Answer, wiki_items [{title, text}] (the article
              texts; a row with only Wikipedia links has no document and is an error)
  verl        verl parquet as in DocQA-RL-1.6K: prompt [messages], data_source,
              reward_model.ground_truth, extra_info (needs pyarrow)

Every record's `task` (the scorer rule_reward applies) comes from its data_source via
`task_for_source`, as QwenLong-L1 routes its rewards: docmath -> math, a source naming
choices (long_toc_choices_...) -> choice, anything else -> qa. Only our docqa JSONL may
name the task explicitly, and then its `task` field wins.

A bad row raises DataError naming file, row and field, or with on_error="skip" is skipped
and counted in the returned dataset's `.skipped`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from .jsonl import DataError, jsonl_lines, read_text
from .records import TASKS, DocQADataset, DocQARecord, task_for_source, write_docqa

__all__ = ["FORMATS", "CONVERTERS", "DocQARecord", "DocQADataset", "task_for_source", "detect_format", "load_docqa",
           "load_records", "write_docqa", "check_unique_ids"]

FORMATS = ("docqa", "longbench", "hotpotqa", "musique", "lciteeval", "leval", "docmath", "frames", "verl")


class _Row:
    """Field access that names file, row and field in its errors."""

    def __init__(self, data: dict, where: str):
        self.data, self.where = data, where

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    def str(self, *keys: str) -> str:
        for key in keys:
            value = self.data.get(key)
            if isinstance(value, str):
                return value
        got = {k: type(self.data[k]).__name__ for k in keys if k in self.data}
        raise DataError(f"{self.where}: field {' or '.join(repr(k) for k in keys)} must be a string "
                        f"({'got ' + str(got) if got else 'missing'})")

    def list(self, key: str) -> list:
        value = self.data.get(key)
        if not isinstance(value, list):
            raise DataError(f"{self.where}: field {key!r} must be a list "
                            f"({'missing' if key not in self.data else 'got ' + type(value).__name__})")
        return value

    def answers(self, *keys: str) -> list[str]:
        for key in keys:
            if key in self.data and self.data[key] is not None:
                out = self.strings(key)
                if out:
                    return out
        raise DataError(f"{self.where}: no answer in field {' or '.join(repr(k) for k in keys)}")

    def strings(self, key: str) -> list[str]:
        """A field holding one answer or a list of them: strings or numbers (a number as it
        prints); blank ones dropped; absent or null: []. Anything else (an object, a nested
        list) is a bad row, not its printed form."""
        value = self.data.get(key)
        if value is None:
            return []
        out = []
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise DataError(f"{self.where}: field {key!r} must be a string or a list of strings "
                                f"(holds a {type(v).__name__})")
            if str(v).strip():
                out.append(str(v))
        return out

    def id(self, key: str, default: str) -> str:
        """A record id: a string or an integer, or `default` when absent or null."""
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise DataError(f"{self.where}: field {key!r} must be a string or an integer (got {type(value).__name__})")
        return str(value)

    def optional_str(self, key: str) -> str | None:
        """A string field that may be absent (or null); any other type is a bad row."""
        value = self.data.get(key)
        if value is None or isinstance(value, str):
            return value
        raise DataError(f"{self.where}: field {key!r} must be a string when present (got {type(value).__name__})")


def _join_passages(passages: list[tuple[str, str]]) -> str:
    return "\n\n".join(f"{title}\n{text}".strip() if title else text.strip() for title, text in passages)


# ---- per-format row converters: (_Row, index) -> list of records -----------------------
def _docqa(r: _Row, i: int, source: str):
    data_source = str(r.get("data_source", source))
    task = r.get("task")
    if task is None:
        task = task_for_source(data_source)
    elif task not in TASKS:
        raise DataError(f"{r.where}: field 'task' must be qa, math or choice, got {task!r}")
    return [DocQARecord(id=r.id("id", f"{source}-{i}"), data_source=data_source, task=task,
                        context=r.str("context"), question=r.str("question"), answers=r.answers("answers", "answer"),
                        meta=r.get("meta") or {}, reasoning=r.optional_str("reasoning"))]


def _longbench(r: _Row, i: int, source: str):
    data_source = str(r.get("dataset") or source)
    return [DocQARecord(id=r.id("_id", f"{source}-{i}"), data_source=data_source,
                        task=task_for_source(data_source), context=r.str("context"), question=r.str("input"),
                        answers=r.answers("answers"))]


def _hotpotqa(r: _Row, i: int, source: str):
    ctx = r.get("context")
    if isinstance(ctx, dict):  # Hugging Face layout
        titles, sentences = ctx.get("title"), ctx.get("sentences")
        if not isinstance(titles, list) or not isinstance(sentences, list) or len(titles) != len(sentences):
            raise DataError(f"{r.where}: field 'context' must hold equal-length 'title' and 'sentences' lists")
        if not all(isinstance(t, str) and isinstance(s, list) and all(isinstance(x, str) for x in s)
                   for t, s in zip(titles, sentences)):
            raise DataError(f"{r.where}: field 'context' must hold string titles and lists of string sentences")
        passages = [(t, "".join(s)) for t, s in zip(titles, sentences)]
    elif isinstance(ctx, list):
        try:
            passages = [(t, "".join(s)) for t, s in ctx]
        except (TypeError, ValueError):
            raise DataError(f"{r.where}: field 'context' must be a list of [title, [sentences]] pairs") from None
    else:
        raise DataError(f"{r.where}: field 'context' must be a list of [title, sentences] or a "
                        f"{{title, sentences}} table ({'missing' if ctx is None else type(ctx).__name__})")
    rid = r.id("_id" if r.get("_id") is not None else "id", f"{source}-{i}")
    return [DocQARecord(id=rid, data_source=source,
                        task=task_for_source(source), context=_join_passages(passages), question=r.str("question"),
                        answers=r.answers("answer"))]


def _musique(r: _Row, i: int, source: str):
    passages = []
    for j, p in enumerate(r.list("paragraphs")):
        if not isinstance(p, dict) or not isinstance(p.get("paragraph_text"), str):
            raise DataError(f"{r.where}: paragraphs[{j}] must have a string 'paragraph_text'")
        passages.append((p.get("title", ""), p["paragraph_text"]))
    answers = r.answers("answer") + r.strings("answer_aliases")
    return [DocQARecord(id=r.id("id", f"{source}-{i}"), data_source=source, task=task_for_source(source),
                        context=_join_passages(passages), question=r.str("question"), answers=answers)]


def _lciteeval(r: _Row, i: int, source: str):
    if isinstance(r.get("context"), str):
        context = r.get("context")
    else:
        docs = r.list("docs")
        texts = [d.get("text") if isinstance(d, dict) else d for d in docs]
        for j, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"{r.where}: docs[{j}] must be a string or an object with a string 'text'")
        context = _join_passages([("", text) for text in texts])
    return [DocQARecord(id=r.id("id", f"{source}-{i}"), data_source=source, task=task_for_source(source),
                        context=context.lstrip("\ufeff").removeprefix("ï»¿"), question=r.str("question"),
                        answers=r.answers("answer", "answers"))]


def _leval(r: _Row, i: int, source: str):
    questions, outputs = r.list("instructions"), r.list("outputs")
    if len(questions) != len(outputs):
        raise DataError(f"{r.where}: 'instructions' ({len(questions)}) and 'outputs' ({len(outputs)}) differ in length")
    doc = r.str("input")
    data_source = str(r.get("source") or source)
    task = task_for_source(data_source)
    return [DocQARecord(id=f"{source}-{i}-{j}", data_source=data_source, task=task, context=doc,
                        question=str(q), answers=[str(a)]) for j, (q, a) in enumerate(zip(questions, outputs))]


def _docmath(r: _Row, i: int, source: str):
    """DocMath rows are numeric by construction, so a file whose name says nothing (test.json)
    still gets the math scorer; only a source naming another scorer overrides that."""
    paragraphs = r.list("paragraphs")
    context = "\n\n".join(str(p) for p in paragraphs)
    return [DocQARecord(id=r.id("question_id", f"{source}-{i}"), data_source=source,
                        task=task_for_source(source, default="math"),
                        context=context, question=r.str("question"), answers=r.answers("ground_truth"))]


def _frames(r: _Row, i: int, source: str):
    items = r.get("wiki_items")
    if not isinstance(items, list) or not items:
        raise DataError(f"{r.where}: field 'wiki_items' (the Wikipedia article texts) is missing; a FRAMES row "
                        f"with only links has no document to read")
    passages = [((d.get("title") or ""), d.get("text") or "") if isinstance(d, dict) else ("", str(d)) for d in items]
    return [DocQARecord(id=r.id("id", f"{source}-{i}"), data_source=source, task=task_for_source(source),
                        context=_join_passages(passages), question=r.str("Prompt", "Question"),
                        answers=r.answers("Answer", "answer"))]


_TEXT_BLOCK = re.compile(r"<text>\n?(.*)\n?</text>\s*(.*?)\s*(?:Format your (?:response|answer)|$)", re.DOTALL)


def _verl(r: _Row, i: int, source: str):
    messages = r.list("prompt")
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        raise DataError(f"{r.where}: field 'prompt' has no user message")
    content = str(user[-1].get("content", ""))
    reward = r.get("reward_model") or {}
    gold = reward.get("ground_truth") if isinstance(reward, dict) else None
    if gold is None:
        raise DataError(f"{r.where}: field 'reward_model.ground_truth' is missing")
    m = _TEXT_BLOCK.search(content)
    context, question = (m.group(1).strip(), m.group(2).strip()) if m else ("", content)
    data_source = str(r.get("data_source") or source)
    task = task_for_source(data_source)
    extra = r.get("extra_info") or {}
    # the index numbers a subset's rows (DocQA-RL-1.6K joins subsets, each from 0): the subset names it
    index = extra.get("index") if isinstance(extra, dict) else None
    rid = f"{data_source}-{index}" if index is not None else f"{source}-{i}"
    golds = [str(g) for g in gold] if isinstance(gold, (list, tuple)) else [str(gold)]
    return [DocQARecord(id=rid, data_source=data_source, task=task, context=context, question=question,
                        answers=golds, prompt=content)]


CONVERTERS: dict[str, Callable] = {"docqa": _docqa, "longbench": _longbench, "hotpotqa": _hotpotqa,
                                   "musique": _musique, "lciteeval": _lciteeval, "leval": _leval,
                                   "docmath": _docmath, "frames": _frames, "verl": _verl}


def detect_format(row: dict) -> str | None:
    keys = set(row)
    if "prompt" in keys and "reward_model" in keys:
        return "verl"
    if {"instructions", "outputs", "input"} <= keys:
        return "leval"
    if "input" in keys and "context" in keys and "answers" in keys:
        return "longbench"
    if "paragraphs" in keys and "ground_truth" in keys:
        return "docmath"
    if "paragraphs" in keys and "answer" in keys:
        return "musique"
    if ("Prompt" in keys or "Question" in keys) and "Answer" in keys:
        return "frames"
    if "docs" in keys and "question" in keys:
        return "lciteeval"
    if "context" in keys and "question" in keys and ("answers" in keys or "task" in keys):
        return "docqa"
    if "context" in keys and "question" in keys and "answer" in keys:  # HotpotQA's context is passages;
        return "docqa" if isinstance(row["context"], str) else "hotpotqa"  # ours with one `answer` is a string
    return None


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install 'longrl[data]')") from None
        for i, row in enumerate(pq.read_table(str(path)).to_pylist()):
            yield i, row
        return
    text = read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        yield from enumerate(rows)
        return
    for lineno, line in enumerate(jsonl_lines(text), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def check_unique_ids(sources: list[tuple[str, list]], what: str) -> None:
    """sources: (file or spec, its records) pairs. Records are kept and looked up by id
    (curriculum, difficulty): two with one id would silently become one. Refused, naming both
    sources."""
    seen: dict[str, str] = {}
    for source, records in sources:
        for r in records:
            if r.id in seen:
                where = "twice in " + source if seen[r.id] == source else f"in {seen[r.id]} and in {source}"
                raise DataError(f"{what}: the id {r.id!r} is used {where}; ids must be unique (give synthetic "
                                f"specs different seeds, and files whose rows have no id different names)")
            seen[r.id] = source


def load_docqa(path: str | Path, *, format: str = "auto", data_source: str | None = None,
               on_error: str = "raise") -> DocQADataset:
    """Read doc-QA records from `path` (JSON list, JSONL or parquet)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if format != "auto" and format not in FORMATS:
        raise DataError(f"format {format!r} unknown; choose auto or one of {', '.join(FORMATS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    source = data_source or path.stem
    fmt = None if format == "auto" else format
    records, skipped = [], []
    unit = "line" if path.suffix == ".jsonl" else "row"
    for i, row in _rows(path):
        where = f"{path}:{i}" if unit == "line" else f"{path} row {i}"
        try:
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object, got {type(row).__name__}")
            if fmt is None:
                fmt = detect_format(row)
                if fmt is None:
                    raise DataError(f"{where}: cannot tell the format from fields {sorted(row)[:12]}; "
                                    f"pass format= (one of {', '.join(FORMATS)})")
            records.extend(CONVERTERS[fmt](_Row(row, where), i, source))
        except DataError as e:
            if on_error == "raise":
                raise
            skipped.append(str(e))
    if not records:
        detail = f" ({len(skipped)} skipped; first: {skipped[0]})" if skipped else ""
        raise DataError(f"{path}: no usable rows{detail}")
    return DocQADataset(records, skipped)


def load_records(spec: str, *, format: str = "auto") -> DocQADataset:
    """A data file, or `synthetic:n=64,tokens=200-400,seed=0[,kinds=lookup+two_hop][,reasoning=0]
    [,confusers=R]` for records made on the fly by engine.data.synthetic (recipes stay
    self-contained); reasoning=0 drops the reasoning traces (SFT then teaches the answer
    sentence alone); confusers=R plants R look-alike facts per 100 tokens of document."""
    if not spec.startswith("synthetic:"):
        return load_docqa(spec, format=format)
    from . import synthetic
    opts = {}
    for part in filter(None, spec[len("synthetic:"):].split(",")):
        key, _, value = part.partition("=")
        opts[key.strip()] = value.strip()
    unknown = set(opts) - {"n", "tokens", "seed", "kinds", "reasoning", "confusers"}
    expected = "expected synthetic:n=N,tokens=T or LOW-HIGH[,seed=S][,kinds=a+b][,reasoning=0|1][,confusers=R]"
    if unknown or "n" not in opts or "tokens" not in opts or opts.get("reasoning", "1") not in ("0", "1"):
        raise DataError(f"data spec {spec!r}: {expected}" + (f" (unknown {sorted(unknown)})" if unknown else ""))
    try:
        confusers = float(opts.get("confusers", 0))
    except ValueError:
        raise DataError(f"data spec {spec!r}: confusers={opts['confusers']!r} is not a number ({expected})") from None
    low, _, high = opts["tokens"].partition("-")
    try:
        target = (int(low), int(high)) if high else int(low)
        n, seed = int(opts["n"]), int(opts.get("seed", 0))
    except ValueError:
        raise DataError(f"data spec {spec!r}: n, tokens and seed must be integers ({expected})") from None
    if n < 1:
        raise DataError(f"data spec {spec!r}: n must be at least 1, got {n}")
    kinds = tuple(opts["kinds"].split("+")) if "kinds" in opts else synthetic.KINDS
    try:
        records = synthetic.generate(n, target, seed=seed, kinds=kinds, confusers=confusers)
    except ValueError as e:
        raise DataError(f"data spec {spec!r}: {e}") from None
    if opts.get("reasoning") == "0":
        for rec in records:
            rec.reasoning = None
    return DocQADataset(records)
