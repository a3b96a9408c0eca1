"""Mixed precision that trains: fp32 master weights and AdamW state with bf16 compute move the
weights as fp32 training does at a small learning rate, where bf16 weights would not move at
all; pure bf16 training is refused; the RL rollout generates with a bf16 copy refreshed from
the master weights each step; under FSDP2 the policy casts the gathered weights and reduces
gradients in fp32 (one step on 2 gloo ranks equals one process within bf16 error)."""
from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch
from conftest import letters_checkpoint
from dist_helpers import run_ranks

from engine.config import ConfigError, ParallelConfig, SFTConfig, TrainConfig, load_config
from engine.train.loop import Precision, start_model
from engine.train.sft import SFTTrainer

LR = 1e-6
BF16 = Precision(torch.bfloat16, "cpu")


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    return letters_checkpoint(tmp_path_factory.mktemp("letters-precision"), max_positions=256)


def examples():
    g = torch.Generator().manual_seed(3)
    out = []
    for n in (11, 17, 9, 14):
        ids = torch.randint(0, 16, (n,), generator=g).tolist()
        out.append((ids, [0] * 4 + [1] * (n - 4)))
    return out


def sft_step(path, precision=None, weights_dtype=torch.float32, par=None):
    from engine.model import load_model
    model, _ = load_model(path, device="cpu", dtype="float32")
    model = model.to(weights_dtype)
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    if par is not None:
        from engine.parallel import parallelize
        parallelize(model, par.mesh, precision.compute if precision else None)
    trainer = SFTTrainer(model, examples(), TrainConfig(lr=LR, seed=0, token_budget=40, grad_clip=0.0),
                         SFTConfig(batch_examples=4, max_steps=1), parallel=par, precision=precision)
    row = trainer.step()
    return model, trainer, before, row


def deltas(model, before) -> dict:
    state = model.state_dict()
    full = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t) for n, t in state.items()}
    return {n: full[n].float() - before[n] for n in before}


def test_bf16_mixed_moves_the_weights_as_fp32_does(letters):
    m32, _, b32, row32 = sft_step(letters)
    mix, trainer, bmix, rowmix = sft_step(letters, BF16)
    assert all(p.dtype == torch.float32 for p in mix.parameters())  # master weights
    state = trainer.optimizer.state
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())
    assert rowmix["loss"] == pytest.approx(row32["loss"], rel=2e-2) and rowmix["loss"] != row32["loss"]  # bf16
    d32, dmix = deltas(m32, b32), deltas(mix, bmix)
    for n in d32:
        a, b = d32[n].flatten(), dmix[n].flatten()
        assert a.norm() > 0.5 * LR * a.numel() ** 0.5  # Adam's first step: about lr per weight
        cos = float(a @ b / (a.norm() * b.norm()))
        assert cos > 0.98 and float(b.norm() / a.norm()) == pytest.approx(1.0, abs=0.05), n
    # bf16 weights under the same step barely move: what mixed precision is for
    m16, _, b16, _ = sft_step(letters, None, torch.bfloat16)
    moved = sum(int((d != 0).sum()) for d in deltas(m16, b16).values())
    total = sum(d.numel() for d in d32.values())
    assert moved < 0.5 * total


def test_pure_bf16_training_is_refused(letters):
    cfg = load_config(None, [f"--model.path={letters}", "--model.dtype=bfloat16"])
    with pytest.raises(ConfigError, match="train.precision = 'bf16-mixed'"):
        start_model(cfg, letters)
    cfg = load_config(None, [f"--model.path={letters}", "--train.precision=bf16-mixed"])
    assert Precision.of(cfg, "cpu").name == "bf16-mixed"
    assert Precision.of(load_config(None, []), "cpu").name == "fp32"
    assert Precision.of(load_config(None, []), "cuda").name == "bf16-mixed"
    assert Precision.named("fp32", "cuda").name == "fp32" and Precision.named("bf16-mixed", "cpu").name == "bf16-mixed"


def test_rl_rollout_uses_a_bf16_copy_refreshed_each_step(letters):
    from test_rl_options import scripted_generate
    from test_rl_train import LetterTokenizer, ToyReward

    from engine.config import DataConfig, RLConfig
    from engine.curriculum import PhaseSampler
    from engine.data import synthetic
    from engine.model import load_model
    from engine.train.rl import GRPOTrainer

    model, _ = load_model(letters, device="cpu", dtype="float32")
    records = synthetic.generate(4, 12, seed=3, kinds=("lookup",))
    rl = RLConfig(group_size=4, batch_prompts=2, max_new_tokens=6, temperature=1.0, top_p=1.0, max_rounds=1,
                  dynamic_sampling=False, entropy_coef=0.01)
    trainer = GRPOTrainer(model, LetterTokenizer(), records, rl, TrainConfig(lr=1e-3, seed=0), reward=ToyReward(),
                          total_steps=2, data=DataConfig(template="plain"), precision=BF16)
    copy_ = trainer.rollout_model
    assert trainer.generator.model is copy_ and all(p.dtype == torch.bfloat16 for p in copy_.parameters())
    trainer.generator.generate = scripted_generate([3, 5, 2, 6])
    sampler = PhaseSampler(list(trainer.records), seed=0)
    start = copy.deepcopy(model.state_dict())
    row = trainer.step(sampler, max_input=400)
    assert "time/weight_sync" in row and row["loss"] != 0
    changed = [n for n, t in model.state_dict().items() if not torch.equal(t, start[n])]
    assert changed  # the update moved the fp32 master weights
    trainer.step(sampler, max_input=400)  # the next step's rollout reads them, cast to bf16
    for n, t in copy_.state_dict().items():
        assert t.dtype == torch.bfloat16
    stale = copy.deepcopy(copy_.state_dict())
    trainer._sync_rollout_weights()
    assert all(torch.equal(copy_.state_dict()[n], model.state_dict()[n].to(torch.bfloat16)) for n in stale)
    # its projections are stacked (one product for q / k / v, one for gate / up), and the syncs kept them so
    from engine.model.model import _fused_linears
    stacks = [m for m in copy_.modules() if hasattr(m, "FUSED")]
    assert len(stacks) == 2 * model.config.num_layers and all(_fused_linears(m, m.FUSED) for m in stacks)


def _fsdp_rank(rank, world, path):
    from engine.parallel.runtime import Parallel
    par = Parallel.from_env(ParallelConfig(sp=1, timeout_s=60))
    model, trainer, before, row = sft_step(path, BF16, par=par)
    d = deltas(model, before)
    kinds = {type(p).__name__ for p in model.parameters()}
    model(torch.tensor([1, 2, 3]), torch.tensor([0, 3]))  # the root stays gathered after a forward:
    gathered = model.lm_head_weight.dtype  # in the policy's compute dtype
    return row["loss"], row["grad_norm"], {n: t.numpy() for n, t in d.items()}, sorted(kinds), gathered


def test_fsdp_mixed_precision_step_equals_one_process(letters):
    one_model, _, before, row = sft_step(letters, BF16)
    one = deltas(one_model, before)
    fp32_loss = sft_step(letters)[3]["loss"]
    results = run_ranks(_fsdp_rank, 2, letters, timeout=150)
    for loss, norm, d, kinds, gathered in results:
        assert kinds == ["DTensor"] and gathered == torch.bfloat16  # fp32 shards, gathered and cast to bf16
        assert loss != fp32_loss  # the policy computes in bf16
        assert loss == pytest.approx(row["loss"], rel=2e-2) and norm == pytest.approx(row["grad_norm"], rel=5e-2)
        for n, a in one.items():
            b = torch.from_numpy(d[n])
            cos = float(a.flatten() @ b.flatten() / (a.norm() * b.norm()))
            assert cos > 0.95, n  # bf16 rounding differs with the split (Adam's first step ~ lr·sign(g))


def test_mfu_counts_forward_only_passes_at_a_third_and_per_device():
    from engine.train.metrics import efficiency, nvml_uuid

    model = torch.nn.Linear(10, 10, bias=False)  # 100 parameters
    assert efficiency(model, 2.0, 1e-9, train_tokens=3)["mfu"] == pytest.approx(100 * 18 / 2 / 1e3)
    both = efficiency(model, 2.0, 1e-9, train_tokens=3, forward_tokens=6, devices=2)["mfu"]
    assert both == pytest.approx(100 * (18 + 12) / 2 / 1e3 / 2)
    assert "mfu" not in efficiency(model, 2.0, 0.0, train_tokens=3)  # no peak given: no MFU
    assert nvml_uuid("58e8a3c1-0000-1111-2222-333344445555") == "GPU-58e8a3c1-0000-1111-2222-333344445555"
    assert nvml_uuid("GPU-abc") == "GPU-abc" and nvml_uuid("MIG-abc") == "MIG-abc"


def test_rl_step_mfu_covers_the_old_log_prob_pass(letters):
    from test_rl_options import scripted_generate
    from test_rl_train import LetterTokenizer, ToyReward

    from engine.config import DataConfig, RLConfig
    from engine.curriculum import PhaseSampler
    from engine.data import synthetic
    from engine.model import load_model
    from engine.train.rl import GRPOTrainer

    model, _ = load_model(letters, device="cpu", dtype="float32")
    rl = RLConfig(group_size=4, batch_prompts=2, max_new_tokens=6, max_rounds=1, dynamic_sampling=False,
                  entropy_coef=0.01, mini_batches=2)
    trainer = GRPOTrainer(model, LetterTokenizer(), synthetic.generate(4, 12, seed=3, kinds=("lookup",)), rl,
                          TrainConfig(lr=1e-3, seed=0, peak_tflops=1e-6), reward=ToyReward(), total_steps=1,
                          data=DataConfig(template="plain"))
    trainer.generator.generate = scripted_generate([3, 5, 2, 6])
    row = trainer.step(PhaseSampler(list(trainer.records), seed=0), max_input=400)
    through = row["update_tokens"] / 2  # two passes: the update and the old log-probs
    params = sum(p.numel() for p in model.parameters())
    seconds = row["time/update"] + row["time/old_logprob"]
    assert row["time/old_logprob"] > 0 and "_work" not in row
    assert row["mfu"] == pytest.approx(params * (6 * through + 2 * through) / seconds / 1e6, rel=1e-6)


def test_the_kl_reference_computes_the_starting_policy(letters, tmp_path, monkeypatch):
    """Under bf16-mixed the policy is fp32 weights run under autocast; its KL reference must give
    the same log-probs at the start of RL (KL 0), however `model.dtype = auto` loads (bf16 on a
    GPU, stood in for here), and holds each linear layer's weights in bf16 (what autocast rounds
    them to). Under FSDP2, whose policy casts every weight, the reference is bf16 throughout."""
    import dataclasses

    from engine.config import KernelsConfig, RLConfig
    from engine.data import synthetic
    from engine.model import weights
    from engine.train import _reference_model
    from engine.train.rl import GRPOTrainer
    from kernels import linear_logprob

    real = weights.default_dtype
    monkeypatch.setattr(weights, "default_dtype",
                        lambda dtype, device: torch.bfloat16 if dtype in (None, "auto") else real(dtype, device))
    from test_rl_train import LetterTokenizer

    from engine.model import load_model
    cfg = load_config(None, [f"--model.path={letters}", "--train.precision=bf16-mixed", "--rl.kl_coef=0.01"])
    model, tok = load_model(letters, device="cpu", dtype="float32")[0], LetterTokenizer()
    ids = torch.randint(1, 16, (23,), generator=torch.Generator().manual_seed(1))

    def logprobs(m):
        with BF16.autocast():
            hidden = m(ids[:-1])
        return linear_logprob(BF16.cast(hidden), BF16.cast(m.lm_head_weight), ids[1:])[0]
    start = logprobs(model)
    ref = _reference_model(cfg, tmp_path, model, None, False, BF16)
    trainer = GRPOTrainer(model, tok, [], RLConfig(kl_coef=0.01), cfg.train, precision=BF16, kernels=KernelsConfig())
    for r in (ref, trainer.ref_model):  # saved and reloaded; the in-process copy
        assert torch.equal(logprobs(r), start)
        assert r.embed_tokens.weight.dtype == torch.float32 and r.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    sharded = _reference_model(cfg, tmp_path, model, None, True, BF16, parallel=Barrier())
    assert {p.dtype for p in sharded.parameters()} == {torch.bfloat16}
    # its passes take the policy's attention backend (a bf16 reference would get flash-attn on a GPU
    # beside an fp32 policy's SDPA), in both layouts
    from test_parallel_rl import fixed_batch

    from engine.train import rl as rl_mod
    seen = []
    monkeypatch.setattr(rl_mod, "resolve_backend", lambda name, device, dtype: seen.append(dtype) or "sdpa")
    trainer.records = {r.id: r for r in synthetic.generate(6, 12, seed=3, kinds=("lookup",))}
    batch = fixed_batch(trainer)
    samples = [(gi, c) for gi, g in enumerate(batch) for c in g.completions]
    for layout in (True, False):
        trainer.rl = dataclasses.replace(trainer.rl, shared_prefix=layout)
        micros = trainer._micro_batches(sharded, batch, samples, list(range(len(samples))))
        assert all(m.attn.backend == "sdpa" for m in micros)
    assert seen == [torch.float32, torch.float32]  # the policy's lm_head, not the reference's bf16


class Barrier:  # one rank of several, as _reference_model sees it
    is_main = True

    def barrier(self):
        pass


def test_sft_takes_the_kernels_section(letters, monkeypatch):
    """[kernels] backend and chunk_mb reach SFT's fused log-prob (the OOM advice names chunk_mb)."""
    from kernels.rows import rows_for_budget

    from engine.config import KernelsConfig
    from engine.model import load_model
    from engine.train import sft as sft_mod

    model, _ = load_model(letters, device="cpu", dtype="float32")
    seen, real = [], sft_mod.linear_logprob
    monkeypatch.setattr(sft_mod, "linear_logprob", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    trainer = SFTTrainer(model, examples(), TrainConfig(lr=LR, seed=0, token_budget=40),
                         SFTConfig(batch_examples=4, max_steps=1),
                         kernels=KernelsConfig(backend="torch", chunk_mb=3, logits="compute"))
    trainer.step()
    want = {"backend": "torch", "chunk_tokens": rows_for_budget(model.lm_head_weight.shape[0], 3), "logits": "compute"}
    assert seen and all(kw == want for kw in seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_reference_kept_on_the_cpu_serves_a_cuda_update(letters):
    """rl.ref_device = "cpu": the reference waits in host memory and its pass runs on the
    training device (its table indexed by the policy's micro-batches there); KL 0 at the start."""
    from test_rl_options import scripted_generate
    from test_rl_train import LetterTokenizer, ToyReward

    from engine.config import DataConfig, RLConfig
    from engine.curriculum import PhaseSampler
    from engine.data import synthetic
    from engine.model import load_model
    from engine.train.rl import GRPOTrainer

    model, _ = load_model(letters, device="cuda", dtype="float32")
    rl = RLConfig(group_size=4, batch_prompts=2, max_new_tokens=6, max_rounds=1, dynamic_sampling=False,
                  kl_coef=0.01, ref_device="cpu")
    trainer = GRPOTrainer(model, LetterTokenizer(), synthetic.generate(4, 12, seed=3, kinds=("lookup",)), rl,
                          TrainConfig(lr=1e-6, seed=0), reward=ToyReward(), total_steps=1,
                          data=DataConfig(template="plain"), precision=Precision(torch.bfloat16, "cuda"))
    trainer.generator.generate = scripted_generate([3, 5, 2, 6])
    row = trainer.step(PhaseSampler(list(trainer.records), seed=0), max_input=400)
    assert trainer.ref_model.lm_head_weight.device.type == "cpu"
    assert row["policy/kl"] == pytest.approx(0.0, abs=1e-6)
