"""Attention behind one seam.

The decoder never calls an attention function directly. Each layer hands its rotated
q [T, Hq, D], k, v [T, Hkv, D] to an *attention context* — any object with

    attend(layer: int, q, k, v) -> out [T, Hq, D]

— built once per forward pass. The context decides the layout: packed variable-length
sequences for training (`VarlenAttention`, backends `sdpa` and `flash_attn`), a KV cache
for generation (engine/rollout), and later the sequence-parallel ring. A new backend is a
new context class; the model code does not change.
"""
from __future__ import annotations

import functools
from typing import Protocol

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flash_attn")


class AttentionContext(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


@functools.cache
def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # ImportError, or a build for another CUDA/torch
        return False
    return torch.cuda.is_available()


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """`auto` picks flash_attn on a GPU with half-precision weights when it imports, else sdpa."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} unknown; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        half = dtype in (torch.float16, torch.bfloat16)
        return "flash_attn" if device.type == "cuda" and half and flash_attn_available() else "sdpa"
    if name == "flash_attn" and not flash_attn_available():
        raise RuntimeError("attention backend 'flash_attn' requested but flash_attn does not import "
                           "on this machine (install the `gpu` extra on a CUDA machine)")
    return name


def expand_kv_for_sdpa(device_type: str, dtype: torch.dtype) -> bool:
    """Whether SDPA should get K/V with their heads expanded rather than `enable_gqa`: fp32 (or
    fp64) on a GPU, where no fused kernel takes GQA (flash and cuDNN need half precision, the
    memory-efficient kernel rejects enable_gqa), so SDPA would fall back to its math kernel and
    materialise [Hq, Tq, Tk] scores. Expanded heads cost [Hq, Tk, D] and keep a fused kernel."""
    return device_type == "cuda" and dtype not in (torch.float16, torch.bfloat16)


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                q_offset: int = 0, fused_offset: bool | None = None) -> torch.Tensor:
    """One sequence: q [Tq, Hq, D] attends causally to k, v [Tk, Hkv, D].

    q_offset is the position of q's first token among the keys (Tk - Tq when the keys
    hold a cached prefix); query i sees keys 0 .. q_offset + i.

    With an offset, a boolean mask beside `enable_gqa` leaves SDPA only its math kernel on a
    GPU, which materialises fp32 [Hq, Tq, Tk] scores (7.5 GB for 28 heads x 2,048 x 32K).
    fused_offset (default: on CUDA) instead expands the K/V heads and passes a lower-right
    causal bias, which the fused memory-efficient kernel takes. On CPU the boolean mask goes
    to the fused CPU kernel as it is.
    """
    tq, tk = q.shape[0], k.shape[0]
    # 4-D [1, H, T, D]: with 3-D inputs torch's CPU sdpa takes its unfused math path (~6x slower)
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    gqa = q.shape[1] != k.shape[1]
    if gqa and expand_kv_for_sdpa(q.device.type, q.dtype):
        rep = q.shape[1] // k.shape[1]
        kh, vh, gqa = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1), False
    if q_offset == 0 and tq == tk:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    elif tq == 1:  # one new token sees every key: no mask
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=gqa)
    elif fused_offset if fused_offset is not None else q.is_cuda:
        if q_offset != tk - tq:
            raise ValueError(f"causal_sdpa: a lower-right causal bias needs q_offset = Tk - Tq, got {q_offset} "
                             f"with Tq {tq}, Tk {tk}")
        from torch.nn.attention.bias import causal_lower_right
        if gqa:
            rep = q.shape[1] // k.shape[1]
            kh, vh = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(tq, tk), scale=scale)
    else:
        rows = torch.arange(tq, device=q.device)[:, None] + q_offset
        mask = torch.arange(tk, device=q.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)


class VarlenAttention:
    """Packed sequences without padding: tokens [T] cut by cu_seqlens [S+1]."""

    def __init__(self, cu_seqlens: torch.Tensor, backend: str = "sdpa", scale: float | None = None):
        self.cu_seqlens = cu_seqlens.to(torch.int32)
        self.bounds = cu_seqlens.tolist()  # one host sync per forward, not per layer
        self.max_seqlen = max(b - a for a, b in zip(self.bounds[:-1], self.bounds[1:]))
        self.backend = backend
        self.scale = scale

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        if self.backend == "flash_attn":
            from flash_attn import flash_attn_varlen_func
            cu = self.cu_seqlens.to(q.device)
            return flash_attn_varlen_func(q, k, v, cu, cu, self.max_seqlen, self.max_seqlen,
                                          softmax_scale=scale, causal=True)
        if len(self.bounds) == 2:
            return causal_sdpa(q, k, v, scale)
        # sdpa has no varlen form on CPU; a loop over sequences costs no padding and no
        # [T, T] block-diagonal mask
        return torch.cat([causal_sdpa(q[a:b], k[a:b], v[a:b], scale)
                          for a, b in zip(self.bounds[:-1], self.bounds[1:])])


class GroupAttention:
    """Shared-prefix GRPO rows, [P | R1 | … | RG] each (engine.data.packing.GroupRows).

    The prompt attends causally to itself; each response attends to all of the prompt (one
    non-causal block for every response of the row at once) and causally to itself, the two
    blocks merged by their log-sum-exp (kernels.attention_block). Responses never see each
    other, so every token's output equals the repeated layout's, where each response follows
    its own copy of the prompt.

    On a GPU in half precision (`direct`, the default there) each response instead attends to
    [prompt keys | its own keys] in one flash-attention call with the causal mask aligned
    bottom-right (flash's own semantics when Tq < Tk): the same function with no LSE, no
    merge and flash's native GQA; the prompt's K/V are copied per response (small: K/V heads
    are few under GQA)."""

    def __init__(self, layout: list[tuple[int, int, tuple[int, ...]]], backend: str = "sdpa",
                 scale: float | None = None, direct: bool | None = None):
        self.layout = layout
        self.backend = backend
        self.scale = scale
        self.direct = direct  # None: on CUDA in half precision

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from kernels.attention_block import attention_block, merge

        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        outs = []
        for start, p, lens in self.layout:
            s, e = start + p, start + p + sum(lens)
            outs.append(self._causal(q[start:s], k[start:s], v[start:s], scale))
            if e == s:
                continue
            direct = self.direct
            if direct is None:
                direct = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            if direct:
                outs.append(self._responses_direct(q, k, v, start, p, lens, scale))
                continue
            out_p, lse_p = attention_block(q[s:e], k[start:s], v[start:s], causal=False, scale=scale)
            own, own_lse, a = [], [], s
            for n in lens:
                if n:
                    o, lse = attention_block(q[a:a + n], k[a:a + n], v[a:a + n], causal=True, scale=scale)
                    own.append(o)
                    own_lse.append(lse)
                    a += n
            out, _ = merge(out_p, lse_p, torch.cat(own), torch.cat(own_lse))
            outs.append(out)
        return torch.cat(outs)

    @staticmethod
    def _responses_direct(q, k, v, start: int, p: int, lens, scale: float) -> torch.Tensor:
        kp, vp = k[start:start + p], v[start:start + p]
        outs, a = [], start + p
        for n in lens:
            if not n:
                continue
            kk = torch.cat([kp, k[a:a + n]]).transpose(0, 1)[None]
            vv = torch.cat([vp, v[a:a + n]]).transpose(0, 1)[None]
            # is_causal on a [n, P + n] block: query i sees keys 0 .. P + i (bottom-right) in flash
            out = torch.ops.aten._scaled_dot_product_flash_attention(
                q[a:a + n].transpose(0, 1)[None], kk, vv, 0.0, True, False, scale=scale)[0]
            outs.append(out[0].transpose(0, 1))
            a += n
        return torch.cat(outs)

    def _causal(self, q, k, v, scale):
        if self.backend == "flash_attn":
            from flash_attn import flash_attn_func
            return flash_attn_func(q[None], k[None], v[None], softmax_scale=scale, causal=True)[0]
        return causal_sdpa(q, k, v, scale)


class RingAttention:
    """Sequence parallel: this rank's tokens of packed sequences in the zigzag layout
    (engine.parallel.SequenceShard), causal attention by kernels.ring_attention over `group`.
    seqlens are the sequences' global padded lengths; segments (optional) the segment id of
    every global padded token, for shared-prefix group rows sharded as one sequence."""

    def __init__(self, seqlens: list[int], group=None, scale: float | None = None, segments=None):
        self.seqlens = list(seqlens)
        self.group = group
        self.scale = scale
        self.segments = segments  # shared-prefix group rows: kernels.ring_attention's segment ids

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from kernels.ring_attention import ring_attention
        return ring_attention(q, k, v, self.seqlens, scale=self.scale, group=self.group, segments=self.segments)
