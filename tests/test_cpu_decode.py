"""The CPU decode step's own paths: weight-major linear layers and the host allocator settings."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from engine.model.config import DecoderConfig
from engine.model.model import MLP, WEIGHT_MAJOR_CHUNK, WEIGHT_MAJOR_ROWS, linear, weight_major


@pytest.mark.parametrize("rows", [1, 7, 64, WEIGHT_MAJOR_ROWS])
@pytest.mark.parametrize("out_features", [5, 192, WEIGHT_MAJOR_CHUNK, 2 * WEIGHT_MAJOR_CHUNK + 37])
@pytest.mark.parametrize("bias", [False, True])
def test_weight_major_linear_equals_f_linear(rows, out_features, bias):
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, 48, generator=g)
    w = torch.randn(out_features, 48, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    with torch.inference_mode():
        assert weight_major(x, w)
        got = linear(x, w, b)
    assert got.shape == (rows, out_features) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_weight_major_only_for_cpu_fp32_inference_with_few_rows():
    w = torch.randn(16, 8)
    few, many = torch.randn(4, 8), torch.randn(WEIGHT_MAJOR_ROWS + 1, 8)
    assert not weight_major(few, w)  # autograd on: the plain product (training keeps F.linear)
    with torch.no_grad():
        assert not weight_major(few, w)  # the trainer's old / reference log-probs: as its update's forward
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not weight_major(few, w)
    with torch.inference_mode():
        assert weight_major(few, w)
        assert not weight_major(many, w)  # prefill chunks: F.linear
        assert not weight_major(few.bfloat16(), w.bfloat16())
        assert not weight_major(few[None], w)  # 3-D input
    x = torch.randn(3, 8, requires_grad=True)
    y = linear(x, w)
    y.sum().backward()  # the training path still differentiates
    torch.testing.assert_close(x.grad, w.sum(0).expand(3, 8))


def test_mlp_weight_major_path_equals_plain_path():
    cfg = DecoderConfig("llama", vocab_size=64, hidden_size=40, intermediate_size=3 * WEIGHT_MAJOR_CHUNK // 2 + 5,
                        num_layers=1, num_heads=4, num_kv_heads=2, head_dim=10, rms_norm_eps=1e-6,
                        max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    mlp = MLP(cfg)
    x = torch.randn(64, 40)
    with torch.no_grad():
        reference = F.linear(F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight),
                             mlp.down_proj.weight)
    with torch.inference_mode():
        assert weight_major(x, mlp.gate_proj.weight)
        got = mlp(x)
    assert got.is_contiguous()
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from engine.rollout import hostmem
    print(hostmem.tune())
    def step():  # a sampler's temporaries: six fp32 [64, 49152] and one int64, alive together, then freed
        bufs = [torch.empty(64, 49152).fill_(1.0) for _ in range(6)]
        bufs.append(torch.empty(64, 49152, dtype=torch.int64).fill_(1))
        del bufs
    for _ in range(5):  # the heap settles (in the first rounds a buffer may still land on fresh pages)
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _glibc() -> bool:
    from engine.rollout import hostmem
    return hostmem._libc() is not None


@pytest.mark.skipif(not _glibc(), reason="mallopt: glibc only")
def test_host_allocator_keeps_freed_buffers_without_page_faults():
    """Tuned, later rounds of the same allocations fault (almost) no page in. Untuned, glibc
    usually trims its heap after each round (past twice the largest freed block) and the next
    round faults its ~24K pages in again; not always (where other allocations sit at the heap's
    top it cannot), so only the tuned side is asserted. LONGRL_HOST_MALLOC=default opts out."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("LONGRL_HOST_MALLOC", None)
    pages = (6 * 4 + 8) * 64 * 49152 // 4096 * 10  # bytes per round / page size x rounds
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    tuned, faults = out.stdout.split()
    assert tuned == "True"
    assert int(faults) < pages * 0.1, f"{faults} minor faults for {pages} pages written"
    out = subprocess.run([sys.executable, "-c", _FAULTS], env={**env, "LONGRL_HOST_MALLOC": "default"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "False"  # opted out: mallopt not called


# ---- decode block tables kept on the device ---------------------------------------------------
class _Seq:
    def __init__(self):
        self.table: list[int] = []
        self.resets = 0


def _expect(tables: torch.Tensor, seqs: list[_Seq]) -> None:
    for i, s in enumerate(seqs):
        assert tables[i, :len(s.table)].tolist() == s.table, f"row of batch entry {i}"


def test_decode_tables_follow_appends_copy_on_write_resets_and_drops():
    """A random run of what the block manager and scheduler do to tables between decode steps:
    each step's gathered rows equal the tables, and only changed entries are written."""
    from engine.rollout.paged import DecodeTables

    rng = torch.Generator().manual_seed(0)
    dt = DecodeTables("cpu", rows=2, width=2)  # small: rows and width must grow
    live = [_Seq() for _ in range(5)]
    for s in live:
        s.table = list(range(100 * len(live), 100 * len(live) + 3))
    next_block = 10_000
    _expect(dt.gather(live), live)  # first sight: every entry written
    assert dt.entries_written == 15
    for step in range(60):
        changed = 0
        for s in live:
            r = int(torch.randint(0, 10, (1,), generator=rng))
            if r < 4:  # a new block
                s.table.append(next_block)
                changed += 1
            elif r == 4 and s.table:  # copy-on-write of the last block
                s.table[-1] = next_block
                changed += 1
            elif r == 5:  # preempted and prefilled again: new blocks, maybe fewer
                s.table[:] = list(range(next_block + 1, next_block + 1 + int(torch.randint(1, 6, (1,), generator=rng))))
                s.resets += 1
                changed += len(s.table)
            next_block += 10
        if step % 7 == 3:  # one finishes, a new one starts
            dt.drop(live.pop(0))
            fresh = _Seq()
            fresh.table = [next_block, next_block + 1]
            next_block += 10
            live.append(fresh)
            changed += 2
        order = torch.randperm(len(live), generator=rng).tolist()  # any batch order
        batch = [live[i] for i in order]
        before = dt.entries_written
        _expect(dt.gather(batch), batch)
        if step % 7 != 3:
            assert dt.entries_written - before == changed, f"step {step}: wrote more than what changed"
    assert len(dt.row_of) == len(live) and dt.table.shape[0] <= 8  # dropped rows are reused


def test_engine_decodes_through_device_tables(tiny_checkpoint):
    """Greedy generation with the engine's device tables equals generation with tables built
    from the lists every step, preemption included."""
    from engine.model import load_model
    from engine.rollout import CacheConfig, Generator, SamplingParams
    from engine.rollout import paged

    path, _ = tiny_checkpoint("qwen2")
    model, _ = load_model(path, device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 331, (n,), generator=g).tolist() for n in (9, 14, 6)]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    tight = CacheConfig(block_size=4, num_blocks=12)  # forces preemption
    gen = Generator(model, cache_cfg=tight)
    out = gen.generate(prompts, n=2, params=params)
    assert gen.stats.preemptions > 0
    real = paged.DecodeTables.gather
    try:
        paged.DecodeTables.gather = lambda self, seqs: paged._block_table([s.table for s in seqs], torch.int32)
        ref = Generator(model, cache_cfg=tight).generate(prompts, n=2, params=params)
    finally:
        paged.DecodeTables.gather = real
    assert [[c.token_ids for c in group] for group in out] == [[c.token_ids for c in group] for group in ref]


def test_every_decode_row_is_given_back(tiny_checkpoint, monkeypatch):
    """Finished samples drop their rows; a group's prompt whose last prefill chunk is one token
    never takes one (the scheduler calls that step prefill, and its token counts as a prompt's)."""
    from engine.model import load_model
    from engine.rollout import CacheConfig, Generator, SamplingParams
    from engine.rollout import paged

    made = []
    real_init = paged.DecodeTables.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)
    monkeypatch.setattr(paged.DecodeTables, "__init__", init)
    path, _ = tiny_checkpoint("llama")
    model, _ = load_model(path, device="cpu", dtype="float32")
    gen = Generator(model, cache_cfg=CacheConfig(block_size=4, max_prefill_tokens=8))
    gen.generate([list(range(3, 12))], n=3,  # 9 tokens: chunks of 8 and 1
                 params=SamplingParams(max_new_tokens=5, temperature=1.0, seed=0, ignore_eos=True))
    assert len(made) == 1 and made[0].entries_written > 0
    assert made[0].row_of == {}, "rows still held after the rollout"
    assert gen.stats.prompt_tokens == 9
