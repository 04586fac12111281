"""The op tests on the CPU kernels built with AddressSanitizer and UndefinedBehaviorSanitizer (``make sanitize``).

Builds csrc/ once more with -fsanitize=address,undefined into build/sanitize (ninja: only what changed is rebuilt),
then runs pytest on the op and codec tests in a child process that preloads the sanitizer runtimes and loads that
library instead of fastopt._C (FASTOPT_EXTENSION). Those tests cover odd sizes, tails and every ISA level this CPU
has. Any sanitizer report fails the run (halt_on_error, and UBSan's reports are made fatal).

    python -m tests.sanitize [pytest arguments]      (default: the op surface and codec tests)
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the C++ side of the op tests (the Triton cases run Python in the interpreter: nothing for the sanitizers to see)
TESTS = ["tests/ops/test_parity.py", "tests/ops/test_library.py", "tests/ops/test_adam.py",
         "tests/ops/test_adam_quantized.py", "tests/ops/test_spam_cpu.py", "tests/ops/test_properties.py",
         "tests/quant/test_formats.py", "-k", "not triton"]
FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


def build() -> Path:
    """Builds (and so loads) the sanitized library; fastopt itself is not imported, whose import loads fastopt._C."""
    import importlib.util

    from torch.utils.cpp_extension import load

    spec = importlib.util.spec_from_file_location("fastopt_build", ROOT / "fastopt" / "_build.py")
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    CSRC, CXX_FLAGS, LD_FLAGS, SOURCES = flags.CSRC, flags.CXX_FLAGS, flags.LD_FLAGS, flags.SOURCES

    out = ROOT / "build" / "sanitize"
    out.mkdir(parents=True, exist_ok=True)
    # -O1 keeps the reports' stacks readable; -Werror is not used (GCC's sanitizer builds warn in torch headers)
    cflags = [f for f in CXX_FLAGS if f != "-O3"] + ["-O1"] + FLAGS
    load(name="fastopt_sanitized", sources=[str(CSRC / s) for s in SOURCES], extra_cflags=cflags,
         extra_ldflags=LD_FLAGS + FLAGS, build_directory=str(out), is_python_module=False, verbose=False)
    return out / "fastopt_sanitized.so"


def runtime(name: str) -> str:
    path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(path):
        raise SystemExit(f"tests.sanitize: gcc does not know {name} (install gcc's sanitizer runtimes)")
    return path


def main(argv: list[str]) -> int:
    env = dict(os.environ, LD_PRELOAD=f"{runtime('libasan.so')}:{runtime('libubsan.so')}",
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    # built in a child that preloads the runtimes too: building loads the library, which needs them first
    built = subprocess.run([sys.executable, "-c", "from tests.sanitize import build; print(build())"], cwd=ROOT,
                           env=env, capture_output=True, text=True)
    if built.returncode != 0:
        print(built.stdout, built.stderr, sep="\n", file=sys.stderr)
        return built.returncode
    env["FASTOPT_EXTENSION"] = built.stdout.strip().splitlines()[-1]
    check = "import fastopt._ext as e; import fastopt; assert e.load() == 'FASTOPT_EXTENSION', e.load()"
    subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, check=True)  # the tests run the sanitized build
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(argv or TESTS)]
    return subprocess.run(command, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
