"""The one-kernel RMSNorm (kernels/triton_norm.py) against the model's torch RMSNorm, and the
rule that picks it (inference on CUDA only). Under the Triton interpreter on CPU; on the GPU
when there is one."""
from __future__ import annotations

import types

import pytest
import torch
import triton
import triton.language as tl

from engine.model import model as model_mod
from engine.model.model import RMSNorm, fused_kernels
from kernels.triton_norm import _round, add_rms_norm_triton, rms_norm_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(x, weight, eps):
    """The model's own RMSNorm on its torch path (autograd on, so never the kernel)."""
    norm = RMSNorm(x.shape[-1], eps)
    norm.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    with torch.enable_grad():
        return norm(x).detach()


@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape", [(5, 576), (3, 100), (4, 3, 64), (0, 32)])
def test_the_kernel_computes_the_models_rms_norm(dtype, wdtype, shape):
    """Rows of a hidden size not a power of two (100, 576), the per-head shape of q / k norms,
    no rows; bf16 activations with bf16 and with fp32 weights (torch's promotion decides the
    output dtype); values far from 1 so the scale matters."""
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 7 + 1).to(dtype).to(DEVICE)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(wdtype).to(DEVICE)
    want = _reference(x, w, 1e-6)
    got = rms_norm_triton(x, w, 1e-6)
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    else:  # the mean's summation order may move a value across a bf16 rounding boundary: one ulp at most
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)
        assert got.numel() == 0 or (got != want).float().mean() < 0.02


def test_a_strided_input_and_bad_shapes():
    """A column slice of a wider tensor (its rows' stride is not H), and the checks."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(6, 80, generator=g).to(DEVICE)
    x, w = wide[:, :48], torch.rand(48, generator=g).to(DEVICE)
    torch.testing.assert_close(rms_norm_triton(x, w, 1e-5), _reference(x, w, 1e-5), rtol=2e-6, atol=1e-6)
    with pytest.raises(ValueError, match="does not match the hidden size 48"):
        rms_norm_triton(x, w[:40], 1e-5)
    with pytest.raises(ValueError, match="more than one program's registers hold"):
        rms_norm_triton(torch.zeros(1, 16385, device=DEVICE), torch.ones(16385, device=DEVICE), 1e-5)


@pytest.mark.parametrize("dtype,ddtype,wdtype", [(torch.float32, torch.float32, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32, torch.float32)])
@pytest.mark.parametrize("shape", [(5, 576), (3, 100), (0, 32)])
def test_the_residual_add_and_the_norm_in_one_kernel(dtype, ddtype, wdtype, shape):
    """(x + delta, norm(x + delta)) as torch computes them: the sum rounded once to the promoted dtype
    (bf16 + bf16 -> bf16, exactly torch's), the norm read from that rounded sum; a residual in bf16
    with an fp32 delta sums in fp32."""
    g = torch.Generator().manual_seed(sum(shape) + 1)
    x = (torch.randn(shape, generator=g) * 7 + 1).to(dtype).to(DEVICE)
    delta = (torch.randn(shape, generator=g) * 3).to(ddtype).to(DEVICE)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(wdtype).to(DEVICE)
    want_sum = x + delta
    want = _reference(want_sum, w, 1e-6)
    got_sum, got = add_rms_norm_triton(x, delta, w, 1e-6)
    assert got_sum.dtype == want_sum.dtype and got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got_sum, want_sum)
    if want.dtype == torch.float32 and dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)
        assert got.numel() == 0 or (got != want).float().mean() < 0.02
    with pytest.raises(ValueError, match=r"delta \(2, 8\) does not match x \(2, 4\)"):
        add_rms_norm_triton(torch.zeros(2, 4, device=DEVICE), torch.zeros(2, 8, device=DEVICE),
                            torch.ones(4, device=DEVICE), 1e-6)


def test_the_fused_kernels_run_only_in_inference_mode_on_cuda(monkeypatch):
    """The rollout runs in inference mode; the trainer's forwards, the no-grad old / reference
    log-probs included, keep torch's ops (their values must equal the update's exactly)."""
    on_gpu, on_cpu = types.SimpleNamespace(is_cuda=True), torch.zeros(2)
    monkeypatch.delenv("LONGRL_FUSED", raising=False)
    assert not fused_kernels(on_gpu)  # autograd on: the update's forward
    with torch.no_grad():
        assert not fused_kernels(on_gpu)  # the old / reference log-probs
    with torch.inference_mode():
        assert fused_kernels(on_gpu) and not fused_kernels(on_cpu)
        monkeypatch.setenv("LONGRL_FUSED", "torch")
        assert not fused_kernels(on_gpu)
        monkeypatch.setenv("LONGRL_FUSED", "fast")
        with pytest.raises(ValueError, match="LONGRL_FUSED must be triton or torch, got 'fast'"):
            fused_kernels(on_gpu)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_a_model_with_the_fused_kernels_computes_the_same_hidden_states(tmp_path, monkeypatch, kind):
    """Every fused path of a model (the CUDA-only rule stood in for on CPU): the first norm, each
    residual add with the norm after it, RoPE on q and k (no cache here: VarlenAttention), the
    MLP's silu * up; Qwen2's q / k / v biases, Qwen3's q / k norms per head; then with the
    projections stacked (fuse_projections: q, k, v and gate, up as column slices of one product).
    The forward's hidden states equal torch's ops' (fp32 here: up to the norms' summation order)."""
    from conftest import tiny_decoder
    from kernels import triton_norm, triton_pointwise

    model = tiny_decoder(tmp_path / kind, kind, num_hidden_layers=2)
    ids = torch.randint(0, model.config.vocab_size, (11,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(ids)
        calls = []
        for mod, name in ((triton_norm, "rms_norm_triton"), (triton_norm, "add_rms_norm_triton"),
                          (triton_pointwise, "rope_store_triton"), (triton_pointwise, "silu_mul_triton")):
            def spy(*args, _real=getattr(mod, name), _name=name, **kwargs):
                calls.append(_name)
                return _real(*args, **kwargs)
            monkeypatch.setattr(mod, name, spy)
        monkeypatch.setattr(model_mod, "fused_kernels", lambda x: torch.is_inference_mode_enabled())
        monkeypatch.setattr(model_mod, "weight_major", lambda x, w: False)  # a GPU's products: F.linear
        got = model(ids)
        each = sorted(calls)
        calls.clear()
        model_mod.fuse_projections(model)  # and with q / k / v, gate / up as one product each
        stacked = model(ids)
    layers = model.config.num_layers
    qk = 2 * layers if kind == "qwen3" else 0  # q_norm and k_norm per layer
    assert each == sorted(calls) == sorted(["rms_norm_triton"] * (1 + qk) + ["add_rms_norm_triton"] * 2 * layers
                                           + ["rope_store_triton"] * layers + ["silu_mul_triton"] * layers)
    assert all(model_mod._fused_linears(m, m.FUSED) is not None for m in model.modules() if hasattr(m, "FUSED"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked, want, rtol=1e-5, atol=1e-5)


@triton.jit
def _to_bf16(x_ptr, o_ptr, N: tl.constexpr):
    c = tl.arange(0, N)
    tl.store(o_ptr + c, _round(tl.load(x_ptr + c), tl.bfloat16))


def test_nan_and_inf_survive_the_bf16_rounding():
    """The hand rounding to bf16 on the bit patterns a GPU produces: its NaN is 0x7FFFFFFF (an
    add of 0x7FFF would carry it into the sign bit: −0.0), ±inf and the largest floats (which
    round to ±inf) and −0.0 kept."""
    bits = torch.tensor([0x7FFFFFFF, -1, 0x7F800000, -8388608, 0x7F7FFFFF, -2147483648, 0x3F808000, 0x3F818000],
                        dtype=torch.int32)  # NaN, −NaN (0xFFFFFFFF), inf, −inf, max float, −0.0, two ties
    x = bits.view(torch.float32).to(DEVICE)
    out = torch.empty(8, dtype=torch.bfloat16, device=DEVICE)
    _to_bf16[(1,)](x, out, N=8)
    got = out.float().cpu()
    assert bool(got[:2].isnan().all()), got
    assert got[2:5].tolist() == [float("inf"), float("-inf"), float("inf")]
    assert got[5].item() == 0.0 and torch.signbit(got[5])
    assert got[6:].tolist() == x[6:].cpu().to(torch.bfloat16).float().tolist() == [1.0, 1.015625]  # to even


def test_the_fused_path_keeps_hooks_and_falls_back_for_shapes_it_cannot_take(tmp_path, monkeypatch):
    """A layer with a forward hook (FSDP2 unshards a layer's weights in one) runs through its own
    __call__, not the fused loop; a model with more query heads or a wider hidden size than one
    program holds keeps torch's rotation and norm. Either way the hidden states are torch's."""
    from conftest import tiny_decoder
    from kernels import triton_norm, triton_pointwise

    model = tiny_decoder(tmp_path / "q2", "qwen2", num_hidden_layers=2)
    ids = torch.randint(0, model.config.vocab_size, (9,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(ids)
        monkeypatch.setattr(model_mod, "fused_kernels", lambda x: torch.is_inference_mode_enabled())
        monkeypatch.setattr(model_mod, "weight_major", lambda x, w: False)
        fired = []
        handle = model.layers[1].register_forward_pre_hook(lambda mod, args: fired.append(mod.index))
        hooked = model(ids)
        handle.remove()
        calls = []
        for mod, name in ((triton_norm, "rms_norm_triton"), (triton_norm, "add_rms_norm_triton"),
                          (triton_pointwise, "rope_store_triton")):
            monkeypatch.setattr(mod, name, lambda *a, _name=name, **k: calls.append(_name))
        monkeypatch.setattr(triton_pointwise, "MAX_HEADS", model.config.num_heads - 1)
        monkeypatch.setattr(triton_norm, "MAX_HIDDEN", model.config.hidden_size - 1)
        narrow = model(ids)
    assert fired == [1] and calls == []
    torch.testing.assert_close(hooked, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(narrow, want, rtol=1e-5, atol=1e-5)
