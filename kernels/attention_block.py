"""One block of attention that also returns its log-sum-exp, and the LSE merge. Both differentiable.

    out, lse = attention_block(q, k, v, *, causal=False, q_offset=0, scale=None, chunk_bytes=None)
    out, lse = merge(out_a, lse_a, out_b, lse_b)

q [Tq, Hq, D], k and v [Tk, Hkv, D] with Hq % Hkv == 0 (GQA: query head h reads kv head
h // (Hq // Hkv), as torch's sdpa enable_gqa and HF's repeat_kv). out [Tq, Hq, D] in q's
dtype; lse [Tq, Hq] = log Σ_visible exp(scale · q·k) in fp32 (fp64 for fp64 inputs); scale
defaults to D ** -0.5. With causal=True query i sees key j iff j <= q_offset + i (any
integer offset; q_offset = Tk − Tq is the usual bottom-right alignment). A query that sees
no key gets out 0 and lse −inf, and passes no gradient (no NaN, forward or backward).

Attention over keys split into blocks is the merge of the blocks' results: for a
shared-prefix GRPO row, a response attends to the prompt (one non-causal block) and to
itself (one causal block), and

    merge(attention_block(q_r, k_p, v_p), attention_block(q_r, k_r, v_r, causal=True))
        == attention_block(q_r, cat(k_p, k_r), cat(v_p, v_r), causal=True, q_offset=Tp)

in values and in gradients; merge is associative, so ring attention folds one block per
step. lse = logaddexp(lse_a, lse_b), out = out_a·exp(lse_a − lse) + out_b·exp(lse_b − lse),
in fp32, −inf in either or both handled (both −inf: out 0, lse −inf, zero gradients).

Memory: the forward keeps only q, k, v, out and lse; the backward recomputes the
probabilities from lse, walking the queries in chunks so that one fp32 score block
[Hq, chunk, Tk] stays within chunk_bytes (default 64 MiB, at least one query per chunk;
the backward holds two such blocks, the forward one). GQA never repeats K/V: per kv head,
its G query heads are stacked as rows of one batched matmul against that head's keys, so
dK and dV sum over the G heads inside the matmul. Plain torch matmuls, one code path for CPU
and CUDA; scores, softmax statistics and gradient accumulation are fp32 whatever the input
dtype (K and V are upcast once per call, Q per chunk); gradients come back in the input
dtypes. The backward takes the gradient of lse too: with P = exp(scale·S − lse),

    dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − (rowsum(dO ∘ O) − dlse)),  dQ = scale·dS K,  dK = scale·dSᵀ Q

which makes a block exactly differentiable when its lse feeds a merge.
"""
from __future__ import annotations

import math

import torch

DEFAULT_CHUNK_BYTES = 64 << 20
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half and fp32 inputs, fp64 for fp64 (so fp64 tests and gradcheck stay exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _heads_first(x: torch.Tensor, hkv: int, acc: torch.dtype) -> torch.Tensor:
    """x [C, Hq, D] -> [Hkv, G·C, D] in acc: kv head's G query heads stacked (row r = g·C + i), one copy."""
    c, hq, d = x.shape
    g = hq // hkv
    buf = torch.empty(hkv, g, c, d, dtype=acc, device=x.device)
    buf.copy_(x.reshape(c, hkv, g, d).permute(1, 2, 0, 3))
    return buf.view(hkv, g * c, d)


def _rows_first(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """per-query statistic [C, Hq] -> [Hkv, G, C, 1] (a view where possible)."""
    c, hq = x.shape
    return x.reshape(c, hkv, hq // hkv).permute(1, 2, 0).unsqueeze(-1)


def _scores(qc: torch.Tensor, kh: torch.Tensor, scale: float, g: int, s: int, c: int,
            causal: bool, q_offset: int, segs=None) -> torch.Tensor:
    """Scaled scores [Hkv, G, C, Tk] (fp32) of queries s..s+C, hidden keys at −inf."""
    hkv, tk = kh.shape[0], kh.shape[1]
    sc = torch.matmul(qc, kh.transpose(1, 2)).mul_(scale).view(hkv, g, c, tk)
    if causal:
        pos = torch.arange(s, s + c, device=kh.device)[:, None] + q_offset  # query position, the same for all heads
        hidden = torch.arange(tk, device=kh.device)[None, :] > pos  # [C, Tk]
        sc.masked_fill_(hidden, -math.inf)
    if segs is not None:  # a key of segment 0 (the shared prefix) is seen by all, others by their own segment
        q_seg, k_seg = segs
        hidden = (k_seg[None, :] != 0) & (k_seg[None, :] != q_seg[s:s + c, None])
        sc.masked_fill_(hidden, -math.inf)
    return sc


class _AttentionBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, q_offset, scale, rows, segs=None):
        # autocast would run the fp32 score products in bf16 (and the backward, without autocast,
        # recompute other probabilities): the block keeps its own precision
        with torch.autocast(q.device.type, enabled=False):
            return _AttentionBlock._forward(ctx, q, k, v, causal, q_offset, scale, rows, segs)

    @staticmethod
    def _forward(ctx, q, k, v, causal, q_offset, scale, rows, segs):
        tq, hq, d = q.shape
        tk, hkv, _ = k.shape
        g = hq // hkv
        acc = _acc_dtype(q.dtype)
        out = torch.zeros_like(q, memory_format=torch.contiguous_format)
        lse = torch.full((tq, hq), -math.inf, dtype=acc, device=q.device)
        if tk > 0:
            kh = k.to(acc).transpose(0, 1).contiguous()  # [Hkv, Tk, D]
            vh = v.to(acc).transpose(0, 1).contiguous()
            for s in range(0, tq, rows):
                e = min(tq, s + rows)
                c = e - s
                sc = _scores(_heads_first(q[s:e], hkv, acc), kh, scale, g, s, c, causal, q_offset, segs)
                m = sc.amax(-1, keepdim=True)
                m = torch.where(m == -math.inf, 0.0, m)  # a row that sees no key: exp(−inf − 0) = 0
                p = sc.sub_(m).exp_()
                l_ = p.sum(-1, keepdim=True)
                live = l_ > 0
                o = torch.matmul(p.view(hkv, g * c, tk), vh).view(hkv, g, c, d)
                o.div_(torch.where(live, l_, 1.0))
                out[s:e].view(c, hkv, g, d).copy_(o.permute(2, 0, 1, 3))
                c_lse = torch.where(live, m + torch.log(torch.where(live, l_, 1.0)), -math.inf)
                lse[s:e].view(c, hkv, g).copy_(c_lse.squeeze(-1).permute(2, 0, 1))
                del sc, p, o
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = (causal, q_offset, scale, rows, segs)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        causal, q_offset, scale, rows, segs = ctx.cfg
        dq, dk, dv = _block_grads(q, k, v, out, lse, dout, dlse, causal, q_offset, scale, rows,
                                  ctx.needs_input_grad[:3], segs)
        return dq, dk, dv, None, None, None, None, None


def _block_grads(q, k, v, out, lse, dout, dlse, causal, q_offset, scale, rows, need=(True, True, True),
                 segs=None):
    """(dq, dk, dv) of one block by recomputing its probabilities from lse, query chunk by chunk.
    out and lse are the block's own (then dlse is the gradient of its lse) or the merged ones of
    every block its queries attend to (then dlse is None: flash attention's backward form)."""
    need_dq, need_dk, need_dv = need
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    g = hq // hkv
    acc = _acc_dtype(q.dtype)
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format) if need_dq else None
    dkh = torch.zeros(hkv, tk, d, dtype=acc, device=k.device) if need_dk else None
    dvh = torch.zeros(hkv, tk, d, dtype=acc, device=v.device) if need_dv else None
    if tk > 0 and (dout is not None or dlse is not None):
        kh = k.to(acc).transpose(0, 1).contiguous()
        vh = v.to(acc).transpose(0, 1).contiguous()
        for s in range(0, tq, rows):
            e = min(tq, s + rows)
            c = e - s
            qc = _heads_first(q[s:e], hkv, acc)
            sc = _scores(qc, kh, scale, g, s, c, causal, q_offset, segs)
            c_lse = _rows_first(lse[s:e], hkv)
            c_lse = torch.where(c_lse == -math.inf, 0.0, c_lse)  # seen-nothing rows: P = exp(−inf) = 0
            p = sc.sub_(c_lse).exp_().view(hkv, g * c, tk)  # P, recomputed
            c_dlse = None if dlse is None else _rows_first(dlse[s:e].to(acc), hkv).reshape(hkv, g * c, 1)
            if dout is not None:
                doc = _heads_first(dout[s:e], hkv, acc)
                if need_dv:
                    dvh.baddbmm_(p.transpose(1, 2), doc)
                delta = (doc * _heads_first(out[s:e], hkv, acc)).sum(-1, keepdim=True)
                if c_dlse is not None:
                    delta = delta - c_dlse
                ds = torch.matmul(doc, vh.transpose(1, 2)).sub_(delta).mul_(p)  # dS = P ∘ (dP − delta)
                del doc
            else:  # only lse is used: dS = P · dlse
                ds = p.mul_(c_dlse)
            if need_dq:
                dqc = torch.matmul(ds, kh).mul_(scale)
                dq[s:e].view(c, hkv, g, d).copy_(dqc.view(hkv, g, c, d).permute(2, 0, 1, 3))
            if need_dk:
                dkh.baddbmm_(ds.transpose(1, 2), qc, alpha=scale)
            del sc, p, ds
    dk = dkh.transpose(0, 1).to(k.dtype) if need_dk else None
    dv = dvh.transpose(0, 1).to(v.dtype) if need_dv else None
    return dq, dk, dv


def attention_block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, *, causal: bool = False, q_offset: int = 0,
                             scale: float | None = None, chunk_bytes: int | None = None,
                             q_seg: torch.Tensor | None = None, k_seg: torch.Tensor | None = None):
    """One block's share (dq, dk, dv) of the gradient of attention over several key blocks,
    given the MERGED out and lse of all of them (flash attention's backward form): with
    P = exp(scale·S − lse) the block's probabilities within the whole row and
    δ = rowsum(dO ∘ O), dS = P ∘ (dO Vᵀ − δ). Summing the blocks' dq gives the row's dq, and
    each block's dk, dv are its keys' whole gradient from these queries. Ring attention's
    backward runs this per step, so no block stores its probabilities. Torch path (any device)."""
    _check_block(q, k, v, causal, q_offset, scale, chunk_bytes)
    segs = _check_segs(q, k, q_seg, k_seg)
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    rows = _rows_for(q, k, chunk_bytes)
    with torch.autocast(q.device.type, enabled=False):  # its products in fp32, under autocast too
        return _block_grads(q, k, v, out, lse, dout, None, bool(causal), int(q_offset), scale, rows, segs=segs)


def _rows_for(q: torch.Tensor, k: torch.Tensor, chunk_bytes: int | None) -> int:
    """Query rows per chunk so one fp32 score block [Hq, rows, Tk] fits chunk_bytes."""
    tq, hq, tk = q.shape[0], q.shape[1], k.shape[0]
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    elem = torch.finfo(_acc_dtype(q.dtype)).bits // 8
    return max(1, min(max(tq, 1), budget // (hq * max(tk, 1) * elem)))


# ---- the flash path: aten's flash-attention ops, which return the LSE ---------------------
FLASH_PAD = 8  # extra head-dim columns that carry the LSE gradient through the flash backward


def _flash_ops(device: torch.device):
    """(forward, backward) of aten's flash attention for `device`, each on [1, H, T, D]
    tensors: forward(q, k, v, causal, scale) -> (out, lse, state); backward(dout, q, k, v,
    out, lse, state, causal, scale) -> (dq, dk, dv)."""
    aten = torch.ops.aten
    if device.type == "cuda":
        def fwd(q, k, v, causal, scale):
            r = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
            return r[0], r[1][..., :q.shape[2]], r[2:8]

        def bwd(dout, q, k, v, out, lse, state, causal, scale):
            cq, ck, mq, mk, seed, offset = state
            return aten._scaled_dot_product_flash_attention_backward(
                dout, q, k, v, out, lse, cq, ck, mq, mk, 0.0, causal, seed, offset, scale=scale)
        return fwd, bwd

    def fwd_cpu(q, k, v, causal, scale):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse, ()

    def bwd_cpu(dout, q, k, v, out, lse, state, causal, scale):
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, causal,
                                                                         scale=scale)
    return fwd_cpu, bwd_cpu


def _stack(x: torch.Tensor, heads: int, pad: int) -> torch.Tensor:
    """[T, Hq, D] -> [1, heads, (Hq / heads)·T, D + pad] (a head's query heads stacked, zero pad)."""
    t, hq, d = x.shape
    g = hq // heads
    buf = x.new_zeros(1, heads, g * t, d + pad)
    buf[0, :, :, :d].view(heads, g, t, d).copy_(x.view(t, heads, g, d).permute(1, 2, 0, 3))
    return buf


def _unstack(x: torch.Tensor, t: int, d: int) -> torch.Tensor:
    """[1, heads, g·T, D'] -> [T, heads·g, D] (the inverse of _stack, pad dropped)."""
    heads, gt = x.shape[1], x.shape[2]
    g = gt // t
    return x[0, :, :, :d].reshape(heads, g, t, d).permute(2, 0, 1, 3).reshape(t, heads * g, d)


class _FlashBlock(torch.autograd.Function):
    """attention_block through the flash-attention kernels. Non-causal GQA stacks each kv
    head's query heads as rows (no K/V copy); causal GQA repeats K/V (the causal blocks of a
    group row are the short ones). The LSE gradient rides on FLASH_PAD zero columns: with
    V' = [V, 0], O' = [O, 1] and dO' = [dO, −dlse], flash's backward computes
    rowsum(dO'·O') = rowsum(dO·O) − dlse and dO'V'ᵀ = dO Vᵀ: exactly the block's backward."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        tq, hq, d = q.shape
        tk, hkv, _ = k.shape
        heads = hq if causal else hkv
        if causal and hkv != hq:
            k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
        fwd, _ = _flash_ops(q.device)
        qs, ks, vs = _stack(q, heads, FLASH_PAD), _stack(k, heads, FLASH_PAD), _stack(v, heads, FLASH_PAD)
        out4, lse4, state = fwd(qs, ks, vs, causal, scale)
        ctx.save_for_backward(qs, ks, vs, out4, lse4)
        ctx.state = state  # CUDA: cum_seq_q, cum_seq_k, max_q, max_k, philox seed and offset (CPU: none)
        ctx.meta = (causal, scale, tq, d, heads, hkv)
        ctx.set_materialize_grads(False)
        lse = lse4[0].reshape(heads, hq // heads, tq).permute(2, 0, 1).reshape(tq, hq)
        return _unstack(out4, tq, d), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        qs, ks, vs, out4, lse4 = ctx.saved_tensors
        causal, scale, tq, d, heads, hkv = ctx.meta
        state = ctx.state
        hq = heads * (qs.shape[2] // tq)
        dout4 = torch.zeros_like(out4)
        if dout is not None:
            dout4[0, :, :, :d].view(heads, hq // heads, tq, d).copy_(
                dout.view(tq, heads, hq // heads, d).permute(1, 2, 0, 3))
        out4 = out4.clone()
        out4[..., d] = 1.0
        if dlse is not None:
            dl = torch.where(torch.isfinite(lse4), 1.0, 0.0)  # rows that see nothing pass no gradient
            dout4[0, :, :, d] = -dlse.reshape(tq, heads, hq // heads).permute(1, 2, 0).reshape(heads, -1) * dl[0]
        _, bwd = _flash_ops(qs.device)
        dq4, dk4, dv4 = bwd(dout4, qs, ks, vs, out4, lse4, state, causal, scale)
        dq = _unstack(dq4, tq, d)
        tk = ks.shape[2]
        dk, dv = _unstack(dk4, tk, d), _unstack(dv4, tk, d)
        if causal and hkv != heads:  # K/V were repeated per query head: sum the copies back
            dk = dk.view(tk, hkv, heads // hkv, d).sum(2)
            dv = dv.view(tk, hkv, heads // hkv, d).sum(2)
        return dq, dk, dv, None, None


def _flash_eligible(q: torch.Tensor, k: torch.Tensor, causal: bool, q_offset: int) -> bool:
    """The flash path: CUDA half precision, head dim + pad <= 256, both sides non-empty, and a
    mask flash can express (non-causal, or causal with q_offset 0 on a square block)."""
    tq, tk, d = q.shape[0], k.shape[0], q.shape[2]
    mask_ok = not causal or (q_offset == 0 and tq == tk)
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and d + FLASH_PAD <= 256
            and tq > 0 and tk > 0 and mask_ok)


BACKENDS = ("auto", "torch", "flash")


def attention_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    q_offset: int = 0, scale: float | None = None, chunk_bytes: int | None = None,
                    backend: str = "auto", q_seg: torch.Tensor | None = None,
                    k_seg: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Tq, Hq, D], k and v [Tk, Hkv, D] -> (out [Tq, Hq, D] in q's dtype, lse [Tq, Hq] fp32).

    causal: query i sees key j iff j <= q_offset + i. scale: default D ** -0.5. chunk_bytes:
    budget for one fp32 score block [Hq, chunk, Tk] (default 64 MiB) of the torch path.
    backend: "torch" (chunked matmuls, any device and dtype), "flash" (aten's flash-attention
    kernels: CUDA, or the CPU's flash op; non-causal blocks, or causal with q_offset 0 on a
    square block), "auto" (flash where eligible on CUDA in half precision, else torch).
    q_seg [Tq], k_seg [Tk] (integer segment ids, both or neither; torch backend): a key of
    segment 0 is seen by every query, any other key only by queries of its own segment, on
    top of the causal rule; a shared-prefix group row cut into blocks (prompt = 0, response
    i = i + 1) keeps its mask this way. See the module docstring."""
    _check_block(q, k, v, causal, q_offset, scale, chunk_bytes)
    segs = _check_segs(q, k, q_seg, k_seg)
    if segs is not None:
        if backend == "flash":
            raise ValueError("attention_block: segment masks (q_seg/k_seg) run on the torch backend")
        backend = "torch"
    if backend not in BACKENDS:
        raise ValueError(f"attention_block: backend {backend!r} unknown; choose one of {', '.join(BACKENDS)}")
    tq, hq, d = q.shape
    tk = k.shape[0]
    scale = d ** -0.5 if scale is None else float(scale)
    if backend == "flash" or (backend == "auto" and _flash_eligible(q, k, causal, q_offset)):
        if causal and not (q_offset == 0 and tq == tk):
            raise ValueError(f"attention_block: the flash backend takes causal blocks only with q_offset 0 and "
                             f"Tq == Tk, got q_offset {q_offset}, Tq {tq}, Tk {tk}")
        if tq == 0 or tk == 0:
            raise ValueError("attention_block: the flash backend needs Tq > 0 and Tk > 0")
        return _FlashBlock.apply(q, k, v, bool(causal), scale)
    return _AttentionBlock.apply(q, k, v, bool(causal), int(q_offset), scale, _rows_for(q, k, chunk_bytes), segs)


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
          lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention results over disjoint key sets: out [..., D], lse [...] -> (out, lse).

    lse = logaddexp(lse_a, lse_b); out = out_a·exp(lse_a − lse) + out_b·exp(lse_b − lse), in fp32
    (fp64 when an lse is fp64); out comes back in out_a's dtype. −inf in either or both is
    fine (both: out 0, lse −inf), with finite gradients. Plain autograd."""
    _check_merge(out_a, lse_a, out_b, lse_b)
    acc = torch.promote_types(torch.promote_types(lse_a.dtype, lse_b.dtype), torch.float32)
    la, lb = lse_a.to(acc), lse_b.to(acc)
    # shift by the (detached) max so exp cannot overflow; exp(−inf − m) = 0 with a zero gradient
    m = torch.maximum(la, lb).detach()
    m = torch.where(m == -math.inf, 0.0, m)
    ea, eb = torch.exp(la - m), torch.exp(lb - m)
    total = ea + eb
    live = total > 0
    safe = torch.where(live, total, 1.0)  # no log(0) or x/0 in values or gradients
    lse = torch.where(live, m + torch.log(safe), -math.inf)
    out = out_a.to(acc) * (ea / safe).unsqueeze(-1) + out_b.to(acc) * (eb / safe).unsqueeze(-1)
    return out.to(out_a.dtype), lse


# ---- argument checks ---------------------------------------------------------------------
def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype} on {t.device}"


def _check_block(q, k, v, causal, q_offset, scale, chunk_bytes) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"attention_block: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"attention_block: {name} must be 3-d [T, heads, head_dim], got shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"attention_block: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"attention_block: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention_block: {name} must be on q's device {q.device}, got {t.device}")
    if k.shape != v.shape:
        raise ValueError(f"attention_block: k and v must have the same shape [Tk, Hkv, D], got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    _, hq, d = q.shape
    hkv = k.shape[1]
    if d < 1 or hq < 1 or hkv < 1:
        raise ValueError(f"attention_block: need at least one head and head_dim >= 1, got q {_describe(q)}, "
                         f"k {_describe(k)}")
    if k.shape[2] != d:
        raise ValueError(f"attention_block: k and v head_dim must equal q's ({d}), got {k.shape[2]}")
    if hq % hkv:
        raise ValueError(f"attention_block: q heads ({hq}) must be a multiple of k/v heads ({hkv}) for GQA")
    if not isinstance(causal, bool):
        raise ValueError(f"attention_block: causal must be a bool, got {causal!r}")
    if isinstance(q_offset, bool) or not isinstance(q_offset, int):
        raise ValueError(f"attention_block: q_offset must be an int, got {q_offset!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"attention_block: scale must be a finite number or None, got {scale!r}")
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                    or chunk_bytes < 1):
        raise ValueError(f"attention_block: chunk_bytes must be a positive int or None, got {chunk_bytes!r}")


def _check_segs(q, k, q_seg, k_seg):
    """-> (q_seg, k_seg) on q's device, or None."""
    if q_seg is None and k_seg is None:
        return None
    if q_seg is None or k_seg is None:
        raise ValueError("attention_block: give q_seg and k_seg together (or neither)")
    for name, t, n in (("q_seg", q_seg, q.shape[0]), ("k_seg", k_seg, k.shape[0])):
        if not isinstance(t, torch.Tensor) or t.shape != (n,) or t.is_floating_point():
            raise ValueError(f"attention_block: {name} must be an integer tensor of shape [{n}], got "
                             f"{t.shape if isinstance(t, torch.Tensor) else type(t).__name__}")
    return q_seg.to(q.device), k_seg.to(q.device)


def _check_merge(out_a, lse_a, out_b, lse_b) -> None:
    named = (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"merge: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"merge: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != out_a.device:
            raise ValueError(f"merge: {name} must be on out_a's device {out_a.device}, got {t.device}")
    if out_a.dim() < 1:
        raise ValueError("merge: out_a must be [..., D], got a 0-d tensor")
    if out_b.shape != out_a.shape:
        raise ValueError(f"merge: out_b must have out_a's shape {tuple(out_a.shape)}, got {tuple(out_b.shape)}")
    want = tuple(out_a.shape[:-1])
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(t.shape) != want:
            raise ValueError(f"merge: {name} must have shape {want} (out's shape without the last dim), "
                             f"got {tuple(t.shape)}")
