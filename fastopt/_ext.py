"""Loads fastopt's compiled CPU kernels, the CPU implementations of the ``torch.ops.fastopt`` ops that
fastopt/ops/library.py defines (and loads this from, at import).

Order: the library named by ``FASTOPT_EXTENSION`` if set; the installed extension ``fastopt._C``; else, in a source checkout, a JIT build of csrc/ with ninja
(cached by torch under ~/.cache/torch_extensions; ``FASTOPT_NO_JIT=1`` turns it off); else none, and CPU
tensors take the reference path after one warning. Importing fastopt never fails because of this.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch


@functools.lru_cache(maxsize=None)
def load() -> str | None:
    """How the compiled ops were loaded: "installed", "jit", "FASTOPT_EXTENSION" (the library that variable names,
    e.g. the sanitizer build of tests/sanitize.py), or None when they are unavailable."""
    chosen = os.environ.get("FASTOPT_EXTENSION")
    if chosen:
        torch.ops.load_library(chosen)
        return "FASTOPT_EXTENSION"
    try:
        from fastopt import _C  # noqa: F401  (loading the library registers the ops)

        how = "installed"
    except ImportError as missing:
        how = _jit_build(missing)
    return how


def _jit_build(missing: ImportError) -> str | None:
    from fastopt._build import CSRC, CXX_FLAGS, LD_FLAGS, SOURCES

    reason = f"fastopt._C is not built ({missing})"
    if os.environ.get("FASTOPT_NO_JIT") == "1":
        reason += " and FASTOPT_NO_JIT=1 forbids a JIT build"
    elif not CSRC.is_dir():
        reason += " and there is no csrc/ to build it from"
    else:
        try:
            from torch.utils.cpp_extension import load as cpp_load

            cpp_load(name="fastopt_C", sources=[str(CSRC / s) for s in SOURCES], extra_cflags=CXX_FLAGS,
                     extra_ldflags=LD_FLAGS, is_python_module=False)
            return "jit"
        except Exception as e:  # a compiler or ninja missing, a build error: fall back, never crash
            reason += f"; the JIT build failed: {e}"
    warnings.warn(f"fastopt: C++ CPU kernels unavailable: {reason}. CPU tensors use the slower reference path; "
                  "build the kernels with `pip install --no-build-isolation -e .`", RuntimeWarning, stacklevel=3)
    return None
