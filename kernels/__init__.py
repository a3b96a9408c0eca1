"""Fused kernels for the policy loss, with plain-torch references. Knows nothing of `engine`.

    linear_logprob(hidden, weight, targets, ...)   -> per-token log-prob (+ entropy)
    linear_grpo_loss(hidden, weight, targets, ...) -> GRPO/DAPO loss, gradient in the forward
    attention_block(q, k, v, ...)                  -> (out, lse) of one attention block, differentiable
    merge(out_a, lse_a, out_b, lse_b)              -> (out, lse) of two blocks over disjoint keys
    ring_attention(q, k, v, seqlens, group=...)    -> causal attention of zigzag-sharded sequences over
                                                      a sequence-parallel group (kernels.ring_attention)
    paged_decode_attention(q, k_cache, v_cache, ...) -> one decode step over a paged KV cache: GQA-grouped,
    shared_prefix_decode_attention(...)                 split-K; a group's shared prompt read once per step
                                                      (kernels.paged_attention)
"""
from .attention_block import attention_block, merge
from .grpo_loss import AGGREGATIONS, GRPOLossConfig, aggregation_weights, linear_grpo_loss
from .logprob import linear_logprob

__all__ = ["linear_logprob", "linear_grpo_loss", "GRPOLossConfig", "aggregation_weights", "AGGREGATIONS",
           "attention_block", "merge"]
