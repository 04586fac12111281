"""Loads fastopt's compiled CPU kernels: libfastopt_cpu.so, a plain shared library behind the C ABI of
csrc/fastopt.h, called through ctypes by fastopt/ops/cpu.py (the CPU implementations of the ``torch.ops.fastopt``
ops). It links neither torch nor Python, so no torch or Python version can mismatch it; what can is the library
itself (one built for another fastopt version), which its ABI version tells. Its threads are torch's: the library
is handed the OpenMP runtime torch loaded (``openmp_entry``), and each op call says how many (torch.get_num_threads()).

Order: the library named by ``FASTOPT_EXTENSION`` if set (e.g. the sanitizer build of tests/sanitize.py); the one
installed beside this file (wheel, or editable build); else, in a source checkout, a JIT build of csrc/ into
``~/.cache/fastopt`` (``FASTOPT_NO_JIT=1`` turns it off); else none, and CPU tensors take the reference path after
one warning. Importing fastopt never fails because of this.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import warnings
from pathlib import Path

ABI_VERSION = 1  # FASTOPT_ABI_VERSION of csrc/fastopt.h
ISAS = ("scalar", "avx2", "avx512", "avx512vbmi")  # by the C ABI's numbers
INSTALLED = Path(__file__).resolve().parent / "libfastopt_cpu.so"

_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_I64 = ctypes.POINTER(ctypes.c_int64)
_I32 = ctypes.POINTER(ctypes.c_int32)
_F64 = ctypes.POINTER(ctypes.c_double)


class Moments(ctypes.Structure):
    """fastopt_moments of csrc/fastopt.h: one step op's tensors, as arrays indexed by tensor."""
    _fields_ = [("count", ctypes.c_int64), ("numel", _I64), ("param_dtype", _I32), ("state_dtype", _I32),
                ("param", _PP), ("grad", _PP), ("exp_avg", _PP), ("exp_avg_sq", _PP), ("exp_avg_scale", _PP),
                ("exp_avg_sq_scale", _PP), ("max_exp_avg_sq", _PP), ("bits", ctypes.c_int32),
                ("exp_avg_map", _P), ("exp_avg_sq_map", _P)]


_SIGNATURES = {  # name: (result, arguments)
    "fastopt_abi_version": (ctypes.c_int, []),
    "fastopt_last_error": (ctypes.c_char_p, []),
    "fastopt_best_isa": (ctypes.c_int, []),
    "fastopt_isa": (ctypes.c_int, []),
    "fastopt_set_isa": (None, [ctypes.c_int]),
    "fastopt_set_parallel": (None, [_P]),
    "fastopt_adam_step": (ctypes.c_int, [ctypes.POINTER(Moments), _PP, _P, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                         ctypes.c_double, ctypes.c_int]),
    "fastopt_stable_spam_step": (ctypes.c_int, [ctypes.POINTER(Moments), _PP, _PP, _PP, _PP, _PP, _P, ctypes.c_int,
                                                ctypes.c_double, _P, ctypes.c_int]),
    "fastopt_spam_step": (ctypes.c_int, [ctypes.POINTER(Moments), _PP, _P, ctypes.c_double, ctypes.c_int]),
    "fastopt_grad_stats": (ctypes.c_int, [ctypes.c_int64, _PP, _I64, _I32, _P, ctypes.c_double, _P, ctypes.c_int]),
    "fastopt_quantize_blockwise": (ctypes.c_int, [_P, ctypes.c_int64, _P, ctypes.c_int, _P, _P]),
    "fastopt_dequantize_blockwise": (ctypes.c_int, [_P, _P, ctypes.c_int64, _P, ctypes.c_int, _P]),
}


def library() -> ctypes.CDLL | None:
    """The loaded kernels (ctypes), or None when unavailable."""
    return _load()[1]


def load() -> str | None:
    """How the kernels were loaded: "installed", "jit", "FASTOPT_EXTENSION", or None when they are unavailable."""
    return _load()[0]


@functools.lru_cache(maxsize=None)
def _load() -> tuple[str | None, ctypes.CDLL | None]:
    import torch  # noqa: F401  (first: its OpenMP runtime is the one the kernels then run on)

    chosen = os.environ.get("FASTOPT_EXTENSION")
    if chosen:
        return "FASTOPT_EXTENSION", _open(Path(chosen))  # asked for by name: a library that does not fit raises
    problems = []
    if INSTALLED.exists():
        try:
            return "installed", _open(INSTALLED)
        except (OSError, RuntimeError) as e:
            problems.append(f"{INSTALLED} does not load: {e}")
    else:
        problems.append(f"{INSTALLED.name} is not built")
    try:
        return "jit", _open(_jit_build())
    except Exception as e:  # a compiler missing, a build error, no sources: fall back, never crash
        problems.append(str(e))
    warnings.warn(f"fastopt: C++ CPU kernels unavailable ({'; '.join(problems)}). CPU tensors use the slower "
                  "reference path; build the kernels with `pip install --no-build-isolation -e .` (or `make build`)",
                  RuntimeWarning, stacklevel=4)
    return None, None


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    version = lib.fastopt_abi_version() if hasattr(lib, "fastopt_abi_version") else None
    if version != ABI_VERSION:
        raise RuntimeError(f"{path} has C ABI version {version}, this fastopt needs {ABI_VERSION}: it was built from "
                           "another fastopt version; rebuild it (`pip install --no-build-isolation -e .`) or reinstall")
    for name, (result, arguments) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = result, arguments
    if lib.fastopt_best_isa() == 0:
        warnings.warn("fastopt: this CPU has no AVX2: the C++ kernels run their baseline x86-64 code (correct, but "
                      "several times slower than with AVX2 or AVX-512)", RuntimeWarning, stacklevel=5)
    entry = openmp_entry()
    if entry is None:
        warnings.warn("fastopt: no OpenMP runtime in this process (torch normally brings libgomp.so.1): the C++ "
                      "kernels run on one thread", RuntimeWarning, stacklevel=5)
    lib.fastopt_set_parallel(entry)
    return lib


def openmp_entry() -> int | None:
    """The address of GOMP_parallel in the OpenMP runtime torch runs on, which the kernels then share: the one in the
    process's global scope (torch loads its libgomp.so.1 there), else libgomp.so.1 by name (the copy already loaded
    if there is one). None when there is none."""
    for name in (None, "libgomp.so.1"):
        try:
            return ctypes.cast(ctypes.CDLL(name).GOMP_parallel, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


def _jit_build() -> Path:
    from fastopt._build import CSRC, LIBRARY, SOURCES, build

    if os.environ.get("FASTOPT_NO_JIT") == "1":
        raise RuntimeError("FASTOPT_NO_JIT=1 forbids a JIT build")
    if not all((CSRC / s).is_file() for s in SOURCES):
        raise RuntimeError(f"there is no csrc/ to build them from ({CSRC})")
    cache = jit_cache()
    return build(cache / LIBRARY, cache / "objects")


def jit_cache() -> Path:
    """Where a JIT build goes: a folder of the user's cache named by the sources' contents."""
    from fastopt._build import CSRC, SOURCES, headers

    digest = hashlib.sha256()
    for path in [CSRC / s for s in SOURCES] + headers():
        digest.update(path.read_bytes())
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastopt" / digest.hexdigest()[:16]


# ---- the ISA the kernels run ---------------------------------------------------------------------------------------
def cpu_isa() -> str:
    """The SIMD code the C++ kernels run: "avx512vbmi", "avx512", "avx2" or "scalar"."""
    return ISAS[_required().fastopt_isa()]


def best_cpu_isa() -> str:
    return ISAS[_required().fastopt_best_isa()]


def set_cpu_isa(isa: str) -> str:
    """Makes the C++ kernels run ``isa`` (at most this CPU's best; "auto": the best) and returns its name."""
    lib = _required()
    best = lib.fastopt_best_isa()
    if isa != "auto" and isa not in ISAS:
        raise ValueError(f"fastopt: unknown isa {isa!r} (expected one of {', '.join(reversed(ISAS))} or 'auto')")
    want = best if isa == "auto" else ISAS.index(isa)
    if want > best:
        raise ValueError(f"fastopt: isa {isa!r} is not supported by this CPU (best: {ISAS[best]})")
    lib.fastopt_set_isa(want)
    return ISAS[want]


def _required() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("fastopt's C++ kernels are not available (build them with `make build`)")
    return lib
