"""Faster device-function calls in the Triton interpreter (TRITON_INTERPRET=1), for the tests.

The interpreter swaps triton.language's builtins for interpreted ones at every kernel launch
and again at every call of a @triton.jit helper inside a kernel, tl.max / tl.sum / tl.cumsum
included (they are jit functions too): each time it scans the language modules with
inspect.getmembers, about 0.3 ms on this machine. A kernel with a dozen reductions a program
and a thousand programs spends seconds there. Inside a launch the modules a helper sees are
already swapped (by the launch itself, or by an earlier helper call: the interpreter never
swaps those back), and a scan of swapped modules changes nothing: `install()` skips it then.
A launch still swaps and restores as before. What the kernels compute is unchanged; a version
of Triton without the private function this wraps is left as it is.

Installed for the whole test session by tests/conftest.py when the kernels run in the
interpreter ($LONGRL_TRITON_PATCH_ONCE=0 turns it off).
"""
from __future__ import annotations

import inspect

_installed: list = []


def _swapped(lang, tl) -> bool:
    """True when the language module's builtins are already the interpreter's (program_id stands
    for them all: one scan swaps every builtin of a module)."""
    member = getattr(lang, "program_id", None)
    return member is not None and not tl.core.is_builtin(member)


def install() -> bool:
    """Wrap the interpreter's language swap (idempotent). -> whether it is in place."""
    if _installed:
        return True
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        real = interpreter._patch_lang
        scope_type = interpreter._LangPatchScope
    except (ImportError, AttributeError):
        return False

    def patch_lang(fn):
        langs = [v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)]
        if langs and all(_swapped(lang, tl) for lang in langs):
            return scope_type()  # nothing to swap, nothing to restore
        return _installed[0](fn)  # the interpreter's own swap

    interpreter._patch_lang = patch_lang
    _installed.append(real)
    return True
