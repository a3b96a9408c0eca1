"""One decoder for Llama, Qwen2 and Qwen3, written plainly in torch.

Input is a packed batch: token ids [T] of S sequences laid end to end, cut by
cu_seqlens [S+1]; positions restart at 0 for every sequence. Output is the final hidden
state [T, H] — not logits: the fused kernels take hidden states and `lm_head_weight` and
never build [T, V].

Parameter names follow Hugging Face's minus the leading "model." (weights.py maps them),
so a reader who knows those checkpoints knows these modules.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionContext, VarlenAttention, resolve_backend
from .config import DecoderConfig
from .rope import apply_rope, rope_cos_sin, rope_inv_freq


# CPU inference with at most this many rows computes a linear layer weight-major (below)
WEIGHT_MAJOR_ROWS = 128
WEIGHT_MAJOR_CHUNK = 2048  # output features per product: the [chunk, T] result is transposed while in cache


def weight_major(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `linear` takes the weight-major product for x [T, in] and weight w [out, in]:
    CPU, fp32, no autocast, T <= WEIGHT_MAJOR_ROWS (a decode step's batch), inference mode
    (the rollout's). Its sums run in another order than F.linear's (results differ in the last
    bits), so the trainer's forwards, with or without gradients, all keep F.linear: the old and
    reference log-probs then match the update's forward exactly."""
    return (x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= WEIGHT_MAJOR_ROWS
            and x.dtype == w.dtype == torch.float32 and torch.is_inference_mode_enabled()
            and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias). For a decode step on CPU (`weight_major`) it is computed as (w @ x.T).T,
    WEIGHT_MAJOR_CHUNK output features at a time: with the weight as the left operand MKL runs a
    few-row product faster, and each chunk's [chunk, T] result is transposed into place while it
    is still in cache (a whole [V, T] logits transpose reads memory with a 256-byte stride).
    `python -m bench.linear_case` measures both."""
    if not weight_major(x, w):
        return F.linear(x, w, bias)
    out = x.new_empty(x.shape[0], w.shape[0])
    xt = x.t()
    for i in range(0, w.shape[0], WEIGHT_MAJOR_CHUNK):
        out[:, i:i + WEIGHT_MAJOR_CHUNK].copy_(torch.mm(w[i:i + WEIGHT_MAJOR_CHUNK], xt).t())
    return out.add_(bias) if bias is not None else out


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def rope_store_fits(q_heads: int, head_dim: int) -> bool:
    """Whether kernels/triton_pointwise.py's rotation takes this shape (else the torch rotation)."""
    from kernels.triton_pointwise import MAX_HEAD_DIM, MAX_HEADS
    return head_dim % 2 == 0 and head_dim <= MAX_HEAD_DIM and q_heads <= MAX_HEADS


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def fused_kernels(x: torch.Tensor) -> bool:
    """Whether the layers run their inference kernels (kernels/triton_norm.py, triton_pointwise.py):
    each RMSNorm, with the residual add before it, as one launch; RoPE on q and k with the paged
    cache's K/V write as one; silu(gate) * up as one; where fuse_projections stacked them, one
    product for q / k / v and one for gate / up. In inference mode (the rollout and
    generation; not the trainer's no-grad old / reference log-probs, which must equal the
    update's forward exactly), on CUDA, unless $LONGRL_FUSED = torch."""
    if not torch.is_inference_mode_enabled() or not x.is_cuda or not _has_triton():
        return False
    choice = os.environ.get("LONGRL_FUSED", "triton")
    if choice not in ("triton", "torch"):
        raise ValueError(f"LONGRL_FUSED must be triton or torch, got {choice!r}")
    return choice == "triton"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def _fused(self, x: torch.Tensor) -> bool:
        # a sharded DTensor weight, or a row wider than the kernel's registers hold, keeps the torch path
        if not fused_kernels(x) or type(self.weight.data) is not torch.Tensor:
            return False
        from kernels.triton_norm import MAX_HIDDEN
        return x.shape[-1] <= MAX_HIDDEN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):  # inference on a GPU: one kernel instead of eight
            from kernels.triton_norm import rms_norm_triton
            return rms_norm_triton(x, self.weight, self.eps)
        # statistics in fp32 whatever the activation dtype; scale after casting back
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_forward(self, h: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, this norm of it): a residual add and the norm after it, one launch when fused."""
        if self._fused(h):
            from kernels.triton_norm import add_rms_norm_triton
            return add_rms_norm_triton(h, delta, self.weight, self.eps)
        h = h + delta
        return h, self(h)


def _fuse_linears(module: nn.Module, names: tuple[str, ...]) -> None:
    """Make the weights (and biases) of module's linear layers `names` consecutive rows of one tensor
    each (stacked along the output dimension); module._stacked keeps only their row counts."""
    linears = [getattr(module, n) for n in names]
    with_bias = [lin.bias is not None for lin in linears]
    if any(with_bias) and not all(with_bias):
        return  # a bias on some but not all: the products stay separate
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = torch.cat([lin.bias.detach() for lin in linears]) if all(with_bias) else None
    sizes, start = [], 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[start:start + n], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start:start + n], requires_grad=False)
        sizes.append(n)
        start += n
    module._stacked = sizes


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor whose consecutive rows `tensors` are (a view from the first one's storage), or None
    when they are not laid out so (after a .to(), a deepcopy, a replaced parameter)."""
    first = tensors[0]
    if not first.is_contiguous():
        return None
    at, size = first.data_ptr(), first.element_size()
    for t in tensors:
        if (t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or t.data_ptr() != at
                or not t.is_contiguous() or t.dtype != first.dtype or t.shape[1:] != first.shape[1:]):
            return None
        at += t.numel() * size
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def _fused_linears(module: nn.Module, names: tuple[str, ...]):
    """(weight, bias or None, sizes) of module's stacked linear layers `names` (fuse_projections), the
    weight and bias views over all of them; None when they were never stacked or no longer are. Holds
    no memory of its own: the stack is wherever the layers' own parameters are."""
    sizes = getattr(module, "_stacked", None)
    if sizes is None:
        return None
    linears = [getattr(module, n) for n in names]
    weight = _stack([lin.weight for lin in linears])
    if weight is None:
        return None
    bias = None
    if linears[0].bias is not None:
        if any(lin.bias is None for lin in linears):
            return None
        bias = _stack([lin.bias for lin in linears])
        if bias is None:
            return None
    elif any(lin.bias is not None for lin in linears):
        return None
    return weight, bias, sizes


def fuse_projections(model: nn.Module) -> nn.Module:
    """For a model that only generates (the trainer's rollout copy, an evaluation's model): each
    layer's q / k / v weights and biases become consecutive rows of one [q + 2·kv, H] tensor, gate /
    up of one [2·I, H] (the parameters are views into it, frozen). In inference mode on a GPU
    (`fused_kernels`) the layer then runs one product for q, k and v and one for gate and up,
    instead of five small ones. Nothing else changes: the same parameters, state-dict keys and
    shapes; load_state_dict copies into the views, so a weight sync keeps the stack. Nothing but
    the row counts is kept beside the parameters: after a .to() or a deepcopy, which give each
    parameter memory of its own, the layer runs its separate products (call this again to stack
    them). Call it after moving the model to its device and dtype. -> model."""
    for module in model.modules():
        if isinstance(module, Attention):
            _fuse_linears(module, Attention.FUSED)
        elif isinstance(module, MLP):
            _fuse_linears(module, MLP.FUSED)
    return model


class Attention(nn.Module):
    FUSED = ("q_proj", "k_proj", "v_proj")  # what fuse_projections stacks

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self._stacked: list[int] | None = None  # fuse_projections: the stacked layers' row counts
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, cfg.q_size, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        # Qwen3 normalises each head of q and k before the rotation
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionContext, layer: int) -> torch.Tensor:
        t = x.shape[0]
        fused = fused_kernels(x)
        qkv = _fused_linears(self, self.FUSED) if fused else None
        if qkv is not None:  # one product; q, k, v are column slices of it (the kernels take their strides)
            q, k, v = F.linear(x, qkv[0], qkv[1]).split(qkv[2], dim=-1)
            q = q.view(t, self.num_heads, self.head_dim)
            k, v = k.view(t, self.num_kv_heads, self.head_dim), v.view(t, self.num_kv_heads, self.head_dim)
        else:
            q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
            k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if fused and rope_store_fits(self.num_heads, self.head_dim):  # one launch: rotation and K/V cache write
            rotating = getattr(attn, "attend_rotating", None)
            if rotating is not None:
                out = rotating(layer, q, k, v, cos, sin)
            else:
                from kernels.triton_pointwise import rope_store_triton
                q, k = rope_store_triton(q, k, v, cos, sin)
                out = attn.attend(layer, q, k, v)
            return self.o_proj(out.reshape(t, -1))
        # back to the projections' dtype: under autocast they are bf16 while cos / sin are fp32
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        out = attn.attend(layer, q, k, v)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, -1))


class MLP(nn.Module):
    FUSED = ("gate_proj", "up_proj")  # what fuse_projections stacks

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self._stacked: list[int] | None = None  # fuse_projections: the stacked layers' row counts
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wg, wu, wd = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
        if weight_major(x, wg):
            # decode on CPU: the [I, T] activations stay weight-major, the layout down_proj's
            # weight-major product takes, so only the [H, T] result is transposed
            xt = x.t()
            h = F.silu(torch.mm(wg, xt)).mul_(torch.mm(wu, xt))
            return torch.mm(wd, h).t().contiguous()
        if fused_kernels(x):
            from kernels.triton_pointwise import silu_mul_triton
            gate_up = _fused_linears(self, self.FUSED)
            if gate_up is not None:  # one product; gate and up are its two column halves
                gate, up = F.linear(x, gate_up[0]).split(gate_up[2], dim=-1)
                return self.down_proj(silu_mul_triton(gate, up))
            return self.down_proj(silu_mul_triton(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionContext) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attn, self.index)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_normed(self, h: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       attn: AttentionContext, next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """The same layer for a caller that has already applied input_layernorm (x = norm(h)) and wants
        next_norm of the result with it: (h', next_norm(h')). Each residual add goes with the norm
        after it (RMSNorm.add_forward): one launch each when the kernels are fused."""
        h, x = self.post_attention_layernorm.add_forward(h, self.self_attn(x, cos, sin, attn, self.index))
        return next_norm.add_forward(h, self.mlp(x))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, attn_backend: str = "auto"):
        super().__init__()
        self.config = cfg
        self.attn_backend = attn_backend
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._checkpointed: frozenset[int] = frozenset()
        self._rope_cache: dict[torch.device, tuple[torch.Tensor, float]] = {}

    # ---- outputs ---------------------------------------------------------------------
    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H]: the embedding matrix itself when the model ties them."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> logits [T, V]. For tests and tiny shapes only: the trainer
        uses the fused kernels, which never build this tensor."""
        return linear(hidden, self.lm_head_weight)

    # ---- switches --------------------------------------------------------------------
    def set_activation_checkpointing(self, layers: bool | Iterable[int]) -> None:
        """True: every layer; False: none; an iterable: those layer indices. Checkpointed
        layers keep only their input and recompute the rest in backward."""
        if layers is True:
            chosen = range(len(self.layers))
        elif layers is False:
            chosen = ()
        else:
            chosen = list(layers)
            bad = [i for i in chosen if not 0 <= i < len(self.layers)]
            if bad:
                raise ValueError(f"activation checkpointing: layers {bad} out of range 0..{len(self.layers) - 1}")
        self._checkpointed = frozenset(chosen)

    # ---- forward ---------------------------------------------------------------------
    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        dev = positions.device
        if dev not in self._rope_cache:
            inv_freq, scaling = rope_inv_freq(self.config.rope, self.config.head_dim)
            self._rope_cache[dev] = (inv_freq.to(dev), scaling)
        inv_freq, scaling = self._rope_cache[dev]
        return rope_cos_sin(inv_freq, scaling, positions, dtype)

    def _plain_layers(self) -> bool:
        """Whether the fused loop may call the layers directly (DecoderLayer.forward_normed, bypassing
        their __call__): no layer has forward hooks (FSDP2's unshard hooks, a user's) to skip."""
        return len(self.layers) > 0 and not any(layer._forward_pre_hooks or layer._forward_hooks
                                                for layer in self.layers)

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None,
                attn: AttentionContext | None = None) -> torch.Tensor:
        """input_ids [T], cu_seqlens [S+1] (None: one sequence) -> hidden [T, H].

        position_ids default to 0..len-1 within each sequence. `attn` replaces the default
        varlen context (the rollout engine passes its KV cache here, with positions)."""
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be packed 1-D [T], got shape {tuple(input_ids.shape)}")
        t = input_ids.shape[0]
        # only when needed: a host list copied to the device would be illegal inside a CUDA graph's capture
        if cu_seqlens is None and (position_ids is None or attn is None):
            cu_seqlens = torch.tensor([0, t], dtype=torch.int32, device=input_ids.device)
        if position_ids is None:
            position_ids = positions_from_cu_seqlens(cu_seqlens, t)
        if attn is None:
            w = self.embed_tokens.weight
            attn = VarlenAttention(cu_seqlens, resolve_backend(self.attn_backend, w.device, w.dtype))
        h = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, h.dtype)
        if fused_kernels(h) and self._plain_layers():  # inference on a GPU: each residual add fused into the next norm
            x = self.layers[0].input_layernorm(h)
            for layer, nxt in zip(self.layers, [*(l.input_layernorm for l in self.layers[1:]), self.norm]):
                h, x = layer.forward_normed(h, x, cos, sin, attn, nxt)
            return x
        grad = torch.is_grad_enabled()
        for layer in self.layers:
            if grad and layer.index in self._checkpointed:
                h = checkpoint(layer, h, cos, sin, attn, use_reentrant=False)
            else:
                h = layer(h, cos, sin, attn)
        return self.norm(h)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[0, 3, 5] -> [0, 1, 2, 0, 1]: positions restarting at each sequence start."""
    cu = cu_seqlens.to(torch.long)
    if cu[0].item() != 0 or cu[-1].item() != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={total}, got {cu.tolist()}")
    lengths = cu[1:] - cu[:-1]
    if (lengths < 0).any():
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}")
    starts = torch.repeat_interleave(cu[:-1], lengths)
    return torch.arange(total, device=cu.device) - starts
