"""Out-of-bounds checking for Triton kernels run in the interpreter (TRITON_INTERPRET=1).

On a GPU an unmasked load or store past a tensor is an illegal memory access that kills the
CUDA context (every later launch in the process fails); in the interpreter the same access reads
or writes whatever host memory lies there and the test usually still passes. `install()` makes
every interpreted load and store check that each address its mask lets through lies inside one
of the launch's tensor arguments (the bytes its view spans), and raise `OutOfBounds` naming the
kernel, the operation and the first stray address otherwise (the interpreter hands it on
wrapped in its InterpreterError). Atomics are not wrapped (no kernel here uses them); kernels
run in a child process (spawned ranks) are checked only if that process installs it too.

Installed for the whole test session by tests/conftest.py when the kernels run in the
interpreter ($LONGRL_TRITON_BOUNDS=0 turns it off).
"""
from __future__ import annotations

import contextvars
import functools

import numpy as np
import torch


class OutOfBounds(AssertionError):
    pass


_launch: contextvars.ContextVar = contextvars.ContextVar("triton_bounds_launch", default=None)
_installed: list = []


def view_span(t: torch.Tensor) -> tuple[int, int]:
    """[start, end) bytes that tensor view `t` can address (its first element to one past its last)."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    steps = [(n - 1) * s for n, s in zip(t.shape, t.stride())]
    below, above = sum(x for x in steps if x < 0), sum(x for x in steps if x > 0)  # furthest back, forward
    return t.data_ptr() + below * t.element_size(), t.data_ptr() + (above + 1) * t.element_size()


def _regions(args, kwargs) -> list[tuple[int, int, str]]:
    out = []

    def visit(name, a):
        if isinstance(a, torch.Tensor):
            lo, hi = view_span(a)
            out.append((lo, hi, f"{name} {tuple(a.shape)} {a.dtype}"))
        elif isinstance(a, tuple):
            for i, x in enumerate(a):
                visit(f"{name}[{i}]", x)
        elif hasattr(a, "base") and isinstance(getattr(a, "base"), torch.Tensor):  # a tensor descriptor
            visit(f"{name}.base", a.base)

    for i, a in enumerate(args):
        visit(f"arg {i}", a)
    for k, a in kwargs.items():
        visit(k, a)
    return out


def check(op: str, ptrs: np.ndarray, mask: np.ndarray, itemsize: int) -> None:
    """Raise OutOfBounds unless every address of `ptrs` where `mask` is set (and its `itemsize`
    bytes) lies inside one tensor argument of the current launch."""
    launch = _launch.get()
    if launch is None:
        return
    addr = np.asarray(ptrs, dtype=np.uint64)
    sel = np.broadcast_to(np.asarray(mask, dtype=bool), addr.shape)
    addr = addr[sel].astype(np.int64) if addr.ndim else (addr[None].astype(np.int64) if bool(sel) else addr[:0])
    if addr.size == 0:
        return
    inside = np.zeros(addr.shape, dtype=bool)
    for lo, hi, _ in launch["regions"]:
        inside |= (addr >= lo) & (addr + itemsize <= hi)
    if inside.all():
        return
    bad = int(addr[~inside][0])
    near = min(launch["regions"], key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])), default=None)
    where = "" if near is None else (f"; nearest argument {near[2]} spans [{near[0]:#x}, {near[1]:#x}), "
                                     f"{bad - near[1] if bad >= near[1] else bad - near[0]:+d} bytes from its "
                                     f"{'end' if bad >= near[1] else 'start'}")
    raise OutOfBounds(f"{launch['kernel']}: {op} of {int((~inside).sum())} of {addr.size} active lanes outside "
                      f"every tensor argument (first {bad:#x}){where}")


def install() -> None:
    """Wrap the interpreter's launch, masked load and masked store (idempotent)."""
    if _installed:
        return
    from triton.runtime import interpreter as interp

    executor, builder = getattr(interp, "GridExecutor", None), getattr(interp, "InterpreterBuilder", None)
    hooks = [(executor, "__call__"), (executor, "_init_args_hst"), (builder, "create_masked_load"),
             (builder, "create_masked_store"), (interp, "_get_np_dtype")]
    if any(owner is None or not hasattr(owner, name) for owner, name in hooks):
        import warnings
        warnings.warn("tests/triton_bounds.py: this Triton's interpreter lacks the hooks the bounds check "
                      "wraps; kernels run unchecked", stacklevel=2)
        return
    real_call, real_load, real_store = executor.__call__, builder.create_masked_load, builder.create_masked_store

    @functools.wraps(real_call)
    def call(self, *args, **kwargs):
        # the interpreter copies device tensors to the host: check against the host copies it runs on
        real_init = self._init_args_hst

        def init(args_dev, kw):
            args_hst, kwargs_hst = real_init(args_dev, kw)
            token_box.append(_launch.set({"kernel": getattr(self.fn, "__name__", "kernel"),
                                          "regions": _regions(args_hst, kwargs_hst)}))
            return args_hst, kwargs_hst

        token_box: list = []
        self._init_args_hst = init
        try:
            return real_call(self, *args, **kwargs)
        finally:
            del self._init_args_hst
            if token_box:
                _launch.reset(token_box[0])

    def itemsize(ptrs) -> int:
        return np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize

    # (ptrs, mask, ...) and (ptrs, value, mask, ...): the trailing arguments differ between Triton releases
    def load(self, ptrs, mask, *rest, **kwargs):
        check("load", ptrs.data, mask.data, itemsize(ptrs))
        return real_load(self, ptrs, mask, *rest, **kwargs)

    def store(self, ptrs, value, mask, *rest, **kwargs):
        check("store", ptrs.data, mask.data, itemsize(ptrs))
        return real_store(self, ptrs, value, mask, *rest, **kwargs)

    executor.__call__, builder.create_masked_load, builder.create_masked_store = call, load, store
    _installed.append((executor, builder, real_call, real_load, real_store))


def uninstall() -> None:
    if not _installed:
        return
    executor, builder, real_call, real_load, real_store = _installed.pop()
    executor.__call__, builder.create_masked_load, builder.create_masked_store = real_call, real_load, real_store
