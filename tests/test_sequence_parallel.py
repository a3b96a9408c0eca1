"""Sequence parallelism through the whole decoder: a packed batch sharded over 2 gloo ranks
(zigzag, each sequence padded at its end), ring attention in every layer, the fused log-prob
loss on each rank's own rows with the batch's global token count: the loss, every real
token's hidden state and every parameter's gradient (summed over the ranks) equal the
one-process run."""
from __future__ import annotations

import pytest
import torch
from dist_helpers import run_ranks

from engine.parallel import SequenceShard

LENGTHS = [7, 12, 1, 9]  # uneven, none a multiple of 2·SP


def tiny_model():
    from engine.model import Decoder, DecoderConfig
    hf = {"model_type": "qwen2", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False}
    torch.manual_seed(0)
    model = Decoder(DecoderConfig.from_hf(hf), attn_backend="sdpa").double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model


def batch():
    from engine.data.packing import pack
    g = torch.Generator().manual_seed(2)
    seqs = []
    for n in LENGTHS:
        ids = torch.randint(0, 97, (n,), generator=g).tolist()
        seqs.append((ids, [0] + [1] * (n - 1)))  # every token after the first is in the loss
    return pack(seqs)


def loss_of(model, hidden, targets, weight_per_token):
    from kernels import linear_logprob
    rows = (weight_per_token != 0).nonzero().squeeze(-1)
    logp, _ = linear_logprob(hidden[rows], model.lm_head_weight, targets[rows])
    return -(logp * weight_per_token[rows]).sum()


def one_process():
    model, packed = tiny_model(), batch()
    hidden = model(packed.input_ids, packed.cu_seqlens)
    w = packed.loss_mask.double() / packed.loss_mask.sum()
    loss = loss_of(model, hidden, packed.targets, w)
    loss.backward()
    return float(loss.detach()), hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _sp_rank(rank, world):
    import torch.distributed as dist

    from engine.model.attention import RingAttention
    model, packed = tiny_model(), batch()
    lengths = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).tolist()
    shard = SequenceShard(lengths, world, rank)
    w = packed.loss_mask.double() / packed.loss_mask.sum()  # the global count: every rank's rows share it
    hidden = model(shard.take(packed.input_ids), position_ids=shard.positions, attn=RingAttention(shard.padded))
    loss = loss_of(model, hidden, shard.take(packed.targets), shard.take(w, fill=0.0))
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {}
    for n, p in model.named_parameters():
        dist.all_reduce(p.grad)
        grads[n] = p.grad
    ref_loss, ref_hidden, ref_grads = one_process()
    got = shard.put(hidden.detach(), torch.zeros_like(ref_hidden))
    mine = torch.zeros(len(ref_hidden), dtype=torch.bool)
    shard.put(torch.ones(shard.local_tokens, 1, dtype=torch.bool), mine[:, None])
    # the model runs in fp64 (hidden states exact); the fused loss keeps fp32 statistics inside
    assert float(total) == pytest.approx(ref_loss, rel=1e-6)
    assert torch.allclose(got[mine], ref_hidden[mine], rtol=1e-10, atol=1e-10)
    for n in ref_grads:
        err = float((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm())
        assert err < 1e-6, f"rank {rank}: {n} gradient off by {err:.2e} (relative)"
    return int(mine.sum())


def test_decoder_under_sequence_parallel_equals_one_process():
    held = run_ranks(_sp_rank, 2, timeout=180)
    assert sum(held) == sum(LENGTHS)  # the ranks' real tokens are the batch, each once


def test_sequence_shard_layout():
    shards = [SequenceShard([5, 8], 2, r) for r in range(2)]
    assert shards[0].padded == [8, 8]
    assert shards[0].positions.tolist() == [0, 1, 6, 7, 0, 1, 6, 7]
    assert shards[1].positions.tolist() == [2, 3, 4, 5, 2, 3, 4, 5]
    assert shards[0].real.tolist() == [True, True, False, False] + [True] * 4  # seq 0's tokens 5..7 are padding
    x = torch.arange(13) * 10
    out = torch.full((13,), -1)
    for s in shards:
        s.put(s.take(x, fill=-7), out)
    assert torch.equal(out, x)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        SequenceShard([4], 2, 2)
    with pytest.raises(ValueError, match="expected 13 rows"):
        shards[0].take(torch.zeros(12))


# ---- FSDP2 over dp × sp: one training step equals one process --------------------------------
STEP_LENGTHS = [7, 12, 3, 9]


def step_batch():
    from engine.data.packing import pack
    g = torch.Generator().manual_seed(5)
    return [(torch.randint(0, 97, (n,), generator=g).tolist(), [0] + [1] * (n - 1)) for n in STEP_LENGTHS]


def one_process_step():
    """(loss, grad norm, weights after one AdamW step) on the whole batch, one process."""
    from engine.data.packing import pack
    model, packed = tiny_model(), pack(step_batch())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    hidden = model(packed.input_ids, packed.cu_seqlens)
    loss = loss_of(model, hidden, packed.targets, packed.loss_mask.double() / packed.loss_mask.sum())
    loss.backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    opt.step()
    return float(loss.detach()), float(norm), {n: p.detach().clone() for n, p in model.named_parameters()}


def _step_rank(rank, world, sp):
    import torch.distributed as dist

    from engine.data.packing import pack
    from engine.model.attention import RingAttention
    from engine.parallel.fsdp import make_mesh, parallelize
    mesh = make_mesh(sp=sp)
    dp, dp_rank, sp_rank = world // sp, mesh["dp"].get_local_rank(), mesh["sp"].get_local_rank()
    model = parallelize(tiny_model(), mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    seqs = step_batch()
    global_tokens = sum(sum(f[1:]) for _, f in seqs)  # the batch's count, the same on every rank
    packed = pack(seqs[dp_rank::dp])  # data parallel: this dp rank's sequences
    w = packed.loss_mask.double() / global_tokens
    if sp > 1:
        shard = SequenceShard((packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).tolist(), sp, sp_rank)
        hidden = model(shard.take(packed.input_ids), position_ids=shard.positions,
                       attn=RingAttention(shard.padded, group=mesh["sp"].get_group()))
        loss = loss_of(model, hidden, shard.take(packed.targets), shard.take(w, fill=0.0))
    else:
        hidden = model(packed.input_ids, packed.cu_seqlens)
        loss = loss_of(model, hidden, packed.targets, w)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    norm = float(torch.sqrt(sum((p.grad.full_tensor() ** 2).sum() for p in model.parameters())))
    opt.step()
    ref_loss, ref_norm, ref_weights = one_process_step()
    assert float(total) == pytest.approx(ref_loss, rel=1e-6)
    assert norm == pytest.approx(ref_norm, rel=1e-6)
    for n, p in model.named_parameters():
        full = p.detach().full_tensor()
        err = float((full - ref_weights[n]).norm() / ref_weights[n].norm())
        assert err < 1e-6, f"rank {rank} (dp {dp}, sp {sp}): {n} off the one-process weights by {err:.2e}"
    return float(total)


@pytest.mark.parametrize("dp,sp", [(1, 2), (2, 1), (2, 2)], ids=["dp1-sp2", "dp2-sp1", "dp2-sp2"])
def test_fsdp2_training_step_equals_one_process(dp, sp):
    losses = run_ranks(_step_rank, dp * sp, sp, timeout=240)
    assert len(set(losses)) == 1  # every rank logs the same global loss
