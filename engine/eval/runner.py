"""The benchmark runner behind `longrl eval`.

For every item of every benchmark: the QwenLong-L1 prompt (document truncated in its middle
to `max_input_tokens`), n samples from the rollout engine, each scored with the training
reward (rule, max with the judge when one is given). Results go to OUT/items.jsonl, one
row per sample, written as each batch finishes; a rerun with the same OUT skips items
already there, so an interrupted eval continues where it stopped. The summary — accuracy
(mean score), pass@k for each k, counts, lengths, truncation rate, per benchmark and the
average over benchmarks — is recomputed from items.jsonl and written as summary.json and
summary.md.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from ..config import DataConfig, EvalConfig, RolloutConfig
from ..data.jsonl import jsonl_lines, replace_text
from ..data.lengths import record_prompt_ids
from ..data.template import resolve_think
from ..data.loaders import DocQARecord, check_unique_ids
from ..rewards import HybridReward, RewardItem
from .passk import pass_at_k


_ROW_KEYS = ("benchmark", "id", "sample", "score")


def _read_done(path: Path, n: int = 1, rewrite: bool = True, every_sample: bool = False
               ) -> dict[tuple[str, str], list[dict]]:
    """Items already finished, by (benchmark, id): those with all n samples on disk (samples
    0..n-1; a run with a larger n left more, which stay in the file and out of the result
    unless `every_sample`). A
    torn last line (a crash mid-write) and the rows of an item with fewer than n samples are
    dropped from the file (when `rewrite`: the file is this process's own; written aside and
    renamed, so a crash keeps the old file whole), so that item is generated again whole."""
    done: dict[tuple[str, str], list[dict]] = {}
    if not path.is_file():
        return done
    lines = [line for line in jsonl_lines(path.read_text(encoding="utf-8")) if line.strip()]
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or any(k not in row for k in _ROW_KEYS):
            raise ValueError(f"{path}, line {number}: not a row of `longrl eval` (an object with "
                             f"{', '.join(_ROW_KEYS)}); give another --out, or move the file away")
        done.setdefault((row["benchmark"], row["id"]), []).append(row)
    done = {key: rows for key, rows in done.items() if len({r["sample"] for r in rows}) >= n}
    kept = sum(len(rows) for rows in done.values())
    if rewrite and kept != len(lines):
        _write_rows(path, [r for rows in done.values() for r in rows])
    return done if every_sample else {key: [r for r in rows if r["sample"] < n] for key, rows in done.items()}


def summarize(rows: list[dict], ks: list[int]) -> dict:
    """Per-benchmark figures from per-sample rows, and their unweighted average."""
    by_bench: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        by_bench.setdefault(r["benchmark"], {}).setdefault(r["id"], []).append(r)
    table = {}
    for bench, items in sorted(by_bench.items()):
        scores = [r["score"] for samples in items.values() for r in samples]
        entry = {"items": len(items), "samples": len(scores), "accuracy": 100 * sum(scores) / len(scores)}
        for k in ks:
            vals = [pass_at_k(len(s), sum(r["score"] >= 1 for r in s), k) for s in items.values() if len(s) >= k]
            if vals:
                entry[f"pass@{k}"] = 100 * sum(vals) / len(vals)
        samples = [r for s in items.values() for r in s]
        entry["mean_completion_tokens"] = sum(r["completion_tokens"] for r in samples) / len(samples)
        entry["truncated_inputs"] = 100 * sum(s[0]["truncated"] for s in items.values()) / len(items)
        table[bench] = entry
    if table:
        keys = [k for k in next(iter(table.values())) if k not in ("items", "samples")]
        table["average"] = {k: sum(e.get(k, 0.0) for e in table.values()) / len(table) for k in keys}
        table["average"]["items"] = sum(e["items"] for b, e in table.items() if b != "average")
    return table


def markdown(table: dict) -> str:
    if not table:
        return "(no items)\n"
    cols = [k for k in table["average"] if k != "items"]
    head = "| benchmark | items | " + " | ".join(cols) + " |\n"
    head += "| --- | --- | " + " | ".join("---" for _ in cols) + " |\n"
    lines = [f"| {b} | {e['items']} | " + " | ".join(f"{e.get(c, float('nan')):.1f}" for c in cols) + " |"
             for b, e in table.items()]
    return head + "\n".join(lines) + "\n"


def run_eval(model, tokenizer, benchmarks: dict[str, list[DocQARecord]], settings: EvalConfig,
             out_dir: str | os.PathLike, *, reward: HybridReward | None = None, progress: bool = True,
             generator_factory: Callable | None = None, data: DataConfig | None = None,
             rollout: RolloutConfig | None = None, rank: int = 0, world: int = 1,
             barrier: Callable | None = None, model_id: str | None = None) -> dict:
    """Evaluate, resuming from out_dir/items.jsonl; -> the summary table. data: the prompt
    template and chat wrapping (as in training); rollout: the KV cache settings; model_id: what
    the model is (its path), kept in out_dir/settings.json with the sampling settings, so that a
    rerun into the same out_dir with another model or other settings is refused.

    Data parallel (world > 1, every rank calls this with its rank and a barrier): rank r
    generates items r, r + W, … into items.rank{r}.jsonl; then rank 0 merges every part into
    items.jsonl (benchmark, item and sample order) and writes the summary, which it alone
    returns (the others return {}). A sample's seed depends on its sample index only, so the
    rows are those of one process."""
    from tqdm import tqdm

    from ..rollout import Generator, SamplingParams
    from ..rollout.sampling import item_seed

    settings.validate("eval")
    data = data or DataConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for bench, records in benchmarks.items():  # results are kept by id
        check_unique_ids([(bench, records)], f"benchmark {bench}")
    ctx = model.config.context_window
    if settings.max_new_tokens >= ctx:  # QwenLong-L1's 10K new tokens, on a model with a shorter window
        if rank == 0:
            print(f"eval: max_new_tokens {settings.max_new_tokens} leaves no room for an input in the model's "
                  f"{ctx}-token window; generating at most {ctx // 2} (set --eval.max_new_tokens below {ctx} to "
                  f"choose)", file=sys.stderr)
        settings = replace(settings, max_new_tokens=ctx // 2)
    max_input = min(settings.max_input_tokens, ctx - settings.max_new_tokens)  # the window bounds the input
    _check_settings(out / "settings.json", {
        "model": model_id, "max_new_tokens": settings.max_new_tokens, "max_input_tokens": max_input,
        "temperature": settings.temperature, "top_p": settings.top_p, "seed": settings.seed, "think": settings.think,
        "template": data.template, "chat_template": data.chat_template}, write=rank == 0)
    items_path = out / "items.jsonl" if world == 1 else out / f"items.rank{rank}.jsonl"
    reward = reward or HybridReward(think=resolve_think(settings.think, tokenizer, data.chat_template))
    # rank 0 folds any parts of an earlier run into items.jsonl, and has the judge look again at
    # the earlier run's rows that got no verdict, before anyone reads
    if rank == 0:
        if world > 1:
            _merge_parts(out, benchmarks, settings)
        if reward.judge is not None:
            _judge_again(out / "items.jsonl", _read_done(out / "items.jsonl", settings.n, every_sample=True),
                         benchmarks, reward)
    if world > 1:
        barrier()
    done = _read_done(out / "items.jsonl", settings.n, rewrite=world == 1)
    params = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                            top_p=settings.top_p, seed=settings.seed)  # stops: the model's own rule
    if generator_factory is None:
        gen = Generator(model, tokenizer, (rollout or RolloutConfig()).cache_config())
    else:
        gen = generator_factory(model, tokenizer)
    every = _requested(benchmarks, settings)
    total = len(every)
    # rank r owns items r, r + W, … of the whole list: the split does not depend on what is done
    todo = [(bench, r) for i, (bench, r) in enumerate(every) if i % world == rank and (bench, r.id) not in done]
    scores = [row["score"] for rows in done.values() for row in rows]
    bar = tqdm(total=total, initial=len(done), desc="eval", unit="item",
               disable=not progress or rank != 0, file=sys.stderr, dynamic_ncols=True)
    started = time.perf_counter()
    with open(items_path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), settings.batch_items):
            batch = todo[start:start + settings.batch_items]
            prompts = [_prompt(bench, r, tokenizer, data, max_input) for bench, r in batch]
            # each item its own stream (sample j of every item with one seed would draw the same uniforms)
            groups = gen.generate([p for p, _ in prompts], n=settings.n,
                                  params=[replace(params, seed=item_seed(settings.seed, f"{bench}/{rec.id}"))
                                          for bench, rec in batch])
            for (bench, rec), (ids, cut), group in zip(batch, prompts, groups):
                texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in group]
                results = reward([RewardItem(t, rec.answers, rec.task, rec.question) for t in texts])
                for j, (c, text, res) in enumerate(zip(group, texts, results)):
                    row = {"benchmark": bench, "id": rec.id, "sample": j, "task": rec.task,
                           "prompt_tokens": len(ids), "truncated": cut, "completion": text,
                           "completion_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
                           "answer": res.answer, "gold": rec.answers, "rule": res.rule, "judge": res.judge,
                           "judge_asked": res.judge_asked, "score": res.reward}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    scores.append(res.reward)
                f.flush()  # an item is on disk whole before the next one starts
            bar.update(len(batch) * world)  # the ranks advance together (rank 0 draws the bar)
            bar.set_postfix(acc=f"{100 * sum(scores) / max(len(scores), 1):.1f}",
                            items_s=f"{(start + len(batch)) / (time.perf_counter() - started):.2f}")
    bar.close()
    if world > 1:
        barrier()
        if rank != 0:
            barrier()
            return {}
        _merge_parts(out, benchmarks, settings)
    done = _read_done(out / "items.jsonl", settings.n)
    wanted = {(bench, r.id) for bench, r in every}
    rows = [row for key, rows in done.items() if key in wanted for row in rows]  # this run's items only
    table = summarize(rows, settings.k)
    asked = [r for r in rows if r.get("judge_asked")]
    judge = {"asked": len(asked), "unavailable": sum(r["judge"] is None for r in asked)}
    if judge["unavailable"]:
        print(f"eval: the judge gave no verdict for {judge['unavailable']} of {judge['asked']} items it was asked "
              f"about; they are scored by the rule alone (rerun with the same --out to ask again)", file=sys.stderr)
    (out / "summary.json").write_text(json.dumps({"settings": asdict(settings), "results": table, "judge": judge},
                                                 indent=2))
    (out / "summary.md").write_text(markdown(table))
    if world > 1:
        barrier()
    return table


def _prompt(bench: str, record: DocQARecord, tokenizer, data: DataConfig, max_input: int) -> tuple[list[int], bool]:
    try:
        return record_prompt_ids(record, tokenizer, template=data.template, max_tokens=max_input,
                                 chat=data.chat_template)
    except ValueError as e:  # its question alone is over the limit: say which item
        raise ValueError(f"benchmark {bench}, item {record.id}: {e}") from None


def _requested(benchmarks: dict, settings: EvalConfig) -> list[tuple[str, DocQARecord]]:
    return [(bench, r) for bench, records in benchmarks.items()
            for r in (records[: settings.limit] if settings.limit else records)]


def _check_settings(path: Path, current: dict, write: bool) -> None:
    """OUT's results hold for the settings that made them: a rerun with other ones (another
    model, sampling, input or output budget, template) would mix the two in one table. A
    folder without results yet (a first run that stopped early) takes the new settings."""
    has_results = any(p.stat().st_size for p in path.parent.glob("items*.jsonl"))
    if path.is_file() and has_results:
        before = json.loads(path.read_text())
        changed = [f"{k}: {before.get(k)!r} then, {v!r} now" for k, v in current.items() if before.get(k) != v]
        if changed:
            raise ValueError(f"{path.parent} holds results made with other settings ({'; '.join(changed)}): "
                             f"evaluate into another folder, or delete it to start over")
    elif write:
        replace_text(path, json.dumps(current, indent=1))


def _judge_again(path: Path, done: dict, benchmarks: dict, reward: HybridReward) -> None:
    """Rows below full score without a verdict (the judge was down or timed out, or the run had
    no judge): the reward again, asking the judge where it applies, without generating again;
    items.jsonl is rewritten (aside, then renamed) when a verdict came."""
    records = {(bench, r.id): r for bench, records in benchmarks.items() for r in records}
    stale = [(row, records[row["benchmark"], row["id"]]) for rows in done.values() for row in rows
             if row["judge"] is None and row["score"] < 1 and (row["benchmark"], row["id"]) in records]
    if not stale:
        return
    results = reward([RewardItem(row["completion"], rec.answers, rec.task, rec.question) for row, rec in stale])
    changed = 0
    for (row, _), res in zip(stale, results):
        if res.judge is not None:
            row.update(judge=res.judge, judge_asked=True, score=res.reward)
            changed += 1
    if changed:
        _write_rows(path, [r for rows in done.values() for r in rows])


def _write_rows(path: Path, rows: list[dict]) -> None:
    """items.jsonl's rows (non-ASCII kept as is), replacing the file whole."""
    replace_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _merge_parts(out: Path, benchmarks: dict, settings: EvalConfig) -> None:
    """items.jsonl + items.rank*.jsonl -> items.jsonl in benchmark, item and sample order
    (written aside and renamed: a kill leaves the parts or the merged file whole)."""
    parts = sorted(out.glob("items.rank*.jsonl"))
    done = {}
    for path in [out / "items.jsonl", *parts]:
        done.update(_read_done(path, settings.n, every_sample=True))
    order = [(bench, r.id) for bench, r in _requested(benchmarks, settings)]
    asked = set(order)
    keys = [k for k in order if k in done] + [k for k in done if k not in asked]
    _write_rows(out / "items.jsonl", [row for key in keys for row in sorted(done[key], key=lambda r: r["sample"])])
    for path in parts:
        path.unlink()
