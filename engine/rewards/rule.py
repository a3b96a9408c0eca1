"""Rule-based answer checks: extraction, SQuAD normalisation, sub-EM / EM / F1, numbers,
multiple choice.

Decisions (each tested):
- Thinking: with think="auto" the answer is read after the last `</think>` when there is
  one, and a completion that opens `<think>` and never closes it has no answer (a model that
  writes the tag itself, whatever its chat template); think="required" scores a completion
  without `</think>` as no answer; think="off" ignores the tag.
- The answer is the first non-empty line after the *last* "the answer is", matched
  case-insensitively (models often write "the answer is:" and the answer on a line of its
  own), with wrapping parentheses, quotes, bold markers and a final period removed ("the
  answer isn't X" and "the answer is not X" commit to nothing). A
  completion that never says "the answer is" has no answer and scores 0: a lenient
  fallback would reward long outputs that merely contain the gold string.
- sub-EM (QwenLong-L1's training reward): after normalisation, the gold is contained in the
  prediction or the prediction in the gold; an empty prediction never matches.
- Numbers (DocMath): thousands separators, signs, (123) as −123 in a bare number (an
  answer's wrapping parentheses are the template's "(insert answer here)" and go first, so
  "the answer is (31)" is 31), currency symbols, %,
  exponents (1.2e6, 1.2 × 10^6), simple fractions (3/4) and scale words (thousand, million,
  billion, trillion) are parsed by a regular expression,
  never eval(); a prediction matches within a relative 0.15% of the gold, or of the gold
  ×/÷ 100 (percent vs fraction) or ×/÷ 10^3, 10^6, 10^9 (a table in thousands, millions or
  billions answered with or without the scale word: gold 5 accepts "$5 million"). Other
  ratios, ×10 included, stay wrong.
- Multiple choice: the letter is an uppercase letter in parentheses, "(B)", or standing
  alone, "the answer is B."; "the answer is a clear one" is no choice. Gold letters are
  read leniently ("a", "(a)", "A").
- Gold answers may be a bare answer, a sentence with "the answer is" (its answer is
  extracted the same way), or a list of acceptable answers (the best score counts).
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter

TASKS = ("qa", "math", "choice")
# "is" as a whole word: "the answer isn't X" commits to nothing
_ANSWER_IS = re.compile(r"the\s+(?:correct\s+|final\s+)?answer\s+is\b", re.IGNORECASE)
_NEGATED = re.compile(r"\s+not\b", re.IGNORECASE)  # "the answer is not X": skipped while another commits
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"‘", "’", "“", "”", "–", "—"}


def strip_thinking(completion: str, think: str = "auto") -> str | None:
    if think not in ("auto", "required", "off"):
        raise ValueError(f"think must be auto, required or off, got {think!r}")
    if think == "off":
        return completion
    idx = completion.rfind("</think>")
    if idx < 0:
        if think == "required":
            return None
        # auto: a thought opened and never closed is no answer; what came before it still is
        opened = completion.find("<think>")
        return completion if opened < 0 else completion[:opened]
    return completion[idx + len("</think>"):]


def _first_line(text: str) -> str:
    """The first line with content: "the answer is:" is often followed by a blank line."""
    return next((line for line in text.splitlines() if line.strip()), "")


def _clean(answer: str) -> str:
    answer = _first_line(answer.strip().lstrip(":")).strip()
    for _ in range(3):  # peel wrappers: **(Paris).** -> Paris
        before = answer
        answer = answer.strip().rstrip(".").strip()
        for left, right in (("**", "**"), ("(", ")"), ('"', '"'), ("'", "'"), ("[", "]"), ("“", "”"), ("$", "$")):
            if len(answer) >= len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
                answer = answer[len(left):len(answer) - len(right)]
        if answer == before:
            break
    return answer.strip()


def extract_answer(completion: str, think: str = "auto") -> str | None:
    """The answer a completion commits to, or None when it commits to none."""
    text = strip_thinking(completion, think)
    if text is None:
        return None
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    # the last that commits: "the answer is Paris. ... the answer is not London" answers Paris,
    # while "the answer is not guilty" alone answers "not guilty"
    committed = [m for m in matches if not _NEGATED.match(text, m.end())]
    answer = _clean(text[(committed or matches)[-1].end():])
    return answer or None


def gold_answers(gold: str | list[str]) -> list[str]:
    """Normalise the forms a gold answer comes in to a list of bare answers."""
    items = [gold] if isinstance(gold, str) else list(gold)
    out = []
    for item in items:
        if not isinstance(item, str):
            item = str(item)
        found = extract_answer(item, think="off") if _ANSWER_IS.search(item) else None
        out.append(found if found else _clean(item) or item.strip())
    return [g for g in out if g]


# ---- text scores -----------------------------------------------------------------------
def normalize(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize(prediction) == normalize(gold) != "")


def sub_exact_match(prediction: str, gold: str) -> float:
    p, g = normalize(prediction), normalize(gold)
    if not p or not g:
        return 0.0
    return float(g in p or p in g)


def token_f1(prediction: str, gold: str) -> float:
    p, g = normalize(prediction).split(), normalize(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g or common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


# ---- numbers ---------------------------------------------------------------------------
_SCALES = {"thousand": 1e3, "k": 1e3, "million": 1e6, "m": 1e6, "mn": 1e6, "billion": 1e9, "bn": 1e9,
           "b": 1e9, "trillion": 1e12, "tn": 1e12}
_NUMBER = re.compile(
    r"(?P<open>\()?\s*(?P<sign>[-+−])?\s*[$€£¥]?\s*(?P<sign2>[-+−])?\s*"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    # an exponent (1.2e6, 1e-05: how a float gold prints), a power of ten (1.2 × 10^6), a fraction (3/4)
    r"(?:[eE](?P<exp>[-+]?\d+)|\s*[×x*]\s*10\s*\^\s*\(?(?P<pow>[-+−]?\d+)\)?"
    r"|\s*/\s*(?P<den>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?![\d/,]))?"
    r"\s*(?P<close>\))?\s*(?P<pct>%|percent\b)?"
    # a scale word after a space, or a one-letter abbreviation glued to the number ($5k, 1.2B)
    r"(?:\s*(?P<scale>thousand|million|billion|trillion|mn|bn|tn)\b|(?P<abbr>[kmb])(?![a-z]))?",
    re.IGNORECASE)


def parse_number(text: str) -> float | None:
    """The first number in `text`, with sign, currency, %, parentheses and scale word."""
    values = number_readings(text)
    return values[0] if values else None


def number_readings(text: str) -> list[float]:
    """parse_number's value, then the other reading of an a/b: its numerator alone ("24/7",
    "50/50", "2019/20" are no quotients); [] when there is no number."""
    if not text:
        return []
    m = _NUMBER.search(text)
    if not m:
        return []
    value = float(m.group("num").replace(",", ""))
    if m.group("exp") or m.group("pow"):
        value *= 10.0 ** int((m.group("exp") or m.group("pow")).replace("−", "-"))
    readings = [value]
    if m.group("den"):
        den = float(m.group("den").replace(",", ""))
        readings = [value / den, value] if den else [value]
    return [v for v in (_finish(m, r) for r in readings) if v is not None]


def _finish(m: re.Match, value: float) -> float | None:
    """A reading with the match's sign, parentheses and scale applied."""
    if m.group("sign") in ("-", "−") or m.group("sign2") in ("-", "−") or (m.group("open") and m.group("close")):
        value = -value
    scale = m.group("scale") or m.group("abbr")
    if scale:
        value *= _SCALES[scale.lower()]
    return value if math.isfinite(value) else None


# the unit changes a correct DocMath answer may carry: percent vs fraction, and a scale word
# (thousand, million, billion) the table's header implies but the answer states or drops
_UNIT_FACTORS = (1.0, 1e2, 1e-2, 1e3, 1e-3, 1e6, 1e-6, 1e9, 1e-9)


def numbers_match(prediction: float, gold: float, rel_tol: float = 0.0015) -> bool:
    """Within rel_tol of the gold in its own unit or in one of the unit changes above."""
    if gold == 0:
        return abs(prediction) <= 1e-9
    return any(abs(prediction - gold * f) <= rel_tol * abs(gold * f) for f in _UNIT_FACTORS)


# ---- multiple choice -------------------------------------------------------------------
def _choice_after_answer_is(letter: str) -> re.Pattern:
    """After "answer is": a letter in parentheses, "(B)", or standing alone, "B." (bold allowed)."""
    return re.compile(rf"(?i:answer\s+is)\s*:?\s*(?:\*\*)?\s*(?:\(\s*({letter})\s*\)|({letter})(?![\w'’]))")


_CHOICE = _choice_after_answer_is("[A-Z]")  # uppercase only: "the answer is a ..." is an article
_GOLD_CHOICE = _choice_after_answer_is("[A-Za-z]")
_BARE_CHOICE = re.compile(r"^\(?\s*([A-Za-z])\s*\)?\.?$")


def _last_letter(pattern: re.Pattern, text: str) -> str | None:
    matches = list(pattern.finditer(text))
    return (matches[-1].group(1) or matches[-1].group(2)).upper() if matches else None


def extract_choice(completion: str, think: str = "auto") -> str | None:
    """The letter of the last "answer is (X)" / "answer is X", or None."""
    text = strip_thinking(completion, think)
    return None if text is None else _last_letter(_CHOICE, text)


def _gold_choice(gold: str) -> str | None:
    m = _BARE_CHOICE.match(gold.strip())
    return m.group(1).upper() if m else _last_letter(_GOLD_CHOICE, gold)


# ---- the reward ------------------------------------------------------------------------
def rule_reward(completion: str, gold: str | list[str], task: str, *, think: str = "auto") -> float:
    """1.0 when the completion's answer matches a gold answer under the task's rule, else 0.0.

    task: qa (sub-EM), math (numeric, sub-EM when the gold is not a number), choice (letter)."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} unknown; choose one of {', '.join(TASKS)}")
    golds = gold_answers(gold)
    if not golds:
        return 0.0
    if task == "choice":
        letter = extract_choice(completion, think)
        return float(letter is not None and any(_gold_choice(g) == letter for g in golds))
    answer = extract_answer(completion, think)
    if answer is None:
        return 0.0
    if task == "math":
        preds = number_readings(answer)
        for g in golds:
            g_num = parse_number(g)
            if g_num is not None and any(numbers_match(p, g_num) for p in preds):
                return 1.0
            if g_num is None and sub_exact_match(answer, g):
                return 1.0
        return 0.0
    return max(sub_exact_match(answer, g) for g in golds)
