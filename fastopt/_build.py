"""Builds libfastopt_cpu.so, the C++ CPU kernels behind the C ABI of csrc/fastopt.h: one description and one build
function shared by setup.py (wheels, editable installs), the JIT fallback in fastopt/_ext.py and the sanitizer build
(tests/sanitize.py). Imports only the standard library (setup.py loads it by path).

The library includes neither torch nor Python headers and links neither, so one build serves every torch and Python
version. Portable flags only, never -march=native: the kernels pick their ISA at run time. It needs only what every
manylinux_2_28 system has (glibc 2.28 symbols, libstdc++ of GCC 5): no OpenMP library either, since the kernels run on
the threads of the OpenMP runtime that torch already loaded (fastopt/_ext.py hands it over)."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
LIBRARY = "libfastopt_cpu.so"
# where builds from this tree keep their objects (setup.py: editable installs and wheels), so that the next build
# (and the JIT test, which starts from them) compiles only what changed
OBJECTS = CSRC.parent / "build" / "objects"
SOURCES = ["ops.cpp", "cpu_kernels.cpp"]
# -ffp-contract=fast (GCC's default for C++, spelled out): a·b + c becomes one FMA alike in the hand-written SIMD
# code and in the auto-vectorized loops, which is what makes the AVX-512 and AVX2 kernels agree bit for bit.
CXX_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast",
             "-Wall"]
LD_FLAGS = ["-shared", "-Wl,-z,defs"]  # -z defs: nothing left to resolve from torch, Python or OpenMP


def headers(csrc: Path = CSRC) -> list[Path]:
    return sorted(csrc.glob("*.h")) + sorted(csrc.glob("*.inc"))


def compiler() -> str:
    found = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not found:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    return found


def build(output: Path, build_dir: Path, *, extra_cflags: list[str] = (), extra_ldflags: list[str] = (),
          csrc: Path = CSRC, jobs: int | None = None, log=None) -> Path:
    """Compiles csrc/ into the shared library ``output``, objects in ``build_dir``, sources in parallel. Only what is
    older than its inputs (the source, every header, the flags) is redone, so a second call costs nothing. Returns
    ``output``. ``log(command)`` is told each command that runs."""
    cxx = shlex.split(compiler())
    cflags = CXX_FLAGS + list(extra_cflags)
    ldflags = LD_FLAGS + list(extra_ldflags)
    build_dir.mkdir(parents=True, exist_ok=True)
    flags_file = build_dir / "flags.txt"  # a change of flags or compiler rebuilds everything
    flags = shlex.join(cxx + cflags + ["|"] + ldflags)
    if not flags_file.exists() or flags_file.read_text() != flags:
        flags_file.write_text(flags)
    inputs_time = max(p.stat().st_mtime for p in [*headers(csrc), flags_file])

    def compile_one(source: str) -> Path:
        src, obj = csrc / source, build_dir / (Path(source).stem + ".o")
        if not obj.exists() or obj.stat().st_mtime < max(inputs_time, src.stat().st_mtime):
            run([*cxx, *cflags, f"-I{csrc}", "-c", str(src), "-o", str(obj)], log)
        return obj

    with ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        objects = list(pool.map(compile_one, SOURCES))
    if not output.exists() or output.stat().st_mtime < max(o.stat().st_mtime for o in objects):
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_name(output.name + ".partial")  # a process loading `output` never sees half a file
        run([*cxx, *map(str, objects), *ldflags, "-o", str(partial)], log)
        os.replace(partial, output)
    return output


def run(command: list[str], log=None) -> None:
    if log is not None:
        log(shlex.join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"fastopt: building the C++ kernels failed:\n{shlex.join(command)}\n{done.stderr[-4000:]}")


if __name__ == "__main__":
    # `python fastopt/_build.py`, with any Python 3 and no venv: the library an editable install uses, as setup.py
    # builds it (the same call), so that `make` can compile it while pip installs the dependencies.
    build(CSRC.parent / "fastopt" / LIBRARY, OBJECTS)
