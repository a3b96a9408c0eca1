"""Synthetic long-document QA, deterministic from a seed.

Each document is built from distractor sentences about invented people, towns and
companies, with the facts a question needs planted at chosen depths (0 = start, 1 = end).
Question kinds, each checkable by the rule reward:

  lookup    one planted fact            "In which town was Orvel Tamsk born?"      -> town
  two_hop   two facts, chained          "...the town where the company that X works for
                                         has its headquarters?"                    -> town
  numeric   two revenue figures         sum, difference or growth in percent      (task math)
  choice    a lookup with four options  "(A) ... (D)"                              (task choice)

Each record also carries a short, correct reasoning trace (`record.reasoning`): the
paragraph of the document that states each needed fact, quoted, then the step that turns
the facts into the answer, so warm-up SFT can teach a reasoning format before RL. The
traces use no random draws, so questions, answers and documents are the same for a seed
as before they existed.

Every invented name is unique within a dataset and no name contains another, so an
answer never matches another item's question by accident (the tests check that a shuffled
answer scores 0). Lengths are measured with `count_tokens` (a tokenizer's, or a word-level
estimate) sentence by sentence, so a requested length is met within a few percent.

    python -m engine.data.synthetic --n 200 --tokens 1024 --out data/synth.jsonl --seed 0
"""
from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from .records import DocQARecord, write_docqa

KINDS = ("lookup", "two_hop", "numeric", "choice")
_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kl", "l", "m", "n", "p", "r", "s", "st", "t", "tr",
           "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
_CODAS = ["", "n", "r", "l", "s", "sk", "nd", "th", "m", "v", "x"]


def word_count_tokens(text: str) -> int:
    """A tokenizer-free estimate: words and punctuation marks."""
    return len(re.findall(r"\w+|[^\w\s]", text))


class _Names:
    """Unique invented names; none is a substring of another (after lowercasing)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: list[str] = []

    def _word(self, syllables: int) -> str:
        return "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                       for _ in range(syllables)).capitalize()

    def new(self, words: int = 1) -> str:
        for _ in range(1000):
            name = " ".join(self._word(self.rng.choice((2, 3))) for _ in range(words))
            low = name.lower()
            if all(low not in u and u not in low for u in self.used):
                self.used.append(low)
                return name
        raise RuntimeError("ran out of unique names")


_FILLER = [
    "{p} spent several summers in {t}, where the market square is known for its clock tower.",
    "The river near {t} floods every few years, and the council of {t} has built {n} new embankments.",
    "{o} opened a small office in {t} in {y}, employing about {n} people.",
    "Records from {y} mention {p} as a member of the choir in {t}.",
    "Travellers describe {t} as quiet in winter; its population is close to {n} thousand.",
    "{p} once wrote that the roads between {t} and the coast were the worst in the region.",
    "In {y} a fire damaged the old library of {t}; {n} volumes were saved.",
    "{o} is best known for its ferries, which carried {n} thousand passengers in {y}.",
    "The annual fair of {t} draws visitors from {n} neighbouring villages.",
    "{p} and a cousin kept bees on a farm outside {t} for {n} years.",
]


@dataclass
class _Item:
    kind: str
    question: str
    answer: str
    task: str
    facts: list[str]
    conclusion: str = ""  # the reasoning step from the facts to the answer


def _make_item(kind: str, names: _Names, rng: random.Random, used_numbers: list[float]) -> _Item:
    person, town = names.new(2), names.new(1)
    if kind == "lookup":
        return _Item(kind, f"In which town was {person} born?", town, "qa",
                     [f"{person} was born in the town of {town}."], f"So {person} was born in {town}.")
    if kind == "choice":
        options = [town] + [names.new(1) for _ in range(3)]
        rng.shuffle(options)
        letter = "ABCD"[options.index(town)]
        listed = "\n".join(f"({ch}) {opt}" for ch, opt in zip("ABCD", options))
        return _Item(kind, f"In which town was {person} born?\n{listed}", letter, "choice",
                     [f"{person} was born in the town of {town}."],
                     f"So {person} was born in {town}, which is option ({letter}).")
    company = names.new(1) + " Works"
    if kind == "two_hop":
        return _Item(kind, f"In which town does the company that {person} works for have its headquarters?",
                     town, "qa", [f"{person} works for {company}.", f"{company} has its headquarters in {town}."],
                     f"So the company {person} works for is {company}, and its headquarters are in {town}.")
    # numeric: revenue figures in two years; sum, difference or growth in percent
    y1 = rng.randint(1990, 2015)
    y2 = y1 + rng.randint(1, 5)
    for _ in range(1000):
        a, b = rng.randint(120, 990), rng.randint(120, 990)
        op = rng.choice(("sum", "difference", "growth"))
        value = {"sum": a + b, "difference": b - a, "growth": round((b - a) / a * 100, 1)}[op]
        # unique up to the numeric check's tolerance and its x100 / x1000 rescaling
        if value != 0 and all(min(abs(value - u * s) for s in (1, 100, 0.01, 1000, 0.001)) > 0.01 * abs(value)
                              for u in used_numbers):
            break
    used_numbers.append(value)
    facts = [f"In {y1}, {company} reported revenue of {a} million crowns.",
             f"In {y2}, {company} reported revenue of {b} million crowns."]
    question = {"sum": f"What was the combined revenue of {company} in {y1} and {y2}, in million crowns?",
                "difference": f"By how many million crowns did the revenue of {company} change from {y1} to {y2}?",
                "growth": f"By what percentage did the revenue of {company} grow from {y1} to {y2}? "
                          f"Round to one decimal place."}[op]
    answer = f"{value:g}" if op != "growth" else f"{value:.1f}%"
    step = {"sum": f"{a} + {b} = {answer} million crowns",
            "difference": f"{b} - {a} = {answer} million crowns",
            "growth": f"({b} - {a}) / {a} x 100 = {answer}, rounded to one decimal place"}[op]
    return _Item(kind, question, answer, "math", facts, f"So the {op} is {step}.")


def _reasoning(item: _Item, context: str) -> str:
    """Quote each fact with the paragraph that states it, then the step to the answer: a
    trace that is true of this document, for SFT to teach a grounded reasoning format."""
    paragraphs = context.split("\n\n")
    steps = []
    for k, fact in enumerate(item.facts):
        where = next(j for j, para in enumerate(paragraphs, 1) if fact in para)
        step = f'paragraph {where} of the document says: "{fact}"'
        if len(item.facts) > 1:  # a chain: say which fact comes first
            step = ("First, " if k == 0 else "Then ") + step
        steps.append(step[0].upper() + step[1:])
    return "\n".join(steps + [item.conclusion])


def generate(n: int, target_tokens: int | tuple[int, int], *, seed: int = 0, kinds: Sequence[str] = KINDS,
             count_tokens: Callable[[str], int] = word_count_tokens,
             depths: Sequence[float] | None = None, confusers: float = 0.0) -> list[DocQARecord]:
    """n records; target_tokens is a fixed document length or a (low, high) range drawn per
    record; depths (0..1) place the first fact of each record, cycling (default: random).
    confusers: look-alike facts per 100 tokens of document ("Vel Darn was born in the town
    of Kost." about people the question does not ask about), so a longer document holds
    more near-misses and retrieval gets harder with length; 0 (default) leaves the
    documents of a seed exactly as they were."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown question kinds {bad}; choose from {', '.join(KINDS)}")
    if confusers < 0:
        raise ValueError(f"confusers must be >= 0 (look-alike facts per 100 tokens), got {confusers}")
    rng = random.Random(seed)
    names = _Names(rng)
    used_numbers: list[float] = []
    records = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        item = _make_item(kind, names, rng, used_numbers)
        target = target_tokens if isinstance(target_tokens, int) else rng.randint(*target_tokens)
        depth = depths[i % len(depths)] if depths else rng.random()
        context = _document(item.facts, target, depth, names, rng, count_tokens,
                            _confusers(kind, round(confusers * target / 100), names, rng))
        records.append(DocQARecord(id=f"synth-{seed}-{i}", data_source="synthetic", task=item.task, context=context,
                                   question=item.question, answers=[item.answer],
                                   meta={"kind": kind, "depth": round(depth, 3), "target_tokens": target},
                                   reasoning=_reasoning(item, context)))
    return records


def _confusers(kind: str, count: int, names: _Names, rng: random.Random) -> list[str]:
    """count sentences shaped like the facts a question of this kind needs, about other
    (fresh) people, companies and towns: near-misses that only the asked-for name tells apart."""
    out: list[str] = []
    while len(out) < count:
        person, town, company = names.new(2), names.new(1), names.new(1) + " Works"
        if kind in ("lookup", "choice"):
            out.append(f"{person} was born in the town of {town}.")
        elif kind == "two_hop":
            out += [f"{person} works for {company}.", f"{company} has its headquarters in {town}."]
        else:
            y = rng.randint(1990, 2020)
            out.append(f"In {y}, {company} reported revenue of {rng.randint(120, 990)} million crowns.")
    return out[:count]


def _document(facts: list[str], target: int, depth: float, names: _Names, rng: random.Random,
              count_tokens: Callable[[str], int], confusers: Sequence[str] = ()) -> str:
    # a small cast of distractor entities per document, none of them in the facts
    people = [names.new(2) for _ in range(4)]
    towns = [names.new(1) for _ in range(4)]
    orgs = [names.new(1) + " Company" for _ in range(3)]
    budget = target - sum(count_tokens(f) for f in facts) - sum(count_tokens(c) for c in confusers)
    sentences: list[str] = []
    used = 0
    while True:
        s = rng.choice(_FILLER).format(p=rng.choice(people), t=rng.choice(towns), o=rng.choice(orgs),
                                       y=rng.randint(1850, 2020), n=rng.randint(2, 900))
        cost = count_tokens(s)
        if used + cost > budget:
            break
        sentences.append(s)
        used += cost
    for c in confusers:  # scattered through the filler, before the facts are planted
        sentences.insert(rng.randint(0, len(sentences)), c)
    # plant the facts: the first at `depth`, a second (two-hop, numeric) further on
    pos = round(depth * len(sentences))
    sentences.insert(pos, facts[0])
    for k, fact in enumerate(facts[1:], 1):
        later = pos + 1 + rng.randint(0, max(0, (len(sentences) - pos - 1)))
        sentences.insert(min(later, len(sentences)), fact)
    paragraphs, j = [], 0
    while j < len(sentences):
        size = rng.randint(3, 6)
        paragraphs.append(" ".join(sentences[j:j + size]))
        j += size
    return "\n\n".join(paragraphs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write synthetic long-document QA as doc-QA JSONL.")
    p.add_argument("--n", type=int, required=True, help="number of records")
    p.add_argument("--tokens", type=int, nargs="+", required=True, help="document length, or LOW HIGH")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--tokenizer", help="count tokens with this model's tokenizer (default: a word estimate)")
    a = p.parse_args(argv)
    if len(a.tokens) > 2 or a.tokens[0] < 1 or (len(a.tokens) == 2 and a.tokens[1] < a.tokens[0]):
        p.error(f"--tokens takes a length, or LOW HIGH with 1 <= LOW <= HIGH (got {' '.join(map(str, a.tokens))})")
    if a.n < 1:
        p.error(f"--n must be at least 1 (got {a.n})")
    count = word_count_tokens
    if a.tokenizer:
        from ..model import resolve_checkpoint
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(resolve_checkpoint(a.tokenizer)))
        count = lambda text: len(tok.encode(text, add_special_tokens=False))  # noqa: E731
    target = a.tokens[0] if len(a.tokens) == 1 else (a.tokens[0], a.tokens[1])
    records = generate(a.n, target, seed=a.seed, kinds=a.kinds, count_tokens=count)
    write_docqa(records, a.out)
    print(f"wrote {len(records)} records to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
