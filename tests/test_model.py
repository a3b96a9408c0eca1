"""The decoder against transformers: same logits on packed batches (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch
from helpers import max_logit_diff_vs_hf, pack

from engine.data import build_prompt_ids
from engine.model import Decoder, load_model, positions_from_cu_seqlens

TOL = 1e-4


def _random_seqs(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def test_embedded_smollm_matches_transformers(smollm, hf_smollm):
    model, tok = smollm
    a, _ = build_prompt_ids(tok, "Marie Curie was born in Warsaw in 1867. She moved to Paris in 1891.",
                            "Where was Marie Curie born?")
    b = tok.encode("The quick brown fox jumps over the lazy dog.")
    assert len(a) != len(b)
    assert max_logit_diff_vs_hf(model, hf_smollm, [a, b]) <= TOL


@pytest.mark.parametrize("kind,overrides", [
    ("qwen2", {}),                                             # q/k/v bias, untied lm_head
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {"head_dim": 24}),                               # q/k norm, head_dim != 64/4
    ("llama", {"attention_bias": True}),                       # bias on q, k, v and o
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 32}}),
    ("qwen3", {"head_dim": 24, "rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6,
                                                   "original_max_position_embeddings": 48}}),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}}),
])
def test_tiny_families_match_transformers(tiny_checkpoint, kind, overrides):
    path, hf = tiny_checkpoint(kind, **overrides)
    model, tok = load_model(path, device="cpu", dtype="float32")
    assert tok is None  # transformers wrote no tokenizer for a random model
    assert model.config.model_type == kind
    # lengths past the YaRN / Llama-3 original window so that the scaling matters
    seqs = _random_seqs(hf.config.vocab_size, [150, 37, 1, 90])
    assert max_logit_diff_vs_hf(model, hf, seqs) <= TOL


def test_yarn_changes_the_output(tiny_checkpoint):
    """Guard against a rope branch that is silently ignored."""
    path, _ = tiny_checkpoint("qwen2", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                        "original_max_position_embeddings": 32})
    yarn, _ = load_model(path, device="cpu", dtype="float32")
    plain = Decoder(type(yarn.config)(**{**yarn.config.__dict__, "rope": {"rope_type": "default",
                                                                           "rope_theta": 1e4}}))
    plain.load_state_dict(yarn.state_dict())
    ids = torch.arange(100) % 300
    with torch.no_grad():
        assert (yarn(ids) - plain(ids)).abs().max() > 1e-3
    # the window it serves: the original 32 positions × 4, when max_position_embeddings says less
    import dataclasses
    assert dataclasses.replace(yarn.config, max_position_embeddings=32).context_window == 128
    assert dataclasses.replace(yarn.config, max_position_embeddings=512).context_window == 512
    assert plain.config.context_window == plain.config.max_position_embeddings


def test_packing_is_independent_of_neighbours(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen3", head_dim=24)
    model, _ = load_model(path, device="cpu", dtype="float32")
    seqs = _random_seqs(331, [20, 33, 7])
    ids, cu = pack(seqs)
    with torch.no_grad():
        packed = model(ids, cu)
        alone = torch.cat([model(torch.tensor(s)) for s in seqs])
    assert (packed - alone).abs().max() <= 1e-5


def test_positions_restart_per_sequence():
    cu = torch.tensor([0, 3, 3, 5])
    assert positions_from_cu_seqlens(cu, 5).tolist() == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="end at T"):
        positions_from_cu_seqlens(cu, 6)


def test_activation_checkpointing_gives_same_gradients(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen2")
    model, _ = load_model(path, device="cpu", dtype="float32")
    ids, cu = pack(_random_seqs(331, [30, 12]))

    def grads():
        model.zero_grad()
        model.logits(model(ids, cu)).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_activation_checkpointing(True)
    checked = grads()
    model.set_activation_checkpointing([1])
    partial = grads()
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(partial[name], plain[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        model.set_activation_checkpointing([5])


def test_lm_head_weight_is_tied_for_smollm(smollm):
    model, _ = smollm
    assert model.lm_head is None
    assert model.lm_head_weight.data_ptr() == model.embed_tokens.weight.data_ptr()


def test_input_must_be_packed(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama")
    model, _ = load_model(path, device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="packed 1-D"):
        model(torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_attn_backend_matches_sdpa_on_gpu(tiny_checkpoint):
    pytest.importorskip("flash_attn")
    path, _ = tiny_checkpoint("qwen3", head_dim=32)
    flash, _ = load_model(path, device="cuda", dtype="bfloat16", attn_backend="flash_attn")
    sdpa, _ = load_model(path, device="cuda", dtype="bfloat16", attn_backend="sdpa")
    ids, cu = pack(_random_seqs(331, [200, 64, 3]))
    ids, cu = ids.cuda(), cu.cuda()
    with torch.no_grad():
        torch.testing.assert_close(flash(ids, cu), sdpa(ids, cu), rtol=2e-2, atol=2e-2)
