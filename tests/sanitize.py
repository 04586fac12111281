"""The op tests on the CPU kernels built with AddressSanitizer and UndefinedBehaviorSanitizer (``make sanitize``).

Builds csrc/ once more with -fsanitize=address,undefined into build/sanitize (fastopt/_build.py: only what changed
is rebuilt), then runs pytest on the op and codec tests in a child process that preloads the sanitizer runtimes and
loads that library instead of the installed one (FASTOPT_EXTENSION). Those tests cover odd sizes, tails and every ISA
level this CPU has. Any sanitizer report fails the run (halt_on_error, and UBSan's reports are made fatal).

    python -m tests.sanitize [pytest arguments]      (default: the op surface and codec tests; a worker per core)
    python -m tests.sanitize --build                 (only the build: any Python 3, no torch needed)
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
         "tests/ops/test_kept.py", "tests/quant/test_formats.py", "-k", "not triton"]
FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


def build() -> Path:
    """Builds the sanitized library (fastopt itself is not imported: its import loads the installed one)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastopt_build", ROOT / "fastopt" / "_build.py")
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    out = ROOT / "build" / "sanitize"
    # -O1 keeps the reports' stacks readable
    return flags.build(out / flags.LIBRARY, out / "objects", extra_cflags=["-O1", *FLAGS], extra_ldflags=FLAGS)


def runtime(name: str) -> str:
    path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(path):
        raise SystemExit(f"tests.sanitize: gcc does not know {name} (install gcc's sanitizer runtimes)")
    return path


def main(argv: list[str]) -> int:
    if argv == ["--build"]:
        build()
        return 0
    env = dict(os.environ, LD_PRELOAD=f"{runtime('libasan.so')}:{runtime('libubsan.so')}",
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    try:
        env["FASTOPT_EXTENSION"] = str(build())
    except RuntimeError as failed:
        print(failed, file=sys.stderr)
        return 1
    check = "import fastopt._ext as e; import fastopt; assert e.load() == 'FASTOPT_EXTENSION', e.load()"
    subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, check=True)  # the tests run the sanitized build
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "auto", *(argv or TESTS)]
    return subprocess.run(command, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
