"""The CUDA-graph decode step (engine/rollout/graphs.py).

The graph step run eagerly on its static buffers (cuda_graphs="eager"; on CPU the Triton
kernels run under the interpreter, on a GPU machine the model moves to the GPU): padded batch
buckets, the spare block, the packed inputs and the prefix programs planned on the host must
give the ordinary step's tokens and log-probs (the reference runs the torch decode path, which
tests/test_decode_paths.py holds to the Triton path's tokens: quicker under the interpreter). The capture itself needs a GPU (the last test);
a capture that fails leaves the rollout running without graphs, which is checked here too."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from engine.rollout import CacheConfig, Generator, SamplingParams
from engine.rollout.graphs import DecodeGraphs, batch_bucket, graphs_mode
from engine.rollout.paged import DecodeTables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import tiny_decoder
    model = tiny_decoder(tmp_path_factory.mktemp("ckpt") / "qwen2", num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2)
    return model.to(DEVICE)  # the Triton kernels: on the GPU where there is one, else the interpreter


def _prompts(model, lens=(13, 6, 9), seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lens]


def _run(model, prompts, params, n, tokenizer=None, **cache):
    cache.setdefault("decode_backend", "triton")
    gen = Generator(model, tokenizer, cache_cfg=CacheConfig(block_size=4, **cache))
    out = gen.generate(prompts, n=n, params=params)
    return [[(c.token_ids, c.logprobs, c.finish_reason) for c in group] for group in out], gen.stats


def _same(got, want):
    for g_group, w_group in zip(got, want, strict=True):
        for (gt, gl, gr), (wt, wl, wr) in zip(g_group, w_group, strict=True):
            assert gt == wt and gr == wr
            torch.testing.assert_close(torch.tensor(gl), torch.tensor(wl), rtol=1e-4, atol=1e-4)


def _fuse(monkeypatch):
    """The GPU's inference kernels on CPU (under the interpreter): the model's CUDA-only rule
    (engine.model.model.fused_kernels) stood in for, and F.linear for the CPU's weight-major products."""
    from engine.model import model as model_mod
    monkeypatch.setattr(model_mod, "fused_kernels", lambda x: torch.is_inference_mode_enabled())
    monkeypatch.setattr(model_mod, "weight_major", lambda x, w: False)


def _spy_steps(monkeypatch):
    """Record (batch, bucket, prefix programs) of every graph step."""
    seen = []
    real = DecodeGraphs.step

    def step(self, seqs, tables, feed=None):
        out = real(self, seqs, tables, feed)
        if out is not None:
            seen.append((len(seqs), batch_bucket(len(seqs)), self.last_items))
        return out
    monkeypatch.setattr(DecodeGraphs, "step", step)
    return seen


@pytest.mark.parametrize("share", [True, False])
def test_graph_step_gives_the_ordinary_steps_tokens(tiny, monkeypatch, share):
    """Sampled (T = 1, top-p 0.9) and greedy prompts mixed, samples of different lengths: the batch
    shrinks 9 -> 6 -> 3, so it runs in buckets 16, 8 and 4 with padding rows."""
    prompts = _prompts(tiny)
    params = [SamplingParams(max_new_tokens=k, temperature=t, top_p=0.9, seed=3, stop_token_ids=[])
              for k, t in ((3, 1.0), (6, 0.0), (9, 1.0))]
    want, plain = _run(tiny, prompts, params, 3, share_prefix=share, cuda_graphs="off", decode_backend="torch")
    seen = _spy_steps(monkeypatch)
    got, stats = _run(tiny, prompts, params, 3, share_prefix=share, cuda_graphs="eager")
    _same(got, want)
    assert plain.graph_steps == 0 and stats.graph_steps == len(seen) == stats.steps - 1  # all but the prefill
    assert {b for _, b, _ in seen} == {16, 8, 4} and {n for n, _, _ in seen} == {9, 6, 3}
    # with sharing every group's samples are one prefix program (3 programs, padded to 4); without, none
    assert {k for _, _, k in seen} == ({3, 2, 1} if share else {0})


def test_the_fused_kernels_give_the_ordinary_steps_tokens(tiny, monkeypatch):
    """The GPU's inference kernels (each norm with the residual add before it, RoPE with the K/V
    cache write, silu * up) and the stacked projections of the trainer's rollout copy
    (fuse_projections) in the prefill and in the graph step, prefixes shared: the tokens and
    log-probs of torch's ops in the ordinary step. The cache is written only by the fused kernel."""
    import copy

    from engine.model.model import fuse_projections
    from engine.rollout.paged import PagedAttention

    stacked = fuse_projections(copy.deepcopy(tiny))  # as the trainer's rollout copy has them
    prompts = _prompts(tiny)
    params = [SamplingParams(max_new_tokens=k, temperature=t, top_p=0.9, seed=3, stop_token_ids=[])
              for k, t in ((2, 1.0), (4, 0.0), (5, 1.0))]
    want, _ = _run(tiny, prompts, params, 3, share_prefix=True, cuda_graphs="off", decode_backend="torch")
    used = {"attend": 0, "attend_rotating": 0}
    for name in used:
        def spy(self, *args, _real=getattr(PagedAttention, name), _name=name):
            used[_name] += 1
            return _real(self, *args)
        monkeypatch.setattr(PagedAttention, name, spy)
    _fuse(monkeypatch)
    got, stats = _run(stacked, prompts, params, 3, share_prefix=True, cuda_graphs="eager")
    _same(got, want)
    assert stats.graph_steps > 0 and used["attend"] == 0
    assert used["attend_rotating"] == stats.steps * tiny.config.num_layers


# what stops a CUDA-graph capture: ops that wait for the device to hand a value to the host
# (item / bool / int, nonzero and the shapes that depend on data) and tensors made from host data
# (an H2D copy from pageable memory). On CPU they all run; here they are caught by name.
_CAPTURE_BREAKERS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique",
                     "aten._unique", "aten._unique2", "aten.unique_consecutive", "aten.unique_dim",
                     "aten.bincount", "aten.equal", "aten.is_nonzero", "aten.lift_fresh", "aten.histc",
                     "aten._assert_async", "aten.item"}


def _capture_breakers(fn):
    """Run fn; -> the capture-breaking operations it dispatched, and those of its tensors' host reads
    (tolist / numpy / repeat_interleave without output_size / indexing by a boolean mask)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            kwargs = kwargs or {}
            if name in _CAPTURE_BREAKERS:
                seen.append(name)
            elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None:
                seen.append(name + " without output_size")
            elif name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
                seen.append(name + " by a boolean mask")
            return func(*args, **kwargs)

    # what dispatches nothing on CPU: reads to the host, tensors from numpy, explicit syncs
    real = [(torch.Tensor, name) for name in ("tolist", "numpy", "cpu")]
    real += [(torch, "from_numpy"), (torch.cuda, "synchronize")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in real]

    def flagged(label, f):
        def call(*a, **k):
            seen.append(label)
            return f(*a, **k)
        return call

    for owner, name, f in saved:
        setattr(owner, name, flagged(f"{'Tensor' if owner is torch.Tensor else owner.__name__}.{name}", f))
    try:
        with Spy():
            return fn(), seen
    finally:
        for owner, name, f in saved:
            setattr(owner, name, f)


def test_the_capture_check_catches_a_step_that_reads_the_device():
    """The capture spy (run on every graph step by the test below) is not blind: item(), tolist(),
    nonzero, boolean-mask indexing, a tensor from host data, repeat_interleave without output_size,
    reads to the host and tensors from numpy are all reported."""
    x = torch.arange(6)
    _, seen = _capture_breakers(lambda: (x.sum().item(), x.tolist(), x.nonzero(), x[x > 2], torch.tensor([1]),
                                         x.repeat_interleave(x), x.repeat_interleave(x, output_size=15), x.cpu(),
                                         torch.from_numpy(x.numpy())))
    assert seen == ["aten._local_scalar_dense", "Tensor.tolist", "aten.nonzero", "aten.index by a boolean mask",
                    "aten.lift_fresh", "aten.repeat_interleave without output_size", "Tensor.cpu", "Tensor.numpy",
                    "torch.from_numpy", "aten.lift_fresh"]


def _static_buffers(graphs) -> dict[int, str]:
    """Storage address -> name of what outlives a step: the graph buffers, the cache, the weights,
    the model's RoPE tables (made once per device, at the rollout's first prefill)."""
    buffers = [("inputs", graphs.inputs), ("tables", graphs.tables), ("logits", graphs.logits),
               ("cache.k", graphs.cache.k), ("cache.v", graphs.cache.v), *graphs.model.named_parameters(),
               *graphs.model.named_buffers()]
    rope = getattr(graphs.model, "_rope_cache", {})
    buffers += [(f"rope {i}", t) for i, t in enumerate(torch.utils._pytree.tree_leaves(list(rope.values())))
                if isinstance(t, torch.Tensor)]
    return {t.untyped_storage().data_ptr(): name for name, t in buffers}


def _baked(x, step: dict):
    """What a capture fixes of one argument: a tensor's shape, strides, dtype and where it lives --
    a static buffer at its address, or the n-th storage the step made (at its offset); any other
    value as it is. A tensor that is neither, or that lives off the step's device (a host tensor
    read by a device op: copied in, or read as a scalar, once at capture), is marked."""
    if isinstance(x, torch.Tensor):
        ptr = x.untyped_storage().data_ptr()
        meta = (tuple(x.shape), x.stride(), str(x.dtype))
        if x.device != step["device"]:
            return ("tensor", *meta, f"HOST TENSOR on {x.device}")
        if ptr in step["static"]:
            return ("tensor", *meta, step["static"][ptr], x.data_ptr())
        if ptr in step["made"]:
            return ("tensor", *meta, f"made #{step['made'][ptr]}", x.data_ptr() - ptr)
        return ("tensor", *meta, "EXTERNAL: neither static nor made in the step")
    if isinstance(x, (list, tuple)):
        return tuple(_baked(y, step) for y in x)
    return ("value", x if not callable(x) else "callable")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch-ops"])
def test_what_a_graph_captures_is_capturable_and_the_same_at_every_step(tiny, monkeypatch, fused):
    """Everything DecodeGraphs captures (its _forward: embedding, layers with the K/V write and the
    Triton attention kernels, lm_head) must be capturable: no operation that syncs with the device
    or copies host data in (either makes the capture fail and the rollout run without graphs).
    And a captured graph replays what it recorded: every operator with its scalar arguments, every
    kernel launch with its grid, and every input address. Run eagerly, every step of a bucket must
    therefore run the same torch operators and Triton launches with the same scalars, grids and
    shapes, reading the static buffers (inputs, tables, logits, cache, weights, RoPE tables) at the
    same addresses and otherwise only tensors the step made, in the same order -- a value that
    varies by step outside those would be replayed stale on a GPU. With the GPU's inference
    kernels (a GPU's default) and with torch's ops ($LONGRL_FUSED=torch)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kernels import triton_paged

    # the launches: interpreted functions here, compiled ones on a GPU (the suite runs this file there)
    launcher = type(triton_paged._decode_partial_kernel)
    steps_of: dict[tuple, list[list]] = {}
    current: dict = {}

    def storages(xs):
        return {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves(xs)
                if isinstance(t, torch.Tensor)}

    class Record(TorchDispatchMode):  # every operator the step runs, and the storages it makes, in order
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            recording = "ops" in current and not current.get("in_kernel")  # (the interpreter's own copies: not)
            if recording:
                current["ops"].append((str(func), _baked((args, tuple(sorted(kwargs.items()))), current)))
            out = func(*args, **kwargs)
            if recording:  # new storages only (views and no-ops share their input's), kept alive: no reuse
                for ptr in sorted(storages(out) - storages((args, kwargs)) - current["made"].keys()):
                    current["made"][ptr] = len(current["made"])
                current["keep"].append(out)
            return out

    real_forward, real_run = DecodeGraphs._forward, launcher.run

    breakers = []

    def forward(self, b, ni):
        current.update(static=_static_buffers(self), device=self.device, made={}, keep=[], ops=[])
        with Record():
            out, seen = _capture_breakers(lambda: real_forward(self, b, ni))
        breakers.extend(seen)
        steps_of.setdefault((b, ni), []).append(current.pop("ops"))
        current.pop("keep")
        return out

    def run(self, *args, grid, warmup, **kwargs):
        if "ops" in current and not warmup:  # a warmup compiles without launching (triton_paged._resident)
            current["ops"].append((f"triton {self.fn.__name__}", _baked((grid, args, tuple(sorted(kwargs.items()))),
                                                                        current)))
        current["in_kernel"] = True
        try:
            return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            current["in_kernel"] = False

    monkeypatch.setattr(DecodeGraphs, "_forward", forward)
    monkeypatch.setattr(launcher, "run", run)
    if fused:  # in the graph steps (what is captured); the prefill of a 444-token prompt interpreted would be slow
        from engine.model import model as model_mod
        monkeypatch.setattr(model_mod, "fused_kernels", lambda x: "ops" in current)
        monkeypatch.setattr(model_mod, "weight_major", lambda x, w: False)
    else:
        monkeypatch.setenv("LONGRL_FUSED", "torch")
    pointwise = {"triton _rms_norm_kernel", "triton _rope_store_kernel", "triton _silu_mul_kernel"}
    # a prompt of 444 tokens: its samples grow past 448 = 7 tiles of 64, where a split count chosen from
    # the step's own lengths would change from 1 to 2 (kernels.triton_paged.pick_num_splits)
    prompts = _prompts(tiny, lens=(13, 6, 9, 444))
    params = SamplingParams(max_new_tokens=7, temperature=1.0, seed=3, stop_token_ids=[])
    # the fused kernels do not depend on sharing, nor the decode kernels on the fused ones: one each
    for share in (True,) if fused else (False,):
        if DEVICE == "cuda":  # the decode kernels' residency is measured once per variant, at its first
            _run(tiny, prompts, params, 2, share_prefix=share, cuda_graphs="eager")  # step (triton_paged._resident)
        steps_of.clear()
        breakers.clear()
        _run(tiny, prompts, params, 2, share_prefix=share, cuda_graphs="eager")
        assert breakers == []
        assert steps_of and all(len(steps) >= 3 for steps in steps_of.values())
        for key, steps in steps_of.items():
            first = steps[0]
            kernels = {name for name, _ in first if name.startswith("triton")}
            assert kernels & pointwise == (pointwise if fused else set()), kernels
            assert kernels - pointwise in ({"triton _decode_partial_kernel", "triton _merge_kernel"},
                                           {"triton _decode_partial_kernel"}), kernels
            # the projections: mm on the CPU decode path; on CUDA, under inference mode, linear stays whole
            products = ("aten.mm.", "aten.addmm.", "aten.linear.", "aten.matmul.")
            assert any(name.startswith(products) for name, _ in first)
            marked = [(name, r) for name, r in first if "EXTERNAL" in repr(r) or "HOST TENSOR" in repr(r)]
            assert not marked, (key, marked[:3])
            for later in steps[1:]:
                diff = [(a, b) for a, b in zip(first, later) if a != b]
                assert len(later) == len(first) and not diff, (key, share, diff[:2])


def test_graph_step_after_preemption(tiny):
    """A cache too small for every sample: sequences are preempted, prefilled again (the ordinary
    step) and decode again from the graph buffers with rewritten tables."""
    prompts = _prompts(tiny, (10, 7))
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[])
    want, plain = _run(tiny, prompts, params, 3, num_blocks=14, cuda_graphs="off", decode_backend="torch")
    got, stats = _run(tiny, prompts, params, 3, num_blocks=14, cuda_graphs="eager")
    assert plain.preemptions > 0 and stats.preemptions == plain.preemptions
    assert stats.graph_steps > 0
    _same(got, want)


def _run_with_a_failing_capture(model, monkeypatch, prompts, params, n):
    """_run in capture mode where no graph can be captured (no GPU; on a GPU, no CUDAGraph) ->
    (completions, stats, the warnings that turned graphs off)."""
    monkeypatch.setattr("engine.rollout.engine.graphs_mode", lambda *a: "capture")
    if torch.cuda.is_available():  # make the capture fail on a GPU too
        monkeypatch.setattr(torch.cuda, "CUDAGraph", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, stats = _run(model, prompts, params, n)
    return got, stats, [str(w.message) for w in caught if "CUDA graphs off" in str(w.message)]


def test_a_failed_capture_leaves_the_rollout_running_without_graphs(tiny, monkeypatch):
    """Capture mode where no CUDA graph can be captured (here: no GPU): the bucket's first two
    steps run the static step eagerly, the capture at its third fails with one warning that says
    why, and the rollout continues with the ordinary step and gives its tokens. Mode on raises."""
    prompts = _prompts(tiny, (8, 5))
    params = SamplingParams(max_new_tokens=7, temperature=0, stop_token_ids=[])
    want, _ = _run(tiny, prompts, params, 2, cuda_graphs="off", decode_backend="torch")
    got, stats, msgs = _run_with_a_failing_capture(tiny, monkeypatch, prompts, params, 2)
    _same(got, want)
    assert stats.graph_steps == 2 and stats.graph_captures == 0 and stats.steps == 7
    assert len(msgs) == 1 and "batch 4" in msgs[0], msgs
    monkeypatch.setattr("engine.rollout.engine.graphs_mode", lambda *a: "on")
    with pytest.raises(RuntimeError, match="cuda_graphs=on: capture failed"):
        _run(tiny, prompts, params, 2)


def _fake_capture(monkeypatch, replay_offset=0.0):
    """Capture mode on any device: the CUDA stream calls do nothing, and `_record` returns a stand-in
    graph whose replay runs the captured step (its own batch and prefix-program buckets) on the
    buffers as they are then, which is what a faithful replay computes, plus `replay_offset` on
    the logits (a replay that went wrong). -> [(captured key, the step's key)] of every replay."""
    import contextlib

    from engine.rollout.graphs import _items_bucket

    class Stream:
        def __init__(self, *args):
            pass

        def wait_stream(self, other):
            pass
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr("engine.rollout.engine.graphs_mode", lambda *args: "capture")
    replays = []

    def record(graphs, b, ni):
        class Graph:
            def replay(self):
                replays.append(((b, ni), (b, _items_bucket(graphs.last_items, b))))
                graphs._forward(b, ni)
                graphs.logits[:b] += replay_offset
        return Graph()
    monkeypatch.setattr(DecodeGraphs, "_record", record)
    return replays


def test_each_graph_replays_only_for_its_own_buckets(tiny, monkeypatch):
    """Five prompts × 3 samples (batch bucket 16, 5 prefix programs → bucket 8); the first prompt's
    samples stop at their 7th token, and the other 12 go on to their 10th in bucket 16 with 4 programs: that step
    needs a graph of its own, not the one captured for 8 programs. Every replay is of the step's own
    (batch, prefix-program) buckets, and the tokens are the ordinary step's."""
    prompts = _prompts(tiny, (13, 6, 9, 7, 11))
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[138])  # 3 steps after the 7th
    want, _ = _run(tiny, prompts, params, 3, cuda_graphs="off", decode_backend="torch")
    assert [len(group[0][0]) for group in want] == [7, 10, 10, 10, 10]  # the workload the test is about
    replays = _fake_capture(monkeypatch)
    # without lookahead: with it the stopped samples decode one step more (dropped), and the 12 reach
    # bucket (16, 4) a step later, too late for a capture
    got, stats = _run(tiny, prompts, params, 3, lookahead="off")
    _same(got, want)
    assert {captured for captured, _ in replays} == {(16, 8), (16, 4)}
    assert all(captured == step for captured, step in replays), replays
    assert stats.graph_captures == 2


def test_a_replay_that_differs_from_the_eager_step_turns_graphs_off(tiny, monkeypatch):
    """The capture replays its graph once and compares the logits with the eager step's: a replay
    that differs turns graphs off for the rollout with one warning saying by how much (mode on
    raises), and the rollout's tokens are the ordinary step's."""
    prompts = _prompts(tiny, (8, 5))
    params = SamplingParams(max_new_tokens=7, temperature=0, stop_token_ids=[])
    want, _ = _run(tiny, prompts, params, 2, cuda_graphs="off", decode_backend="torch")
    _fake_capture(monkeypatch, replay_offset=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, stats = _run(tiny, prompts, params, 2)
    _same(got, want)
    assert stats.graph_captures == 0
    msgs = [str(w.message) for w in caught if "CUDA graphs off" in str(w.message)]
    assert len(msgs) == 1 and "differ from the eager step's by up to 0.5" in msgs[0], msgs
    monkeypatch.setattr("engine.rollout.engine.graphs_mode", lambda *args: "on")
    with pytest.raises(RuntimeError, match="capture failed"):
        _run(tiny, prompts, params, 2)


def test_modes_and_buckets(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("LONGRL_CUDA_GRAPHS", raising=False)
    monkeypatch.delenv("LONGRL_PAGED_BACKEND", raising=False)
    assert graphs_mode(cpu, "auto", "auto") == "off"  # torch backend on CPU
    assert graphs_mode(cpu, "auto", "triton") == "off"  # no capture without a GPU
    assert graphs_mode(cuda, "auto", "auto") == "capture"
    assert graphs_mode(cuda, "on", "auto") == "on"
    assert graphs_mode(cuda, "auto", "torch") == "off"
    assert graphs_mode(cpu, "eager", "triton") == "eager"
    assert graphs_mode(cuda, "off", "auto") == "off"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        graphs_mode(cpu, "on", "triton")
    with pytest.raises(ValueError, match="Triton decode kernels"):
        graphs_mode(cpu, "eager", "auto")
    monkeypatch.setenv("LONGRL_CUDA_GRAPHS", "off")
    assert graphs_mode(cuda, "on", "auto") == "off"
    monkeypatch.setenv("LONGRL_CUDA_GRAPHS", "sometimes")
    with pytest.raises(ValueError, match="cuda_graphs must be one of"):
        graphs_mode(cuda, "auto", "auto")
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        CacheConfig(cuda_graphs="yes")
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 17, 63, 64, 65, 200, 257, 300)] == \
        [1, 2, 4, 8, 8, 16, 24, 64, 64, 80, 208, 288, 320]
    assert all(batch_bucket(n) >= n for n in range(1, 600))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_graphs_give_the_eager_tokens_on_cuda(tiny):
    model = tiny
    prompts = _prompts(tiny)
    params = [SamplingParams(max_new_tokens=k, temperature=t, top_p=0.9, seed=3, stop_token_ids=[])
              for k, t in ((3, 1.0), (6, 0.0), (9, 1.0))]
    params = [dataclasses.replace(p, max_new_tokens=3 * p.max_new_tokens) for p in params]
    for share in (True, False):
        want, _ = _run(model, prompts, params, 3, share_prefix=share, cuda_graphs="off")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback would warn
            got, stats = _run(model, prompts, params, 3, share_prefix=share, cuda_graphs="on")
        # 9 samples for 8 steps, 6 for 9, 3 for 9: each bucket captured at its third step, then replayed
        # with new inputs (the static buffers reused) 5, 6 and 6 times
        assert stats.graph_steps == stats.steps - 1 and stats.graph_captures == 3 and stats.graph_replays == 17
        _same(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_steady_lookahead_steps_never_wait_for_the_device(tiny, monkeypatch):
    """On a GPU, once a bucket's graph is captured, a lookahead step returns while the step it
    launched is still running: with a 15-20-ms spin kernel queued ahead of each graph step, that
    step's token copies have not landed when _step returns. And no such step blocks on the device
    anywhere (torch.cuda.set_sync_debug_mode("error"): a blocking copy to or from pageable memory,
    .item(), a stream or device synchronize raise; the host reads tokens from pinned copies after
    an event, which that mode allows). The completions are those of reading every step first."""
    from engine.rollout.engine import Generator as Gen

    real_graph_step, real_step = DecodeGraphs.step, Gen._step
    running = []  # per steady lookahead step: whether the step it launched was still running at its return

    def slow_graph_step(self, seqs, tables, feed=None):
        torch.cuda._sleep(30_000_000)  # 15-20 ms of device time ahead of the step's own kernels
        return real_graph_step(self, seqs, tables, feed)

    def step(self, sched, cache, blocks, results, graphs=None):
        # steady: a graph captured (the batch never changes here: one bucket, so the step replays it) and
        # the last step's tokens in flight
        steady = (self._flight is not None and graphs is not None and bool(graphs.graphs)
                  and self._may_look_ahead(sched, blocks, graphs))
        replays = graphs.replays if graphs is not None else 0
        torch.cuda.set_sync_debug_mode("error" if steady else "default")
        try:
            real_step(self, sched, cache, blocks, results, graphs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if steady:
            assert graphs.replays == replays + 1, "a steady step that did not replay its graph"
            running.append(self._flight is not None and not self._flight.ready.query())

    for name in ("LONGRL_SAMPLER", "LONGRL_LOOKAHEAD", "LONGRL_CUDA_GRAPHS", "LONGRL_PAGED_BACKEND"):
        monkeypatch.delenv(name, raising=False)  # the GPU's defaults: the Triton sampler, no host sync
    monkeypatch.setattr(DecodeGraphs, "step", slow_graph_step)
    monkeypatch.setattr(Gen, "_step", step)
    prompts = _prompts(tiny)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3, stop_token_ids=[])
    want, _ = _run(tiny, prompts, params, 3, cuda_graphs="on", lookahead="off")
    got, stats = _run(tiny, prompts, params, 3, cuda_graphs="on", lookahead="on")
    _same(got, want)
    assert stats.lookahead_steps > 0 and len(running) >= 5 and all(running), running


def test_host_step_case_times_the_graph_steps_host_work():
    """bench/host_step_case.py: the engine's decode path with the model's step and the sampler
    stubbed; every decode step went through the graph step's buffers (checked inside)."""
    from bench.host_step_case import measure

    r = measure(groups=2, n=3, prompt_len=20, new=5, block_size=16, rounds=2)
    assert r["batch"] == 6 and len(r["rounds_ms"]) == 2 and r["host_ms_per_step"] > 0


def test_the_fused_graph_step_launches_fewer_kernels():
    """bench/launch_count.py on one layer: with the fused kernels each norm (the residual add with
    it), the rotation with the K/V write and silu * up are one launch each, and none of torch's ops
    for them is left; torch's path has the rotation's negations and the cache's index_puts; the
    projections stacked by fuse_projections are two products where torch's path runs five. The
    counter sees casts that copy (`to` under inference mode) and not views."""
    from bench.launch_count import measure

    r = measure(layers=1, groups=1, n=2)
    fused, plain = r["fused"]["by_name"], r["torch"]["by_name"]
    assert (fused["_rms_norm_kernel"], fused["_rope_store_kernel"], fused["_silu_mul_kernel"]) == (3, 1, 1)
    gone = {"aten.neg", "aten.index_put_", "aten.pow", "aten.mean", "aten.rsqrt", "aten.silu", "aten.add"}
    assert not gone & fused.keys() and gone <= plain.keys()
    assert (plain["aten.index_put_"], plain["aten.neg"], plain["aten.rsqrt"]) == (2, 2, 3)
    # 7 projections and the lm_head; stacked (fuse_projections): q / k / v and gate / up one product each
    assert (fused["aten.linear"], plain["aten.linear"]) == (5, 8)
    assert plain["aten.to"] > fused["aten.to"] > 0 and "aten.view" not in plain and "aten.t" not in plain
    assert r["saved"] == r["torch"]["launches"] - r["fused"]["launches"] >= 30


def test_lookahead_gives_the_same_completions(tiny, monkeypatch):
    """Decode steps launched before the last step's tokens are read (their input tokens copied from
    the sampler's output on the device): the completions of reading every step first, token for
    token, with samples stopping early (stop tokens: their next row, already launched, is dropped),
    at their token limit, sampled and greedy. Then with a cache small enough to preempt (preempted
    samples wait to be prefilled again): those steps read first, and the completions are the same."""
    prompts = _prompts(tiny, (13, 6, 9))
    stops = list(range(0, tiny.config.vocab_size, 6))  # a sixth of the vocabulary: some samples stop early
    params = [SamplingParams(max_new_tokens=k, temperature=t, top_p=0.9, seed=3, stop_token_ids=stops)
              for k, t in ((5, 1.0), (8, 0.0), (9, 1.0))]
    want, plain = _run(tiny, prompts, params, 3, cuda_graphs="eager", lookahead="off")
    dropped = []  # every finished sample gives its block-table row back
    real_drop = DecodeTables.drop
    monkeypatch.setattr(DecodeTables, "drop", lambda self, seq: dropped.append(seq) or real_drop(self, seq))
    got, stats = _run(tiny, prompts, params, 3, cuda_graphs="eager", lookahead="on")
    _same(got, want)
    assert len(set(dropped)) == len(dropped) == 9
    assert plain.lookahead_steps == 0 and stats.lookahead_steps > 0 and stats.wasted_rows > 0
    # a row is wasted only after a stop token (a sample at its token limit is not scheduled again)
    assert stats.wasted_rows <= sum(r == "stop" for group in got for _, _, r in group)
    assert stats.generated_tokens == plain.generated_tokens
    assert {r for group in got for _, _, r in group} == {"stop", "length"}
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=4, stop_token_ids=stops[::2])
    prompts = _prompts(tiny, (10, 7))
    want, plain = _run(tiny, prompts, params, 3, cuda_graphs="eager", lookahead="off", num_blocks=14)
    got, stats = _run(tiny, prompts, params, 3, cuda_graphs="eager", lookahead="on", num_blocks=14)
    _same(got, want)
    assert plain.preemptions > 0 and stats.preemptions == plain.preemptions and stats.lookahead_steps > 0


class _Letters:
    """A stand-in tokenizer for stop strings: token t reads as the letter chr(97 + t % 26). A negative
    id (a token launched but not read yet, engine.PENDING) is refused: a stop string is looked for
    in tokens that have been read only."""

    def decode(self, ids, skip_special_tokens=False):
        assert all(t >= 0 for t in ids), f"decoded a token not read yet: {ids}"
        return "".join(chr(97 + t % 26) for t in ids)


def test_lookahead_with_stop_strings(tiny):
    """Stop strings under lookahead: the completions of reading every step first (ending on the
    token that completes a string), with the text decoded from read tokens only."""
    prompts = _prompts(tiny, (13, 6, 9))
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=5, stop=["q", "ee", "xy"], stop_token_ids=[])
    want, plain = _run(tiny, prompts, params, 2, _Letters(), cuda_graphs="eager", lookahead="off")
    got, stats = _run(tiny, prompts, params, 2, _Letters(), cuda_graphs="eager", lookahead="on")
    _same(got, want)
    reasons = [r for group in got for _, _, r in group]
    assert "stop" in reasons and "length" in reasons, reasons
    for group in got:  # a stopped sample ends on the token that completed its string
        for tokens, _, reason in group:
            text = _Letters().decode(tokens)
            assert (reason == "stop") == any(x in text for x in params.stop)
            if reason == "stop":
                assert not any(x in text[:-1] for x in params.stop)
    assert stats.lookahead_steps > 0 and stats.wasted_rows > 0 and plain.lookahead_steps == 0


def test_lookahead_setting(monkeypatch):
    from engine.rollout.engine import lookahead_on

    monkeypatch.delenv("LONGRL_LOOKAHEAD", raising=False)
    assert lookahead_on("capture", "auto") and lookahead_on("on", "auto")
    assert not lookahead_on("eager", "auto") and not lookahead_on("off", "auto")
    assert lookahead_on("eager", "on") and not lookahead_on("capture", "off")
    assert not lookahead_on("off", "on")  # no graph step, nothing to launch ahead
    monkeypatch.setenv("LONGRL_LOOKAHEAD", "off")
    assert not lookahead_on("capture", "auto")
    monkeypatch.setenv("LONGRL_LOOKAHEAD", "sometimes")
    with pytest.raises(ValueError, match="lookahead must be auto, on or off"):
        lookahead_on("capture", "auto")
    with pytest.raises(ValueError, match="lookahead must be auto, on or off"):
        CacheConfig(lookahead="yes")


def test_lookahead_only_before_a_plain_decode_step():
    """A step goes ahead of the host only when the next one cannot prefill or preempt: nothing
    waiting, a free block for every running sequence, graphs on and a bucket for them all."""
    from types import SimpleNamespace as NS

    from engine.rollout.engine import Generator

    may = Generator._may_look_ahead
    graphs = NS(disabled=None, max_batch=8)
    ok = (NS(waiting=[], running=[1, 2, 3]), NS(num_free=3), graphs)
    assert may(None, *ok)
    assert not may(None, NS(waiting=[4], running=[1, 2, 3]), NS(num_free=9), graphs)  # a prefill may come
    assert not may(None, ok[0], NS(num_free=2), graphs)  # a preemption may come
    assert not may(None, ok[0], ok[1], NS(disabled="capture failed", max_batch=8))
    assert not may(None, NS(waiting=[], running=list(range(9))), NS(num_free=9), graphs)  # no bucket
    assert not may(None, ok[0], ok[1], None) and not may(None, NS(waiting=[], running=[]), ok[1], graphs)


def test_lookahead_through_replays_and_a_failed_capture(tiny, monkeypatch):
    """Lookahead (auto: on in capture mode) with stop tokens, through captured (stand-in) replays:
    the ordinary step's completions. Where the capture fails at a bucket's third step (no GPU),
    the step in flight is read first, the samples it stopped leave the batch, and the ordinary
    step goes on: the same completions."""
    prompts = _prompts(tiny, (13, 6, 9))
    stops = list(range(0, tiny.config.vocab_size, 5))
    params = SamplingParams(max_new_tokens=9, temperature=1.0, seed=2, stop_token_ids=stops)
    want, _ = _run(tiny, prompts, params, 3, cuda_graphs="off", decode_backend="torch")
    with monkeypatch.context() as patched:
        replays = _fake_capture(patched)
        got, stats = _run(tiny, prompts, params, 3)
    _same(got, want)
    assert replays and stats.lookahead_steps > 0 and stats.wasted_rows > 0
    got, stats, msgs = _run_with_a_failing_capture(tiny, monkeypatch, prompts, params, 3)
    _same(got, want)
    assert stats.graph_captures == 0 and stats.lookahead_steps > 0 and msgs
