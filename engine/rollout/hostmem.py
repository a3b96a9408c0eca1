"""Host allocator settings for CPU runs: keep freed tensor memory in the process.

glibc serves every allocation above its mmap threshold (128 KiB at first, raised
dynamically up to 32 MiB as large blocks are freed) with a fresh mmap, and returns it to the
kernel on free. A CPU decode step allocates and frees tensors of a few to tens of MB (logits
[64, 49,152] fp32 is 12.6 MB; the sampler makes several of that size), so each of them
page-faults its way in again, every step: the kernel zero-fills each 4 KiB page. Measured by
`python -m bench.rollout_case --impl ours --top-p 0.95` with and without the settings below
(README, rollout figures): decode ran 6-12% faster with them on this project's CPU.

`tune()` raises the mmap threshold to glibc's maximum (32 MiB on 64-bit) and the trim
threshold and top pad so that freed blocks stay in the heap and are reused without faults.
Tensors over 32 MiB (logits of a 152K vocabulary at 64 rows: 39 MB) still
come from mmap each time. The price: the process keeps its peak heap (not handed back to the
system until exit), as CUDA's caching allocator keeps device memory. Set LONGRL_HOST_MALLOC=default to leave
glibc as it is. Not glibc (macOS, musl): nothing is changed.

`to_device()` stages a decode step's small host-to-device copies in pinned memory on a GPU.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top before glibc gives any back
TOP_PAD = 64 << 20  # extra heap obtained per sbrk

_state = {"tuned": None}


def _libc():
    """glibc, or None. The process's own symbols first (no ldconfig or gcc needed, as
    find_library needs them), then the library by name."""
    for name in (None, "libc.so.6", ctypes.util.find_library("c")):
        try:
            libc = ctypes.CDLL(name)
            libc.gnu_get_libc_version  # glibc only: musl and BSD libcs lack it (and mallopt's meaning)
            libc.mallopt
            break
        except (OSError, AttributeError, TypeError):
            continue
    else:
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def _apply(settings: dict[int, int]) -> bool:
    libc = _libc()
    if libc is None:
        return False
    return all([libc.mallopt(param, value) == 1 for param, value in settings.items()])  # each one tried


def tune() -> bool:
    """Apply the settings once per process (later calls return the first answer). True when
    glibc took them; False when it is not glibc or LONGRL_HOST_MALLOC=default."""
    if _state["tuned"] is None:
        if os.environ.get("LONGRL_HOST_MALLOC", "").strip().lower() == "default":
            _state["tuned"] = False
        else:
            _state["tuned"] = _apply({_M_MMAP_THRESHOLD: MMAP_THRESHOLD, _M_TRIM_THRESHOLD: TRIM_THRESHOLD,
                                      _M_TOP_PAD: TOP_PAD})
    return _state["tuned"]


def to_device(t: torch.Tensor, device: torch.device | str, out: torch.Tensor | None = None) -> torch.Tensor:
    """A small host tensor on `device` (or copied into `out` there) without the host waiting for the
    device's queue: on a GPU it is staged in pinned memory (a copy from pageable memory may wait for
    the stream; PyTorch keeps a pinned block until the copy from it is done, so it is never rewritten
    early), elsewhere copied as it is."""
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    if out is not None:
        return out.copy_(t, non_blocking=True)
    return t.to(device, non_blocking=True)
