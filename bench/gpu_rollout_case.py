"""Rollout decode against the memory-bandwidth roofline, with and without prefix sharing.

    python3 -m bench.gpu_rollout_case [--prompt-lens 16384 61440 --graph-lens 1024 16384
                                       --groups 8 --n 8 --new 32]   (run by bench/gpu_suite.py)
    python3 -m bench.gpu_rollout_case --profile 1024 61440      (where an eager step's device time goes)

A Qwen2-1.5B-shaped decoder with random bf16 weights (no download needed), batch 64 = 8
groups of 8 samples, each group sharing one long prompt, temperature 1, top-p 0.95. The
prompts' KV is written straight into the paged cache as random values (a 60K-token prefill
of 8 prompts would take minutes and is not what this measures); the decode steps then run
the engine as in training.

Roofline: a decode step must read every weight once, each group's prompt KV once, and each
sample's own suffix KV. Those bytes at the copy bandwidth measured in the same run are the
floor; the figure is floor / measured step time (target >= 70% with sharing). The same
workload without prefix sharing (each sample reads the prompt itself: 8x the prompt traffic)
is measured beside it, against the same must-read bytes (the samples share the prompt's cache
blocks either way: without sharing, each reads them itself). Were the cache too small for the
whole batch, it would decode in waves; the figure compares the time per `batch` decoded tokens
(batch_step_s; mean_batch says how full the steps were).

Fused kernels: every case runs with the rollout's default on a GPU (engine.model.model.fused_kernels:
each RMSNorm with its residual add, RoPE with the K/V write, silu * up as one kernel each, and
the stacked q / k / v and gate / up as one product each); at --fused-lens the shared graph case
runs again with $LONGRL_FUSED=torch (all of that as torch's ops and five products), and
`fused_speedup` is that step time over the fused one.

Lookahead: every case runs with the rollout's default on a GPU (a graph decode step launched
before the last step's tokens are read: engine/rollout/engine.py); at --lookahead-lens the shared
graph case runs again with $LONGRL_LOOKAHEAD=off, and `lookahead_speedup` is that step time over
the default's.

CUDA graphs: every case runs with the rollout's default (decode steps replayed from CUDA
graphs); at --graph-lens the shared case runs again with cuda_graphs = off, and
`graphs_speedup` is the eager step time over the graph step time. The steps that captured a
graph (about three steps' work each) are left out of a step time and reported as
capture_seconds; a bucket's first two steps (run before its capture, without replay) stay in,
2 of the 31 timed steps at the default --new 32 (graph_replays says how many replayed).
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

QWEN2_1P5B = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
              "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
              "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
              "tie_word_embeddings": True}


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
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


class RandomPrefill(torch.nn.Module):
    """The model, except that a prefill step writes random K/V for its tokens into the paged
    cache (every layer) and returns random hidden states: decode then runs on a cache as full
    as a real prefill would leave it, at a fraction of the cost."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config
        self.embed_tokens = model.embed_tokens
        self.checkpoint_dir = None

    def forward(self, ids, position_ids=None, attn=None):
        if attn is None or attn.decode:
            return self.inner(ids, position_ids=position_ids, attn=attn)
        cache = attn.cache
        hkv, d = cache.k.shape[-2], cache.k.shape[-1]
        for layer in range(cache.k.shape[0]):
            for buf in (cache.k, cache.v):
                buf[layer].view(-1, hkv, d)[attn.slots] = torch.randn(len(attn.slots), hkv, d, device=buf.device,
                                                                       dtype=buf.dtype)
        w = self.embed_tokens.weight
        return torch.randn(ids.shape[0], self.config.hidden_size, device=ids.device, dtype=w.dtype)

    def logits(self, hidden):
        return self.inner.logits(hidden)


def _rollout(model, groups: int, prompt_len: int, new: int, **cache):
    """The case's generator (random-KV prefill, `cache` -> CacheConfig), prompts and sampling."""
    from engine.rollout import Generator, SamplingParams
    from engine.rollout.paged import CacheConfig

    gen = Generator(RandomPrefill(model), cache_cfg=CacheConfig(**cache))
    params = SamplingParams(max_new_tokens=new, temperature=1.0, top_p=0.95, seed=0, ignore_eos=True,
                            stop_token_ids=[])
    return gen, [[1] * prompt_len for _ in range(groups)], params


def decode_case(model, groups: int, n: int, prompt_len: int, new: int, share: bool, block_size: int = 16,
                cache_bytes: int | None = None, graphs: str = "auto", warmup: bool = True, fused: bool = True,
                lookahead: bool = True) -> dict:
    """Decode `groups` x `n` samples of `new` tokens after random-KV prompts; time per decode step
    (without the steps that captured a CUDA graph) and the bytes a step must read (weights + each
    prompt's KV once + each sample's suffix). With `warmup` the same rollout runs once untimed first:
    a Triton kernel compiles on the first launch of each of its variants (about a second each), and
    the first H100 run showed that alone adding up to 50 ms to the mean step of a 31-step case.
    fused = False runs the case with $LONGRL_FUSED=torch (torch's ops for the norms, RoPE, the K/V
    write and silu * up instead of the fused kernels; the graphs are captured afresh per rollout).
    lookahead = False: with $LONGRL_LOOKAHEAD=off (each step's tokens read before the next launch)."""
    with _case_env("LONGRL_FUSED", None if fused else "torch"), \
            _case_env("LONGRL_LOOKAHEAD", None if lookahead else "off"):
        r = _decode_case(model, groups, n, prompt_len, new, share, block_size, cache_bytes, graphs, warmup, fused)
    r["lookahead"] = lookahead
    return r


@contextlib.contextmanager
def _case_env(name: str, value: str | None):
    """An environment variable for one case: unset (the default) or `value`; restored after."""
    saved = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if saved is not None:
            os.environ[name] = saved


def _decode_case(model, groups, n, prompt_len, new, share, block_size, cache_bytes, graphs, warmup, fused) -> dict:
    cfg = model.config
    gen, prompts, params = _rollout(model, groups, prompt_len, new, block_size=block_size, share_prefix=share,
                                    max_bytes=cache_bytes, cuda_graphs=graphs)
    sync = torch.cuda.synchronize if model.embed_tokens.weight.is_cuda else (lambda: None)
    if warmup:  # the same rollout once untimed: every kernel variant it launches is compiled before the timing
        gen.generate(prompts, n=n, params=params)
    sync()
    gen.generate(prompts, n=n, params=params)
    sync()
    st = gen.stats
    steps = len(st.blocks_trace)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = cfg.num_layers * 2 * cfg.kv_size * model.embed_tokens.weight.element_size()
    mean_suffix = (new + 1) / 2  # decode step j reads j + 1 suffix tokens, j = 1 .. new - 1
    must_read = weight_bytes + (groups * prompt_len + groups * n * mean_suffix) * kv_per_token
    timed = max(steps - st.graph_captures, 1)
    seconds = st.decode_seconds - st.capture_seconds
    # where the cache cannot hold every sample at once (a cache smaller than the batch needs) the batch
    # decodes in waves: fewer rows a step, more steps. batch_step_s is the time per `batch` decoded
    # tokens, the figure the roofline compares (the same as decode_step_s when every step is full)
    mean_batch = st.decode_rows / max(steps, 1)
    return {"share_prefix": share, "cuda_graphs": graphs, "fused": fused, "graph_steps": st.graph_steps,
            "graph_replays": st.graph_replays, "graph_captures": st.graph_captures,
            "capture_seconds": st.capture_seconds,
            "batch": groups * n, "mean_batch": mean_batch, "preemptions": st.preemptions,
            "prompt_len": prompt_len, "new_tokens": new,
            "decode_steps": steps, "decode_step_s": seconds / timed,
            "batch_step_s": seconds / timed * groups * n / max(mean_batch, 1e-9),
            "decode_step_s_with_captures": st.decode_seconds / max(steps, 1),
            "decode_tokens_per_s": timed * mean_batch / max(seconds, 1e-9),
            "bytes_per_step": must_read, "weight_bytes": weight_bytes,
            "prompt_kv_bytes": groups * prompt_len * kv_per_token}


def step_breakdown(model, groups: int, n: int, prompt_len: int, new: int, share: bool = True,
                   graphs: str = "auto", block_size: int = 16) -> dict:
    """Where a decode step goes (median over the decode steps, ms): the model (the graph replay,
    or the eager forward + lm_head), the sampler, and the rest (scheduler, block tables, packing
    the inputs, appending tokens). Each part is timed between device syncs, so the parts add up
    to a step slower than an unsynchronised one: this says where to look, decode_case says how fast."""
    import statistics

    from engine.rollout import Generator
    from engine.rollout import engine as engine_mod
    from engine.rollout.graphs import DecodeGraphs

    sync = torch.cuda.synchronize if model.embed_tokens.weight.is_cuda else (lambda: None)
    parts: list[dict] = []
    current: dict = {}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            current[key] = current.get(key, 0.0) + time.perf_counter() - t0
            return out
        return wrapper

    real = (Generator._step, Generator._forward, DecodeGraphs.step, engine_mod.sample)

    def step(self, sched, *args):
        current.clear()
        sync()
        t0 = time.perf_counter()
        real[0](self, sched, *args)
        sync()
        if sched.decoding:
            model_s = current.get("graph", 0.0) + current.get("forward", 0.0)
            parts.append({"step": time.perf_counter() - t0, "model": model_s, "sampler": current.get("sampler", 0.0),
                          "graph_step": "graph" in current and "forward" not in current})

    Generator._step, Generator._forward = step, timed(real[1], "forward")
    DecodeGraphs.step, engine_mod.sample = timed(real[2], "graph"), timed(real[3], "sampler")
    try:
        gen, prompts, params = _rollout(model, groups, prompt_len, new, block_size=block_size, share_prefix=share,
                                        cuda_graphs=graphs)
        gen.generate(prompts, n=n, params=params)
    finally:
        Generator._step, Generator._forward, DecodeGraphs.step, engine_mod.sample = real
    ms = {k: 1e3 * statistics.median(p[k] for p in parts) for k in ("step", "model", "sampler")}
    ms["rest"] = ms["step"] - ms["model"] - ms["sampler"]
    return {"prompt_len": prompt_len, "batch": groups * n, "share_prefix": share, "cuda_graphs": graphs,
            "decode_steps": len(parts), "graph_steps": sum(p["graph_step"] for p in parts),
            **{f"{k}_ms": v for k, v in ms.items()}}


def kernel_profile(model, groups: int, n: int, prompt_len: int, new: int, share: bool = True,
                   block_size: int = 16, top: int = 15) -> dict:
    """Where an eager decode step's device time goes: the case run once to compile, then again
    under torch.profiler from its third decode step on; the kernels (CPU operators where there is
    no GPU) ranked by self time, in ms per profiled step. A diagnosis, not a figure to target."""
    from torch.profiler import ProfilerActivity, profile

    from engine.rollout import Generator

    cuda = model.embed_tokens.weight.is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    gen, prompts, params = _rollout(model, groups, prompt_len, new, block_size=block_size, share_prefix=share,
                                    cuda_graphs="off")
    gen.generate(prompts, n=n, params=params)  # compiles every variant the rollout launches
    prof = profile(activities=activities)
    state = {"from": None}
    real = Generator._step

    def step(self, *args):
        if state["from"] is None and len(self.stats.blocks_trace) == 2:
            if cuda:
                torch.cuda.synchronize()
            prof.__enter__()
            state["from"] = 2
        return real(self, *args)

    Generator._step = step
    try:
        gen.generate(prompts, n=n, params=params)
        if cuda:
            torch.cuda.synchronize()
    finally:
        Generator._step = real
        if state["from"] is not None:
            prof.__exit__(None, None, None)
    if state["from"] is None:
        raise ValueError(f"kernel_profile: {new} new tokens make under 3 decode steps; the profile starts at the third")
    steps = max(len(gen.stats.blocks_trace) - state["from"], 1)

    def self_us(e):
        if not cuda:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    events = [e for e in prof.key_averages() if self_us(e) > 0]
    if cuda:  # kernels only: the operators' device time is the sum of theirs
        events = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    events.sort(key=self_us, reverse=True)
    total = sum(self_us(e) for e in events) / 1e3 / steps
    kernels = {e.key[:120]: round(self_us(e) / 1e3 / steps, 4) for e in events[:top]}
    wall = gen.stats.decode_seconds / max(len(gen.stats.blocks_trace), 1) * 1e3  # profiler on for most steps
    r = {"prompt_len": prompt_len, "share_prefix": share, "batch": groups * n, "profiled_steps": steps,
         "device_ms_per_step": total, "wall_ms_per_step": wall, "top_ms_per_step": kernels}
    print(f"prompt {prompt_len} {'shared' if share else 'not shared'}: {total:.2f} ms a step on the "
          f"{'device' if cuda else 'CPU'}; top:", file=sys.stderr)
    for name, ms in kernels.items():
        print(f"  {ms:8.3f} ms  {name}", file=sys.stderr)
    return r


def measure(model, prompt_lens, graph_lens, groups: int, n: int, new: int, bw: float, graphs=("auto", "off"),
            block_size: int = 16, warmup: bool = True, fused_lens=(), lookahead_lens=(), unshared: bool = True) -> dict:
    """Every case (each warmed up first, decode_case's `warmup`); the shared case at graph_lens also
    with graphs[1] (off), at fused_lens also with torch's ops for what the fused kernels do
    (`fused_speedup`: that step time over the fused one), at lookahead_lens also without the
    engine's lookahead (`lookahead_speedup`, the same ratio); unshared=False: the prompt lengths
    with sharing only -> the summary dict."""
    rows, speedups, fused_speedups, ahead_speedups = [], {}, {}, {}
    on, off = graphs
    runs = [(plen, share, on, True, True) for plen in prompt_lens for share in ((True, False) if unshared else (True,))]
    runs += [(plen, True, g, True, True) for plen in graph_lens for g in (on, off)
             if plen not in prompt_lens or g == off]
    done = set(prompt_lens) | set(graph_lens)
    runs += [(plen, True, on, True, True) for plen in dict.fromkeys([*fused_lens, *lookahead_lens]) if plen not in done]
    runs += [(plen, True, on, False, True) for plen in fused_lens]
    runs += [(plen, True, on, True, False) for plen in lookahead_lens]
    for plen, share, mode, fused, ahead in runs:
        r = decode_case(model, groups, n, plen, new, share, block_size=block_size, graphs=mode, warmup=warmup,
                        fused=fused, lookahead=ahead)
        r["roofline_fraction"] = r["bytes_per_step"] / bw / r["batch_step_s"]
        rows.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)

    def step_s(plen, mode, fused, ahead=True):
        return next(r["batch_step_s"] for r in rows if r["prompt_len"] == plen and r["share_prefix"]
                    and r["cuda_graphs"] == mode and r["fused"] == fused and r["lookahead"] == ahead)

    for plen in graph_lens:
        speedups[str(plen)] = step_s(plen, off, True) / step_s(plen, on, True)
    for plen in fused_lens:
        fused_speedups[str(plen)] = step_s(plen, on, False) / step_s(plen, on, True)
    for plen in lookahead_lens:
        ahead_speedups[str(plen)] = step_s(plen, on, True, False) / step_s(plen, on, True)
    shared = [r for r in rows if r["share_prefix"] and r["cuda_graphs"] == on and r["fused"] and r["lookahead"]
              and r["prompt_len"] in prompt_lens]
    # where a step goes: with and without graphs at the first graph length, with graphs at the others
    breakdown = [step_breakdown(model, groups, n, plen, new, graphs=g)
                 for i, plen in enumerate(graph_lens) for g in ((on, off) if i == 0 else (on,))]
    for r in breakdown:
        print(json.dumps(r), file=sys.stderr, flush=True)
    return {"batch": groups * n, "copy_bandwidth": bw, "cases": rows, "graphs_speedup": speedups,
            "fused_speedup": fused_speedups, "lookahead_speedup": ahead_speedups, "step_breakdown": breakdown,
            "roofline_fraction": min(r["roofline_fraction"] for r in shared)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[16384, 61440])
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--graph-lens", type=int, nargs="*", default=[1024, 16384],
                   help="prompt lengths at which the shared case also runs without CUDA graphs")
    p.add_argument("--fused-lens", type=int, nargs="*", default=[1024, 16384],
                   help="prompt lengths at which the shared graph case also runs with $LONGRL_FUSED=torch")
    p.add_argument("--lookahead-lens", type=int, nargs="*", default=[1024, 16384],
                   help="prompt lengths at which the shared graph case also runs with $LONGRL_LOOKAHEAD=off")
    p.add_argument("--profile", type=int, nargs="*", default=[],
                   help="instead of the measurement: at these prompt lengths, shared and not, the kernels of "
                        "the eager decode steps ranked by device time per step (torch.profiler)")
    p.add_argument("--top", type=int, default=15, help="kernels listed by --profile")
    p.add_argument("--shared-only", action="store_true", help="the prompt lengths with prefix sharing only")
    a = p.parse_args(argv)

    from engine.model import Decoder, DecoderConfig
    from engine.model.model import fuse_projections

    cfg = DecoderConfig.from_hf(QWEN2_1P5B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Decoder(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    fuse_projections(model)  # as the trainer's rollout copy: q / k / v and gate / up one product each
    if a.profile:
        print(json.dumps({"cases": [kernel_profile(model, a.groups, a.n, plen, a.new, share, top=a.top)
                                    for plen in a.profile for share in (True, False)]}))
        return 0
    print(json.dumps(measure(model, a.prompt_lens, a.graph_lens, a.groups, a.n, a.new, copy_bandwidth(),
                             graphs=("auto", "off"), fused_lens=a.fused_lens, lookahead_lens=a.lookahead_lens,
                             unshared=not a.shared_only)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
