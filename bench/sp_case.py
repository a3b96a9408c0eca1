"""One SFT-like training step (forward + backward) of one long sequence under sequence
parallelism on CPU ranks (gloo): per-rank peak memory above the model and time.

    python -m bench.sp_case --sp 2 --tokens 16384

A small Qwen2-shaped model (hidden 256, 4 layers, 4/2 heads, vocabulary 1,024), fp32, one
sequence of --tokens tokens sharded over --sp ranks (zigzag, ring attention; sp 1 is the
one-process varlen path). Prints one JSON line: the step's wall time (max over ranks) and
each rank's peak resident memory above what it held before the step.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from bench.kernel_case import _rss_bytes


def small_model():
    import torch

    from engine.model import Decoder, DecoderConfig
    hf = {"model_type": "qwen2", "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512,
          "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 65536, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True}
    torch.manual_seed(0)
    return Decoder(DecoderConfig.from_hf(hf), attn_backend="sdpa")


def step_on_rank(rank: int, world: int, tokens: int) -> dict:
    import torch

    from engine.model.attention import RingAttention
    from engine.parallel import SequenceShard
    from kernels import linear_logprob
    model = small_model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1024, (tokens,), generator=g)
    targets = torch.roll(ids, -1)
    base = _rss_bytes()
    t0 = time.perf_counter()
    if world == 1:
        hidden = model(ids)
        rows_t = targets
    else:
        shard = SequenceShard([tokens], world, rank)
        hidden = model(shard.take(ids), position_ids=shard.positions, attn=RingAttention(shard.padded))
        rows_t = shard.take(targets)
    logp, _ = linear_logprob(hidden, model.lm_head_weight, rows_t)
    (-logp.sum() / tokens).backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rank": rank, "seconds": seconds, "peak_extra_bytes": max(peak - base, 0)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sp", type=int, default=1)
    p.add_argument("--tokens", type=int, default=16384)
    a = p.parse_args(argv)
    if a.sp == 1:
        ranks = [step_on_rank(0, 1, a.tokens)]
    else:
        from engine.parallel.spawn import run_ranks
        ranks = run_ranks(step_on_rank, a.sp, a.tokens, timeout=900)
    print(json.dumps({"sp": a.sp, "tokens": a.tokens, "seconds": max(r["seconds"] for r in ranks),
                      "peak_extra_bytes": [r["peak_extra_bytes"] for r in ranks]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
