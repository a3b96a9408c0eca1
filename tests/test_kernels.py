"""Fused log-prob and GRPO loss against the fp64 materialised-logits reference.

Criterion (per output): |ours − ref| ≤ |naive torch in the same dtype − ref| + tol, where
ref is the reference in fp64. Every case runs on both backends: `torch` and `triton`
(under TRITON_INTERPRET=1 on CPU, set in conftest before triton is imported).
"""
from __future__ import annotations

import math

import pytest
import torch

from kernels import AGGREGATIONS, GRPOLossConfig, aggregation_weights, linear_grpo_loss, linear_logprob
from kernels.reference import grpo_token_loss_reference, naive_grpo_loss, naive_logprob

# backend names, with "-cuda" variants when a GPU is present (the GPU suite runs those)
BACKENDS = ["torch", "triton"] + (["torch-cuda", "triton-cuda"] if torch.cuda.is_available() else [])


def _split(name: str) -> tuple[str, str]:
    backend, _, device = name.partition("-")
    return backend, device or "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _inputs(t=47, h=31, v=123, dtype=torch.float32, seed=0, scale=1.0, negative=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h ** 0.5
    if negative:  # every logit < 0
        hidden, weight = hidden.abs(), -weight.abs()
    targets = torch.randint(0, v, (t,), generator=g)
    return hidden, weight, targets, g


def _close(ours, same_dtype, ref, dtype, what):
    ours, same_dtype, ref = ours.double(), same_dtype.double(), ref.double()
    budget = (same_dtype - ref).abs().max().item() + TOL[dtype] * (1 + ref.abs().max().item())
    err = (ours - ref).abs().max().item()
    assert err <= budget, f"{what}: |ours - ref| = {err:.3g} > {budget:.3g}"


def _grads(fn, hidden, weight, dtype, device="cpu"):
    h = hidden.detach().to(device=device, dtype=dtype).requires_grad_()
    w = weight.detach().to(device=device, dtype=dtype).requires_grad_()
    out = fn(h, w)
    out.backward()
    return out.detach().cpu(), h.grad.cpu(), w.grad.cpu()


# ---- linear_logprob -----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    dict(),                                    # odd shapes T=47, H=31, V=123
    dict(temperature=0.6),
    dict(scale=40.0),                          # confident targets: p -> 1 for most rows
    dict(negative=True),                       # all-negative logits
    dict(t=70, v=4100, chunk=32),              # V past one 4096 tile, T not a multiple of the chunk
])
def test_logprob_values_and_grads(backend, case):
    backend, device = _split(backend)
    case = dict(case)
    temperature, chunk = case.pop("temperature", 1.0), case.pop("chunk", 16)
    hidden, weight, targets, g = _inputs(**case)
    _check_logprob(hidden, weight, targets, g, temperature, chunk, backend, device)


def _check_logprob(hidden, weight, targets, g, temperature, chunk, backend, device):
    """linear_logprob's values, entropy and gradients (through random upstream weights) on
    `backend` against the fp64 reference, no worse than naive torch in fp32."""
    up_logp = torch.randn(hidden.shape[0], generator=g, dtype=torch.float64)
    up_ent = torch.randn(hidden.shape[0], generator=g, dtype=torch.float64)

    def ours(h, w):
        lp, ent = linear_logprob(h, w, targets.to(device), temperature=temperature, with_entropy=True,
                                 backend=backend, chunk_tokens=chunk)
        ours.values = (lp.cpu(), ent.cpu())
        return (lp.double() * up_logp.to(device)).sum() + (ent.double() * up_ent.to(device)).sum()

    def naive(h, w):
        lp, ent = naive_logprob(h, w, targets, temperature=temperature, with_entropy=True)
        naive.values = (lp, ent)
        return (lp.double() * up_logp).sum() + (ent.double() * up_ent).sum()

    _, ref_dh, ref_dw = _grads(naive, hidden, weight, torch.float64)
    ref_vals = naive.values
    _, n_dh, n_dw = _grads(naive, hidden, weight, torch.float32)
    n_vals = naive.values
    _, o_dh, o_dw = _grads(ours, hidden, weight, torch.float32, device)
    for name, o, n, r in zip(("logprob", "entropy"), ours.values, n_vals, ref_vals):
        assert o.dtype == torch.float32
        _close(o, n, r, torch.float32, name)
    _close(o_dh, n_dh, ref_dh, torch.float32, "d hidden")
    _close(o_dw, n_dw, ref_dw, torch.float32, "d weight")
    return o_dw, n_dw, ref_dw


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprob_without_entropy_and_no_grad(backend):
    backend, device = _split(backend)
    hidden, weight, targets, _ = _inputs()
    with torch.no_grad():
        lp, ent = linear_logprob(hidden.float().to(device), weight.float().to(device), targets.to(device),
                                 backend=backend, chunk_tokens=10)
        lp = lp.cpu()
    ref, _ = naive_logprob(hidden, weight, targets)
    assert ent is None
    _close(lp, naive_logprob(hidden.float(), weight.float(), targets)[0], ref, torch.float32, "logprob")


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprob_bf16(backend):
    """bf16 hidden states and lm_head, as training on a GPU hands them over (the Triton rows keep the
    chunk's logits in bf16): within bf16's error of the fp64 reference, as naive bf16 is."""
    backend, device = _split(backend)
    hidden, weight, targets, _ = _inputs(t=40, h=64, v=300)
    ref, _ = naive_logprob(hidden, weight, targets)
    same, _ = naive_logprob(hidden.bfloat16(), weight.bfloat16(), targets)
    ours, _ = linear_logprob(hidden.bfloat16().to(device), weight.bfloat16().to(device), targets.to(device),
                             backend=backend, chunk_tokens=16)
    _close(ours.cpu(), same.float(), ref, torch.bfloat16, "bf16 logprob")


def test_logprob_long_sequence_torch_backend():
    """T >= 65,536 tokens: nothing may be indexed by sequence length in a way that breaks."""
    hidden, weight, targets, _ = _inputs(t=65_536 + 37, h=8, v=16)
    ours, _ = linear_logprob(hidden.float(), weight.float(), targets, backend="torch")
    ref, _ = naive_logprob(hidden, weight, targets)
    _close(ours, naive_logprob(hidden.float(), weight.float(), targets)[0], ref, torch.float32, "long T")


# ---- linear_grpo_loss ----------------------------------------------------------------
def _policy_case(t, g, logp_ref, *, spread=0.5):
    adv = torch.randn(t, generator=g, dtype=torch.float64)
    old = logp_ref + spread * torch.randn(t, generator=g, dtype=torch.float64)
    ref = logp_ref + spread * torch.randn(t, generator=g, dtype=torch.float64)
    return adv, old, ref


CONFIGS = {
    "dapo": GRPOLossConfig(),
    "dual_clip_kl_k3_entropy": GRPOLossConfig(clip_c=3.0, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01),
    "kl_k1": GRPOLossConfig(kl_coef=0.05, kl_estimator="k1"),
    "kl_k2_temp": GRPOLossConfig(kl_coef=0.05, kl_estimator="k2", temperature=0.7),
    "tight_logratio_clamp": GRPOLossConfig(logratio_clamp=0.3, clip_c=2.0),
    "tis_kl": GRPOLossConfig(tis_cap=1.5, kl_coef=0.05, kl_estimator="k2"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("on_policy", [False, True])
def test_grpo_loss_values_and_grads(backend, name, on_policy):
    backend, device = _split(backend)
    cfg = CONFIGS[name]
    hidden, weight, targets, g = _inputs(seed=3)
    t = hidden.shape[0]
    with torch.no_grad():
        logp_ref, _ = naive_logprob(hidden, weight, targets, temperature=cfg.temperature)
    adv, old, ref = _policy_case(t, g, logp_ref, spread=1.0)
    behaviour = logp_ref + 0.3 * torch.randn(t, generator=g, dtype=torch.float64)  # the rollout's log-probs
    tw = torch.rand(t, generator=g, dtype=torch.float64)
    tw[::5] = 0  # masked tokens
    old = None if on_policy else old

    def run(fn, dtype, device="cpu", **kw):
        def on(x):
            return None if x is None else x.to(device=device, dtype=dtype)

        def loss(h, w):
            return fn(h, w, targets.to(device), advantages=on(adv), token_weight=on(tw), old_logprob=on(old),
                      ref_logprob=on(ref), behaviour_logprob=on(behaviour), cfg=cfg, **kw)
        return _grads(loss, hidden, weight, dtype, device)

    def fused(h, w, y, **kw):
        loss, stats = linear_grpo_loss(h, w, y, **kw)
        fused.stats = stats
        return loss

    ref_out = run(naive_grpo_loss, torch.float64)
    same_out = run(naive_grpo_loss, torch.float32)
    ours_out = run(fused, torch.float32, device, backend=backend, chunk_tokens=16)
    for what, o, n, r in zip(("loss", "d hidden", "d weight"), ours_out, same_out, ref_out):
        _close(o, n, r, torch.float32, what)
    assert int(fused.stats["tokens"]) == int((tw != 0).sum())
    # rollout/trainer mismatch over the loss tokens: the trainer's side is old, or logp when on-policy
    gap = ((logp_ref if old is None else old) - behaviour)[tw != 0].abs()
    assert abs(float(fused.stats["mismatch_abs"]) - gap.mean().item()) < 1e-4
    assert abs(float(fused.stats["max_mismatch_abs"]) - gap.max().item()) < 1e-4
    assert float(fused.stats["mismatch_over"]) == pytest.approx((gap > 0.1).double().mean().item())
    if cfg.tis_cap:
        capped = (((logp_ref if old is None else old) - behaviour)[tw != 0] >= math.log(cfg.tis_cap)).double()
        assert 0 < capped.mean() < 1  # the case puts tokens on both sides of the cap
        assert float(fused.stats["tis_capped"]) == pytest.approx(capped.mean().item(), abs=1e-6)


def test_every_clip_branch_is_hit_and_counted():
    """Hand-built ratios that land in each branch; stats count them, gradients vanish there."""
    cfg = GRPOLossConfig(clip_low=0.2, clip_high=0.28, clip_c=3.0)
    # tokens: A>0 ratio 2 (clip high) | A<0 ratio 0.5 (clip low) | A<0 ratio 5 (dual) | A>0 ratio 1.1 (free)
    ratios = torch.tensor([2.0, 0.5, 5.0, 1.1], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    logp = torch.tensor([-1.0, -2.0, -0.5, -1.5], dtype=torch.float64, requires_grad=True)
    old = logp.detach() - ratios.log()
    per_token = grpo_token_loss_reference(logp, None, adv, old, None, cfg)
    per_token.sum().backward()
    expected = torch.tensor([-1.28, 0.8, 3.0, -1.1], dtype=torch.float64)  # by hand: −A·clip(r) / −A·c / −A·r
    torch.testing.assert_close(per_token.detach(), expected)
    torch.testing.assert_close(logp.grad, torch.tensor([0, 0, 0, -1.1], dtype=torch.float64))
    from kernels.grpo_loss import grpo_token_terms
    loss, dlogp, stats = grpo_token_terms(logp.detach().float(), None, adv.float(), old.float(), None, cfg)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dlogp.double(), logp.grad, rtol=1e-6, atol=1e-6)
    assert stats["clip_high"].tolist() == [1, 0, 0, 0]
    assert stats["clip_low"].tolist() == [0, 1, 0, 0]
    assert stats["clip_dual"].tolist() == [0, 0, 1, 0]


@pytest.mark.parametrize("estimator,expected", [
    ("k1", [0.5, -0.5]), ("k2", [0.125, 0.125]),
    ("k3", [float(torch.tensor(-0.5).exp() - 1 + 0.5), float(torch.tensor(0.5).exp() - 1 - 0.5)]),
])
def test_kl_estimators_by_hand(estimator, expected):
    from kernels.grpo_loss import _kl_and_grad
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.5])
    value, grad = _kl_and_grad(logp, ref, estimator)
    torch.testing.assert_close(value, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    lp = logp.clone().double().requires_grad_()
    from kernels.reference import kl_reference
    kl_reference(lp, ref.double(), estimator).sum().backward()
    torch.testing.assert_close(grad.double(), lp.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_micro_batched_sum_equals_whole_batch_loss(mode, backend):
    """Uneven micro-batches with global counts sum to the whole-batch loss of each mode."""
    backend, device = _split(backend)
    g = torch.Generator().manual_seed(5)
    lengths = [7, 3, 12, 5, 9]  # response tokens of 5 sequences
    seq_index = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    t = len(seq_index)
    mask = (torch.rand(t, generator=g) > 0.15).float()
    hidden, weight, targets, _ = _inputs(t=t, seed=9)
    hidden, weight, targets = hidden.float().to(device), weight.float().to(device), targets.to(device)
    adv = torch.randn(t, generator=g).to(device)
    mask, seq_index = mask.to(device), seq_index.to(device)
    norm = 16 if mode == "seq-mean-token-sum-norm" else None
    whole_w = aggregation_weights(mask, seq_index, mode, norm_len=norm)
    whole, _ = linear_grpo_loss(hidden, weight, targets, advantages=adv, token_weight=whole_w, backend=backend)
    # the same batch cut into uneven micro-batches at sequence boundaries: [0,1] [2] [3,4]
    counts = dict(global_tokens=int(mask.sum()), global_seqs=len(lengths), norm_len=norm)
    bounds = [0, 10, 22, t]
    parts = 0.0
    for a, b in zip(bounds[:-1], bounds[1:]):
        w = aggregation_weights(mask[a:b], seq_index[a:b], mode, **counts)
        loss, _ = linear_grpo_loss(hidden[a:b], weight, targets[a:b], advantages=adv[a:b], token_weight=w,
                                   backend=backend)
        parts = parts + loss
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)
    whole, adv, mask, seq_index = whole.cpu(), adv.cpu(), mask.cpu(), seq_index.cpu()
    # and the whole-batch value matches the definition computed by hand
    per_tok = (-adv).double() * mask.double()  # on-policy: ratio 1, so loss per token = −A
    per_seq_sum = torch.zeros(len(lengths), dtype=torch.float64).index_add_(0, seq_index, per_tok)
    per_seq_n = torch.zeros(len(lengths), dtype=torch.float64).index_add_(0, seq_index, mask.double())
    expected = {"token-mean": per_tok.sum() / mask.sum(),
                "seq-mean-token-mean": (per_seq_sum / per_seq_n).mean(),
                "seq-mean-token-sum": per_seq_sum.mean(),
                "seq-mean-token-sum-norm": per_tok.sum() / (len(lengths) * 16)}[mode]
    torch.testing.assert_close(whole.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_grpo_loss(backend):
    backend, device = _split(backend)
    cfg = GRPOLossConfig(kl_coef=0.1)
    hidden, weight, targets, g = _inputs(t=33, h=64, v=200, seed=4)
    adv, old, ref = _policy_case(33, g, naive_logprob(hidden, weight, targets)[0].detach())
    tw = torch.full((33,), 1 / 33, dtype=torch.float64)

    def loss_with(fn, dtype, dev="cpu", **kw):
        def f(h, w):
            out = fn(h, w, targets.to(dev), advantages=adv.to(dev, dtype), token_weight=tw.to(dev, dtype),
                     old_logprob=old.to(dev, dtype), ref_logprob=ref.to(dev, dtype), cfg=cfg, **kw)
            return out[0] if isinstance(out, tuple) else out
        return _grads(f, hidden, weight, dtype, dev)

    ref_out = loss_with(naive_grpo_loss, torch.float64)
    same = loss_with(naive_grpo_loss, torch.bfloat16)
    ours = loss_with(linear_grpo_loss, torch.bfloat16, device, backend=backend, chunk_tokens=8)
    assert ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.bfloat16
    for what, o, n, r in zip(("loss", "d hidden", "d weight"), ours, same, ref_out):
        _close(o.float(), n.float(), r, torch.bfloat16, what)


def test_grpo_loss_long_sequence_torch_backend():
    hidden, weight, targets, g = _inputs(t=65_536 + 11, h=8, v=16, seed=2)
    t = hidden.shape[0]
    adv = torch.randn(t, generator=g, dtype=torch.float64)
    tw = torch.full((t,), 1.0 / t, dtype=torch.float64)
    h32 = hidden.float().requires_grad_()
    loss, _ = linear_grpo_loss(h32, weight.float(), targets, advantages=adv.float(), token_weight=tw.float(),
                               backend="torch")
    loss.backward()
    h64 = hidden.clone().requires_grad_()
    ref = naive_grpo_loss(h64, weight, targets, advantages=adv, token_weight=tw)
    ref.backward()
    h_same = hidden.float().requires_grad_()
    same = naive_grpo_loss(h_same, weight.float(), targets, advantages=adv.float(), token_weight=tw.float())
    same.backward()
    _close(loss, same, ref, torch.float32, "loss")
    _close(h32.grad, h_same.grad, h64.grad, torch.float32, "d hidden")


def test_bad_shapes_and_config_are_refused():
    hidden, weight, targets, _ = _inputs()
    with pytest.raises(ValueError, match="advantages must have shape"):
        linear_grpo_loss(hidden, weight, targets, advantages=torch.zeros(3), token_weight=torch.zeros(47))
    with pytest.raises(ValueError, match=r"hidden \[T, H\] and weight \[V, H\]"):
        linear_logprob(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match="clip_c must be > 1"):
        GRPOLossConfig(clip_c=0.5)
    with pytest.raises(ValueError, match="kernel backend 'cuda' unknown"):
        linear_logprob(hidden, weight, targets, backend="cuda")
    with pytest.raises(ValueError, match="needs norm_len"):
        aggregation_weights(torch.ones(3), torch.zeros(3), "seq-mean-token-sum-norm")


# ---- the policy-loss table shared with engine.rl's reference (tests/policy_cases.py) ----
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [
    n for n in __import__("policy_cases").POLICY_CASES])
def test_fused_loss_agrees_with_policy_table(backend, name):
    from policy_cases import POLICY_CASES, case_tensors

    from engine.rl import policy_loss
    backend, device = _split(backend)
    case = POLICY_CASES[name]
    cfg = case["cfg"]
    t = len(case["logp"])
    hidden, weight, targets, _ = _inputs(t=t, h=16, v=40, seed=11)
    # the table's ratios, advantages and weights around the model's own log-probs
    with torch.no_grad():
        logp0, _ = naive_logprob(hidden, weight, targets, temperature=cfg.temperature)
    parts = case_tensors(case, logp0)

    def reference(h, w):
        lp, ent = naive_logprob(h, w, targets, temperature=cfg.temperature, with_entropy=True)
        return policy_loss(lp, parts["adv"], parts["weight"], old_logprob=parts["old"], ref_logprob=parts["ref"],
                           entropy=ent, behaviour_logprob=parts["behaviour"], cfg=cfg)[0]

    def fused(h, w):
        def on(x):
            return None if x is None else x.to(device=device, dtype=torch.float32)
        loss, _ = linear_grpo_loss(h, w, targets.to(device), advantages=on(parts["adv"]),
                                   token_weight=on(parts["weight"]), old_logprob=on(parts["old"]),
                                   ref_logprob=on(parts["ref"]), behaviour_logprob=on(parts["behaviour"]), cfg=cfg,
                                   backend=backend)
        return loss

    ref_out = _grads(reference, hidden, weight, torch.float64)
    ours = _grads(fused, hidden, weight, torch.float32, device)
    for what, o, r in zip(("loss", "d hidden", "d weight"), ours, ref_out):
        _close(o, r.float(), r, torch.float32, what)


# ---- real vocabulary widths, each row's maximum in the LAST 8,192 slice / 4,096 tile ----------
def _last_tile_inputs(t, h, v, seed):
    """_inputs, plus k = 3 switch features: row i turns on feature i % k (value 8..10), which adds
    that much to one column of the last 4,096 tile (and so of the last 8,192 slice): every row's
    maximum logit lies there, so a tile-wise online max / sum must rescale what it has summed.
    Half the targets are those columns (each row's likeliest token), the rest are random."""
    hidden, weight, targets, g = _inputs(t=t, h=h, v=v, seed=seed)
    k = 3
    cols = [v - 1, v - 1_000, v - 3_000]
    last_tile, last_slice = (v - 1) // 4096 * 4096, (v - 1) // 8192 * 8192
    assert all(c >= max(last_tile, last_slice) for c in cols)
    hidden[:, -k:] = 0
    weight[:, -k:] = 0
    for j, c in enumerate(cols):
        weight[c, h - k + j] = 1.0
    rows = torch.arange(t)
    hidden[rows, h - k + rows % k] = 8.0 + 2.0 * torch.rand(t, generator=g, dtype=torch.float64)
    bumped = torch.tensor(cols)[rows % k]
    targets[::2] = bumped[::2]
    z = hidden @ weight.t()
    assert torch.equal(z.argmax(-1), bumped)  # the row maxima really sit in the last tile
    assert (z[:, :last_tile].max(-1).values < z.max(-1).values - 2).all()  # by a margin
    return hidden, weight, targets, g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v,temperature", [(20_011, 1.0), (49_152, 0.7)])
def test_logprob_max_in_last_tile_real_vocab(backend, v, temperature):
    """V = 20,011 (ragged last tile) and 49,152 (exact multiple): 3 / 6 torch slices, 5 / 12 Triton
    tiles; catches a missing online rescale and any slice that skips or mis-writes columns."""
    backend, device = _split(backend)
    hidden, weight, targets, g = _last_tile_inputs(t=13, h=16, v=v, seed=21)
    chunk = 8  # two chunks, the second ragged
    o_dw, n_dw, ref_dw = _check_logprob(hidden, weight, targets, g, temperature, chunk, backend, device)
    # the last slice's columns carry most of dW here: check them on their own scale too
    tail = (v - 1) // 8192 * 8192
    _close(o_dw[tail:], n_dw[tail:], ref_dw[tail:], torch.float32, "d weight, last slice")
    _close(o_dw[:tail], n_dw[:tail], ref_dw[:tail], torch.float32, "d weight, before the last slice")


# ---- the fused loss's stats ---------------------------------------------------------------------
def _expected_stats(logp, ent, adv, old, ref, cfg):
    """The documented stats, from the definitions (not from grpo_token_terms): means over the
    loss tokens of logprob, entropy, ratio = exp(clamp(logp − old)), k-estimator KL, and the
    fractions of tokens clipped low (A < 0, r < 1 − clip_low), high (A > 0, r > 1 + clip_high)
    and by the dual clip (A < 0 and −A·clip_c below the clipped surrogate, i.e. r > clip_c)."""
    from kernels.reference import kl_reference
    ratio = torch.exp(torch.clamp(logp - old, -cfg.logratio_clamp, cfg.logratio_clamp))
    return {
        "logprob": logp.mean(), "entropy": ent.mean(), "ratio": ratio.mean(),
        "kl": kl_reference(logp, ref, cfg.kl_estimator).mean(),
        "clip_low": ((adv < 0) & (ratio < 1 - cfg.clip_low)).double().mean(),
        "clip_high": ((adv > 0) & (ratio > 1 + cfg.clip_high)).double().mean(),
        "clip_dual": ((adv < 0) & (ratio > cfg.clip_c)).double().mean(),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_loss_stats_match_reference_whatever_the_chunk(backend):
    """Every stat (not only `tokens`) equals its definition on the fp64 reference's log-probs, over
    the loss tokens only, and does not depend on the chunking: 5 chunks of 4 vs one chunk."""
    backend, device = _split(backend)
    cfg = GRPOLossConfig(temperature=0.8, clip_low=0.2, clip_high=0.28, clip_c=3.0, kl_coef=0.1,
                         kl_estimator="k3", entropy_coef=0.01)
    t, v = 24, 20_011
    hidden, weight, targets, g = _inputs(t=t, h=16, v=v, seed=21)
    logp64, ent64 = naive_logprob(hidden, weight, targets, temperature=cfg.temperature, with_entropy=True)
    adv, old, ref = _policy_case(t, g, logp64, spread=1.0)
    tw = torch.rand(t, generator=g, dtype=torch.float64)
    tw[[2, 9, 10, 23]] = 0  # not loss tokens (dropped before chunking): no part of any stat
    keep = tw != 0
    expected = _expected_stats(logp64[keep], ent64[keep], adv[keep], old[keep], ref[keep], cfg)
    lp32, ent32 = naive_logprob(hidden.float(), weight.float(), targets, temperature=cfg.temperature,
                                with_entropy=True)
    same = _expected_stats(lp32.double()[keep], ent32.double()[keep], adv[keep], old.float().double()[keep],
                           ref.float().double()[keep], cfg)
    # the data engage every branch, and no ratio sits so close to a threshold that fp32 could flip it
    for name in ("clip_low", "clip_high", "clip_dual"):
        assert 0 < expected[name] < 1, name
    log_r = (logp64 - old)[keep]
    for threshold in (1 - cfg.clip_low, 1 + cfg.clip_high, cfg.clip_c):
        assert (log_r - torch.log(torch.tensor(threshold, dtype=torch.float64))).abs().min() > 1e-3

    def fused(chunk):
        def on(x):
            return x.to(device=device, dtype=torch.float32)
        _, stats = linear_grpo_loss(on(hidden), on(weight), targets.to(device), advantages=on(adv),
                                    token_weight=on(tw), old_logprob=on(old), ref_logprob=on(ref), cfg=cfg,
                                    backend=backend, chunk_tokens=chunk)
        return {k: s.cpu() for k, s in stats.items()}

    chunked, whole = fused(4), fused(None)
    assert set(chunked) == set(expected) | {"tokens"}
    for stats in (chunked, whole):
        assert int(stats["tokens"]) == int(keep.sum())
        for name in ("logprob", "entropy", "ratio", "kl"):
            _close(stats[name], same[name], expected[name], torch.float32, name)
        for name in ("clip_low", "clip_high", "clip_dual"):
            assert stats[name].item() == pytest.approx(expected[name].item(), abs=1e-6), name
    for name in expected:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-5, atol=1e-6)


# ---- chunk sizing by the logits' dtype; dW accumulation in fp32 ------------------------------
def test_chunk_sizing_follows_the_logits_dtype_and_rows():
    from kernels.rows import TorchRows, chunk_rows, logit_bytes, rows_for_budget
    from kernels.triton_rows import TritonRows

    assert logit_bytes(TorchRows, torch.float32) == 4 and logit_bytes(TritonRows, torch.float32) == 4
    # fp32 logits of bf16 inputs (the default): 4 bytes + the gradient's bf16 copy, either rows
    assert logit_bytes(TritonRows, torch.bfloat16) == logit_bytes(TorchRows, torch.bfloat16) == 6
    assert logit_bytes(TritonRows, torch.bfloat16, "compute") == 2  # in place
    assert logit_bytes(TorchRows, torch.bfloat16, "compute") == 6  # bf16 logits + the fp32 copy the row passes use
    vocab = 151_936
    assert (rows_for_budget(vocab, 1024, 4), rows_for_budget(vocab, 1024, 2)) == (1728, 3520)  # 1 GiB, x64
    assert rows_for_budget(vocab, 1024, 6) == 1152  # 1 GiB / (V x 6 bytes), a multiple of 64
    assert chunk_rows(10_000, vocab, torch.device("cpu"), bytes_per_logit=2) == rows_for_budget(vocab, 256, 2)


def test_accumulate_dw_of_half_inputs_stays_in_fp32_and_lets_oom_through(monkeypatch):
    from kernels import rows as rows_mod

    g = torch.Generator().manual_seed(0)
    dz = (torch.randn(64, 96, generator=g) * 1e-3).to(torch.bfloat16)
    h = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    dw = torch.randn(96, 32, generator=g)
    want = dw.double() + dz.double().t() @ h.double()
    rows_mod.accumulate_dw(dw, dz, h)
    err = float((dw.double() - want).abs().max() / want.abs().max())
    assert err < 1e-6  # an fp32 accumulation: a bf16-rounded partial product would be off by ~1e-3
    calls = []
    real = torch.addmm

    def oom(*args, **kwargs):
        calls.append(kwargs.get("out_dtype"))
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(rows_mod, "_FP32_OUT", {})
    monkeypatch.setattr(torch, "addmm", oom)
    with pytest.raises(torch.OutOfMemoryError):
        rows_mod.accumulate_dw(dw, dz, h)
    monkeypatch.setattr(torch, "addmm", real)
    rows_mod.accumulate_dw(dw, dz, h)  # the failed probe cached nothing: probed again, once
    assert len(rows_mod._FP32_OUT) == 1


def test_row_kernel_launch_config_is_the_fastest_candidate_and_keeps_the_results(monkeypatch):
    from kernels import triton_rows
    from kernels.rows import TorchRows

    monkeypatch.setattr(triton_rows, "_LAUNCH", {})
    g = torch.Generator().manual_seed(0)
    c, v = 6, 3000  # not a power of two: the last tile is partial for every width
    z = torch.randn(c, v, generator=g) * 3
    targets = torch.randint(0, v, (c,), generator=g)
    fastest = (2048, 8)
    timed = []

    def timer(run):  # runs each candidate for real (on the copy), reports a made-up time
        run()
        timed.append(len(timed))
        return 1.0 if len(timed) != 1 + triton_rows.LAUNCH_CANDIDATES.index(fastest) else 0.5

    want_lse, want_logp, want_ent = TorchRows.stats(z.clone(), targets, 0.7)
    gl = torch.randn(c, generator=g)
    ge = torch.randn(c, generator=g)
    want_dz = TorchRows.grad(z.clone(), targets, want_lse, want_ent, gl, ge, 0.7)
    for kind in ("stats", "grad"):
        def launch(rows, block_v, warps, kind=kind):
            if kind == "stats":
                triton_rows._row_stats_kernel[(rows.shape[0],)](
                    rows, rows.stride(0), targets, *(torch.empty(rows.shape[0]) for _ in range(3)), v, 0.7,
                    BLOCK_V=block_v, num_warps=warps)
            else:
                triton_rows._row_grad_kernel[(rows.shape[0],)](
                    rows, rows.stride(0), targets, want_lse, want_ent, gl, ge, v, 0.7, HAS_ENT=True,
                    BLOCK_V=block_v, num_warps=warps)
        timed.clear()
        assert triton_rows.launch_config(kind, z, launch, timer=timer) == fastest
        assert len(timed) == len(triton_rows.LAUNCH_CANDIDATES)  # 3000 < 4096: no width collapses
        assert triton_rows.launch_config(kind, z, launch, timer=timer) == fastest and len(timed) == 6  # cached
    # every candidate width computes the same thing; tuning (on a copy) leaves z as it was
    for block_v, warps in triton_rows.LAUNCH_CANDIDATES:
        monkeypatch.setattr(triton_rows, "_LAUNCH", {})
        monkeypatch.setattr(triton_rows, "LAUNCH_CANDIDATES", ((block_v, warps),))
        lse, logp, ent = triton_rows.TritonRows.stats(z, targets, 0.7)
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent, want_ent, rtol=1e-4, atol=1e-5)
        dz = triton_rows.TritonRows.grad(z.clone(), targets, lse, ent, gl, ge, 0.7)
        torch.testing.assert_close(dz, want_dz, rtol=1e-4, atol=1e-6)
    monkeypatch.setattr(triton_rows, "LAUNCH_CANDIDATES", ((1024, 4), (4096, 4)))
    monkeypatch.setattr(triton_rows, "_LAUNCH", {})
    small = z[:, :300].contiguous()  # both widths fit in 512: one candidate left, nothing to time
    assert triton_rows.launch_config("stats", small, lambda *a: None, timer=lambda run: 1 / 0) == (512, 4)


def test_fused_ops_under_autocast_keep_their_gradients_consistent():
    """Autocast is off in a backward pass: a fused op called inside torch.autocast computes its
    products in the inputs' dtype (fp32 here), so the backward's recompute sees the forward's
    logits; left to autocast, the forward's bf16 logits against the fp32 recompute gave gradients
    ~6% off (softmax rows summing to 0.87..1.16)."""
    hidden, weight, targets, _ = _inputs(t=24, h=16, v=300, scale=12.0, seed=5)

    def logprob(h, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_logprob(h, w, targets, temperature=0.7)[0].sum()

    def grpo(h, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_grpo_loss(h, w, targets, advantages=torch.ones(24), token_weight=torch.full((24,), 0.1),
                                    cfg=GRPOLossConfig(temperature=0.7))[0]

    def naive(h, w):
        return naive_logprob(h, w, targets, temperature=0.7)[0].sum()
    want = _grads(naive, hidden, weight, torch.float64)
    got = _grads(logprob, hidden, weight, torch.float32)
    for name, o, r in zip(("value", "d hidden", "d weight"), got, want):
        _close(o, r.float(), r, torch.float32, f"logprob {name}")
    # on-policy, A = 1, token weight 0.1: loss = −0.1 · Σ ratio = −2.4, d loss / d logp = −0.1 a token
    value, dh, dw = _grads(grpo, hidden, weight, torch.float32)
    assert value.item() == pytest.approx(-2.4)
    for name, o, r in (("d hidden", dh, -0.1 * want[1]), ("d weight", dw, -0.1 * want[2])):
        _close(o, r.float(), r, torch.float32, f"grpo {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs_give_fp32_logits(backend):
    """bf16 hidden states and lm_head with logits around 20 (a trained model's scale): the chunk's
    logits are written in fp32 by the product, so the log-probs are those of the bf16 inputs to
    fp32 rounding; rounded to bf16 first ("compute") they were off by up to ~0.1 nat at T 0.7."""
    backend, device = _split(backend)
    g = torch.Generator().manual_seed(4)
    hidden = (torch.randn(40, 64, generator=g) * 2).to(torch.bfloat16)
    weight = (torch.randn(700, 64, generator=g) * 0.6).to(torch.bfloat16)
    targets = torch.randint(0, 700, (40,), generator=g)
    exact = torch.log_softmax(hidden.double() @ weight.double().t() / 0.7, -1).gather(1, targets[:, None]).squeeze(1)
    errors = {}
    for mode in ("fp32", "compute"):
        logp, _ = linear_logprob(hidden.to(device), weight.to(device), targets.to(device), temperature=0.7,
                                 backend=backend, logits=mode)
        loss, stats = linear_grpo_loss(hidden.to(device), weight.to(device), targets.to(device),
                                       advantages=torch.ones(40, device=device),
                                       token_weight=torch.full((40,), 1 / 40, device=device),
                                       cfg=GRPOLossConfig(temperature=0.7), backend=backend, logits=mode)
        errors[mode] = max((logp.cpu().double() - exact).abs().max().item(),
                           abs(stats["logprob"].item() - exact.mean().item()))
    assert errors["fp32"] < 1e-4 < 1e-2 < errors["compute"], errors
    with pytest.raises(ValueError, match="logits 'bf16' unknown"):
        linear_logprob(hidden, weight, targets, logits="bf16")


def test_empty_kernel_variables_mean_unset(monkeypatch):
    """`export LONGRL_CHUNK_MB=` clears a setting, as the config reads it: the kernels take their
    defaults instead of failing on ''."""
    from kernels.rows import TorchRows, chunk_rows, pick_rows

    monkeypatch.setenv("LONGRL_KERNEL_BACKEND", "")
    monkeypatch.setenv("LONGRL_CHUNK_MB", "")
    assert pick_rows("auto", torch.device("cpu")) is TorchRows
    monkeypatch.delenv("LONGRL_CHUNK_MB")
    default = chunk_rows(10_000, 50_000, torch.device("cpu"))
    monkeypatch.setenv("LONGRL_CHUNK_MB", "")
    assert chunk_rows(10_000, 50_000, torch.device("cpu")) == default
    hidden, weight, targets, _ = _inputs(t=5, h=8, v=20)
    assert torch.isfinite(linear_logprob(hidden.float(), weight.float(), targets)[0]).all()
