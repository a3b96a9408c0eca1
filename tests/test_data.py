"""Loaders on real fixtures and real-shaped rows, bad rows, lengths, and the synthetic generator."""
from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.data import (FORMATS, read_docqa_jsonl, DataError, DocQARecord, length_buckets, load_docqa, load_records, prompt_lengths,
                         record_prompt_ids, synthetic, task_for_source, write_docqa)
from engine.rewards import rule_reward

REAL = Path(__file__).parent / "fixtures" / "real"
DOCQA_RL = Path(__file__).parent / "fixtures" / "docqa_rl_sample.parquet"


# ---- real fixtures ----------------------------------------------------------------------
@pytest.mark.parametrize("name,count,question,answer", [
    ("hotpotqa_dev_hf.json", 3, "Were Scott Derrickson and Ed Wood of the same nationality?", "yes"),
    ("hotpotqa_train_orig.json", 2, "If Gallu is a demon Lilu is what?", "a spirit"),
    ("musique_dev.json", 2, "What did the actress in My Fair Lady win a Tony for?",
     "for Best Performance by a Leading Actress in a Play in Ondine"),
    ("2wikimqa.json", 2, "When did Lothair Ii's mother die?", "20 March 851"),
    ("narrativeqa_lciteeval.json", 1, None, None),
    ("qasper_leval.jsonl", None, None, None),
])
def test_real_fixtures_load(name, count, question, answer):
    ds = load_docqa(REAL / name)
    if count is not None:
        assert len(ds) == count
    rec = ds[0]
    assert rec.task == "qa" and len(rec.context) > 1000 and rec.question and rec.answers
    if question:
        assert rec.question == question and rec.answers[0] == answer
    assert not ds.skipped


def test_hotpotqa_layouts_give_titled_passages():
    hf = load_docqa(REAL / "hotpotqa_dev_hf.json")[0]
    assert hf.context.startswith("Ed Wood (film)\n")  # the first title of row 0, then its sentences
    orig = load_docqa(REAL / "hotpotqa_train_orig.json")[0]
    assert orig.id == "5a77ec115542992a6e59dff7" and orig.context.startswith("Demon Dice\n")


def test_musique_aliases_and_leval_questions():
    mu = load_docqa(REAL / "musique_dev.json")[0]
    assert "leading actress" in mu.answers  # answer_aliases are acceptable answers
    qasper = load_docqa(REAL / "qasper_leval.jsonl")
    raw = json.loads((REAL / "qasper_leval.jsonl").read_text().splitlines()[0])
    assert len(qasper) == len(raw["instructions"]) > 1
    assert {r.context for r in qasper} == {raw["input"]}  # one document, several questions


def test_narrativeqa_bom_is_stripped():
    rec = load_docqa(REAL / "narrativeqa_lciteeval.json")[0]
    assert not rec.context.startswith("ï»¿") and rec.context.startswith("Project Gutenberg")


def test_frames_without_documents_is_refused_clearly():
    with pytest.raises(DataError, match=r"frames_links_only\.json row 0: field 'wiki_items'"):
        load_docqa(REAL / "frames_links_only.json")
    with pytest.raises(DataError, match="no usable rows \\(2 skipped"):
        load_docqa(REAL / "frames_links_only.json", on_error="skip")


# ---- real-shaped rows of the formats without a public sample here -------------------------
def _write(tmp_path, name, rows, jsonl=True):
    path = tmp_path / name
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


def test_longbench_jsonl(tmp_path):
    row = {"input": "Who founded the observatory?", "context": "Passage 1:\nThe observatory was founded by Mara.",
           "answers": ["Mara"], "length": 9, "dataset": "hotpotqa", "language": "en", "all_classes": None,
           "_id": "abc123"}
    rec = load_docqa(_write(tmp_path, "hotpotqa.jsonl", [row]))[0]
    assert (rec.id, rec.data_source, rec.question, rec.answers) == ("abc123", "hotpotqa", row["input"], ["Mara"])


def test_docmath_rows_are_math(tmp_path):
    row = {"question_id": "complong-testmini-0", "paragraphs": ["Revenue was $5 million.", "| 2018 | 5 |"],
           "question": "What was the revenue in millions?", "ground_truth": 5.0}
    rec = load_docqa(_write(tmp_path, "docmath.json", [row], jsonl=False))[0]
    assert rec.task == "math" and rec.answers == ["5.0"] and "| 2018 | 5 |" in rec.context


def test_frames_with_wiki_items(tmp_path):
    row = {"Prompt": "Which town hosts the fair?", "Answer": "Brellin",
           "wiki_items": [{"title": "Brellin", "text": "Brellin hosts an annual fair."}], "wiki_links": "[]"}
    rec = load_docqa(_write(tmp_path, "frames.json", [row], jsonl=False))[0]
    assert rec.question == row["Prompt"] and rec.context.startswith("Brellin\nBrellin hosts")


def test_our_jsonl_round_trip(tmp_path):
    recs = [DocQARecord("a", "synthetic", "math", "ctx", "q?", ["12"], meta={"kind": "numeric"}),
            DocQARecord("b", "synthetic", "choice", "ctx", "q?\n(A) x\n(B) y", ["B"])]
    path = tmp_path / "ours.jsonl"
    write_docqa(recs, path)
    assert load_docqa(path) == recs


def test_verl_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    content = ("Please read the following text and answer the question below.\n\n<text>\nThe bridge opened in "
               "1931.\n</text>\n\nWhen did the bridge open?\n\nFormat your response as follows: \"Therefore, the "
               "answer is (insert answer here)\".")
    row = {"data_source": "docmath_qa", "prompt": [{"role": "user", "content": content}], "ability": "doc-math",
           "reward_model": {"style": "rule", "ground_truth": "1931"}, "extra_info": {"index": 7, "split": "train"}}
    table = pa.Table.from_pylist([row, {**row, "data_source": "musique_qa"}])  # subsets number their rows alike
    path = tmp_path / "train.parquet"
    pq.write_table(table, str(path))
    rec, other = load_docqa(path)
    assert (rec.id, rec.task, rec.answers) == ("docmath_qa-7", "math", ["1931"]) and other.id == "musique_qa-7"
    assert rec.context == "The bridge opened in 1931." and rec.question == "When did the bridge open?"
    assert rec.prompt == content


# ---- scorer routing by data source ------------------------------------------------------
@pytest.mark.parametrize("source,task", [
    # DocQA-RL-1.6K's subsets, as QwenLong-L1's reward code routes them
    ("long_toc_choices_0_20000", "choice"), ("long_toc_choices_40000_plus", "choice"),
    ("docmath_0_20000", "math"), ("docmath_20000_40000", "math"), ("DocMath", "math"),
    ("multihoprag_0_20000", "qa"), ("musique_0_20000", "qa"),
    # elsewhere: any source naming choices is multiple choice, anything else sub-EM
    ("longbench_v2_choices", "choice"), ("hotpotqa", "qa"), ("synthetic", "qa"), ("", "qa"),
])
def test_task_for_source(source, task):
    assert task_for_source(source) == task


def test_task_for_source_default():
    assert task_for_source("test", default="math") == "math"
    assert task_for_source("long_toc_choices_0_20000", default="math") == "choice"
    with pytest.raises(ValueError, match="default task"):
        task_for_source("x", default="essay")


_MINIMAL_ROWS = {  # one row of each format, without a data source of its own
    "docqa": {"context": "Mara founded it.", "question": "Who founded it?", "answers": ["Mara"]},
    "longbench": {"input": "Who founded it?", "context": "Mara founded it.", "answers": ["Mara"]},
    "hotpotqa": {"question": "Who founded it?", "answer": "Mara", "context": [["Obs", ["Mara founded it."]]]},
    "musique": {"question": "Who founded it?", "answer": "Mara",
                "paragraphs": [{"title": "Obs", "paragraph_text": "Mara founded it."}]},
    "lciteeval": {"question": "Who founded it?", "answer": "Mara", "docs": ["Mara founded it."]},
    "leval": {"input": "Mara founded it.", "instructions": ["Who founded it?"], "outputs": ["Mara"]},
    "docmath": {"paragraphs": ["Revenue was 5."], "question": "What was revenue?", "ground_truth": 5},
    "frames": {"Prompt": "Who founded it?", "Answer": "Mara", "wiki_items": [{"title": "Obs", "text": "Mara."}]},
    "verl": {"prompt": [{"role": "user", "content": "<text>\nMara founded it.\n</text>\n\nWho founded it?"}],
             "reward_model": {"style": "rule", "ground_truth": "Mara"}, "extra_info": {"index": 0}},
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("source,task", [("long_toc_choices_0_20000", "choice"), ("docmath_0_20000", "math"),
                                         ("musique_0_20000", "qa")])
def test_every_format_routes_its_task_by_data_source(tmp_path, fmt, source, task):
    path = _write(tmp_path, "rows.json", [_MINIMAL_ROWS[fmt]], jsonl=False)
    recs = load_docqa(path, format=fmt, data_source=source)
    expected = "math" if fmt == "docmath" and task == "qa" else task  # DocMath rows are numeric by construction
    assert [(r.data_source, r.task) for r in recs] == [(source, expected)]


def test_a_rows_own_source_routes_and_our_explicit_task_wins(tmp_path):
    lb = dict(_MINIMAL_ROWS["longbench"], dataset="long_toc_choices_0_20000")
    assert load_docqa(_write(tmp_path, "lb.jsonl", [lb]), format="longbench")[0].task == "choice"
    leval = dict(_MINIMAL_ROWS["leval"], source="docmath_0_20000")
    assert load_docqa(_write(tmp_path, "le.jsonl", [leval]), format="leval")[0].task == "math"
    ours = dict(_MINIMAL_ROWS["docqa"], data_source="docmath_0_20000")
    path = _write(tmp_path, "ours.jsonl", [ours, dict(ours, task="qa")])
    assert [r.task for r in load_docqa(path)] == ["math", "qa"]
    assert load_docqa(_write(tmp_path, "test.json", [_MINIMAL_ROWS["docmath"]], jsonl=False))[0].task == "math"


# ---- DocQA-RL-1.6K: rows written by us in the released schema (tests/fixtures/README.md) ----
_DOCQA_RL_EXPECTED = {  # id: (task, gold, a wrong answer)
    "0": ("choice", "A", "B"), "1": ("choice", "C", "B"), "2": ("choice", "B", "A"), "3": ("choice", "D", "C"),
    "4": ("math", "12.0", "15.5"), "5": ("math", "420", "405"), "6": ("math", "2.65", "3.1"),
    "7": ("math", "8.0", "7.5"),
    "8": ("qa", "Kestrel Bank", "Orbis Labs"), "9": ("qa", "Yes", "No"), "10": ("qa", "Ines Porto", "Leo Amari"),
    "11": ("qa", "Harwick", "Elmsford"),
}


def _docqa_rl():
    pytest.importorskip("pyarrow")
    return load_docqa(DOCQA_RL)


def _index(record) -> str:
    """The row's extra_info.index: a verl id is data_source-index."""
    return record.id.rsplit("-", 1)[1]


def test_docqa_rl_sample_tasks_and_golds():
    recs = _docqa_rl()
    assert not recs.skipped and len(recs) == len(_DOCQA_RL_EXPECTED)
    assert all(r.id == f"{r.data_source}-{_index(r)}" for r in recs)  # ids name their subset
    assert {_index(r): (r.task, r.answers[0]) for r in recs} == {k: v[:2] for k, v in _DOCQA_RL_EXPECTED.items()}
    by_family = {"long_toc_choices": "choice", "docmath": "math", "multihoprag": "qa", "musique": "qa"}
    for rec in recs:
        assert rec.task == by_family[rec.data_source.rsplit("_", 2)[0]]  # long_toc_choices_0_20000 -> long_toc_choices
        assert rec.context and "<text>" not in rec.context and "</text>" not in rec.context
        assert rec.question and "Format your response" not in rec.question
        assert rec.prompt.startswith("Please read the following text") and rec.context in rec.prompt
        if rec.task == "choice":
            assert "\nChoices:\n(A) " in rec.question
            assert rec.prompt.endswith('"The correct answer is (insert answer here)".')


def test_docqa_rl_sample_rewards():
    for rec in _docqa_rl():
        task, gold, wrong = _DOCQA_RL_EXPECTED[_index(rec)]
        if task == "choice":
            right, bad = f"The correct answer is ({gold}).", f"The correct answer is ({wrong})."
        else:
            right, bad = f"Therefore, the answer is {gold}.", f"Therefore, the answer is {wrong}."
        think = "<think>\nReading the document.\n</think>\n\n"
        assert rule_reward(think + right, rec.answers, rec.task) == 1.0, (rec.id, right)
        assert rule_reward(think + bad, rec.answers, rec.task) == 0.0, (rec.id, bad)


# ---- bad rows ---------------------------------------------------------------------------
def test_bad_row_names_file_row_and_field(tmp_path):
    good = {"context": "c", "question": "q", "answers": ["a"]}
    path = _write(tmp_path, "mixed.jsonl", [good, {"context": "c", "question": 3, "answers": ["a"]}, good])
    with pytest.raises(DataError,
                       match=r"mixed\.jsonl:2: field 'question' must be a string \(got \{'question': 'int'\}\)"):
        load_docqa(path)
    ds = load_docqa(path, on_error="skip")
    assert len(ds) == 2 and len(ds.skipped) == 1 and "mixed.jsonl:2" in ds.skipped[0]


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_docqa(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_docqa(_write(tmp_path, "odd.jsonl", [{"foo": 1}]))
    with pytest.raises(DataError, match=r"x\.jsonl:1: not valid JSON"):
        (tmp_path / "x.jsonl").write_text("{broken\n")
        load_docqa(tmp_path / "x.jsonl")
    with pytest.raises(DataError, match="'task' must be qa, math or choice"):
        load_docqa(_write(tmp_path, "t.jsonl", [{"context": "c", "question": "q", "answers": ["a"], "task": "essay"}]))
    with pytest.raises(DataError, match="format 'csv' unknown"):
        load_docqa(_write(tmp_path, "ok.jsonl", [{"context": "c", "question": "q", "answers": ["a"]}]), format="csv")


def test_bad_fields_of_each_layout_name_the_row(tmp_path):
    """Shapes a converter cannot read are refused by file, row and field (never a traceback,
    never their printed form used as an answer), and `on_error="skip"` skips them."""
    musique = {"paragraphs": [{"paragraph_text": "Paris is in France."}], "question": "q", "answer": "Paris"}
    cases = [
        ({**musique, "answer_aliases": {"x": 1}}, r"field 'answer_aliases' must be a string or a list of strings"),
        ({"context": "c", "question": "q", "answers": [["a", "b"]]}, r"field 'answers' must be a string or a list"),
        ({"docs": [{"title": "no text"}], "question": "q", "answer": "a"}, r"docs\[0\] must be a string or an object"),
        ({"docs": [{"text": 7}], "question": "q", "answer": "a"}, r"docs\[0\] must be a string or an object"),
        ({"context": {"title": ["t"], "sentences": [[1, 2]]}, "question": "q", "answer": "a"},
         r"field 'context' must hold string titles and lists of string sentences"),
        ({"context": "c", "question": "q", "answers": ["a"], "id": {"n": 1}}, r"field 'id' must be a string or"),
    ]
    for k, (row, message) in enumerate(cases):
        path = _write(tmp_path, f"bad{k}.jsonl", [row])
        with pytest.raises(DataError, match=rf"bad{k}\.jsonl:1: {message}"):
            load_docqa(path)
        with pytest.raises(DataError, match="no usable rows"):
            load_docqa(path, on_error="skip")
    # our layout with a singular `answer` is ours, not HotpotQA's (whose context is passages)
    assert load_docqa(_write(tmp_path, "one.jsonl", [{"context": "c", "question": "q", "answer": "a"}]))[0].answers \
        == ["a"]
    for spec, message in [("synthetic:n=2,tokens=1x", "n, tokens and seed must be integers"),
                          ("synthetic:n=0,tokens=100", "n must be at least 1")]:
        with pytest.raises(DataError, match=f"data spec '{re.escape(spec)}': {message}"):
            load_records(spec)
    # a string of aliases is one alias, not one per character; a null id falls back to the row's
    rec = load_docqa(_write(tmp_path, "m.jsonl", [{**musique, "answer_aliases": "City of Light", "id": None}]))[0]
    assert rec.answers == ["Paris", "City of Light"] and rec.id == "m-1"
    # JSON written with ensure_ascii=False keeps U+2028 / U+0085 unescaped: still one line
    row = {"context": "a\u2028b\u0085c", "question": "q", "answers": ["x"]}
    (tmp_path / "u.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_docqa(tmp_path / "u.jsonl")[0].context == row["context"]
    assert read_docqa_jsonl(tmp_path / "u.jsonl")[0]["context"] == row["context"]
    # encodings: a byte-order mark is dropped; bytes that are not UTF-8 are named by line
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"context": "c", "question": "q",
                                                                         "answers": ["a"]}).encode() + b"\n")
    assert load_docqa(tmp_path / "bom.jsonl")[0].answers == ["a"]
    (tmp_path / "latin.jsonl").write_bytes(b'{"context": "c", "question": "q", "answers": ["a"]}\n'
                                           b'{"context": "caf\xe9", "question": "q", "answers": ["a"]}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not UTF-8 \(byte 0xe9"):
        load_docqa(tmp_path / "latin.jsonl")


def test_reasoning_field(tmp_path):
    plain = DocQARecord("a", "synthetic", "qa", "ctx", "q?", ["x"])
    assert "reasoning" not in json.loads(plain.to_json())
    traced = DocQARecord("b", "synthetic", "qa", "ctx", "q?", ["x"], reasoning="The document says x.")
    assert json.loads(traced.to_json())["reasoning"] == "The document says x."
    path = tmp_path / "r.jsonl"
    write_docqa([plain, traced], path)
    assert load_docqa(path) == [plain, traced]
    row = {"context": "c", "question": "q", "answers": ["a"]}
    assert load_docqa(_write(tmp_path, "n.jsonl", [dict(row, reasoning=None)]))[0].reasoning is None
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'reasoning' must be a string when present \(got list\)"):
        load_docqa(_write(tmp_path, "bad.jsonl", [row, dict(row, reasoning=["step"])]))


# ---- lengths ----------------------------------------------------------------------------
class CountingTokenizer:
    """Wraps a tokenizer and counts encode calls, to see the length cache work."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.name_or_path, self.chat_template = inner.name_or_path, inner.chat_template

    def __len__(self):
        return len(self.inner)

    def apply_chat_template(self, *a, **k):
        self.calls += 1
        return self.inner.apply_chat_template(*a, **k)

    def encode(self, *a, **k):
        self.calls += 1
        return self.inner.encode(*a, **k)

    def decode(self, *a, **k):
        return self.inner.decode(*a, **k)


def test_prompt_lengths_are_cached(smollm, tmp_path):
    _, tok = smollm
    recs = load_docqa(REAL / "hotpotqa_dev_hf.json")
    counting = CountingTokenizer(tok)
    cache = tmp_path / "lengths.json"
    first = prompt_lengths(recs, counting, cache_path=cache)
    calls = counting.calls
    assert calls >= len(recs)
    assert prompt_lengths(recs, counting, cache_path=cache) == first and counting.calls == calls
    assert first[0] == len(record_prompt_ids(recs[0], tok)[0])
    # the same ids with other documents (another file or synthetic spec), or without the chat
    # wrapping: their own lengths, not the cached ones
    other = synthetic.generate(len(recs), 300, seed=5, kinds=("lookup",))
    for r, o in zip(recs, other):
        o.id = r.id
    assert prompt_lengths(other, tok, cache_path=cache) == [len(record_prompt_ids(o, tok)[0]) for o in other]
    assert prompt_lengths(recs, tok, chat=False, cache_path=cache) == [
        len(record_prompt_ids(r, tok, chat=False)[0]) for r in recs] != first


def test_ranks_saving_the_length_cache_at_once(tmp_path, monkeypatch):
    """Every rank of a job saves lengths.json at start-up: a save interleaved with another
    process's (here: inside its write) keeps both whole, no rank fails, nothing is left behind."""
    import os
    from pathlib import Path

    from engine.data.lengths import LengthCache

    class Tok:
        name_or_path = "t"

        def __len__(self):
            return 10
    path = tmp_path / "lengths.json"
    first, second = LengthCache(path, Tok(), "plain"), LengthCache(path, Tok(), "plain")
    first.table, second.table = {"a": 1}, {"b": 2}
    real_write, pid = Path.write_text, {"now": 100}
    monkeypatch.setattr(os, "getpid", lambda: pid["now"])

    def write(self, text, *a, **k):
        out = real_write(self, text, *a, **k)
        if pid["now"] == 100:  # the first rank is writing: the second saves whole meanwhile
            pid["now"] = 101
            second.save()
            pid["now"] = 100
        return out
    monkeypatch.setattr(Path, "write_text", write)
    first.save()
    assert LengthCache(path, Tok(), "plain").table in ({"a": 1}, {"b": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["lengths.json"]


def test_length_buckets():
    assert length_buckets([5, 10, 11, 20, 21], [10, 20]) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="increasing"):
        length_buckets([1], [20, 10])


# ---- synthetic --------------------------------------------------------------------------
def test_synthetic_is_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_docqa(synthetic.generate(12, 600, seed=3), a)
    write_docqa(synthetic.generate(12, 600, seed=3), b)
    assert a.read_bytes() == b.read_bytes()
    write_docqa(synthetic.generate(12, 600, seed=4), b)
    assert a.read_bytes() != b.read_bytes()


@pytest.mark.parametrize("target", [1024, 4096])
def test_synthetic_lengths_with_the_real_tokenizer(smollm, target):
    _, tok = smollm

    def count(text):
        return len(tok.encode(text, add_special_tokens=False))

    for rec in synthetic.generate(4, target, seed=1, count_tokens=count):
        assert abs(count(rec.context) - target) <= 0.05 * target


def test_synthetic_128k_document():
    rec = synthetic.generate(1, 128_000, seed=2)[0]
    n = synthetic.word_count_tokens(rec.context)
    assert abs(n - 128_000) <= 0.05 * 128_000


def test_synthetic_answers_score_one_and_shuffled_answers_zero():
    recs = synthetic.generate(80, 300, seed=5)
    assert {r.task for r in recs} == {"qa", "math", "choice"}
    assert {r.meta["kind"] for r in recs} == set(synthetic.KINDS)
    rng = random.Random(0)
    for rec in recs:
        assert rule_reward(f"Let me look. Therefore, the answer is {rec.answers[0]}.", rec.answers, rec.task) == 1.0
        if rec.task == "choice":
            wrong = rng.choice([c for c in "ABCD" if c != rec.answers[0]])
            completion = f"The correct answer is ({wrong})."
        else:
            others = [r for r in recs if r.task == rec.task and r.id != rec.id]
            completion = f"Therefore, the answer is {rng.choice(others).answers[0]}."
        assert rule_reward(completion, rec.answers, rec.task) == 0.0, (rec.question, completion)
        assert rec.question.split("?")[0].split()[-1] in rec.question  # sanity
        for fact_word in rec.answers[0].split():
            if rec.task == "qa":
                assert fact_word in rec.context  # the answer is in the document


def test_synthetic_cli(tmp_path):
    out = tmp_path / "s.jsonl"
    assert synthetic.main(["--n", "5", "--tokens", "200", "400", "--out", str(out), "--seed", "1"]) == 0
    recs = load_docqa(out)
    assert len(recs) == 5 and all(150 <= synthetic.word_count_tokens(r.context) <= 420 for r in recs)
    for bad in (["--tokens", "400", "200"], ["--tokens", "100", "200", "300"], ["--tokens", "100", "--n", "0"]):
        with pytest.raises(SystemExit):
            synthetic.main(["--n", "5", "--out", str(out), *bad])
    # run as a module, it is not imported twice (runpy warns when the package imported it first)
    run = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "engine.data.synthetic", "--n", "1",
                          "--tokens", "50", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-500:]


def test_synthetic_reasoning_is_true_of_its_document(tmp_path):
    recs = synthetic.generate(40, 300, seed=5)
    quote = re.compile(r'aragraph (\d+) of the document says: "([^"]+)"')
    for rec in recs:
        lines = rec.reasoning.splitlines()
        quoted = [quote.search(line).groups() for line in lines[:-1]]
        assert len(quoted) == (2 if rec.meta["kind"] in ("two_hop", "numeric") else 1), rec.reasoning
        paragraphs = rec.context.split("\n\n")
        for number, fact in quoted:
            assert fact in paragraphs[int(number) - 1]
        answer = f"({rec.answers[0]})" if rec.task == "choice" else rec.answers[0]
        assert answer in lines[-1]
        assert "answer is" not in rec.reasoning.lower()  # never read as the final answer
        completion = f"<think>\n{rec.reasoning}\n</think>\n\nTherefore, the answer is {rec.answers[0]}."
        assert rule_reward(completion, rec.answers, rec.task) == 1.0
    out = tmp_path / "s.jsonl"
    write_docqa(recs, out)
    assert load_docqa(out) == recs


def _digest(recs) -> str:
    rows = [[r.id, r.data_source, r.task, r.context, r.question, r.answers, r.meta] for r in recs]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()[:16]


def test_synthetic_items_unchanged_by_reasoning():
    """Digests taken before reasoning traces existed: other tests depend on these items."""
    assert _digest(synthetic.generate(8, 300, seed=0)) == "2c9f07c2024c94c9"
    assert _digest(synthetic.generate(6, (100, 400), seed=7, kinds=("numeric", "two_hop"))) == "f5c0257ad5406917"
    assert _digest(synthetic.generate(12, 60, seed=0, kinds=("lookup",))) == "56b72b9a227b411f"


def test_synthetic_confusers_grow_with_length_and_keep_answers_unique():
    recs = synthetic.generate(24, (150, 900), seed=8, kinds=("lookup", "two_hop", "numeric"), confusers=2.0)
    patterns = {"lookup": re.compile(r"[A-Z]\w+ [A-Z]\w+ was born in the town of (\w+)\."),
                "two_hop": re.compile(r"\w+ Works has its headquarters in (\w+)\."),
                "numeric": re.compile(r"In \d+, \w+ Works reported revenue of")}
    counts = []
    for rec in recs:
        kind = rec.meta["kind"]
        look_alikes = len(patterns[kind].findall(rec.context)) - (2 if kind == "numeric" else 1)
        want = round(2.0 * rec.meta["target_tokens"] / 100)
        # two-hop confusers come as pairs (works for / headquarters): about half are HQ lines
        assert (want // 2 <= look_alikes <= want // 2 + 1) if kind == "two_hop" else look_alikes == want, kind
        counts.append((rec.meta["target_tokens"], look_alikes))
        assert synthetic.word_count_tokens(rec.context) <= rec.meta["target_tokens"] * 1.05
        if rec.task == "qa":  # the planted answer is said once; no confuser names it
            assert rec.context.count(f" {rec.answers[0]}.") == 1
        assert rule_reward(f"Therefore, the answer is {rec.answers[0]}.", rec.answers, rec.task) == 1.0
    lookups = sorted(c for c, r in zip(counts, recs) if r.meta["kind"] == "lookup")
    assert lookups[-1][1] > 2 * lookups[0][1]  # more look-alikes in the longer documents
    # the default leaves a seed's documents as they were; bad rates are refused by name
    assert _digest(synthetic.generate(8, 300, seed=0, confusers=0)) == "2c9f07c2024c94c9"
    with pytest.raises(ValueError, match="confusers must be >= 0"):
        synthetic.generate(2, 300, confusers=-1)
    with pytest.raises(DataError, match="confusers='x' is not a number"):
        load_records("synthetic:n=2,tokens=300,confusers=x")
    spec = load_records("synthetic:n=4,tokens=400,seed=8,kinds=lookup,confusers=3")
    assert all(len(patterns["lookup"].findall(r.context)) == 13 for r in spec)


# ---- module structure -------------------------------------------------------------------
def _package_imports(package: Path) -> dict[str, set[str]]:
    """Sibling modules each module of `package` imports, at top level or inside functions."""
    names = {f.stem for f in package.glob("*.py")} - {"__init__"}
    graph = {}
    for name in names:
        deps = set()
        for node in ast.walk(ast.parse((package / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [a.name for a in node.names]
                deps |= {t.split(".")[0] for t in targets} & names
        graph[name] = deps
    return graph


def test_data_modules_import_no_cycle():
    graph = _package_imports(Path(__file__).parents[1] / "engine" / "data")
    assert "synthetic" in graph["loaders"]  # the walk sees imports inside functions (load_records' lazy one)
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("module", ["engine.data.synthetic", "engine.data.records", "engine.data.loaders"])
def test_data_modules_import_first_in_a_fresh_interpreter(module):
    code = (f"import {module}\nfrom engine.data.loaders import DocQARecord, write_docqa, task_for_source\n"
            "from engine.data import synthetic\nassert synthetic.generate(2, 60)[0].reasoning")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_synthetic_spec_can_drop_reasoning():
    from engine.data import load_records

    with_trace = load_records("synthetic:n=3,tokens=60,seed=2,kinds=lookup")
    without = load_records("synthetic:n=3,tokens=60,seed=2,kinds=lookup,reasoning=0")
    assert all(r.reasoning for r in with_trace) and not any(r.reasoning for r in without)
    assert [r.answers for r in with_trace] == [r.answers for r in without]
    with pytest.raises(DataError, match="reasoning=0"):
        load_records("synthetic:n=3,tokens=60,reasoning=maybe")
