"""The decode step's fused pointwise kernels (kernels/triton_pointwise.py) against the torch ops
they replace: RoPE on q and k with the paged cache's K/V write, and silu(gate) * up. Under the
Triton interpreter on CPU; on the GPU when there is one."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from engine.model.rope import apply_rope, rope_cos_sin, rope_inv_freq
from kernels.triton_pointwise import rope_store_triton, silu_mul_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cos_sin(t: int, d: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 70000, (t,), generator=g)  # long-context positions: cos / sin far from 1 / 0
    inv_freq, scaling = rope_inv_freq({"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                       "original_max_position_embeddings": 32768}, d)
    cos, sin = rope_cos_sin(inv_freq, scaling, positions, dtype)
    return cos.to(DEVICE), sin.to(DEVICE)


def _qkv(t, hq, hkv, d, dtype, seed, pad=0):
    """q, k, v [T, heads, D]; with pad > 0, q is a strided view (each head's row padded), as a slice is."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(t, hq, d + pad, generator=g) * 3).to(dtype).to(DEVICE)[..., :d]
    k = (torch.randn(t, hkv, d, generator=g) * 3).to(dtype).to(DEVICE)
    v = torch.randn(t, hkv, d, generator=g).to(dtype).to(DEVICE)
    return q, k, v


@pytest.mark.parametrize("dtype,cos_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("t,hq,hkv,d,pad", [(5, 4, 2, 64, 0), (3, 7, 1, 128, 8), (4, 4, 4, 80, 0), (0, 4, 2, 64, 0)])
def test_rope_equals_the_models_rotation(dtype, cos_dtype, t, hq, hkv, d, pad):
    """GQA groups of 2, 7 and 1; head_dim 64, 128 and 80 (half not a power of two); a strided q; no
    tokens. bf16 q with bf16 cos (the rollout's bf16 model: every product and the sum rounded, as
    torch rounds them) equals torch bit for bit; fp32 cos with bf16 q (autocast's projections)
    computes in fp32 and rounds once, to v's dtype (on a GPU a product and the sum may be one FMA:
    one bf16 ulp, rarely)."""
    q, k, v = _qkv(t, hq, hkv, d, dtype, seed=t + hq + d, pad=pad)
    cos, sin = _cos_sin(t, d, cos_dtype, seed=d)
    want_q, want_k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
    got_q, got_k = rope_store_triton(q, k, v, cos, sin)
    assert got_q.dtype == want_q.dtype == v.dtype and got_q.shape == want_q.shape and got_k.shape == want_k.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got_q, want_q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_k, want_k, rtol=1e-6, atol=1e-6)
    elif cos_dtype == torch.bfloat16 or DEVICE == "cpu":  # the interpreter does not contract mul + add
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    else:
        for got, want in ((got_q, want_q), (got_k, want_k)):
            torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)
            assert got.numel() == 0 or (got != want).float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cache_write_puts_rotated_k_and_v_at_each_slot(dtype):
    """The flat cache views of one layer ([blocks × block size, Hkv, D]): each token's slot gets its
    rotated k and its v; every other slot is left as it was."""
    t, hq, hkv, d, slots_total = 6, 4, 2, 64, 40
    q, k, v = _qkv(t, hq, hkv, d, dtype, seed=11)
    cos, sin = _cos_sin(t, d, dtype, seed=2)
    g = torch.Generator().manual_seed(4)
    kc = torch.randn(slots_total, hkv, d, generator=g).to(dtype).to(DEVICE)
    vc = torch.randn(slots_total, hkv, d, generator=g).to(dtype).to(DEVICE)
    before_k, before_v = kc.clone(), vc.clone()
    slots = torch.randperm(slots_total, generator=g)[:t].to(DEVICE)
    got_q, got_k = rope_store_triton(q, k, v, cos, sin, kc, vc, slots)
    want_k = apply_rope(k, cos, sin).to(dtype)
    torch.testing.assert_close(got_k, want_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(kc[slots], got_k) and torch.equal(vc[slots], v)
    others = torch.ones(slots_total, dtype=torch.bool, device=DEVICE)
    others[slots] = False
    assert torch.equal(kc[others], before_k[others]) and torch.equal(vc[others], before_v[others])


def test_rope_refuses_what_it_cannot_compute():
    q, k, v = _qkv(3, 4, 2, 64, torch.float32, seed=0)
    cos, sin = _cos_sin(3, 64, torch.float32, seed=0)
    kc = torch.zeros(8, 2, 64, device=DEVICE)
    slots = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match=r"k \(3, 3, 64\) and v \(3, 2, 64\) must both be \[3, Hkv, 64\]"):
        rope_store_triton(q, k[:, :1].expand(3, 3, 64), v, cos, sin)
    with pytest.raises(ValueError, match=r"cos \(2, 64\) and sin \(3, 64\) must be \[3, 64\]"):
        rope_store_triton(q, k, v, cos[:2], sin)
    with pytest.raises(ValueError, match="give k_cache, v_cache and slots together"):
        rope_store_triton(q, k, v, cos, sin, kc, kc, None)
    with pytest.raises(ValueError, match=r"slots must be \[3\], got \(2,\)"):
        rope_store_triton(q, k, v, cos, sin, kc, kc, slots[:2])
    with pytest.raises(ValueError, match=r"k_cache must be a flat \[N, 2, 64\] view"):
        rope_store_triton(q, k, v, cos, sin, kc.view(8, 128), kc, slots)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2"):
        rope_store_triton(q[:, :3], k, v, cos, sin)
    with pytest.raises(ValueError, match="q must be"):
        rope_store_triton(q[0], k, v, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 96), (3, 1000), (0, 8)])
def test_silu_mul_equals_torch(dtype, shape):
    """Sizes not a multiple of the block, no rows. In bf16 F.silu's result is rounded before the
    product, as torch does; the exponential's last fp32 bit may move a value across a bf16 rounding
    boundary (one ulp, rarely)."""
    g = torch.Generator().manual_seed(shape[1])
    gate = (torch.randn(shape, generator=g) * 4).to(dtype).to(DEVICE)
    up = (torch.randn(shape, generator=g) * 2).to(dtype).to(DEVICE)
    want = F.silu(gate) * up
    got = silu_mul_triton(gate, up)
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)
        assert got.numel() == 0 or (got != want).float().mean() < 0.01
    with pytest.raises(ValueError, match=r"gate \(2, 3\) and up \(3, 2\) differ"):
        silu_mul_triton(torch.zeros(2, 3), torch.zeros(3, 2))


def test_silu_mul_of_one_products_two_halves():
    """gate and up as the column halves of one [T, 2·I] product (fuse_projections' MLP): strided rows,
    read in place."""
    g = torch.Generator().manual_seed(9)
    both = (torch.randn(5, 2 * 1100, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    gate, up = both.split([1100, 1100], dim=-1)
    assert gate.stride(0) == 2200
    torch.testing.assert_close(silu_mul_triton(gate, up).float(), (F.silu(gate) * up).float(), rtol=2 ** -7, atol=1e-6)


def _tiny(tmp_path, kind):
    from conftest import tiny_decoder
    return tiny_decoder(tmp_path / kind, kind, num_hidden_layers=2)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_fuse_projections_keeps_the_parameters_and_follows_a_weight_sync(tmp_path, kind):
    """After fuse_projections the state dict has the same keys, shapes and values (q / k / v with
    Qwen2's biases, gate / up, as views of one tensor each); loading new weights (the trainer's sync)
    writes through the views into the stacked tensors; after a deepcopy or a .to() each parameter
    has memory of its own: the layer no longer reports a stack (and keeps no stale copy: only the
    row counts are stored beside the parameters)."""
    from engine.model.model import MLP, Attention, _fused_linears, fuse_projections

    model = _tiny(tmp_path, kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_projections(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    w, b, sizes = _fused_linears(attn, Attention.FUSED)
    cfg = model.config
    assert sizes == [cfg.q_size, cfg.kv_size, cfg.kv_size] and w.shape == (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size)
    assert (b is not None) == (kind == "qwen2")
    assert torch.equal(w[cfg.q_size:cfg.q_size + cfg.kv_size], attn.k_proj.weight)
    new = {k: torch.randn_like(v) for k, v in before.items()}
    model.load_state_dict(new)
    w, b, _ = _fused_linears(attn, Attention.FUSED)
    assert torch.equal(w[-cfg.kv_size:], new["layers.0.self_attn.v_proj.weight"])
    if b is not None:
        assert torch.equal(b[:cfg.q_size], new["layers.0.self_attn.q_proj.bias"])
    gate_up = _fused_linears(mlp, MLP.FUSED)[0]
    assert torch.equal(gate_up[cfg.intermediate_size:], new["layers.0.mlp.up_proj.weight"])
    if kind == "qwen2":  # a bias replaced (not loaded into the view): the stack no longer holds it
        other = model.layers[1].self_attn
        other.k_proj.bias = torch.nn.Parameter(other.k_proj.bias.clone())
        assert _fused_linears(other, Attention.FUSED) is None
    twin = copy.deepcopy(model)  # each parameter cloned on its own: separate products, nothing stale kept
    assert _fused_linears(twin.layers[0].self_attn, Attention.FUSED) is None
    assert _fused_linears(attn, Attention.FUSED) is not None
    model.to(torch.float64)
    assert _fused_linears(attn, Attention.FUSED) is None and _fused_linears(mlp, MLP.FUSED) is None
    fuse_projections(model)  # stacked again, in the new dtype
    assert _fused_linears(attn, Attention.FUSED)[0].dtype == torch.float64


def test_fuse_projections_leaves_a_partly_biased_stack_alone(tmp_path):
    from engine.model.model import Attention, _fused_linears, fuse_projections

    model = _tiny(tmp_path, "qwen2")
    model.layers[0].self_attn.v_proj.bias = None  # q and k biased, v not: one product cannot serve them
    fuse_projections(model)
    assert _fused_linears(model.layers[0].self_attn, Attention.FUSED) is None
    assert _fused_linears(model.layers[1].self_attn, Attention.FUSED) is not None
