"""Row operations on one chunk of logits, the part of the fused path between the GEMMs.

Two passes over z [C, V] (raw logits of C tokens, any float dtype):

  stats(z, targets, inv_temp)  -> lse, logp, entropy     [C] fp32 each
  grad(z, targets, lse, entropy, grad_logp, grad_ent, inv_temp) -> dz [C, V]

with x = z · inv_temp, p = softmax(x), logp = x[y] − lse, H = lse − Σ p·x, and

  dz_j = inv_temp · ( grad_logp · (δ_jy − p_j) − grad_ent · p_j · (log p_j + H) )

which is d(Σ grad_logp·logp + grad_ent·H)/dz. `grad` may overwrite z (it returns the
buffer that holds dz). Each op exists twice: `TorchRows` (plain torch, the CPU path) and
`TritonRows` (kernels/triton_rows.py, one program per row, fp32 math inside). Everything
else in the fused path — the GEMMs, the per-token loss math — is shared.
"""
from __future__ import annotations

import functools
import os

import torch


class TorchRows:
    """The row ops in plain torch. Both passes walk the vocabulary in slices of VOCAB_SLICE
    columns, like the Triton kernels walk it in tiles, so no temporary is [C, V]: the
    chunk's logits buffer is the only full-width tensor (grad overwrites it with dz)."""

    name = "torch"
    VOCAB_SLICE = 8192

    @classmethod
    def stats(cls, z: torch.Tensor, targets: torch.Tensor, inv_temp: float, with_entropy: bool = True):
        m = z.max(dim=-1).values.float() * inv_temp  # inv_temp > 0 keeps the argmax
        s = torch.zeros_like(m)
        t = torch.zeros_like(m) if with_entropy else None
        for v0 in range(0, z.shape[1], cls.VOCAB_SLICE):
            shifted = z[:, v0:v0 + cls.VOCAB_SLICE].to(torch.float32, copy=True).mul_(inv_temp).sub_(m[:, None])
            e = torch.exp(shifted)
            s += e.sum(-1)
            if with_entropy:
                t += e.mul_(shifted).sum(-1)
        log_s = torch.log(s)
        lse = m + log_s
        logp = z.gather(-1, targets[:, None]).squeeze(-1).float() * inv_temp - lse
        # entropy = log s - Σ e (x - m) / s: no cancellation between large numbers when p_y -> 1
        entropy = log_s - t / s if with_entropy else None
        return lse, logp, entropy

    @classmethod
    def grad(cls, z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None,
             grad_logp: torch.Tensor, grad_ent: torch.Tensor | None, inv_temp: float) -> torch.Tensor:
        buf = z if z.dtype == torch.float32 else z.float()
        g_logp = grad_logp[:, None]
        for v0 in range(0, buf.shape[1], cls.VOCAB_SLICE):
            part = buf[:, v0:v0 + cls.VOCAB_SLICE]
            part.mul_(inv_temp).sub_(lse[:, None])  # log p
            if grad_ent is not None:
                coef = (part + entropy[:, None]).mul_(grad_ent[:, None]).add_(g_logp)
                part.exp_().mul_(coef).neg_()
            else:
                part.exp_().mul_(-g_logp)
        rows = torch.arange(buf.shape[0], device=buf.device)
        buf[rows, targets] += grad_logp
        if inv_temp != 1.0:
            buf.mul_(inv_temp)
        return buf


BACKENDS = ("auto", "torch", "triton")


def no_autocast(device: torch.device):
    """A context with torch.autocast off on `device`'s type: inside the fused ops every product
    runs in its inputs' dtype. Autocast is not active in a backward pass, so a forward under it
    would compute other logits than the backward's recompute (wrong gradients)."""
    return torch.autocast(device.type, enabled=False)


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def pick_rows(backend: str | None, device: torch.device):
    """auto: triton on CUDA, torch elsewhere. $LONGRL_KERNEL_BACKEND overrides auto."""
    choice = backend or "auto"
    if choice == "auto":
        choice = os.environ.get("LONGRL_KERNEL_BACKEND") or "auto"  # set but empty: unset, as in the config
    if choice not in BACKENDS:
        raise ValueError(f"kernel backend {choice!r} unknown; choose one of {', '.join(BACKENDS)}")
    if choice == "auto":
        choice = "triton" if device.type == "cuda" and _triton_importable() else "torch"
    if choice == "torch":
        return TorchRows
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpret:
        raise RuntimeError("kernel backend 'triton' needs a CUDA device, or TRITON_INTERPRET=1 "
                           "(set before triton is imported) to run the kernels on the CPU")
    from .triton_rows import TritonRows
    return TritonRows


LOGITS = ("fp32", "compute")


def logit_bytes(rows, dtype: torch.dtype, logits: str = "fp32") -> int:
    """Bytes a chunk holds per logit. logits "fp32" (chunk_logits): 4, plus for half-precision
    inputs the gradient's copy in their dtype. "compute": the logits in the input dtype, plus
    (torch rows, half-precision input) the fp32 copy the row passes work on; Triton rows work in
    place."""
    if logits not in LOGITS:  # checked here, once an op: chunk_logits runs in the chunk loop
        raise ValueError(f"logits {logits!r} unknown; choose one of {', '.join(LOGITS)}")
    size = torch.finfo(dtype).bits // 8
    if logits == "fp32":
        return 4 + (size if size < 4 else 0)
    return size + 4 if rows is TorchRows and size < 4 else size


def chunk_logits(h: torch.Tensor, w: torch.Tensor, logits: str = "fp32") -> torch.Tensor:
    """h [C, H] @ w.T, a chunk's logits. "fp32": in fp32 whatever the inputs (a half-precision
    product accumulates in fp32 and is written so: rounded to bf16, logits around 20 move each
    log-prob by up to ~0.1 nat at temperature 0.7, and the PPO ratio with them), through torch.mm's
    out_dtype where the device has it, else fp32 copies of the inputs. "compute": in the inputs'
    dtype (half the bytes, the rounding kept). `logits` is checked by logit_bytes."""
    if logits == "compute" or h.dtype == torch.float32:
        return h @ w.t()
    if _fp32_out("mm", h.device, h.dtype):
        return torch.mm(h, w.t(), out_dtype=torch.float32)
    return h.float() @ w.float().t()


def chunk_rows(num_tokens: int, vocab: int, device: torch.device, chunk_tokens: int | None = None,
               bytes_per_logit: int = 4) -> int:
    """Tokens per chunk: from a byte budget for one [C, V] chunk of logits at bytes_per_logit
    (logit_bytes: 4 for fp32, 2 for bf16 on the Triton rows, 6 for bf16 on the torch rows).

    Budget: $LONGRL_CHUNK_MB, else 256 MiB on CPU and 2 GiB on a GPU; the result is kept
    within 64..4096 tokens (smaller chunks are launch-bound on a GPU) and a multiple of 64."""
    if chunk_tokens:
        return max(1, min(chunk_tokens, num_tokens))
    default_mb = 2048 if device.type == "cuda" else 256
    rows = rows_for_budget(vocab, int(os.environ.get("LONGRL_CHUNK_MB") or default_mb), bytes_per_logit)
    return max(1, min(rows, num_tokens))


def rows_for_budget(vocab: int, budget_mb: int, bytes_per_logit: int = 4) -> int:
    """Tokens per chunk whose [C, V] logits at bytes_per_logit fit budget_mb: within
    64..4096, a multiple of 64."""
    rows = (budget_mb << 20) // (vocab * bytes_per_logit)
    return max(64, min(4096, rows // 64 * 64))


_FP32_OUT: dict[tuple[str, str, torch.dtype], bool] = {}


def _fp32_out(op: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's `op` ("addmm" or "mm") takes out_dtype=float32 for `dtype` inputs on this
    device: probed once on a 2 x 2 product and remembered. Out of memory is not an answer: it
    propagates."""
    key = (op, device.type, dtype)
    if key not in _FP32_OUT:
        a = torch.zeros(2, 2, device=device, dtype=dtype)
        out = torch.zeros(2, 2, device=device, dtype=torch.float32)
        try:
            if op == "mm":
                torch.mm(a, a, out_dtype=torch.float32)
            else:
                torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
            _FP32_OUT[key] = True
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError):
            _FP32_OUT[key] = False
    return _FP32_OUT[key]


def accumulate_dw(dw: torch.Tensor, dz: torch.Tensor, h: torch.Tensor) -> None:
    """dw [V, H] fp32 += dz.T @ h, accumulated in fp32. Half-precision inputs go straight into
    fp32 where torch's addmm takes out_dtype, else through fp32 copies of the chunk's dz and h
    (chunk-sized temporaries; nothing [V, H] and no rounding of the partial product)."""
    if dz.dtype == torch.float32:
        dw.addmm_(dz.t(), h)
    elif _fp32_out("addmm", dz.device, dz.dtype):
        torch.addmm(dw, dz.t(), h, out_dtype=torch.float32, out=dw)
    else:
        dw.addmm_(dz.t().float(), h.float())
