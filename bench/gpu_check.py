"""make gpu-check: proves the GPU path on a CUDA machine with one command, using the Python that has torch there.

    python -m bench.gpu_check        (GPU_CHECK_OUT: where results go, default bench/results/gpu;
                                      GPU_CHECK_BENCH_ARGS: extra arguments for the benchmark, e.g. "--rounds 5")

1. Refuses at once, in one line, where there is no CUDA device, and where Triton cannot build its launchers (no C
   compiler, no Python headers: the interpreter used here needs neither).
2. Runs the tests of the Triton path on the GPU, compiled (TRITON_INTERPRET=0): tests/gpu/ (CUDA only) and the
   Triton cases of tests/ops/ (parity with the reference, the Stable-SPAM/SPAM specifics). Test files that need a
   package this Python lacks are deselected by name, and the list is printed.
3. Runs the GPU benchmark (python -m bench --device cuda).
4. Writes gpu-check.json, gpu-check.md (the summary and the benchmark tables) and gpu-check.log (everything) into
   GPU_CHECK_OUT after each part, so that a run cut short still leaves what it did, and prints the summary. Exits
   non-zero if a test failed, a part ran past its time limit, or the benchmark failed.

The C++ CPU kernels are not needed (every test here runs Triton or the pure-torch reference on the GPU): the child
processes get FASTOPT_NO_JIT=1 unless it is set, so that a checkout without the built library does not compile it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = {  # test file: (the tests of it that run here, as pytest -k; modules it needs besides what the machine has)
    "tests/gpu/test_cuda.py": ("", []),
    "tests/ops/test_parity.py": ("triton", []),
    "tests/ops/test_spam_triton.py": ("", []),
    "tests/ops/test_adam.py": ("triton", []),
    "tests/ops/test_kept.py": ("triton", []),
}
TEST_LIMIT_S = 240   # per test file; the whole check is meant to take under 8 minutes on one H100/H200
BENCH_LIMIT_S = 300


def preflight() -> tuple[list[str], list[str]]:
    """(what stops every Triton launch here, what stops only torch.compile's CPU code): Triton compiles its launchers
    with the C compiler it finds (CC, else gcc, else clang) against Python's headers; Inductor's CPU kernels (the
    compiled steps' host part) need a C++ compiler."""
    fatal, partial = [], []
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        fatal.append("no C compiler (CC, gcc or clang), which Triton needs to build its kernel launchers")
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        fatal.append(f"no Python.h in {include}, which Triton needs to build its kernel launchers")
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        partial.append("no C++ compiler: torch.compile's tests will fail (Inductor compiles the step's host part)")
    return fatal, partial


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(f"make gpu-check: no CUDA device here (torch {torch.__version__} sees none); run it on a machine with an "
              "NVIDIA GPU", file=sys.stderr)
        return 2
    fatal, partial = preflight()
    if fatal:
        print(f"make gpu-check: {'; '.join(fatal)}", file=sys.stderr)
        return 3
    out = Path(os.environ.get("GPU_CHECK_OUT", ROOT / "bench" / "results" / "gpu"))
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "gpu-check.log", "w")
    started = time.time()

    def say(text: str) -> None:
        print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    import triton

    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "triton": triton.__version__, "python": platform.python_version(), "warnings": partial}
    say("make gpu-check: " + ", ".join(f"{k} {summary[k]}" for k in ("device", "torch", "cuda", "triton", "python")))
    for warning in partial:
        say(f"warning: {warning}")

    deselected, counts, failures = [], {}, []
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("FASTOPT_NO_JIT", "1")
    for path, (selection, needs) in TESTS.items():
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if missing:
            deselected.append(f"{path} (needs {', '.join(missing)})")
            continue
        code, output = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path,
                             *(["-k", selection] if selection else [])], env, say, TEST_LIMIT_S)
        for kind, number in pytest_counts(output).items():
            counts[kind] = counts.get(kind, 0) + number
        if code != 0:
            failures.append(f"{path}: {'ran past ' + str(TEST_LIMIT_S) + ' s' if code is None else 'exit ' + str(code)}")
    if deselected:
        say("deselected, their packages are not installed: " + "; ".join(deselected))
    summary.update(deselected=deselected, tests=counts, test_failures=failures,
                   tests_ok=counts.get("passed", 0) > 0 and not failures)
    _write(out, summary, started)

    bench_args = shlex.split(os.environ.get("GPU_CHECK_BENCH_ARGS", ""))
    bench_code, _ = _run([sys.executable, "-m", "bench", "--device", "cuda", "--out", str(out), *bench_args], env, say,
                         BENCH_LIMIT_S)
    summary["bench_ok"] = bench_code == 0
    summary["bench"] = "ok" if bench_code == 0 else (f"ran past {BENCH_LIMIT_S} s" if bench_code is None
                                                     else f"exit {bench_code}")
    tables = _write(out, summary, started)
    say(f"\nsummary: tests {'ok' if summary['tests_ok'] else 'FAILED'} {counts}"
        f"{' (' + '; '.join(failures) + ')' if failures else ''}; benchmark {summary['bench']} ({tables} tables); "
        f"{summary['seconds']} s; results in {out}")
    log.close()
    return 0 if summary["tests_ok"] and summary["bench_ok"] else 1


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's last line ("3 passed, 1 failed in 2.0s")."""
    last = output.splitlines()[-1] if output else ""
    counts: dict[str, int] = {}
    for number, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", last):
        kind = "errors" if kind.startswith("error") else kind
        counts[kind] = counts.get(kind, 0) + int(number)
    return counts


def _write(out: Path, summary: dict, started: float) -> int:
    """gpu-check.json and gpu-check.md as far as the check has come; returns the number of benchmark tables."""
    summary["seconds"] = round(time.time() - started)
    tables = sorted(out.glob("gpu-llama-*.md"))
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=1))
    text = [f"# make gpu-check: {summary['device']}", "",
            ", ".join(f"{k} {summary[k]}" for k in ("torch", "cuda", "triton", "python")), "",
            f"Tests (compiled Triton on the GPU): {summary['tests']}; failures: {summary['test_failures'] or 'none'}; "
            f"deselected: {summary['deselected'] or 'none'}", "",
            f"Benchmark: {summary.get('bench', 'not run yet')}", "",
            *[t.read_text() for t in tables], f"Took {summary['seconds']} s."]
    (out / "gpu-check.md").write_text("\n".join(text) + "\n")
    return len(tables)


def _run(command: list[str], env: dict, say, limit_s: float) -> tuple[int | None, str]:
    """Runs ``command``, echoing its output as it comes; returns (its exit code, or None if it ran past ``limit_s``
    seconds and was killed with its children, its output)."""
    say("$ " + " ".join(command))
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    killed = []

    def kill() -> None:
        killed.append(True)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended meanwhile
            pass

    timer = threading.Timer(limit_s, kill)
    timer.start()
    lines = []
    try:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            say(lines[-1])
        code = process.wait()
    finally:
        timer.cancel()
    if killed:
        say(f"(killed: ran past {limit_s:.0f} s)")
    return (None if killed else code), "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
