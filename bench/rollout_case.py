"""Rollout throughput on a GRPO-shaped workload: our Generator vs transformers' generate,
split into prefill and decode.

    python -m bench.rollout_case --impl ours|hf [--prompts 8 --n 8 --prompt-len 1024 --new 128 --rounds 1]
                                 [--top-p 1.0]

Also reports decode against the matmul roofline: 2 x parameters FLOPs per new token at the
fp32 matmul rate (2048^3, best of 5) measured in the same process before and after the rounds
(the higher of the two).

Embedded SmolLM2-135M-Instruct, CPU fp32, random prompt tokens, temperature 1, every sample
forced to exactly --new tokens (no stop token: ignore_eos / min_new_tokens) so both sides
generate the same amount. The model loads once and warms up on a toy call (untimed);
--rounds runs the whole generate that many times and every time is the median of the
rounds, with min–max. Prints one JSON line.

The two sides do unequal prefill work, and the split says how much:
  ours  prefills each group's prompt once (prompts x prompt_len tokens) and forks the KV
        into its n samples; prefill = wall time minus the decode steps' time
        (Generator.stats.decode_seconds): cache set-up, the prompt chunks and each sample's
        first token. Scheduled prefill steps all run before the first decode step here.
  hf    generate(num_return_sequences=n) repeats each prompt n times before the forward,
        so it prefills prompts x n x prompt_len tokens. generate exposes no split, so a
        forward pre-hook on the model counts the tokens of every forward call and stamps
        the start of the first one-token-per-row (decode) call: prefill = that moment
        minus the call's start (time to every sample's first token, sampling included),
        decode = the rest. Prefill tokens are what the hook saw before that moment.
Decode is equal work on both sides: prompts x n x (new - 1) tokens (the first new token of
each sample comes out of the prefill), each sample attending over its own prompt and
tokens so far. That is the fair throughput figure; end to end mixes in the unequal prefill.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time

from bench.spread import spread


def _ours_round(model, tok, ids, n: int, new: int, seed: int, top_p: float = 1.0) -> dict:
    from engine.rollout import Generator, SamplingParams

    gen = Generator(model, tok)
    params = SamplingParams(max_new_tokens=new, temperature=1.0, top_p=top_p, seed=seed, ignore_eos=True)
    t0 = time.perf_counter()
    out = gen.generate(ids.tolist(), n=n, params=params)
    seconds = time.perf_counter() - t0
    st = gen.stats
    if st.preemptions:  # a recomputed sample samples again outside the decode steps: counts would blur
        raise RuntimeError(f"ours: {st.preemptions} preemptions; the prefill/decode split assumes none")
    generated = sum(len(c.token_ids) for group in out for c in group)
    return {"seconds": seconds, "prefill_seconds": seconds - st.decode_seconds, "decode_seconds": st.decode_seconds,
            "prefill_tokens": st.prompt_tokens, "generated": generated, "peak_blocks": st.peak_blocks}


class _ForwardClock:
    """Forward pre-hook on transformers' model: tokens fed before decoding starts, and when
    the first decode call (one token per row) starts."""

    def __init__(self):
        self.prefill_tokens, self.decode_start = 0, None

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.decode_start is None and ids is not None:
            if ids.shape[-1] == 1 and self.prefill_tokens:
                self.decode_start = time.perf_counter()
            else:
                self.prefill_tokens += ids.numel()


def _hf_round(hf, ids, n: int, new: int, seed: int, top_p: float = 1.0, *, pad: int) -> dict:
    import torch

    clock = _ForwardClock()
    handle = hf.register_forward_pre_hook(clock, with_kwargs=True)
    torch.manual_seed(seed)
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                              top_p=top_p, num_return_sequences=n, max_new_tokens=new, min_new_tokens=new,
                              pad_token_id=pad)
        seconds = time.perf_counter() - t0
    finally:
        handle.remove()
    if not clock.prefill_tokens:
        raise RuntimeError("transformers' generate bypassed the model's forward hooks: no prefill/decode split")
    prefill = (clock.decode_start or t0 + seconds) - t0
    return {"seconds": seconds, "prefill_seconds": prefill, "decode_seconds": seconds - prefill,
            "prefill_tokens": clock.prefill_tokens, "generated": (out.shape[1] - ids.shape[1]) * out.shape[0]}


def _summary(per_round: list[dict], first_tokens: int) -> dict:
    """Median and spread of each time over the rounds; token counts must not move between rounds."""
    for key in ("prefill_tokens", "generated"):
        if len({r[key] for r in per_round}) != 1:
            raise RuntimeError(f"{key} differs between rounds: {[r[key] for r in per_round]}")
    r0 = per_round[0]
    times = {k: spread([r[k] for r in per_round]) for k in ("seconds", "prefill_seconds", "decode_seconds")}
    decode_tokens = r0["generated"] - first_tokens
    return {"seconds": times["seconds"]["median"], "time": times["seconds"], "prefill_time": times["prefill_seconds"],
            "decode_time": times["decode_seconds"], "prefill_tokens": r0["prefill_tokens"],
            "generated": r0["generated"], "decode_tokens": decode_tokens,
            "prefill_tokens_per_s": r0["prefill_tokens"] / times["prefill_seconds"]["median"],
            "decode_tokens_per_s": decode_tokens / max(times["decode_seconds"]["median"], 1e-9),
            "new_tokens_per_s": r0["generated"] / times["seconds"]["median"],
            **{k: v for k, v in r0.items() if k == "peak_blocks"}}


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """fp32 matmul rate of this CPU now (best of `repeats` size^3 products): the roofline's
    denominator, measured in the same process as the decode it is compared with."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def run(impl: str, prompts: int, n: int, prompt_len: int, new: int, seed: int = 0, rounds: int = 1,
        top_p: float = 1.0) -> dict:
    import torch

    from engine.model import load_model

    model, tok = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, model.config.vocab_size, (prompts, prompt_len), generator=g)
    if impl == "ours":
        one_round = functools.partial(_ours_round, model, tok)
        prefills = "each prompt once"
    else:
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(str(model.checkpoint_dir), dtype=torch.float32).eval()
        del model
        one_round = functools.partial(_hf_round, hf, pad=tok.eos_token_id)
        prefills = f"each prompt x{n}: num_return_sequences={n}"
    one_round(ids[:1, :8], 2, 2, seed)  # warm-up, untimed: first-call costs stay out of round one
    rate_before = matmul_gflops()
    per_round = [one_round(ids, n, new, seed, top_p) for _ in range(rounds)]
    out = {"impl": impl, "prompts": prompts, "n": n, "prompt_len": prompt_len, "new_tokens": new, "rounds": rounds,
           "top_p": top_p, "prefills": prefills, **_summary(per_round, first_tokens=prompts * n)}
    # the matmul roofline of decode: every new token costs 2 x parameters FLOPs of matmuls (the
    # attention's FLOPs come on top, uncounted), at the fp32 rate of this machine. That rate drifts
    # on a shared VM, so it is measured before and after the rounds and the higher one counts (a
    # slow moment would flatter the fraction)
    params = sum(p.numel() for p in (model if impl == "ours" else hf).parameters())
    rates = [rate_before, matmul_gflops()]
    rate = max(rates)
    out.update(params=params, matmul_gflops=rate, matmul_gflops_measured=rates,
               roofline_tokens_per_s=rate * 1e9 / (2 * params),
               roofline_fraction=out["decode_tokens_per_s"] * 2 * params / (rate * 1e9))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["ours", "hf"], required=True)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--top-p", type=float, default=1.0)
    a = p.parse_args(argv)
    print(json.dumps(run(a.impl, a.prompts, a.n, a.prompt_len, a.new, rounds=a.rounds, top_p=a.top_p)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
