"""The host's share of a decode step: everything but the model and the sampler's kernels.

    python -m bench.host_step_case [--groups 8 --n 8 --prompt-len 1024 --new 256 --block-size 16]
                                   [--rounds 3] [--profile]

On a GPU with CUDA graphs a decode step is one graph replay, one sampler launch and the
host's work around them: the scheduler (a block per sequence when its last one fills), the
block tables, packing the step's inputs, the sampling settings, appending tokens. The device
waits for all of it (each step ends reading its tokens), so it adds to every step. This runs
the rollout engine's decode path exactly as on a GPU (`cuda_graphs = "eager"`: the graph
step's static buffers and packing) with the model's step and the sampler replaced by stubs
that return at once, on a tiny model, and reports host milliseconds per decode step (the
median of --rounds rollouts). --profile prints the functions that take the time.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys


def measure(groups: int, n: int, prompt_len: int, new: int, block_size: int, rounds: int,
            profile: bool = False) -> dict:
    import torch

    from engine.model import Decoder, DecoderConfig
    from engine.rollout import CacheConfig, Generator, SamplingParams
    from engine.rollout import engine as engine_mod
    from engine.rollout.graphs import DecodeGraphs

    # a tiny random decoder with Qwen2-1.5B's 12 / 2 heads: the prefill is cheap, decode never runs it
    cfg = DecoderConfig.from_hf({"model_type": "qwen2", "vocab_size": 1024, "hidden_size": 96, "intermediate_size": 32,
                                 "num_hidden_layers": 1, "num_attention_heads": 12, "num_key_value_heads": 2,
                                 "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6})
    torch.manual_seed(0)
    model = Decoder(cfg).float()
    real = DecodeGraphs._forward, engine_mod.sample
    DecodeGraphs._forward = lambda self, b, ni: self.logits[:b]
    engine_mod.sample = lambda logits, *a, **kw: (torch.zeros(logits.shape[0], dtype=torch.long),
                                                  torch.zeros(logits.shape[0]))
    try:
        gen = Generator(model, cache_cfg=CacheConfig(block_size=block_size, decode_backend="triton",
                                                     cuda_graphs="eager"))
        params = SamplingParams(max_new_tokens=new, temperature=1.0, top_p=0.95, seed=0, ignore_eos=True,
                                stop_token_ids=[])
        prompts = [[1] * prompt_len for _ in range(groups)]
        per_step = []
        prof = cProfile.Profile() if profile else None
        for r in range(rounds):
            if prof is not None and r == rounds - 1:
                prof.enable()
            gen.generate(prompts, n=n, params=params)
            if prof is not None and r == rounds - 1:
                prof.disable()
            st = gen.stats
            per_step.append(st.decode_seconds / len(st.blocks_trace))
            assert st.graph_steps == len(st.blocks_trace)
    finally:
        DecodeGraphs._forward, engine_mod.sample = real
    if prof is not None:
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(15)
    return {"batch": groups * n, "prompt_len": prompt_len, "new_tokens": new, "block_size": block_size,
            "host_ms_per_step": 1e3 * statistics.median(per_step), "rounds_ms": [1e3 * s for s in per_step]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args(argv)
    r = measure(a.groups, a.n, a.prompt_len, a.new, a.block_size, a.rounds, a.profile)
    print(f"host work per decode step, batch {r['batch']}: {r['host_ms_per_step']:.3f} ms "
          f"(rounds: {', '.join(f'{x:.3f}' for x in r['rounds_ms'])})")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    # before triton is imported (a process of its own, so nothing else is affected): no kernel runs in the
    # stubbed decode, and on a machine without a GPU importing the Triton paths needs the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
