"""The interpreter's bounds check (tests/triton_bounds.py) catches what a GPU would fault on:
unmasked loads and stores past a tensor, reads past a view into the rest of its storage; masked
lanes and in-bounds launches pass."""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import triton_bounds  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the interpreter")


@triton.jit
def _copy(src, dst, n, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if MASKED:
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n, other=0.0), mask=offs < n)
    else:
        tl.store(dst + offs, tl.load(src + offs))


@triton.jit
def _scalar_read(src, dst, at):
    tl.store(dst, tl.load(src + at))


@pytest.fixture(autouse=True)
def installed():
    was = bool(triton_bounds._installed)
    triton_bounds.install()
    if not triton_bounds._installed:
        pytest.skip("this Triton's interpreter lacks the hooks the bounds check wraps")
    yield
    if not was:
        triton_bounds.uninstall()


def test_in_bounds_and_masked_lanes_pass():
    src = torch.arange(10, dtype=torch.float32)
    dst = torch.zeros(10)
    _copy[(1,)](src, dst, 10, BLOCK=16, MASKED=True)  # lanes 10..15 masked off
    assert torch.equal(dst, src)
    dst = torch.zeros(16)
    _copy[(2,)](torch.arange(16, dtype=torch.float32), dst, 16, BLOCK=8, MASKED=False)
    assert torch.equal(dst, torch.arange(16, dtype=torch.float32))


def test_unmasked_load_past_the_end_raises():
    with pytest.raises(Exception, match=r"_copy: load of 6 of 16 active lanes outside every tensor argument"):
        _copy[(1,)](torch.arange(10, dtype=torch.float32), torch.zeros(16), 10, BLOCK=16, MASKED=False)


def test_unmasked_store_past_the_end_raises():
    with pytest.raises(Exception, match=r"_copy: store of 4 of 16 active lanes"):
        _copy[(1,)](torch.arange(16, dtype=torch.float32), torch.zeros(12), 16, BLOCK=16, MASKED=False)


def test_reading_past_a_view_into_its_storage_raises():
    """A view's neighbours in the same storage are not the kernel's to read (a GPU would not fault,
    but the values are some other tensor's): the check is against the view's span."""
    base = torch.arange(32, dtype=torch.float32)
    dst = torch.zeros(1)
    _scalar_read[(1,)](base[8:16], dst, 7)
    assert dst.item() == 15
    with pytest.raises(Exception, match=r"_scalar_read: load .* \+0 bytes from its end"):
        _scalar_read[(1,)](base[8:16], dst, 8)
    with pytest.raises(Exception, match=r"from its start"):
        _scalar_read[(1,)](base[8:16], dst, -1)


def test_view_span_of_strided_views():
    x = torch.zeros(4, 6)
    assert triton_bounds.view_span(x) == (x.data_ptr(), x.data_ptr() + 24 * 4)
    col = x[:, 2]  # 4 elements 6 apart: first to last + 1
    assert triton_bounds.view_span(col) == (col.data_ptr(), col.data_ptr() + (3 * 6 + 1) * 4)
    t = x.t()
    assert triton_bounds.view_span(t) == (x.data_ptr(), x.data_ptr() + 24 * 4)
    flipped = torch.zeros(2, 3).as_strided((2, 3), (3, 1), 0)
    assert triton_bounds.view_span(flipped) == (flipped.data_ptr(), flipped.data_ptr() + 6 * 4)

    class Mixed:  # strides torch never makes (it refuses negative ones), the arithmetic all the same
        shape, element_size = (2, 3), staticmethod(lambda: 4)

        def __init__(self, base):
            self.base = base

        def stride(self):
            return (3, -1)

        def numel(self):
            return 6

        def data_ptr(self):
            return self.base
    assert triton_bounds.view_span(Mixed(1000)) == (1000 - 2 * 4, 1000 + (3 + 1) * 4)
    lo, hi = triton_bounds.view_span(x[:0])
    assert lo == hi  # an empty view admits no address
