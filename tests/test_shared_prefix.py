"""The shared-prefix update: a GRPO group as one row [P | R1 … RG] gives the loss and the
gradient of every parameter of the repeated layout (each response after its own copy of
the prompt), on the embedded model and on tiny Qwen2 / Qwen3 configs, through the real
trainer update; and the group row's packing, positions and micro-batch split."""
from __future__ import annotations

import copy
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_hf_model
from test_rl_train import LetterTokenizer

from engine.config import DataConfig, RLConfig, TrainConfig
from engine.data.packing import group_batches, pack, pack_groups
from engine.model import load_model
from engine.model.attention import GroupAttention
from engine.rollout.sampling import Completion
from engine.train.rl import Group, GRPOTrainer


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def make_batch(prompt_lens, response_lens, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for k, (p, lens) in enumerate(zip(prompt_lens, response_lens)):
        prompt = torch.randint(1, vocab, (p,), generator=g).tolist()
        comps = [Completion(torch.randint(1, vocab, (r,), generator=g).tolist(),
                            (-3 - 3 * torch.rand(r, generator=g)).tolist(), "stop") for r in lens]
        rec = SimpleNamespace(id=f"r{k}", task="qa", data_source="test")
        batch.append(Group(rec, prompt, comps, [0.0] * len(lens), [0.0] * len(lens)))
    return batch


def update_grads(model, tok, batch, *, shared, aggregation="token-mean", budget=1 << 16, keep=None, seed=1,
                 **rl_kw):
    """(loss, {name: grad}, row) of one real trainer update on `batch`, advantages drawn at
    random (every sample moves the loss), the optimizer step captured and skipped."""
    n = sum(len(g.completions) for g in batch)
    adv = (torch.randn(n, generator=torch.Generator().manual_seed(seed))).tolist()
    keep = keep or [True] * n
    rl = RLConfig(group_size=max(2, *(len(g.completions) for g in batch)), batch_prompts=len(batch),
                  max_new_tokens=16, temperature=0.9, shared_prefix=shared, aggregation=aggregation, **rl_kw)
    trainer = GRPOTrainer(copy.deepcopy(model), tok, [], rl, TrainConfig(lr=0.0, token_budget=budget),
                          data=DataConfig(template="plain"))
    trainer._advantages = lambda b: (adv, keep, {})
    got = {}

    def opt_step(step, total, loss_total):
        got["loss"] = loss_total
        got["grads"] = {k: p.grad.detach().clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
        return {"skipped": True, "lr": 0.0}
    trainer.opt_step = opt_step
    row = trainer._update(batch, defaultdict(float))
    return got["loss"], got["grads"], row


def assert_same_update(model, tok, batch, **kw):
    loss_g, grads_g, row_g = update_grads(model, tok, batch, shared=True, **kw)
    loss_r, grads_r, row_r = update_grads(model, tok, batch, shared=False, **kw)
    assert loss_g == pytest.approx(loss_r, rel=1e-5, abs=1e-7)
    assert grads_g.keys() == grads_r.keys() and grads_r
    # the whole gradient within 1e-5 relative; each tensor within 1e-4 (a norm weight's
    # gradient sums many cancelling terms: fp32 summation order alone moves it ~1e-5)
    flat = lambda g: torch.cat([g[k].flatten() for k in sorted(g)])  # noqa: E731
    err = rel(flat(grads_g), flat(grads_r))
    assert err < 1e-5, f"group-layout gradient off the repeated layout's by {err:.2e} (relative)"
    for name in grads_r:
        err = rel(grads_g[name], grads_r[name])
        assert err < 1e-4, f"{name}: group-layout gradient off the repeated layout's by {err:.2e} (relative)"
    assert row_g["update_tokens"] < row_r["update_tokens"]  # the prompt went through the model once
    return row_g, row_r


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Factory: kind -> (our Decoder, fp32 CPU) of a tiny random Qwen2 / Qwen3 checkpoint."""
    made = {}

    def get(kind):
        if kind not in made:
            path = tmp_path_factory.mktemp(kind)
            tiny_hf_model(kind, vocab_size=64, max_position_embeddings=512).save_pretrained(str(path))
            made[kind] = load_model(path, device="cpu", dtype="float32")[0]
        return made[kind]
    return get


# ---- through the trainer's update ---------------------------------------------------------
def test_embedded_model_several_groups_in_one_micro_batch(smollm):
    model, tok = smollm
    batch = make_batch([23, 9], [[5, 1, 9], [4, 4, 2]], vocab=2000)
    row_g, row_r = assert_same_update(model, tok, batch)
    # 32 prompt tokens once + 4+0+8 + 3+3+1 response tokens, against 3·23 + 15 + 3·9 + 10 repeated
    assert row_g["update_tokens"] == 32 + 19 and row_r["update_tokens"] == 3 * 23 + 15 + 3 * 9 + 10
    assert row_g["update/shared_prefix_saving"] == pytest.approx((3 * 23 + 15 + 3 * 9 + 10) / 51)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_tiny_models_edge_groups(tiny, kind, aggregation):
    # G = 1; a one-token prompt; one-token responses; a dropped sample (no loss rows)
    batch = make_batch([1, 12, 6], [[3, 6], [7], [1, 1, 4]], vocab=64, seed=2)
    keep = [True, True, True, True, False, True]
    assert_same_update(tiny(kind), LetterTokenizer(), batch, aggregation=aggregation, keep=keep)


def test_group_over_the_budget_is_split_with_the_prompt_repeated(tiny):
    batch = make_batch([30, 8], [[10, 12, 9, 11], [3, 5]], vocab=64, seed=4)
    # a budget under one row of group 0 (30 + 38 = 68 tokens): its responses go in parts
    assert_same_update(tiny("qwen2"), LetterTokenizer(), batch, budget=45)
    with pytest.raises(ValueError, match="train.token_budget"):
        update_grads(tiny("qwen2"), LetterTokenizer(), batch, shared=True, budget=35)


def test_off_policy_mini_batches_and_reference_log_probs_match(tiny):
    """Old and reference log-probs (separate no-grad passes) in the group layout."""
    batch = make_batch([14, 10, 7, 12], [[4, 6], [5, 2], [3, 3], [8, 1]], vocab=64, seed=5)
    assert_same_update(tiny("qwen3"), LetterTokenizer(), batch, mini_batches=2, kl_coef=0.1)


def test_truncated_importance_sampling_and_mismatch_metrics(tiny):
    """The behaviour log-probs reach the loss: the mismatch metrics are those of the trainer's
    own log-probs against the rollout's, and tis_cap changes the gradient exactly as
    min(exp(trainer − rollout), cap) per token does."""
    model = tiny("qwen2")
    batch = make_batch([9, 5], [[4, 3], [6, 2]], vocab=64, seed=6)
    _, grads_off, row = update_grads(model, LetterTokenizer(), batch, shared=True)
    # the trainer's log-probs of the sampled tokens, from the repeated layout, written here
    seqs = [(g.prompt + c.token_ids, [0] * len(g.prompt) + [1] * len(c.token_ids)) for g in batch
            for c in g.completions]
    packed = pack(seqs)
    rows = packed.loss_rows
    with torch.no_grad():
        logits = model(packed.input_ids, packed.cu_seqlens)[rows].double() @ model.lm_head_weight.double().t()
        logp = torch.log_softmax(logits / 0.9, -1).gather(-1, packed.targets[rows, None]).squeeze(-1)
    behaviour = torch.tensor([lp for g in batch for c in g.completions for lp in c.logprobs], dtype=torch.float64)
    gap = (logp - behaviour).abs()
    assert row["mismatch/mean_abs"] == pytest.approx(gap.mean().item(), rel=1e-4)
    assert row["mismatch/max_abs"] == pytest.approx(gap.max().item(), rel=1e-4)
    assert row["mismatch/over_0.1"] == pytest.approx((gap > 0.1).double().mean().item())
    assert "tis/mean_weight" not in row
    # with a cap: same layouts agree, the weights are the truncated ratios, the gradient moves
    cap = 1.5
    row_g, _ = assert_same_update(model, LetterTokenizer(), batch, tis_cap=cap)
    w = torch.exp(logp - behaviour).clamp(max=cap)
    assert row_g["tis/mean_weight"] == pytest.approx(w.mean().item(), rel=1e-4)
    assert 0 < row_g["tis/capped"] < 1
    _, grads_on, _ = update_grads(model, LetterTokenizer(), batch, shared=True, tis_cap=cap)
    assert max(rel(grads_on[k], grads_off[k]) for k in grads_off) > 0.05


# ---- the attention context alone ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_group_row_hidden_states_equal_the_repeated_layout(tiny, kind):
    model = tiny(kind)
    batch = make_batch([11, 1], [[4, 1, 6], [3, 2]], vocab=64, seed=7)
    gr = pack_groups([(g.prompt, [(i, c.token_ids) for i, c in enumerate(g.completions)]) for g in batch])
    with torch.no_grad():
        h_group = model(gr.input_ids, position_ids=gr.position_ids, attn=GroupAttention(gr.layout))
    seqs = [(g.prompt + c.token_ids, [0] * len(g.prompt) + [1] * len(c.token_ids)) for g in batch
            for c in g.completions]
    packed = pack(seqs)
    with torch.no_grad():
        h_rep = model(packed.input_ids, packed.cu_seqlens)
    # every loss row, and the prompt tokens of each group's first copy
    rows = packed.loss_rows
    assert torch.equal(gr.targets, packed.targets[rows])
    torch.testing.assert_close(h_group[gr.rows], h_rep[rows], rtol=1e-5, atol=1e-5)


# ---- packing ------------------------------------------------------------------------------
def test_pack_groups_layout_positions_and_rows():
    gr = pack_groups([([1, 2, 3], [(0, [4, 5, 6]), (1, [7])]), ([9], [(5, [8, 8])])])
    assert gr.input_ids.tolist() == [1, 2, 3, 4, 5, 9, 8]  # each response without its last token
    assert gr.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1]  # responses continue from P
    assert gr.layout == [(0, 3, (2, 0)), (5, 1, (1,))]
    assert gr.rows.tolist() == [2, 3, 4, 2, 5, 6]  # the last prompt token once per response
    assert gr.targets.tolist() == [4, 5, 6, 7, 8, 8]
    assert gr.seq_index.tolist() == [0, 0, 0, 1, 5, 5]
    with pytest.raises(ValueError, match="group 0: empty prompt"):
        pack_groups([([], [(0, [1])])])
    with pytest.raises(ValueError, match="group 0, sample 3: empty response"):
        pack_groups([([1], [(3, [])])])


def test_group_batches_keep_responses_whole_and_rows_under_budget():
    prompt_lens, resp = [3, 1, 10, 4], [[3, 1], [2], [5, 5, 5], [2, 2]]
    batches = group_batches(prompt_lens, resp, 16)
    assert batches == [[(0, [0, 1]), (1, [0])], [(2, [0])], [(2, [1])], [(2, [2])], [(3, [0, 1])]]
    for b in batches:
        assert sum(prompt_lens[g] + sum(resp[g][i] - 1 for i in part) for g, part in b) <= 16
    with pytest.raises(ValueError, match="group 2: prompt \\(10 tokens\\) \\+ response 0 \\(8 tokens\\)"):
        group_batches([3, 1, 10], [[1], [1], [8]], 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_group_attention_direct_path_on_cuda():
    """The GPU path (one flash call per response over [prompt | own] keys, bottom-right causal)
    equals the two-block LSE merge, values and gradients, bf16, GQA."""
    layout = [(0, 300, (40, 0, 75)), (415, 9, (5,))]
    t, hq, hkv, d = 429, 12, 2, 128
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv)]
    go = torch.randn(t, hq, d, generator=g).cuda()
    results = []
    for direct in (True, False):
        q, k, v = (x.to("cuda", torch.bfloat16).requires_grad_() for x in base)
        out = GroupAttention(layout, direct=direct).attend(0, q, k, v)
        (out.float() * go).sum().backward()
        results.append([out.float(), q.grad.float(), k.grad.float(), v.grad.float()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)
        assert rel(a, b) < 1e-2
