"""A rollout under memory pressure: GRPO groups in a KV cache smaller than they need, how much
prompt work the preemptions cost.

    python -m bench.preempt_case [--groups 8 --n 8 --prompt-len 256 --new 64 --block-size 16]
                                 [--fractions 1.0 0.8 0.6 0.4]

A small random model (2 layers, hidden 64; what is measured is the scheduler's work, not the
model's), every sample exactly --new tokens (temperature 1, ignore_eos), the cache sized to a
fraction of what the rollout needs without preemption (each prompt once, each sample its new
tokens plus a copied partial block). For each fraction: the tokens prefilled as a multiple of
the prompt tokens (1.00: every prompt once, nothing recomputed), preemptions, engine steps,
seconds, and whether the completions equal the full cache's token for token. CPU; one JSON
line per fraction.
"""
from __future__ import annotations

import argparse
import json
import time

TINY = {"model_type": "qwen2", "vocab_size": 331, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e4, "tie_word_embeddings": True}


def run(groups: int, n: int, prompt_len: int, new: int, block_size: int, fractions: list[float]) -> list[dict]:
    import torch

    from engine.model import Decoder, DecoderConfig
    from engine.rollout import CacheConfig, Generator, SamplingParams

    torch.manual_seed(0)
    model = Decoder(DecoderConfig.from_hf(TINY)).eval()
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, TINY["vocab_size"], (prompt_len,), generator=g).tolist() for _ in range(groups)]
    params = [SamplingParams(max_new_tokens=new, temperature=1.0, seed=i, ignore_eos=True) for i in range(groups)]
    need = groups * (-(-prompt_len // block_size) + n * (-(-new // block_size) + 1))
    rows, full = [], None
    for frac in fractions:
        blocks = int(need * frac)
        gen = Generator(model, cache_cfg=CacheConfig(block_size=block_size, num_blocks=blocks))
        t0 = time.perf_counter()
        out = gen.generate(prompts, n=n, params=params)
        seconds = time.perf_counter() - t0
        tokens = [[c.token_ids for c in group] for group in out]
        full = full if full is not None else tokens
        s = gen.stats
        rows.append({"fraction": frac, "blocks": blocks, "prefilled_x_prompts":
                     (s.prompt_tokens + s.recomputed_tokens) / (groups * prompt_len),
                     "prompt_tokens_x_prompts": s.prompt_tokens / (groups * prompt_len), "preemptions": s.preemptions,
                     "steps": s.steps, "seconds": seconds, "same_tokens_as_first": tokens == full})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.preempt_case", description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=8, help="prompts, each a group of --n samples")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new", type=int, default=64, help="new tokens per sample (all of them: ignore_eos)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.8, 0.6, 0.4],
                   help="cache sizes as fractions of the no-preemption need; the first is the reference")
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    for row in run(a.groups, a.n, a.prompt_len, a.new, a.block_size, a.fractions):
        print(f"cache {row['fraction']:.0%} ({row['blocks']} blocks): prefilled {row['prefilled_x_prompts']:.2f}x "
              f"the prompts, {row['preemptions']} preemptions, {row['steps']} steps, {row['seconds']:.2f} s, "
              f"same tokens: {row['same_tokens_as_first']}")
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
