"""`longrl`: the command line.

    longrl convert SRC OUT            GGUF file / model name / HF dir / run checkpoint -> checkpoint directory
    longrl generate --prompt TEXT     answer one prompt
    longrl generate --input FILE      answer a JSONL of doc-QA items (context, question)
    longrl eval --data FILE --out DIR score a model on long-document QA benchmarks
    longrl sft --recipe FILE          warm-up SFT (--resume continues a run)
    longrl train RECIPE               the whole recipe: SFT, then RL phases, with held-out evals
    longrl plot RUN_DIR               PNG curves of a run's metrics

Every subcommand that reads a config accepts a TOML recipe (--recipe FILE) and dotted
overrides of any key, e.g. --model.path=/ckpt --generate.temperature=0.7.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, load_config


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Dotted `--section.key=value` arguments are config overrides; the rest is argparse's."""
    overrides, rest = [], []
    for arg in argv:
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            overrides.append(arg)
        else:
            rest.append(arg)
    return overrides, rest


OVERRIDES = ("Any config key can be set on the command line as --section.key=value (the = is required), e.g. "
             "--model.path=/ckpt --generate.temperature=0.7 --rl.phases='[{max_input_tokens=2048, steps=10}]'; "
             "values are TOML. They apply over the recipe's.")


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="longrl",
        description="longrl: long-document reasoning RL (QwenLong-L1) — lean engine.",
        epilog="Config keys can be overridden with --section.key=value (e.g. --generate.max_new_tokens=64). "
               "Run `longrl SUBCOMMAND --help` for details.",
    )
    p.add_argument("--version", action="version", version=f"longrl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND")

    c = sub.add_parser("convert", help="import a GGUF file, model name, HF dir or training checkpoint into a "
                                       "checkpoint directory",
                       description="Load SRC (an embedded model name such as smollm2-135m-instruct, a .gguf "
                                   "file, a Hugging Face checkpoint directory, a training run directory (its "
                                   "newest checkpoint) or one of its step-N checkpoints, sharded ones of several "
                                   "ranks included) and write a checkpoint directory that longrl and "
                                   "transformers both load.")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype written (default float32)")
    c.add_argument("--shard-size-mb", type=int, default=4096, help="largest safetensors shard (MiB)")

    g = sub.add_parser("generate", epilog=OVERRIDES, help="generate answers for a prompt or a JSONL of doc-QA items",
                       description="Answer doc-QA items with the model of the config ([model] path). Items "
                                   "are JSONL rows with 'context' and 'question' (and optional 'id', "
                                   "'answers'); they are wrapped in the [data] template, truncated in the "
                                   "middle to fit, and generated with the [generate] settings.")
    g.add_argument("--recipe", help="TOML recipe to read the [model], [data], [generate] sections from")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="a raw user prompt (chat-templated when the tokenizer has a template)")
    src.add_argument("--input", help="JSONL file of doc-QA items")
    g.add_argument("--output", help="write one JSON row per item here (id, completion, token counts)")
    g.add_argument("--bench", action="store_true", help="print prompt and generated tokens/s")

    t = sub.add_parser("sft", epilog=OVERRIDES, help="warm-up SFT on doc-QA triplets (loss on answer tokens only)",
                       description="Supervised warm-up on the [sft] data with the [train] settings: packed "
                                   "micro-batches under train.token_budget, AdamW, LR schedule, gradient "
                                   "clipping and accumulation; one JSON row per step in OUT/metrics.jsonl and "
                                   "checkpoints (a model dir transformers loads + optimizer/RNG/data state) "
                                   "under train.out_dir. Ctrl-C finishes the step, writes a checkpoint and "
                                   "stops (twice: stops at once); --resume continues.")
    t.add_argument("--recipe", help="TOML recipe with [model], [data], [train] and [sft] sections")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of train.out_dir")
    t.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine: starts `torchrun --standalone --nproc-per-node N` with the "
                        "same arguments ([parallel] sp of them share each sequence, the rest split the batch)")

    tr = sub.add_parser("train", epilog=OVERRIDES, help="run a recipe: held-out eval, SFT warm-up, then the RL phases",
                        description="Run the stages of a recipe in order, each from the previous stage's "
                                    "weights: [sft] (when sft.data is set), then the [rl] phases of growing "
                                    "input length with hard examples carried forward; the [eval] sets are "
                                    "scored before training, after SFT and after each phase. Metrics go to "
                                    "train.out_dir/metrics.jsonl, checkpoints under train.out_dir. Ctrl-C "
                                    "finishes the step, writes a checkpoint and stops (twice: stops at once).")
    tr.add_argument("recipe", nargs="?", help="TOML recipe (see recipes/)")
    tr.add_argument("--recipe", dest="recipe_flag", metavar="RECIPE", help="the same, as the other commands take it")
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of train.out_dir")
    tr.add_argument("--nproc", type=int, default=1,
                    help="processes on this machine: starts `torchrun --standalone --nproc-per-node N` with the "
                         "same arguments. Every process generates for its share of each step's prompts with an "
                         "unsharded copy of the weights; the update runs FSDP2 over the processes ([parallel] "
                         "sp of them share each sequence, the rest split the groups); evaluations split items")

    pl = sub.add_parser("plot", help="draw a run's metrics as PNG curves (or compare several runs)",
                        description="Read RUN_DIR/metrics.jsonl and write RUN_DIR/metrics.png: SFT loss; held-out "
                                    "accuracy against RL step (before training and after SFT at step 0); training "
                                    "reward, response length, entropy, grad norm, groups kept, step time and loss "
                                    "against RL step, with phase boundaries marked. Given several RUN_DIRs, draw "
                                    "their held-out accuracy, reward and response length on shared axes (--out "
                                    "required; each run labelled by its directory name).")
    pl.add_argument("run_dir", nargs="+")
    pl.add_argument("--out", help="PNG path (default RUN_DIR/metrics.png for one run)")

    e = sub.add_parser("eval", epilog=OVERRIDES,
                       help="evaluate a model on long-document QA benchmarks (accuracy, pass@k)",
                       description="Score the [model] on one or more benchmark files (any layout load_docqa "
                                   "reads: LongBench, HotpotQA, MuSiQue, 2Wiki, L-CiteEval, L-Eval, DocMath, "
                                   "FRAMES with wiki_items, verl parquet, our JSONL) with the [eval] settings. "
                                   "Writes OUT/items.jsonl (one row per sample), OUT/summary.md and "
                                   "OUT/summary.json; rerunning with the same OUT resumes.")
    e.add_argument("--recipe", help="TOML recipe with [model] and [eval] sections")
    e.add_argument("--data", action="append", required=True, metavar="[NAME=]PATH",
                   help="a benchmark file, or a synthetic:n=N,tokens=T[,...] spec; repeat for several "
                        "(NAME defaults to the file name)")
    e.add_argument("--format", default="auto", help="layout of every --data file (default: detected)")
    e.add_argument("--out", required=True, help="output folder (resumable)")
    e.add_argument("--judge-url", help="OpenAI-compatible base URL of an LLM judge; shorthand for "
                                       "--reward.judge=http --reward.judge_url=URL (default: the [reward] section)")
    e.add_argument("--judge-model", help="the judge's model name (--reward.judge_model)")
    e.add_argument("--judge-key-env", help="environment variable holding the judge's key (--reward.judge_key_env)")
    e.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (torchrun): each loads the model and scores its share of "
                        "the items; the result is that of one process")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides, rest = _split_overrides(argv)
    parser = _build_parser()
    for arg in overrides:
        if "=" not in arg:  # "--eval.limit 2": the value would be read as a stray argument
            after = argv[argv.index(arg) + 1] if argv.index(arg) + 1 < len(argv) else ""
            hint = f" (write {arg}={after})" if after and not after.startswith("-") else ""
            parser.error(f"{arg}: config overrides take the form --section.key=value{hint}")
    args = parser.parse_args(rest)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "train":
        if args.recipe and args.recipe_flag and args.recipe != args.recipe_flag:
            parser.error(f"train: two recipes given ({args.recipe} and {args.recipe_flag})")
        args.recipe = args.recipe or args.recipe_flag
        if not args.recipe:
            parser.error("train: give a recipe (longrl train RECIPE.toml; see recipes/)")
    if getattr(args, "nproc", 1) > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch(argv, args.nproc)
    try:
        if args.command == "plot":
            from .train.plot import plot_run, plot_runs
            if importlib.util.find_spec("matplotlib") is None:
                raise ConfigError("plot needs matplotlib: pip install -e '.[plot]'")
            if len(args.run_dir) == 1:
                print(f"wrote {plot_run(args.run_dir[0], args.out)}")
            elif not args.out:
                raise ConfigError("plot with several RUN_DIRs draws one comparison: give --out FILE.png")
            else:
                labels = [Path(d).expanduser().resolve().name for d in args.run_dir]
                if len(set(labels)) < len(labels):  # the legend labels runs by folder name
                    raise ConfigError(f"plot: runs with the same folder name ({', '.join(args.run_dir)}); "
                                      f"rename or link them so each has its own")
                print(f"wrote {plot_runs(dict(zip(labels, args.run_dir)), args.out)}")
            return 0
        if args.command == "convert":
            if overrides:
                raise ConfigError(f"convert takes no config overrides (got {overrides})")
            return cmd_convert(args)
        cfg = load_config(args.recipe, overrides)
        ranks = int(os.environ.get("WORLD_SIZE", "1"))
        if args.command == "generate" and (ranks > 1 or cfg.parallel.sp != 1):
            raise ConfigError(f"generate: several processes (WORLD_SIZE={ranks}, parallel.sp={cfg.parallel.sp}) "
                              f"run `longrl train`, `longrl sft` and `longrl eval`; generate runs on one process")
        if args.command == "eval" and cfg.parallel.sp != 1:
            raise ConfigError("eval: parallel.sp must be 1 (eval splits items over the processes, data parallel)")
        if args.command == "eval":
            return cmd_eval(args, cfg)
        if args.command == "train":
            from .train import run_pipeline
            final = run_pipeline(cfg, resume=args.resume)
            if os.environ.get("RANK", "0") == "0":
                print(f"train done: {final} (metrics: {Path(cfg.train.out_dir) / 'metrics.jsonl'})")
            return 0
        if args.command == "sft":
            from .train import run_sft
            final = run_sft(cfg, resume=args.resume)
            if os.environ.get("RANK", "0") == "0":
                print(f"sft done: {final} (metrics: {Path(cfg.train.out_dir) / 'metrics.jsonl'})")
            return 0
        return cmd_generate(args, cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"longrl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # the engine's own stops (non-finite losses, out of memory, cache too small, short batch)
        # carry their advice in the message; anything else keeps its traceback
        if type(e).__name__ not in ("TrainingStopped", "CacheTooSmall", "ShortBatchError"):
            raise
        print(f"longrl {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("longrl: interrupted", file=sys.stderr)
        return 130


SHUTDOWN_WAIT_S = 1800


def _relaunch(argv: list[str], nproc: int) -> int:
    """`--nproc N`: the same command under torchrun, N processes on this machine."""
    rest, skip = [], False
    for a in argv:  # drop --nproc N / --nproc=N
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "engine.cli", *rest]
    # Ctrl-C: torchrun passes it on to the processes (each in its own session, out of the
    # terminal's reach) and waits this long for them to finish their step and write a
    # checkpoint before it kills them (torch >= 2.13 reads it; older torch waits 30 s)
    env = {**os.environ, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
                                                                           str(SHUTDOWN_WAIT_S))}
    proc = subprocess.Popen(cmd, env=env)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # not ours to act on: torchrun has it too, and we wait for it
            print(f"\ninterrupt: the processes finish their step and write a checkpoint (up to "
                  f"{env['TORCH_ELASTIC_SHUTDOWN_TIMEOUT']} s)", file=sys.stderr, flush=True)


def cmd_convert(args) -> int:
    from .model import load_model, save_model

    model, tokenizer = load_model(args.src, device="cpu", dtype=args.dtype)
    out = save_model(model, tokenizer, args.out, max_shard_bytes=args.shard_size_mb << 20)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({model.config.model_type}, {n / 1e6:.1f}M parameters, {args.dtype})")
    return 0


def cmd_generate(args, cfg: Config) -> int:
    from tqdm import tqdm

    from types import SimpleNamespace

    from .data.jsonl import read_docqa_jsonl
    from .data.lengths import record_prompt_ids
    from .model import load_model
    from .model.model import fuse_projections
    from .rollout import Generator, SamplingParams
    from .rollout.sampling import item_seed

    if args.prompt is not None and not args.prompt.strip():  # before the model loads
        raise ConfigError("--prompt is empty: give the text to answer")
    model, tokenizer = load_model(cfg.model.path, device=cfg.model.device, dtype=cfg.model.dtype,
                                  attn_backend=cfg.model.attn_backend)
    if tokenizer is None:
        raise ValueError(f"model {cfg.model.path}: no tokenizer files in the checkpoint directory")
    fuse_projections(model.requires_grad_(False))  # it only generates: q / k / v, gate / up one product each
    gen = cfg.generate
    ctx = model.config.context_window
    window = ctx - gen.max_new_tokens  # the input must leave room for the answer
    if window < 1:
        raise ConfigError(f"generate.max_new_tokens = {gen.max_new_tokens} leaves no room for an input in the "
                          f"model's {ctx}-token window")
    limit = cfg.data.max_input_tokens or window
    if limit > window:
        print(f"generate: data.max_input_tokens {limit} + generate.max_new_tokens {gen.max_new_tokens} is over the "
              f"model's {ctx}-token window; inputs are cut to {window} tokens", file=sys.stderr)
        limit = window

    if args.prompt is not None:
        items = [{"id": "prompt", "prompt": args.prompt}]
    else:
        items = read_docqa_jsonl(args.input, prompt_ok=True)
    prompts, truncated = [], []
    for item in items:  # a pre-rendered prompt loses its middle too when too long
        record = SimpleNamespace(prompt=item.get("prompt"), context=item.get("context"), question=item.get("question"))
        ids, cut = record_prompt_ids(record, tokenizer, template=cfg.data.template, max_tokens=limit,
                                     chat=cfg.data.chat_template)
        prompts.append(ids)
        truncated.append(cut)

    generator = Generator(model, tokenizer, cfg.rollout.cache_config())
    stop = generator.default_stop_ids()
    params = SamplingParams(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                            top_k=gen.top_k, seed=gen.seed)
    per_item, seen = [], {}
    for item in items:  # each item draws its own stream; an id given again (a question asked twice) another
        again = seen[item["id"]] = seen.get(item["id"], -1) + 1
        key = str(item["id"]) if not again else f"{item['id']}#{again}"
        per_item.append(dataclasses.replace(params, seed=item_seed(gen.seed, key)))
    out_f = open(args.output, "w", encoding="utf-8") if args.output else None
    totals = {"prompt_tokens": 0, "generated_tokens": 0, "prefill_seconds": 0.0, "decode_seconds": 0.0}
    bar = tqdm(total=len(items), desc="generate", unit="item", disable=len(items) < 2, file=sys.stderr)
    try:
        for start in range(0, len(items), gen.batch_size):
            batch = slice(start, start + gen.batch_size)
            groups = generator.generate(prompts[batch], n=1, params=per_item[batch])
            for key in totals:
                totals[key] += getattr(generator.stats, key)
            for item, ids, cut, group in zip(items[batch], prompts[batch], truncated[batch], groups):
                out = group[0]
                ended = out.finish_reason == "stop" and bool(out.token_ids) and out.token_ids[-1] in stop
                text = tokenizer.decode(out.token_ids[:-1] if ended else out.token_ids, skip_special_tokens=True)
                row = {"id": item["id"], "completion": text.strip(), "prompt_tokens": len(ids),
                       "completion_tokens": len(out.token_ids), "finish_reason": out.finish_reason,
                       "truncated_input": cut}
                _print_answer(item, row)
                if out_f:
                    out_f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    out_f.flush()
            bar.update(len(groups))
    finally:
        bar.close()
        if out_f:
            out_f.close()
    if args.bench:
        w = model.embed_tokens.weight
        prefill = totals["prompt_tokens"] / max(totals["prefill_seconds"], 1e-9)
        decode = totals["generated_tokens"] / max(totals["decode_seconds"], 1e-9)
        print(f"bench: {len(items)} items; prefill {totals['prompt_tokens']} tokens at {prefill:.1f} tokens/s; "
              f"decode {totals['generated_tokens']} tokens at {decode:.1f} tokens/s ({w.device}, {w.dtype})")
    return 0


def cmd_eval(args, cfg: Config) -> int:
    import dataclasses

    from .data import load_docqa, load_records
    from .data.template import resolve_think
    from .eval import markdown, run_eval
    from .model import load_model
    from .train import build_reward

    benchmarks = {}
    for spec in args.data:
        name, sep, path = spec.partition("=")
        if not sep or any(c in name for c in ":/\\,"):  # no NAME= in front: a path or a synthetic: spec
            name, path = "", spec
        synthetic = path.startswith("synthetic:")
        name = name or ("synthetic" if synthetic else Path(path).stem)
        if name in benchmarks:
            raise ValueError(f"benchmark name {name!r} given twice; use NAME=PATH")
        benchmarks[name] = list(load_records(path)) if synthetic else \
            load_docqa(path, format=args.format, data_source=name)
    if bool(args.judge_url) != bool(args.judge_model):
        raise ValueError("--judge-url and --judge-model go together")
    if args.judge_key_env and not args.judge_url:
        raise ValueError("--judge-key-env goes with --judge-url and --judge-model (or set reward.judge_key_env)")
    if args.judge_url:  # shorthands for the [reward] keys
        cfg.reward = dataclasses.replace(cfg.reward, judge="http", judge_url=args.judge_url,
                                         judge_model=args.judge_model,
                                         judge_key_env=args.judge_key_env or cfg.reward.judge_key_env)
        cfg.reward.validate("reward")
    rank, world, barrier, device = 0, 1, None, cfg.model.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # data parallel: each process a whole model, its share of items
        import torch

        from .train import start_parallel
        par = start_parallel(cfg)
        rank, world, barrier = par.rank, par.world, par.barrier
        if par.device.type == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"
    model, tokenizer = load_model(cfg.model.path, device=device, dtype=cfg.model.dtype,
                                  attn_backend=cfg.model.attn_backend)
    if tokenizer is None:
        raise ValueError(f"model {cfg.model.path}: no tokenizer files in the checkpoint directory")
    reward = build_reward(cfg, resolve_think(cfg.eval.think, tokenizer, cfg.data.chat_template))
    table = run_eval(model, tokenizer, benchmarks, cfg.eval, args.out, reward=reward, data=cfg.data,
                     rollout=cfg.rollout, rank=rank, world=world, barrier=barrier,
                     model_id=str(Path(cfg.model.path).resolve()) if Path(cfg.model.path).exists() else cfg.model.path)
    if rank == 0:
        print(markdown(table), end="")
        print(f"per-sample rows: {Path(args.out) / 'items.jsonl'}; summary: {Path(args.out) / 'summary.md'}")
    return 0


def _print_answer(item: dict, row: dict) -> None:
    if "question" in item:
        print(f"[{row['id']}] Q: {item['question']}")
    print(f"[{row['id']}] A: {row['completion']}")
    if item.get("answers"):
        print(f"[{row['id']}] gold: {item['answers']}")
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
