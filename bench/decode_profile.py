"""Where a rollout decode step's time goes: the sampler's share timed inside the run, and the
operators of the decode steps ranked by self time (torch.profiler).

    python -m bench.decode_profile [--prompts 8 --n 8 --prompt-len 1024 --new 128 --top-p 0.95]
                                   [--model smollm2-135m-instruct] [--no-profile] [--top 15]

The bench workload of bench/rollout_case.py (random prompt tokens, temperature 1, every
sample exactly --new tokens). Decode steps are timed as the engine times them
(Generator.stats); the sampler (`sampling.sample`) is timed at every step it runs in. The profiler, when on,
starts after the second decode step (first-call costs stay out), so its table covers decode
steps only, divided by their number. A diagnosis tool, not a bench: no target, nothing
recorded. Prints the figures and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def run(model_name: str, prompts: int, n: int, prompt_len: int, new: int, top_p: float, profile: bool,
        top: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from engine.model import load_model
    from engine.rollout import Generator, SamplingParams
    from engine.rollout import engine as engine_mod

    model, tok = load_model(model_name, device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (prompts, prompt_len), generator=g).tolist()
    gen = Generator(model, tok)
    gen.generate([ids[0][:8]], n=2, params=SamplingParams(max_new_tokens=2, seed=0, ignore_eos=True))  # warm-up
    sampler_seconds = []  # every sampler call; decode_sampler: those of decode steps
    prof = torch_profile(activities=[ProfilerActivity.CPU]) if profile else None
    profiled = {"on": False, "from_step": 0}
    real_sample, real_step = engine_mod.sample, engine_mod.Generator._step

    def timed_sample(*args, **kwargs):
        t0 = time.perf_counter()
        out = real_sample(*args, **kwargs)
        sampler_seconds.append(time.perf_counter() - t0)
        return out

    decode_sampler = []

    def step(self, *args):
        trace = self.stats.blocks_trace
        if prof is not None and not profiled["on"] and len(trace) == 2:
            prof.__enter__()
            profiled.update(on=True, from_step=len(trace))
        before, calls = len(trace), len(sampler_seconds)
        out = real_step(self, *args)
        if len(trace) > before:  # a decode step (the engine traces its blocks after each)
            decode_sampler.extend(sampler_seconds[calls:])
        return out

    engine_mod.sample, engine_mod.Generator._step = timed_sample, step
    try:
        gen.generate(ids, n=n, params=SamplingParams(max_new_tokens=new, temperature=1.0, top_p=top_p, seed=1,
                                                     ignore_eos=True))
    finally:
        engine_mod.sample, engine_mod.Generator._step = real_sample, real_step
        if profiled["on"]:
            prof.__exit__(None, None, None)
    st = gen.stats
    steps = len(st.blocks_trace)
    result = {"prompts": prompts, "n": n, "prompt_len": prompt_len, "new_tokens": new, "top_p": top_p,
              "decode_steps": steps, "decode_ms_per_step": st.decode_seconds / max(steps, 1) * 1e3,
              "sampler_ms_per_step": sum(decode_sampler) / max(len(decode_sampler), 1) * 1e3,
              "sampler_calls_in_decode": len(decode_sampler),
              "decode_tokens_per_s": (st.generated_tokens - prompts * n) / max(st.decode_seconds, 1e-9)}
    print(f"decode: {steps} steps, {result['decode_ms_per_step']:.1f} ms a step, "
          f"{result['decode_tokens_per_s']:.1f} new tokens/s; "
          f"sampler {result['sampler_ms_per_step']:.1f} ms a step")
    if profiled["on"]:
        covered = steps - profiled["from_step"]
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        result["ops_ms_per_step"] = {e.key: e.self_cpu_time_total / 1e3 / max(covered, 1) for e in rows}
        print(f"operators over the last {covered} decode steps, self time per step:")
        for name, ms in result["ops_ms_per_step"].items():
            print(f"  {ms:8.1f} ms  {name}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--no-profile", action="store_true", help="time only (the profiler adds overhead)")
    p.add_argument("--top", type=int, default=15, help="operators listed")
    a = p.parse_args(argv)
    print(json.dumps(run(a.model, a.prompts, a.n, a.prompt_len, a.new, a.top_p, not a.no_profile, a.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
