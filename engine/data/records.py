"""The doc-QA record, its dataset list, and the routing of a data source to its scorer.

Kept apart from the loaders so that the synthetic generator (which makes records) and the
loaders (which read them, and can call the generator for `synthetic:` specs) both depend
on this module instead of on each other.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("qa", "math", "choice")


def task_for_source(data_source: str, default: str = "qa") -> str:
    """The rule scorer a data source's answers are checked with: math, choice or qa.

    Routed on the data_source string, as QwenLong-L1's released reward code does
    (Tongyi-Zhiwen/QwenLong-L1, verl/verl/utils/reward_score/__init__.py,
    `_default_compute_score`): a source containing "long_toc_choices" goes to the
    multiple-choice scorer (long.py, the letter in "The correct answer is (X)"), one
    containing "docmath" to the numeric scorer (docmath.py), and "multihoprag" / "musique"
    to sub-EM (docqa.py). DocQA-RL-1.6K's data_source values carry a length bucket, e.g.
    long_toc_choices_0_20000, long_toc_choices_20000_40000, long_toc_choices_40000_plus,
    docmath_0_20000, docmath_20000_40000, docmath_40000_plus, multihoprag_0_20000,
    multihoprag_20000_40000, musique_0_20000 (the names seen in public verl reward routers
    written for this dataset; the sungyub/docqa-rl-verl card lists the same three families).

    Here any source naming choices counts as choice (not only long_toc_choices), and any
    other source gets `default` ("qa": sub-EM, the training reward of the multi-hop subset)
    instead of the original's NotImplementedError, so every loader can route through it.
    """
    if default not in TASKS:
        raise ValueError(f"default task must be one of {', '.join(TASKS)}, got {default!r}")
    name = data_source.lower()
    if "choice" in name:
        return "choice"
    if "docmath" in name:
        return "math"
    return default


@dataclass
class DocQARecord:
    id: str
    data_source: str
    task: str  # qa | math | choice: the rule scorer (engine.rewards.rule_reward) for the answers
    context: str
    question: str
    answers: list[str]
    prompt: str | None = None  # a pre-rendered prompt (verl rows); when set, no template is applied
    meta: dict[str, Any] = field(default_factory=dict)
    reasoning: str | None = None  # a worked reasoning trace, for warm-up SFT that teaches a reasoning format

    def to_json(self) -> str:
        """One JSON line; optional fields left unset are omitted so old files stay byte-identical."""
        row = asdict(self)
        for key in ("prompt", "reasoning"):
            if row[key] is None:
                del row[key]
        if not row["meta"]:
            del row["meta"]
        return json.dumps(row, ensure_ascii=False)


class DocQADataset(list):
    """A list of DocQARecord, plus the messages of rows skipped under on_error='skip'."""

    def __init__(self, records=(), skipped=()):
        super().__init__(records)
        self.skipped: list[str] = list(skipped)


def write_docqa(records, path: str | Path) -> None:
    """Records as our doc-QA JSONL, the format `load_docqa` reads back unchanged."""
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(rec.to_json() + "\n")
