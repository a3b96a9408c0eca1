"""A decode step's pointwise work as single Triton kernels, for inference on a GPU.

    rope_store_triton(q [T, Hq, D], k [T, Hkv, D], v, cos [T, D], sin [T, D],
                      k_cache=None, v_cache=None, slots=None) -> (q rotated, k rotated)
    silu_mul_triton(gate, up) -> silu(gate) * up

In torch, the rotation of q and k (engine.model.rope.apply_rope: a negation, a concatenation,
two products and a sum, for each of q and k) and the paged cache's K/V write (an index_put
each) are twelve kernels a layer; here they are one. The MLP's silu(gate) * up is two; here
one. In a batch-64 decode step of a 28-layer model that is 336 launches fewer, each of which,
at a few microseconds of device time whatever its size, costs more than its bytes
(`python -m bench.launch_count` counts a step's launches).

Where torch computes in bf16 (or fp16), every intermediate it rounds is rounded here too, to
nearest even (kernels.triton_norm._round): the rotation of bf16 q with bf16 cos / sin (a bf16
model's) equals torch's bit for bit. The rotation computes in torch's promotion of q's and cos's
dtypes (fp32 cos, as under autocast: in fp32) and its results take v's dtype, as the model's
`apply_rope(...).to(v.dtype)` does; in fp32 a GPU may fuse a product and the sum into one
rounding (Triton contracts them), so a result may differ from torch's in its last fp32 bit, and
rarely then in its bf16 rounding. SiLU's exponential and division are the GPU's fast
approximations: the same last-bits difference. The cache write stores k rotated and v at each token's slot of the flat cache views
[slots, Hkv, D] (PagedAttention's own write, done here instead).

engine.model.model takes these paths in inference mode on CUDA unless $LONGRL_FUSED is
"torch"; the trainer keeps torch's ops. Runs on CPU under TRITON_INTERPRET=1 for the tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_norm import _round, _rows

MAX_HEAD_DIM = 512
MAX_HEADS = 256  # query heads a program holds
SILU_BLOCK = 1024


@triton.jit
def _rotate(x_ptr, stride_h, H, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK: tl.constexpr,
            cos1, cos2, sin1, sin2, ROUND: tl.constexpr):
    """One token's H heads (x_ptr at its first head, heads stride_h apart) rotated, as two halves
    [BLOCK_H, BLOCK]: x·cos + rotate_half(x)·sin, each product and the sum rounded to x's dtype
    when ROUND (torch's bf16 ops). -> (first halves, second halves, the mask)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    c = tl.arange(0, BLOCK)[None, :]
    ok = (heads < H) & (c < HALF)
    at = x_ptr + heads * stride_h + c
    x1 = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(at + HALF, mask=ok, other=0.0).to(tl.float32)
    a1, b1, a2, b2 = x1 * cos1, -x2 * sin1, x2 * cos2, x1 * sin2
    if ROUND:
        dt = x_ptr.dtype.element_ty
        a1, b1 = _round(a1, dt).to(tl.float32), _round(b1, dt).to(tl.float32)
        a2, b2 = _round(a2, dt).to(tl.float32), _round(b2, dt).to(tl.float32)
        return _round(a1 + b1, dt).to(tl.float32), _round(a2 + b2, dt).to(tl.float32), ok
    return a1 + b1, a2 + b2, ok


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, kc_ptr, vc_ptr, slot_ptr,
                       sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sc_t, ss_t, skc, svc, sslot, HQ, HKV,
                       HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
                       ROUND: tl.constexpr, STORE: tl.constexpr):
    """Program t: token t's query heads and K/V heads rotated (q into qo, k into ko), and with STORE
    k rotated and v written to the cache at the token's slot."""
    t = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)[None, :]
    ok = c < HALF
    cos1 = tl.load(cos_ptr + t * sc_t + c, mask=ok, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + t * sc_t + HALF + c, mask=ok, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + t * ss_t + c, mask=ok, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + t * ss_t + HALF + c, mask=ok, other=0.0).to(tl.float32)
    o1, o2, qok = _rotate(q_ptr + t * sq_t, sq_h, HQ, HALF, BLOCK_HQ, BLOCK, cos1, cos2, sin1, sin2, ROUND)
    qo = qo_ptr + t * HQ * (2 * HALF) + tl.arange(0, BLOCK_HQ)[:, None] * (2 * HALF) + c
    tl.store(qo, _round(o1, qo_ptr.dtype.element_ty), mask=qok)
    tl.store(qo + HALF, _round(o2, qo_ptr.dtype.element_ty), mask=qok)
    o1, o2, kok = _rotate(k_ptr + t * sk_t, sk_h, HKV, HALF, BLOCK_HKV, BLOCK, cos1, cos2, sin1, sin2, ROUND)
    k1, k2 = _round(o1, ko_ptr.dtype.element_ty), _round(o2, ko_ptr.dtype.element_ty)
    heads = tl.arange(0, BLOCK_HKV)[:, None]
    ko = ko_ptr + t * HKV * (2 * HALF) + heads * (2 * HALF) + c
    tl.store(ko, k1, mask=kok)
    tl.store(ko + HALF, k2, mask=kok)
    if STORE:
        slot = tl.load(slot_ptr + t * sslot).to(tl.int64)
        kc = kc_ptr + slot * skc + heads * (2 * HALF) + c
        tl.store(kc, k1.to(kc_ptr.dtype.element_ty), mask=kok)
        tl.store(kc + HALF, k2.to(kc_ptr.dtype.element_ty), mask=kok)
        vs = v_ptr + t * sv_t + heads * sv_h + c
        vc = vc_ptr + slot * svc + heads * (2 * HALF) + c
        tl.store(vc, tl.load(vs, mask=kok, other=0.0).to(vc_ptr.dtype.element_ty), mask=kok)
        tl.store(vc + HALF, tl.load(vs + HALF, mask=kok, other=0.0).to(vc_ptr.dtype.element_ty), mask=kok)


def _heads(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 3:
        raise ValueError(f"rope_store: {name} must be [T, heads, D], got shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def rope_store_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                      slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k rotated (engine.model.rope.apply_rope, then cast to v's dtype), and, given the flat
    cache views k_cache, v_cache [N, Hkv, D] and slots [T], k rotated and v written at each token's
    slot — in one launch. The module docstring says what matches torch and how."""
    q, k, v = _heads("q", q), _heads("k", k), _heads("v", v)
    t, hq, d = q.shape
    hkv = k.shape[1]
    if k.shape != (t, hkv, d) or v.shape != k.shape:
        raise ValueError(f"rope_store: k {tuple(k.shape)} and v {tuple(v.shape)} must both be [{t}, Hkv, {d}]")
    if cos.shape != (t, d) or sin.shape != (t, d) or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError(f"rope_store: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be [{t}, {d}] with "
                         "unit stride along D")
    if d % 2 or d > MAX_HEAD_DIM:
        raise ValueError(f"rope_store: head_dim {d} must be even and at most {MAX_HEAD_DIM}")
    if hq > MAX_HEADS:
        raise ValueError(f"rope_store: {hq} query heads > {MAX_HEADS}, more than one program holds")
    if hq % hkv:
        raise ValueError(f"rope_store: {hq} query heads are not a multiple of {hkv} K/V heads")
    store = k_cache is not None
    if store != (v_cache is not None) or store != (slots is not None):
        raise ValueError("rope_store: give k_cache, v_cache and slots together, or none of them")
    if store:
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if cache.dim() != 3 or cache.shape[1:] != (hkv, d) or cache.stride(2) != 1 or cache.stride(1) != d:
                raise ValueError(f"rope_store: {name} must be a flat [N, {hkv}, {d}] view with contiguous heads, "
                                 f"got shape {tuple(cache.shape)}, strides {cache.stride()}")
        if slots.shape != (t,):
            raise ValueError(f"rope_store: slots must be [{t}], got {tuple(slots.shape)}")
    compute = torch.promote_types(q.dtype, cos.dtype)
    qo = torch.empty(t, hq, d, dtype=v.dtype, device=q.device)
    ko = torch.empty(t, hkv, d, dtype=v.dtype, device=q.device)
    if t:
        kc, vc, sl = (k_cache, v_cache, slots) if store else (ko, ko, ko)
        block_hq = triton.next_power_of_2(hq)
        rounds = compute in (torch.bfloat16, torch.float16) and q.dtype == compute  # torch's products in bf16
        _rope_store_kernel[(t,)](
            q, k, v, cos, sin, qo, ko, kc, vc, sl, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), cos.stride(0), sin.stride(0), kc.stride(0), vc.stride(0),
            sl.stride(0), hq, hkv, HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2), BLOCK_HQ=block_hq,
            BLOCK_HKV=triton.next_power_of_2(hkv), ROUND=rounds, STORE=store, num_warps=4 if block_hq * d >= 4096 else 2)
    return qo, ko


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, stride_g, stride_u, N, BLOCK: tl.constexpr, ROUND: tl.constexpr):
    """Program (row, block): BLOCK columns of one row (gate and up may be column slices of one tensor)."""
    r = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    g = tl.load(g_ptr + r * stride_g + i, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r * stride_u + i, mask=ok, other=0.0).to(tl.float32)
    s = g / (1.0 + tl.exp(-g))
    if ROUND:  # F.silu's result is rounded to gate's dtype before the product
        s = _round(s, g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(o_ptr + r * N + i, _round(s * u, o_ptr.dtype.element_ty), mask=ok)


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up in one launch (the output in torch's promotion of the two dtypes). gate and
    up may be column slices of one [T, 2·I] product (rows strided), as fuse_projections' MLP has them."""
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    g, u = _rows(gate, gate.shape[-1]), _rows(up, up.shape[-1])
    rows, n = g.shape
    out = torch.empty(rows, n, dtype=torch.promote_types(g.dtype, u.dtype), device=g.device)
    if rows and n:
        _silu_mul_kernel[(rows, triton.cdiv(n, SILU_BLOCK))](g, u, out, g.stride(0), u.stride(0), n, BLOCK=SILU_BLOCK,
                                                              ROUND=g.dtype in (torch.bfloat16, torch.float16))
    return out.view(gate.shape)
