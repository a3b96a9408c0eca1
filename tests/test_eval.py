"""`longrl eval`: pass@k, summaries recomputed from the per-sample rows, resume, truncation,
and a real run of the embedded model on shipped samples of each format."""
from __future__ import annotations

import json
from math import comb
from pathlib import Path

import pytest

from engine.cli import main
from engine.config import EvalConfig
from engine.data import load_docqa, record_prompt_ids
from engine.eval import pass_at_k, run_eval
from engine.rollout import Completion

REAL = Path(__file__).parent / "fixtures" / "real"


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - comb(3, 2) / comb(5, 2))  # 0.7
    assert pass_at_k(4, 1, 4) == 1.0  # n = k, one correct
    assert pass_at_k(4, 0, 4) == 0.0  # n = k, none correct
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 9, 2) == 1.0  # fewer than k wrong samples
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


class ScriptedGenerator:
    """Stands in for the rollout engine: answers from a script, counts the prompts it gets."""

    def __init__(self, tokenizer, answer_for):
        self.tokenizer, self.answer_for = tokenizer, answer_for
        self.prompts = 0
        self.seeds = []

    def generate(self, prompts, n, params):
        self.prompts += len(prompts)
        self.seeds += [p.seed for p in params] if isinstance(params, list) else [params.seed] * len(prompts)
        out = []
        for p in prompts:
            group = []
            for j in range(n):
                text = self.answer_for(p, j)
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                group.append(Completion(ids, [0.0] * len(ids), "length"))
            out.append(group)
        return out


def _benchmarks():
    return {"hotpotqa": load_docqa(REAL / "hotpotqa_dev_hf.json"), "musique": load_docqa(REAL / "musique_dev.json")}


def test_summary_equals_recomputation_from_items(smollm, tmp_path):
    model, tok = smollm
    benches = _benchmarks()
    golds = {len(record_prompt_ids(r, tok, max_tokens=600)[0]): r.answers[0] for b in benches.values() for r in b}

    def answer(prompt, j):  # sample 0 right, sample 1 wrong, sample 2 right only for some items
        gold = golds.get(len(prompt), "x")
        return f"Therefore, the answer is {gold if j == 0 or (j == 2 and len(prompt) % 2) else 'nothing'}."

    fake = ScriptedGenerator(tok, answer)
    settings = EvalConfig(max_input_tokens=600, max_new_tokens=8, n=3, k=[1, 2, 3])
    table = run_eval(model, tok, benches, settings, tmp_path, progress=False,
                     generator_factory=lambda m, t: fake)
    rows = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * (3 + 2)
    assert len(set(fake.seeds)) == len(fake.seeds) == 5  # each item its own sampling stream
    for bench in benches:
        mine = [r for r in rows if r["benchmark"] == bench]
        items = {}
        for r in mine:
            items.setdefault(r["id"], []).append(r["score"])
        assert table[bench]["accuracy"] == pytest.approx(100 * sum(r["score"] for r in mine) / len(mine))
        for k in (1, 2, 3):
            by_hand = sum(pass_at_k(3, int(sum(s)), k) for s in items.values()) / len(items)
            assert table[bench][f"pass@{k}"] == pytest.approx(100 * by_hand)
    assert table["average"]["accuracy"] == pytest.approx((table["hotpotqa"]["accuracy"] +
                                                          table["musique"]["accuracy"]) / 2)
    saved = json.loads((tmp_path / "summary.json").read_text())["results"]
    assert saved == json.loads(json.dumps(table))
    md = (tmp_path / "summary.md").read_text()
    assert "| hotpotqa | 3 |" in md and "pass@3" in md


def test_resume_skips_finished_items(smollm, tmp_path):
    model, tok = smollm
    benches = _benchmarks()
    fake = ScriptedGenerator(tok, lambda p, j: "Therefore, the answer is yes.")
    factory = lambda m, t: fake  # noqa: E731
    settings = EvalConfig(max_input_tokens=400, max_new_tokens=8, limit=1)
    run_eval(model, tok, benches, settings, tmp_path, progress=False, generator_factory=factory)
    assert fake.prompts == 2
    settings.limit = 0  # the rest of the items: only those are generated
    run_eval(model, tok, benches, settings, tmp_path, progress=False, generator_factory=factory)
    assert fake.prompts == 2 + (3 - 1) + (2 - 1)
    # a crash mid-write leaves a torn last line: it is dropped and that item done again
    path = tmp_path / "items.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    table = run_eval(model, tok, benches, settings, tmp_path, progress=False, generator_factory=factory)
    assert fake.prompts == 6 and table["average"]["items"] == 5
    assert len(path.read_text().splitlines()) == 5


def test_truncation_keeps_head_tail_and_question(smollm):
    _, tok = smollm
    rec = load_docqa(REAL / "narrativeqa_lciteeval.json")[0]
    ids, cut = record_prompt_ids(rec, tok, max_tokens=500)
    text = tok.decode(ids)
    assert cut and len(ids) <= 500
    assert rec.question in text
    head = rec.context.strip()[:40]
    tail = rec.context.strip()[-40:]
    assert head in text and tail in text


def test_eval_of_the_embedded_model_on_each_shipped_format(smollm, tmp_path, capsys):
    out = tmp_path / "eval"
    data = ["hotpotqa_dev_hf.json", "hotpotqa_train_orig.json", "musique_dev.json", "2wikimqa.json",
            "narrativeqa_lciteeval.json", "qasper_leval.jsonl"]
    args = ["eval", "--out", str(out), "--eval.max_input_tokens=512", "--eval.max_new_tokens=12",
            "--eval.limit=1", "--eval.temperature=0"]
    for name in data:
        args += ["--data", str(REAL / name)]
    # synthetic specs too, bare (named "synthetic") or NAME=spec (commas and '=' inside the spec)
    args += ["--data", "synthetic:n=1,tokens=80,seed=3,kinds=lookup",
             "--data", "near=synthetic:n=1,tokens=80,seed=4,kinds=lookup,confusers=2"]
    assert main(args) == 0
    table = json.loads((out / "summary.json").read_text())["results"]
    assert set(table) == {Path(n).stem for n in data} | {"synthetic", "near", "average"}
    assert all(e["items"] == 1 and e["truncated_inputs"] == 100.0 for b, e in table.items()
               if b not in ("average", "synthetic", "near"))
    assert table["near"]["items"] == 1 and table["near"]["truncated_inputs"] == 0.0
    printed = capsys.readouterr().out
    assert "| average | 8 |" in printed and "pass@1" in printed


def test_eval_refuses_bad_k():
    with pytest.raises(Exception, match="eval.k"):
        from engine.config import load_config
        load_config(None, ["--eval.n=2", "--eval.k=[3]"])


def test_resume_with_n_samples_redoes_an_item_missing_some(smollm, tmp_path):
    """An item counts as done only with all n of its samples on disk: an item cut short by a
    crash is generated again whole, and pass@k sees n samples for every item."""
    model, tok = smollm
    benches = _benchmarks()
    fake = ScriptedGenerator(tok, lambda p, j: f"Therefore, the answer is {'yes' if j == 0 else 'no'}.")
    settings = EvalConfig(max_input_tokens=400, max_new_tokens=8, n=3, k=[1, 3])
    run_eval(model, tok, benches, settings, tmp_path, progress=False, generator_factory=lambda m, t: fake)
    path = tmp_path / "items.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 5 * 3
    path.write_text("\n".join(lines[:-2]) + "\n")  # the last item lost two of its three samples
    before = fake.prompts
    table = run_eval(model, tok, benches, settings, tmp_path, progress=False, generator_factory=lambda m, t: fake)
    assert fake.prompts == before + 1
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    per_item = {}
    for r in rows:
        per_item.setdefault((r["benchmark"], r["id"]), []).append(r["sample"])
    assert len(rows) == 15 and all(sorted(s) == [0, 1, 2] for s in per_item.values())
    assert table["average"]["items"] == 5


def test_reruns_hold_to_their_settings_items_and_samples(smollm, tmp_path, capsys):
    """A rerun into the same OUT: other settings are refused; fewer samples or items summarise
    only those asked for; duplicate ids and a foreign items.jsonl are refused by name; a
    QwenLong-sized output budget on a short-window model is capped, and said so."""
    import copy
    model, tok = smollm
    benches = _benchmarks()
    fake = ScriptedGenerator(tok, lambda p, j: f"Therefore, the answer is {'yes' if j == 0 else 'no'}.")
    factory = lambda m, t: fake  # noqa: E731
    settings = EvalConfig(max_input_tokens=400, max_new_tokens=8, n=2, k=[1, 2])
    run_eval(model, tok, benches, settings, tmp_path, progress=False, generator_factory=factory, model_id="a")
    with pytest.raises(ValueError, match=r"other settings \(max_new_tokens: 8 then, 4 now\)"):
        run_eval(model, tok, benches, EvalConfig(max_input_tokens=400, max_new_tokens=4, n=2, k=[1, 2]), tmp_path,
                 progress=False, generator_factory=factory, model_id="a")
    with pytest.raises(ValueError, match="model: 'a' then, 'b' now"):
        run_eval(model, tok, benches, settings, tmp_path, progress=False, generator_factory=factory, model_id="b")
    fewer = EvalConfig(max_input_tokens=400, max_new_tokens=8, n=1, k=[1], limit=1)
    table = run_eval(model, tok, benches, fewer, tmp_path, progress=False, generator_factory=factory, model_id="a")
    assert fake.prompts == 5  # nothing generated again
    assert table["average"]["items"] == 2 and table["hotpotqa"]["samples"] == table["musique"]["samples"] == 1
    twice = {"hotpotqa": benches["hotpotqa"] + [copy.copy(benches["hotpotqa"][0])]}
    with pytest.raises(ValueError, match=f"benchmark hotpotqa: the id '{benches['hotpotqa'][0].id}' is used twice"):
        run_eval(model, tok, twice, settings, tmp_path / "dup", progress=False, generator_factory=factory)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "items.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match=r"other/items.jsonl, line 1: not a row of `longrl eval`"):
        run_eval(model, tok, benches, settings, tmp_path / "other", progress=False, generator_factory=factory)
    long = EvalConfig(max_new_tokens=10_000, limit=1)
    run_eval(model, tok, benches, long, tmp_path / "long", progress=False, generator_factory=factory)
    saved = json.loads((tmp_path / "long" / "summary.json").read_text())["settings"]
    assert saved["max_new_tokens"] == 4096 and "generating at most 4096" in capsys.readouterr().err
    honoured = EvalConfig(max_new_tokens=6000, limit=1)  # fits beside an input: as asked
    run_eval(model, tok, benches, honoured, tmp_path / "six", progress=False, generator_factory=factory)
    assert json.loads((tmp_path / "six" / "summary.json").read_text())["settings"]["max_new_tokens"] == 6000
    # a first run that stopped before any result does not hold its folder to its settings
    with pytest.raises(ValueError, match="the question and template alone"):
        run_eval(model, tok, benches, EvalConfig(max_input_tokens=20, max_new_tokens=8), tmp_path / "retry",
                 progress=False, generator_factory=factory)
    run_eval(model, tok, benches, settings, tmp_path / "retry", progress=False, generator_factory=factory)


def test_an_unavailable_judge_is_reported_and_asked_again_on_rerun(smollm, tmp_path, capsys):
    from engine.rewards import HybridReward
    from engine.rewards.judge import Judge

    class Switch(Judge):
        def __init__(self):
            super().__init__()
            self.up, self.asked = False, 0

        def _complete(self, conversations):
            self.asked += len(conversations)
            return ["[[YES]]" if self.up else None for _ in conversations]

    model, tok = smollm
    benches = _benchmarks()
    fake = ScriptedGenerator(tok, lambda p, j: "Therefore, the answer is something else.")
    judge = Switch()
    settings = EvalConfig(max_input_tokens=400, max_new_tokens=8)
    table = run_eval(model, tok, benches, settings, tmp_path, progress=False, generator_factory=lambda m, t: fake,
                     reward=HybridReward(judge))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert table["average"]["accuracy"] == 0 and summary["judge"] == {"asked": 5, "unavailable": 5}
    assert "no verdict for 5 of 5 items" in capsys.readouterr().err
    judge.up = True
    table = run_eval(model, tok, benches, settings, tmp_path, progress=False, generator_factory=lambda m, t: fake,
                     reward=HybridReward(judge))
    assert fake.prompts == 5 and judge.asked == 10  # judged again, not generated again
    assert table["average"]["accuracy"] == 100
    assert json.loads((tmp_path / "summary.json").read_text())["judge"] == {"asked": 5, "unavailable": 0}
    rows = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert all(r["judge"] is True and r["score"] == 1.0 for r in rows)


def test_smaller_refusals_name_what_is_wrong(smollm, tmp_path, capsys):
    from engine.eval.paired import paired_gain
    model, tok = smollm
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        paired_gain({"a": 1.0}, {"a": 0.0}, resamples=0)
    with pytest.raises(ValueError, match=r"benchmark hotpotqa, item \S+: the question and template alone take"):
        run_eval(model, tok, _benchmarks(), EvalConfig(max_input_tokens=20, max_new_tokens=8), tmp_path,
                 progress=False, generator_factory=lambda m, t: None)
    assert main(["eval", "--data", str(REAL / "musique_dev.json"), "--out", str(tmp_path / "k"),
                 "--judge-key-env", "MY_KEY"]) == 2
    assert "--judge-key-env goes with --judge-url" in capsys.readouterr().err


def test_results_files_keep_unicode_line_separators_and_every_sample(tmp_path):
    """items.jsonl is written with ensure_ascii=False: a completion holding U+2028 or U+0085 is
    one row, not a torn one. Merging the ranks' parts keeps samples past the current n."""
    from engine.eval.runner import _merge_parts, _read_done
    rows = [{"benchmark": "b", "id": "1", "sample": j, "score": 1.0, "completion": "a\u2028b\u0085c"} for j in range(3)]
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert [r["completion"] for r in _read_done(path, 3)[("b", "1")]] == ["a\u2028b\u0085c"] * 3
    assert len(path.read_text(encoding="utf-8").split("\n")) == 4  # nothing dropped, nothing rewritten
    record = load_docqa(REAL / "musique_dev.json")[0]
    record.id = "1"
    _merge_parts(tmp_path, {"b": [record]}, EvalConfig(n=1))
    assert len(_read_done(path, 1, every_sample=True)[("b", "1")]) == 3  # samples 1 and 2 stay in the file
