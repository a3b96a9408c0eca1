"""Triton row kernels for the fused log-prob / GRPO path (see kernels/rows.py for the math).

One program per row of a logits chunk z [C, V]; each walks the vocabulary in BLOCK_V
tiles with an online max / sum-exp, all in fp32 whatever z's dtype. The tile width and the
warps per program come from a short candidate list, timed on the card at first use
(`launch_config`). The grid has C
programs on axis 0 (C <= 4096), and row offsets are computed in int64, so nothing here
depends on the total sequence length. Written for Triton 3.6 and later: plain tl ops only.
Under TRITON_INTERPRET=1 the same kernels run on CPU tensors (the tests do that).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _row_stats_kernel(z_ptr, stride_z, targets_ptr, lse_ptr, logp_ptr, ent_ptr, V, inv_temp,
                      BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    m = float("-inf")  # running max of x
    s = 0.0  # running sum of exp(x - m)
    t = 0.0  # running sum of exp(x - m) * (x - m): entropy = log s - t / s, with no
    #          cancellation between two large numbers when the row is confident
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(x, axis=0))
        scale = tl.exp(m - m_new)
        shift = tl.where(s > 0, (m - m_new) * s, 0.0)  # re-centre the old terms on m_new
        e = tl.where(mask, tl.exp(x - m_new), 0.0)
        t = scale * (t + shift) + tl.sum(e * tl.where(mask, x - m_new, 0.0), axis=0)
        s = s * scale + tl.sum(e, axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row).to(tl.int64)
    x_y = tl.load(base + target).to(tl.float32) * inv_temp
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, x_y - lse)
    tl.store(ent_ptr + row, tl.log(s) - t / s)


@triton.jit
def _row_grad_kernel(z_ptr, stride_z, targets_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, V, inv_temp,
                     HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    lse = tl.load(lse_ptr + row)
    g_logp = tl.load(glogp_ptr + row)
    target = tl.load(targets_ptr + row).to(tl.int64)
    if HAS_ENT:
        g_ent = tl.load(gent_ptr + row)
        ent = tl.load(ent_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
        logp = x - lse
        p = tl.exp(logp)
        coef = g_logp
        if HAS_ENT:
            coef = coef + g_ent * (logp + ent)
        # softmax(x)_y - 1 is formed as -(1 - p_y) in fp32, never in z's dtype
        d = tl.where(cols == target, g_logp, 0.0) - p * coef
        tl.store(base + cols, (d * inv_temp).to(z_ptr.dtype.element_ty), mask=mask)


# (BLOCK_V, num_warps) candidates for the row kernels: a row program streams V values, so the
# tile width and the warps that share it trade registers against memory-level parallelism;
# which wins depends on V, the dtype and the card, so it is measured once per (kernel, V, dtype,
# device) on first use and cached. Under the interpreter (CPU) the first candidate is used.
LAUNCH_CANDIDATES = ((4096, 4), (4096, 8), (4096, 16), (2048, 4), (2048, 8), (1024, 4))
_LAUNCH: dict[tuple, tuple[int, int]] = {}
TUNE_ROWS = 256  # rows of the chunk the timing runs on (a row program's time does not depend on C)


def _cuda_timer(run) -> float:
    run()  # compile outside the timing
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def launch_config(kind: str, z: torch.Tensor, launch, timer=None) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row kernel over z [C, V]: the fastest of LAUNCH_CANDIDATES,
    timed once on a copy of at most TUNE_ROWS rows (the grad kernel writes its input), then
    cached. `launch(z_rows, block_v, warps)` runs the kernel; `timer(run) -> time` (any unit, only
    compared) times a callable (default: CUDA events, ms; on CPU no timing, the first candidate)."""
    v = z.shape[1]
    key = (kind, v, z.dtype, z.device.type, z.device.index)
    if key in _LAUNCH:
        return _LAUNCH[key]
    fits = [(min(b, triton.next_power_of_2(v)), w) for b, w in LAUNCH_CANDIDATES]
    fits = list(dict.fromkeys(fits))  # a small vocabulary maps several tiles to the same width
    if len(fits) == 1 or timer is None and (z.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        _LAUNCH[key] = fits[0]
        return fits[0]
    timer = timer or _cuda_timer
    sample = z[:TUNE_ROWS].clone()
    times = {cfg: timer(lambda cfg=cfg: launch(sample, *cfg)) for cfg in fits}
    _LAUNCH[key] = min(times, key=times.get)
    return _LAUNCH[key]


class TritonRows:
    name = "triton"

    @staticmethod
    def stats(z: torch.Tensor, targets: torch.Tensor, inv_temp: float, with_entropy: bool = True):
        c, v = z.shape
        lse = torch.empty(c, device=z.device, dtype=torch.float32)
        logp = torch.empty_like(lse)
        ent = torch.empty_like(lse)

        def launch(rows, block_v, warps):
            n = rows.shape[0]
            _row_stats_kernel[(n,)](rows, rows.stride(0), targets, lse, logp, ent, v, float(inv_temp),
                                    BLOCK_V=block_v, num_warps=warps)
        if c:
            launch(z, *launch_config("stats", z, launch))
        return lse, logp, ent if with_entropy else None

    @staticmethod
    def grad(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None,
             grad_logp: torch.Tensor, grad_ent: torch.Tensor | None, inv_temp: float) -> torch.Tensor:
        c, v = z.shape
        has_ent = grad_ent is not None
        g_logp = grad_logp.float().contiguous()
        g_ent = grad_ent.float().contiguous() if has_ent else lse

        def launch(rows, block_v, warps):
            _row_grad_kernel[(rows.shape[0],)](rows, rows.stride(0), targets, lse, entropy if has_ent else lse,
                                               g_logp, g_ent, v, float(inv_temp), HAS_ENT=has_ent,
                                               BLOCK_V=block_v, num_warps=warps)
        if c:
            launch(z, *launch_config("grad", z, launch))
        return z
