"""GPU decode throughput of the rollout engine against the memory-bandwidth roofline.

    python3 -m bench.gpu_rollout_case    (run by bench/gpu_suite.py)

A Qwen2-1.5B-shaped decoder with random bf16 weights (no download needed), 8 prompts x 8
samples (batch 64), 1,024-token prompts, 128 new tokens, temperature 1. Roofline: each
decode step reads every weight once plus each running sequence's KV; its time at the copy
bandwidth measured in the same run is the floor. Prints one JSON line.
"""
from __future__ import annotations

import json
import sys
import time


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    import torch
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * nbytes * 10 / (time.perf_counter() - t0)  # read + write


def main() -> int:
    import torch

    from engine.model import Decoder, DecoderConfig
    from engine.rollout import Generator, SamplingParams

    hf = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
          "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
          "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True}
    cfg = DecoderConfig.from_hf(hf)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Decoder(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    prompts, n, plen, new = 8, 8, 1024, 128
    ids = torch.randint(0, cfg.vocab_size, (prompts, plen)).tolist()
    gen = Generator(model)
    gen.generate(ids[:1], n=2, params=SamplingParams(max_new_tokens=4, temperature=1.0, seed=0))  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    gen.generate(ids, n=n, params=SamplingParams(max_new_tokens=new, temperature=1.0, seed=0))
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    st = gen.stats
    decode_steps = len(st.blocks_trace)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = cfg.num_layers * 2 * cfg.kv_size * 2
    mean_len = plen + new / 2
    step_bytes = weight_bytes + prompts * n * mean_len * kv_per_token
    bw = copy_bandwidth()
    step_time = st.decode_seconds / max(decode_steps, 1)
    print(json.dumps({"batch": prompts * n, "prompt_len": plen, "new_tokens": new, "seconds": total,
                      # each sample's first token comes out of its group's prefill step, not a decode step
                      "decode_tokens_per_s": (st.generated_tokens - prompts * n) / st.decode_seconds,
                      "prefill_tokens_per_s": st.prompt_tokens / st.prefill_seconds,
                      "decode_step_ms": step_time * 1e3, "bytes_per_step": step_bytes, "copy_bandwidth": bw,
                      "roofline_fraction": (step_bytes / bw) / step_time}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
