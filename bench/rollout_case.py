"""Rollout throughput on a GRPO-shaped workload: our Generator vs transformers' generate.

    python -m bench.rollout_case --impl ours|hf [--prompts 8 --n 8 --prompt-len 1024 --new 128]

Embedded SmolLM2-135M-Instruct, CPU fp32, random prompt tokens, temperature 1, every sample
forced to exactly --new tokens (no stop token) so both sides generate the same amount.
Prints one JSON line with new tokens/s (all samples' new tokens over the wall time).
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def run(impl: str, prompts: int, n: int, prompt_len: int, new: int, seed: int = 0) -> dict:
    import torch

    from engine.model import load_model
    from engine.rollout import Generator, SamplingParams

    model, tok = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, model.config.vocab_size, (prompts, prompt_len), generator=g)
    if impl == "ours":
        gen = Generator(model, tok)
        t0 = time.perf_counter()
        out = gen.generate(ids.tolist(), n=n, params=SamplingParams(max_new_tokens=new, temperature=1.0, seed=seed))
        seconds = time.perf_counter() - t0
        produced = sum(len(c.token_ids) for group in out for c in group)
        extra = {k: v for k, v in gen.stats.as_dict().items() if k in
                 ("prompt_tokens", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_blocks", "preemptions")}
    else:
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(str(model.checkpoint_dir), dtype=torch.float32).eval()
        del model
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, num_return_sequences=n, max_new_tokens=new, min_new_tokens=new,
                              pad_token_id=tok.eos_token_id)
        seconds = time.perf_counter() - t0
        produced = (out.shape[1] - prompt_len) * out.shape[0]
        extra = {}
    return {"impl": impl, "prompts": prompts, "n": n, "prompt_len": prompt_len, "new_tokens": new,
            "seconds": seconds, "generated": produced, "new_tokens_per_s": produced / seconds, **extra}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["ours", "hf"], required=True)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new", type=int, default=128)
    a = p.parse_args(argv)
    print(json.dumps(run(a.impl, a.prompts, a.n, a.prompt_len, a.new)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
