"""The interpreter shim of tests/triton_patch_once.py: inside a launch, helper calls (tl.max and
tl.sum are helpers too) no longer rescan the language modules; the launch itself still swaps
them in and back; what a kernel computes is unchanged."""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import triton_patch_once  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the interpreter")


@triton.jit
def _scaled_max(x):
    return tl.max(x, axis=0) * 2.0


@triton.jit
def _row_stats(src, dst, n, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x = tl.load(src + r * n + offs, mask=offs < n, other=float("-inf"))
    s = tl.sum(tl.where(offs < n, x, 0.0), axis=0)
    tl.store(dst + 2 * r, _scaled_max(x))
    tl.store(dst + 2 * r + 1, s)


def test_helper_calls_skip_the_rescan_and_compute_the_same():
    assert triton_patch_once.install()  # conftest installed it: in place, installing again changes nothing
    real = triton_patch_once._installed[0]
    assert interpreter._patch_lang is not real and len(triton_patch_once._installed) == 1
    scans = []

    def counting(fn):
        scans.append(fn.__name__)
        return real(fn)
    triton_patch_once._installed[0] = counting
    x = torch.randn(5, 7)
    out = torch.empty(5, 2)
    try:
        _row_stats[(5,)](x, out, 7, BLOCK=8)
    finally:
        triton_patch_once._installed[0] = real
    torch.testing.assert_close(out[:, 0], 2 * x.max(1).values)
    torch.testing.assert_close(out[:, 1], x.sum(1))
    # the launch's own swap, and the first call into triton.language's own helpers (their module,
    # tl.core, is swapped then and stays so); not one swap per helper call of the 5 programs
    assert scans[0] == "_row_stats" and len(scans) <= 2, scans
    assert tl.core.is_builtin(tl.program_id)  # the launch swapped tl back at its end
