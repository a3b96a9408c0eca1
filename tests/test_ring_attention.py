"""Ring attention over W gloo ranks (zigzag layout) equals single-process causal attention:
outputs and the gradients of q, k and v, for W = 2 and 4, packed sequences of uneven lengths
(padded at their ends to multiples of 2W), GQA, fp32 and fp64."""
from __future__ import annotations

import pytest
import torch
from dist_helpers import run_ranks

from kernels.attention_block import attention_block
from kernels.ring_attention import zigzag_indices


def padded(lengths, world):
    return [-(-n // (2 * world)) * (2 * world) for n in lengths]


def _case(world, lengths, hq, hkv, d, dtype, seed):
    """Global inputs (the same on every rank), the real rows, and the fp64 reference."""
    g = torch.Generator().manual_seed(seed)
    seqlens = padded(lengths, world)
    t = sum(seqlens)
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    dout = torch.randn(t, hq, d, generator=g, dtype=torch.float64)
    real = torch.cat([torch.arange(s0, s0 + n) for s0, n in zip([0, *torch.tensor(seqlens).cumsum(0)[:-1].tolist()],
                                                                   lengths)])
    mask = torch.zeros(t, dtype=torch.bool)
    mask[real] = True
    dout[~mask] = 0  # padding never reaches a loss
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    outs, a = [], 0
    for n in seqlens:  # one causal call per sequence
        outs.append(attention_block(qr[a:a + n], kr[a:a + n], vr[a:a + n], causal=True)[0])
        a += n
    ref = torch.cat(outs)
    (ref * dout).sum().backward()
    return seqlens, [x.to(dtype) for x in (q, k, v, dout)], mask, (ref.detach(), qr.grad, kr.grad, vr.grad)


CASES = [([5, 13, 2], 6, 2, 8, torch.float32), ([16, 7], 4, 4, 8, torch.float64), ([9, 30, 1, 12], 8, 2, 16,
                                                                                   torch.float32)]


def _rank_checks(rank, world):
    from kernels.ring_attention import ring_attention
    worst = 0.0
    for seed, (lengths, hq, hkv, d, dtype) in enumerate(CASES):
        seqlens, (q, k, v, dout), mask, ref = _case(world, lengths, hq, hkv, d, dtype, seed)
        idx = zigzag_indices(seqlens, world, rank)
        ql, kl, vl = (x[idx].clone().requires_grad_() for x in (q, k, v))
        out = ring_attention(ql, kl, vl, seqlens)
        (out * dout[idx]).sum().backward()
        real = mask[idx]
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        for name, got, want in zip(("out", "dq", "dk", "dv"), (out, ql.grad, kl.grad, vl.grad), ref):
            g_, w_ = got.detach().double()[real], want[idx][real]
            err = float((g_ - w_).abs().max() / w_.abs().max().clamp(min=1e-30))
            assert err <= tol, f"rank {rank}/{world} case {seed} {name}: relative error {err:.2e} > {tol:.0e}"
            worst = max(worst, err)
    return worst


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_equals_one_process(world):
    worst = run_ranks(_rank_checks, world, timeout=180)
    assert all(w <= 1e-5 for w in worst)


def test_zigzag_indices_cover_each_token_once_and_balance_the_work():
    seqlens, world = [8, 16, 4], 2
    parts = [zigzag_indices(seqlens, world, r) for r in range(world)]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(28))
    # rank 0 holds chunks 0 and 3 of each sequence, rank 1 chunks 1 and 2
    assert parts[0][:4].tolist() == [0, 1, 6, 7] and parts[1][:4].tolist() == [2, 3, 4, 5]
    # causal work (Σ over held tokens of their position + 1) is equal across ranks
    starts = [0, 8, 24]
    work = []
    for p in parts:
        pos = torch.cat([p[(p >= s) & (p < s + n)] - s for s, n in zip(starts, seqlens)])
        work.append(int((pos + 1).sum()))
    assert work[0] == work[1]
    with pytest.raises(ValueError, match="sequence 1 has 6 tokens; every sequence must be a positive multiple of"):
        zigzag_indices([8, 6], 2, 0)


def _one_rank_hangs(rank, world):
    import time

    import torch.distributed as dist
    if rank == 1:
        time.sleep(60)
    dist.barrier()


def _one_rank_fails(rank, world):
    if rank == 1:
        raise ValueError("planted failure on rank 1")
    return rank


def test_the_harness_reports_hangs_and_failures_and_leaves_no_process():
    import multiprocessing

    with pytest.raises(TimeoutError, match="within 6 s"):
        run_ranks(_one_rank_hangs, 2, timeout=6)
    with pytest.raises(AssertionError, match="planted failure on rank 1"):
        run_ranks(_one_rank_fails, 2, timeout=60)
    with pytest.raises(AssertionError, match="cannot pickle"):  # said at once, not a timeout
        run_ranks(_unpicklable_result, 1, timeout=60)
    assert not multiprocessing.active_children()


def _unpicklable_result(rank, world):
    import threading
    return threading.Lock()


# ---- shared-prefix group rows over the ring -------------------------------------------------
def _group_rank(rank, world):
    """Two group rows [P | R1 … RG] sharded as sequences: the ring with segment ids equals
    attention under the group mask (prompt causal; a response sees the prompt and its own
    earlier tokens), values and gradients."""
    import math

    from kernels.ring_attention import ring_attention
    rows = [(5, [4, 3, 6]), (3, [2, 7])]  # (prompt length, response lengths)
    lengths = [p + sum(r) for p, r in rows]
    seqlens = padded(lengths, world)
    seg_parts, mask_parts = [], []
    for (p, resp), n, npad in zip(rows, lengths, seqlens):
        seg = torch.tensor([0] * p + [i + 1 for i, r in enumerate(resp) for _ in range(r)] + [-1] * (npad - n))
        seg_parts.append(seg)
        causal = torch.arange(npad)[None, :] <= torch.arange(npad)[:, None]
        mask_parts.append(causal & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None])))
    segments = torch.cat(seg_parts)
    t = sum(seqlens)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(t, h, 8, generator=g, dtype=torch.float64) for h in (6, 2, 2))
    dout = torch.randn(t, 6, 8, generator=g, dtype=torch.float64)
    # reference: plain attention under the block-diagonal group mask
    full = torch.block_diag(*mask_parts)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    s = torch.einsum("qhd,khd->hqk", qr, kr.repeat_interleave(3, 1)) / math.sqrt(8)
    ref = torch.einsum("hqk,khd->qhd", torch.softmax(s.masked_fill(~full, -math.inf), -1), vr.repeat_interleave(3, 1))
    (ref * dout).sum().backward()
    idx = zigzag_indices(seqlens, world, rank)
    ql, kl, vl = (x[idx].clone().requires_grad_() for x in (q, k, v))
    out = ring_attention(ql, kl, vl, seqlens, segments=segments)
    (out * dout[idx]).sum().backward()
    for name, got, want in (("out", out, ref), ("dq", ql.grad, qr.grad), ("dk", kl.grad, kr.grad),
                            ("dv", vl.grad, vr.grad)):
        err = float((got.detach() - want.detach()[idx]).abs().max())
        assert err < 1e-10, f"rank {rank}/{world} {name}: max error {err:.2e}"
    return 0


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_over_shared_prefix_group_rows(world):
    run_ranks(_group_rank, world, timeout=180)
