"""attention_block and merge against plain fp64 attention over the concatenated keys with an
explicit mask: values, lse and gradients (q, k, v), causal and not, GQA, any q_offset (rows that
see no key included), merged blocks, gradcheck through out and lse, chunking, what is saved."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from kernels import attention_block, merge

ab = importlib.import_module("kernels.attention_block")  # the module (the package attribute is the function)

HEADS = [(4, 4), (6, 2), (8, 2)]  # (Hq, Hkv): GQA ratios 1, 3, 4
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


# ---- reference -----------------------------------------------------------------------------
def visible_mask(tq: int, tk: int, causal: bool, q_offset: int = 0) -> torch.Tensor:
    """[Tq, Tk] bool: query i sees key j iff j <= q_offset + i (causal), else every key."""
    if not causal:
        return torch.ones(tq, tk, dtype=torch.bool)
    return torch.arange(tk)[None, :] <= torch.arange(tq)[:, None] + q_offset


def reference(q, k, v, visible, scale=None):
    """Plain fp64 attention with mask visible [Tq, Tk] -> (out [Tq, Hq, D], lse [Tq, Hq]).
    Rows that see nothing: out 0, lse −inf; differentiable without NaN (masked before exp)."""
    q, k, v = q.double(), k.double(), v.double()
    hq, d = q.shape[1], q.shape[2]
    g = hq // k.shape[1]
    kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # head h -> kv head h // g
    s = torch.einsum("qhd,khd->hqk", q, kk) * (d ** -0.5 if scale is None else scale)
    mask = visible[None]
    m = s.masked_fill(~mask, -math.inf).amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.exp(torch.where(mask, s, m) - m) * mask
    total = e.sum(-1, keepdim=True)
    live = total > 0
    safe = torch.where(live, total, 1.0)
    out = torch.einsum("hqk,khd->qhd", e / safe, vv)
    lse = torch.where(live, m + torch.log(safe), -math.inf).squeeze(-1).transpose(0, 1)
    return out, lse


def make(tq, tk, hq, hkv, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(tk, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(tk, hkv, d, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype).requires_grad_() for t in (q, k, v))


def weights_for(out, lse, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out.shape, generator=g, dtype=torch.float64),
            torch.randn(lse.shape, generator=g, dtype=torch.float64))


def loss_of(out, lse, go, gl):
    """A loss through out and lse (so dlse is exercised); −inf entries of lse contribute nothing."""
    finite = torch.where(torch.isfinite(lse), lse.double(), 0.0)
    return (out.double() * go).sum() + (finite * gl).sum()


def grads(out, lse, inputs, go, gl):
    return torch.autograd.grad(loss_of(out, lse, go, gl), inputs)


def assert_lse_close(lse, ref, **tol):
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), "lse is −inf on different rows"
    finite = torch.isfinite(ref)
    assert torch.isfinite(lse[finite]).all()
    torch.testing.assert_close(lse[finite].double(), ref[finite].double(), **tol)


def assert_close(a, b, **tol):
    torch.testing.assert_close(a.double(), b.double(), **tol)


# ---- 1. one block against the reference ------------------------------------------------------
# (Tq, Tk, causal, q_offset)
SHAPES = [(5, 5, False, 0), (4, 9, False, 0), (7, 3, False, 0),
          (5, 5, True, 0), (4, 9, True, 5), (6, 4, True, 2), (5, 8, True, 1), (7, 5, True, -3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"q{s[0]}k{s[1]}{'c' if s[2] else 'n'}{s[3]}")
def test_block_matches_reference(shape, heads, dtype):
    tq, tk, causal, off = shape
    q, k, v = make(tq, tk, *heads, dtype=dtype)
    out, lse = attention_block(q, k, v, causal=causal, q_offset=off)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lse.shape == (tq, heads[0])
    ref_out, ref_lse = reference(q, k, v, visible_mask(tq, tk, causal, off))
    assert_close(out, ref_out, **TOL[dtype])
    assert_lse_close(lse, ref_lse, **TOL[dtype])
    go, gl = weights_for(out, lse)
    for got, want in zip(grads(out, lse, (q, k, v), go, gl), grads(ref_out, ref_lse, (q, k, v), go, gl)):
        assert got.dtype == dtype
        assert_close(got, want, **TOL[dtype])


def test_rows_that_see_nothing():
    """q_offset = −3: queries 0..2 see no key: out 0, lse −inf, finite gradients and none from them,
    even when the incoming dlse of those rows is nonzero."""
    q, k, v = make(6, 5, 6, 2)
    out, lse = attention_block(q, k, v, causal=True, q_offset=-3)
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))
    assert torch.isneginf(lse[:3]).all() and torch.isfinite(lse[3:]).all()
    assert torch.isfinite(out).all()
    dq, dk, dv = torch.autograd.grad((out, lse), (q, k, v), (torch.ones_like(out), torch.ones_like(lse)))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert torch.equal(dq[:3], torch.zeros_like(dq[:3]))
    # keys 3, 4 are seen by no query (the last query, i = 5, sees j <= 2)
    assert torch.equal(dk[3:], torch.zeros_like(dk[3:])) and torch.equal(dv[3:], torch.zeros_like(dv[3:]))
    # every query sees nothing
    out, lse = attention_block(q, k, v, causal=True, q_offset=-100)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    for g in torch.autograd.grad((out, lse), (q, k, v), (torch.ones_like(out), torch.ones_like(lse))):
        assert torch.equal(g, torch.zeros_like(g))


def test_matches_torch_sdpa_gqa():
    """Independent check of the GQA head mapping and the mask against torch's own attention."""
    q, k, v = make(5, 7, 8, 2)
    out, _ = attention_block(q, k, v, causal=True, q_offset=2)
    mask = visible_mask(5, 7, True, 2)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True).transpose(0, 1)
    assert_close(out, want, **TOL[torch.float32])


def test_scale_and_bf16():
    q, k, v = make(6, 9, 6, 3, dtype=torch.bfloat16)
    out, lse = attention_block(q, k, v, causal=True, q_offset=3, scale=0.2)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref_out, ref_lse = reference(q, k, v, visible_mask(6, 9, True, 3), scale=0.2)
    assert_close(out, ref_out, rtol=2e-2, atol=2e-2)
    assert_lse_close(lse, ref_lse, rtol=1e-5, atol=1e-5)  # bf16 inputs are exact in fp64; fp32 statistics
    go, gl = weights_for(out, lse)
    for got, want in zip(grads(out, lse, (q, k, v), go, gl), grads(ref_out, ref_lse, (q, k, v), go, gl)):
        assert got.dtype == torch.bfloat16
        assert_close(got, want, rtol=3e-2, atol=3e-2)


def test_autocast_leaves_the_block_in_its_own_precision():
    """Under torch.autocast (the trainer's bf16-mixed forward) a block computes exactly what it
    computes outside it: autocast would run its fp32 score products in bf16, and the backward
    (no autocast there) would recompute other probabilities (LSE off by up to 0.06)."""
    q, k, v = make(24, 40, 6, 2, dtype=torch.bfloat16)
    q, k, v = (x.detach().mul(4).requires_grad_() for x in (q, k, v))  # sharp rows: bf16 scores round visibly
    plain = attention_block(q, k, v, causal=True, q_offset=16)
    go, gl = weights_for(*plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = attention_block(q, k, v, causal=True, q_offset=16)
    for a, b in zip(cast, plain):
        assert torch.equal(a, b)
    for a, b in zip(grads(*cast, (q, k, v), go, gl), grads(*plain, (q, k, v), go, gl)):
        assert torch.equal(a, b)
    dout = go.to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ab.attention_block_backward(dout, q, k, v, *plain, causal=True, q_offset=16)
    with torch.no_grad():
        outside = ab.attention_block_backward(dout, q, k, v, *plain, causal=True, q_offset=16)
    for a, b in zip(inside, outside):
        assert torch.equal(a, b)


# ---- 2. merged blocks == one attention over the concatenated keys -----------------------------
def run_blocks(q, k, v, specs, fold="left"):
    """Attention of q over k, v split into blocks specs [(k0, k1, causal, q_offset)], merged."""
    parts = [attention_block(q, k[a:b], v[a:b], causal=c, q_offset=o) for a, b, c, o in specs]
    if fold == "left":
        acc = parts[0]
        for p in parts[1:]:
            acc = merge(*acc, *p)
    else:
        acc = parts[-1]
        for p in reversed(parts[:-1]):
            acc = merge(*p, *acc)
    return acc


def specs_mask(tq, specs):
    return torch.cat([visible_mask(tq, b - a, c, o) for a, b, c, o in specs], dim=1)


TP, TR = 6, 5
BLOCKS = {
    "prefix": [(0, TP, False, 0), (TP, TP + TR, True, 0)],
    "3way": [(0, 3, False, 0), (3, TP, False, 0), (TP, TP + TR, True, 0)],
    "empty-block": [(0, TP, False, 0), (TP, TP + TR, True, -100)],
    "empty-first": [(0, TP, True, -100), (TP, TP + TR, True, 0)],
    "ring-partial": [(0, 4, True, -2), (4, TP + TR, True, -1)],  # query 0 sees nothing in either
    "all-empty": [(0, 3, True, -10), (3, TP + TR, True, -10)],
}


@pytest.mark.parametrize("fold", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_merged_blocks_match_one_attention(name, dtype, fold):
    specs = BLOCKS[name]
    q, k, v = make(TR, TP + TR, 6, 2, dtype=dtype, seed=3)
    out, lse = run_blocks(q, k, v, specs, fold)
    ref_out, ref_lse = reference(q, k, v, specs_mask(TR, specs))
    assert out.dtype == dtype
    assert_close(out, ref_out, **TOL[dtype])
    assert_lse_close(lse, ref_lse, **TOL[dtype])
    go, gl = weights_for(out, lse)
    for got, want in zip(grads(out, lse, (q, k, v), go, gl), grads(ref_out, ref_lse, (q, k, v), go, gl)):
        assert torch.isfinite(got).all()
        assert_close(got, want, **TOL[dtype])


def test_prefix_blocks_equal_one_causal_call():
    """merge(prompt block, own causal block) == one causal call with q_offset = Tp, grads included."""
    q, k, v = make(TR, TP + TR, 8, 2, dtype=torch.float64, seed=4)
    out, lse = run_blocks(q, k, v, BLOCKS["prefix"])
    one_out, one_lse = attention_block(q, k, v, causal=True, q_offset=TP)
    assert_close(out, one_out, **TOL[torch.float64])
    assert_close(lse, one_lse, **TOL[torch.float64])
    go, gl = weights_for(out, lse)
    for got, want in zip(grads(out, lse, (q, k, v), go, gl), grads(one_out, one_lse, (q, k, v), go, gl)):
        assert_close(got, want, **TOL[torch.float64])


def test_packed_grpo_row():
    """One packed row [P | R1 | R2]: each response attends to all of P and causally to itself only."""
    tp, lens, hq, hkv = 7, (4, 6), 6, 3
    t = tp + sum(lens)
    q, k, v = make(t, t, hq, hkv, dtype=torch.float64, seed=5)
    outs, lses, mask = [], [], torch.zeros(t, t, dtype=torch.bool)
    start = tp
    for n in lens:
        r = slice(start, start + n)
        a = attention_block(q[r], k[:tp], v[:tp])
        b = attention_block(q[r], k[r], v[r], causal=True)
        o, l_ = merge(*a, *b)
        outs.append(o)
        lses.append(l_)
        mask[r, :tp] = True
        mask[r, r] = visible_mask(n, n, True)
        start += n
    out, lse = torch.cat(outs), torch.cat(lses)
    ref_out, ref_lse = reference(q, k, v, mask)
    assert_close(out, ref_out[tp:], **TOL[torch.float64])
    assert_close(lse, ref_lse[tp:], **TOL[torch.float64])
    go, gl = weights_for(out, lse)
    for got, want in zip(grads(out, lse, (q, k, v), go, gl), grads(ref_out[tp:], ref_lse[tp:], (q, k, v), go, gl)):
        assert_close(got, want, **TOL[torch.float64])


def test_merge_handles_neg_inf():
    g = torch.Generator().manual_seed(0)
    out_a = torch.randn(4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    out_b = torch.randn(4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    raw_a = torch.randn(4, 3, generator=g, dtype=torch.float64) * 30
    raw_b = torch.randn(4, 3, generator=g, dtype=torch.float64) * 30
    raw_a[0], raw_b[1] = -math.inf, -math.inf  # row 0: only b, row 1: only a
    raw_a[2], raw_b[2] = -math.inf, -math.inf  # row 2: neither
    lse_a, lse_b = raw_a.requires_grad_(), raw_b.requires_grad_()
    out, lse = merge(out_a, lse_a, out_b, lse_b)
    want_lse = torch.logaddexp(raw_a.detach(), raw_b.detach())
    assert_lse_close(lse, want_lse, **TOL[torch.float64])
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.isneginf(lse[2]).all()
    torch.testing.assert_close(out[0], out_b[0].detach())
    torch.testing.assert_close(out[1], out_a[1].detach())
    wa = torch.exp(raw_a[3] - want_lse[3])[:, None]
    torch.testing.assert_close(out[3], out_a[3].detach() * wa + out_b[3].detach() * (1 - wa))
    go, gl = weights_for(out, lse)
    for gr in torch.autograd.grad(loss_of(out, lse, go, gl), (out_a, lse_a, out_b, lse_b)):
        assert torch.isfinite(gr).all()
    # merge keeps out_a's dtype; statistics in fp32
    o32, l32 = merge(out_a.detach().bfloat16(), lse_a.detach().float(), out_b.detach().float(), lse_b.detach().float())
    assert o32.dtype == torch.bfloat16 and l32.dtype == torch.float32


def test_merge_gradcheck():
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in ((3, 2, 4), (3, 2), (3, 2, 4), (3, 2))]
    assert torch.autograd.gradcheck(lambda *a: merge(*a), args)


# ---- 3. gradcheck through out and lse ----------------------------------------------------------
def _finite_lse(fn):
    def wrapped(*a):
        out, lse = fn(*a)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)
    return wrapped


@pytest.mark.parametrize("case", [
    dict(heads=(4, 2), causal=False, q_offset=0),
    dict(heads=(4, 2), causal=True, q_offset=0),
    dict(heads=(3, 1), causal=True, q_offset=1),
    dict(heads=(4, 2), causal=True, q_offset=-1),  # query 0 sees nothing
    dict(heads=(4, 4), causal=True, q_offset=0, chunk_bytes=1),
], ids=["noncausal", "causal", "gqa3-off1", "off-1", "chunked"])
def test_gradcheck_block(case):
    q, k, v = make(3, 4, *case["heads"], d=3, dtype=torch.float64, seed=7)
    kw = dict(causal=case["causal"], q_offset=case["q_offset"], chunk_bytes=case.get("chunk_bytes"))
    assert torch.autograd.gradcheck(_finite_lse(lambda a, b, c: attention_block(a, b, c, **kw)), (q, k, v))


def test_gradcheck_merged_blocks():
    """Gradients through merge flow into each block's lse (the dlse term of the backward)."""
    q, k, v = make(3, 5, 4, 2, d=3, dtype=torch.float64, seed=8)
    specs = [(0, 2, False, 0), (2, 5, True, -1)]
    assert torch.autograd.gradcheck(_finite_lse(lambda a, b, c: run_blocks(a, b, c, specs)), (q, k, v))


# ---- 4. chunking ---------------------------------------------------------------------------------
@pytest.mark.parametrize("causal,off", [(False, 0), (True, 2), (True, -4)])
def test_chunking_matches_one_chunk(monkeypatch, causal, off):
    tq, tk, hq, hkv = 13, 11, 4, 2
    q, k, v = make(tq, tk, hq, hkv, seed=9)
    one = attention_block(q, k, v, causal=causal, q_offset=off)
    go, gl = weights_for(*one)
    want = grads(*one, (q, k, v), go, gl)
    calls = []
    real = ab._scores
    monkeypatch.setattr(ab, "_scores", lambda *a: calls.append(a[5]) or real(*a))  # a[5]: chunk length
    for budget, rows in ((1, 1), (hq * tk * 4 * 3, 3), (hq * tk * 4 * 5 + 7, 5)):
        calls.clear()
        out, lse = attention_block(q, k, v, causal=causal, q_offset=off, chunk_bytes=budget)
        assert calls == [min(rows, tq - s) for s in range(0, tq, rows)], "forward did not chunk as budgeted"
        assert_close(out, one[0], rtol=1e-6, atol=1e-6)
        assert_lse_close(lse, one[1], rtol=1e-6, atol=1e-6)
        for got, w in zip(grads(out, lse, (q, k, v), go, gl), want):
            assert_close(got, w, rtol=1e-6, atol=1e-6)
        assert len(calls) == 2 * math.ceil(tq / rows)  # the backward walks the same chunks


# ---- 5. what the forward saves -------------------------------------------------------------------
def test_saves_no_score_matrix():
    tq, tk, hq, hkv, d = 37, 53, 4, 2, 8
    q, k, v = make(tq, tk, hq, hkv, d=d)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, lse = attention_block(q, k, v, causal=True, q_offset=tk - tq)
    assert sorted(saved) == sorted([(tq, hq, d), (tk, hkv, d), (tk, hkv, d), (tq, hq, d), (tq, hq)]), saved
    assert max(math.prod(s) for s in saved) < tq * tk  # far from [Hq, Tq, Tk]
    (out.sum() + lse.sum()).backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


# ---- 6. bad inputs -------------------------------------------------------------------------------
def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("args,kwargs,match", [
    ((_t(4, 8), _t(5, 2, 8), _t(5, 2, 8)), {}, r"q must be 3-d .*got shape \(4, 8\)"),
    ((_t(4, 4, 8), _t(5, 2, 8), _t(5, 3, 8)), {}, r"k and v must have the same shape.*\(5, 2, 8\) and \(5, 3, 8\)"),
    ((_t(4, 4, 8), _t(5, 2, 6), _t(5, 2, 6)), {}, r"head_dim must equal q's \(8\), got 6"),
    ((_t(4, 6, 8), _t(5, 4, 8), _t(5, 4, 8)), {}, r"q heads \(6\) must be a multiple of k/v heads \(4\)"),
    ((_t(4, 4, 8), _t(5, 2, 8, dtype=torch.float64), _t(5, 2, 8)), {}, r"k must have q's dtype torch.float32"),
    ((_t(4, 4, 8, dtype=torch.int64),) * 3, {}, r"q must be float16, bfloat16, float32 or float64, got torch.int64"),
    ((_t(4, 4, 8), _t(5, 2, 8), _t(5, 2, 8, device="meta")), {}, r"v must be on q's device cpu, got meta"),
    ((_t(4, 4, 8), _t(5, 2, 8), _t(5, 2, 8)), dict(q_offset=1.5), r"q_offset must be an int, got 1.5"),
    ((_t(4, 4, 8), _t(5, 2, 8), _t(5, 2, 8)), dict(causal=1), r"causal must be a bool"),
    ((_t(4, 4, 8), _t(5, 2, 8), _t(5, 2, 8)), dict(chunk_bytes=0), r"chunk_bytes must be a positive int"),
    ((_t(4, 4, 8), _t(5, 2, 8), _t(5, 2, 8)), dict(scale=float("nan")), r"scale must be a finite number"),
    (([1.0], _t(5, 2, 8), _t(5, 2, 8)), {}, r"q must be a torch.Tensor, got list"),
], ids=["q-2d", "kv-shape", "head-dim", "gqa", "dtype-mix", "int", "device", "offset", "causal", "chunk",
        "scale", "not-tensor"])
def test_block_rejects_bad_inputs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention_block(*args, **kwargs)


@pytest.mark.parametrize("args,match", [
    ((_t(4, 2, 8), _t(4, 2), _t(4, 3, 8), _t(4, 2)), r"out_b must have out_a's shape \(4, 2, 8\), got \(4, 3, 8\)"),
    ((_t(4, 2, 8), _t(4, 2, 8), _t(4, 2, 8), _t(4, 2)), r"lse_a must have shape \(4, 2\) .*got \(4, 2, 8\)"),
    ((_t(4, 2, 8), _t(4, 2), _t(4, 2, 8), _t(4, 2, dtype=torch.int32)), r"lse_b must be a floating-point tensor"),
    ((_t(4, 2, 8), _t(4, 2), _t(4, 2, 8), _t(4, 2, device="meta")), r"lse_b must be on out_a's device cpu"),
], ids=["out-shape", "lse-shape", "lse-dtype", "device"])
def test_merge_rejects_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        merge(*args)


def test_empty_keys_and_queries():
    q, k, v = make(3, 0, 4, 2)
    out, lse = attention_block(q, k, v)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    (out.sum()).backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
    q, k, v = make(0, 5, 4, 2)
    out, lse = attention_block(q, k, v, causal=True)
    assert out.shape == (0, 4, 8) and lse.shape == (0, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefix_blocks_on_cuda(dtype):
    """The GPU suite's check: a prompt block merged with a causal block on CUDA, GQA, against
    the fp64 reference on the CPU (values, lse, gradients), fp32 and bf16."""
    tp, tr, hq, hkv, d = 300, 70, 12, 2, 64
    q, k, v = make(tr, tp + tr, hq, hkv, d=d, dtype=torch.float64, seed=9)
    qc, kc, vc = (t.detach().to("cuda", dtype).requires_grad_() for t in (q, k, v))
    a = attention_block(qc, kc[:tp], vc[:tp], chunk_bytes=1 << 16)  # several query chunks
    b = attention_block(qc, kc[tp:], vc[tp:], causal=True)
    out, lse = merge(*a, *b)
    ref_out, ref_lse = reference(q, k, v, visible_mask(tr, tp + tr, True, tp))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    assert_close(out.double().cpu(), ref_out, **tol)
    assert_close(lse.double().cpu(), ref_lse, **tol)
    go, gl = weights_for(ref_out, ref_lse)
    got = grads(out, lse, (qc, kc, vc), go.to("cuda"), gl.to("cuda"))
    for g_, want in zip(got, grads(ref_out, ref_lse, (q, k, v), go, gl)):
        assert_close(g_.double().cpu(), want, **tol)


# ---- the flash backend (aten's flash-attention ops; on the CPU, its CPU kernel) ------------------
FLASH_SHAPES = [(5, 9, False), (4, 11, False), (7, 7, True), (1, 1, True), (6, 3, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}")
@pytest.mark.parametrize("shape", FLASH_SHAPES, ids=lambda s: f"q{s[0]}k{s[1]}{'c' if s[2] else 'n'}")
def test_flash_backend_matches_reference(shape, heads, dtype):
    """Values, lse and the gradients of q, k, v through out AND lse (the LSE gradient rides on
    the padded head-dim columns) equal plain attention, GQA by stacked rows or repeated K/V."""
    tq, tk, causal = shape
    q, k, v = make(tq, tk, *heads, d=16, dtype=dtype, seed=11)
    out, lse = attention_block(q, k, v, causal=causal, backend="flash")
    ref_out, ref_lse = reference(q, k, v, visible_mask(tq, tk, causal))
    assert_close(out, ref_out, **TOL[dtype])
    assert_lse_close(lse, ref_lse, **TOL[dtype])
    go, gl = weights_for(out, lse)
    for got, want in zip(grads(out, lse, (q, k, v), go, gl), grads(ref_out, ref_lse, (q, k, v), go, gl)):
        assert_close(got, want, **TOL[dtype])


def test_flash_blocks_merge_like_one_causal_call():
    """A shared-prefix row's two blocks on the flash backend, merged = one causal call (torch backend)."""
    q, k, v = make(TR, TP + TR, 8, 2, dtype=torch.float64, seed=12)
    a = attention_block(q, k[:TP], v[:TP], backend="flash")
    b = attention_block(q, k[TP:], v[TP:], causal=True, backend="flash")
    out, lse = merge(*a, *b)
    one_out, one_lse = attention_block(q, k, v, causal=True, q_offset=TP, backend="torch")
    assert_close(out, one_out, **TOL[torch.float64])
    go, gl = weights_for(out, lse)
    for got, want in zip(grads(out, lse, (q, k, v), go, gl), grads(one_out, one_lse, (q, k, v), go, gl)):
        assert_close(got, want, **TOL[torch.float64])


def test_flash_backend_refuses_masks_it_cannot_express():
    q, k, v = make(4, 6, 4, 2)
    with pytest.raises(ValueError, match="q_offset 0 and Tq == Tk"):
        attention_block(q, k, v, causal=True, q_offset=2, backend="flash")
    with pytest.raises(ValueError, match="backend 'nope' unknown"):
        attention_block(q, k, v, backend="nope")
