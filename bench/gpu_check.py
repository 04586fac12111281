"""make gpu-check: proves the GPU path on a CUDA machine with one command, using the Python that has torch there.

    python -m bench.gpu_check        (GPU_CHECK_OUT: where results go, default bench/results/gpu)

1. Refuses at once, in one line, where there is no CUDA device.
2. Runs the tests of the Triton path on the GPU, compiled (TRITON_INTERPRET=0): tests/gpu/ (CUDA only) and the
   Triton cases of tests/ops/ (parity with the reference, the Stable-SPAM/SPAM specifics). Test files that need a
   package this Python lacks are deselected by name, and the list is printed.
3. Runs the GPU benchmark (python -m bench --device cuda).
4. Writes gpu-check.json, gpu-check.md (the summary and the benchmark tables) and gpu-check.log (everything) into
   GPU_CHECK_OUT, and prints the summary. Exits non-zero if a test failed or the benchmark did.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = {  # test file: (the tests of it that run here, as pytest -k; modules it needs besides what the machine has)
    "tests/gpu/test_cuda.py": ("", []),
    "tests/ops/test_parity.py": ("triton", []),
    "tests/ops/test_spam_triton.py": ("", []),
    "tests/ops/test_adam.py": ("triton", []),
}


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(f"make gpu-check: no CUDA device here (torch {torch.__version__} sees none); run it on a machine with an "
              "NVIDIA GPU", file=sys.stderr)
        return 2
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
               "triton": triton.__version__, "python": platform.python_version()}
    say("make gpu-check: " + ", ".join(f"{k} {v}" for k, v in summary.items()))

    deselected, counts = [], {}
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    for path, (selection, needs) in TESTS.items():
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if missing:
            deselected.append(f"{path} (needs {', '.join(missing)})")
            continue
        output = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path,
                       *(["-k", selection] if selection else [])], env, say)
        last = output.splitlines()[-1] if output else ""
        for number, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", last):
            kind = "errors" if kind.startswith("error") else kind
            counts[kind] = counts.get(kind, 0) + int(number)
    if deselected:
        say("deselected, their packages are not installed: " + "; ".join(deselected))
    summary.update(deselected=deselected, tests=counts,
                   tests_ok=counts.get("passed", 0) > 0 and not counts.get("failed") and not counts.get("errors"))

    bench_code = _run([sys.executable, "-m", "bench", "--device", "cuda", "--out", str(out)], env, say,
                      returncode=True)
    summary["bench_ok"] = bench_code == 0
    tables = sorted(out.glob("gpu-llama-*.md"))
    summary["seconds"] = round(time.time() - started)
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=1))
    text = [f"# make gpu-check: {summary['device']}", "",
            ", ".join(f"{k} {summary[k]}" for k in ("torch", "cuda", "triton", "python")), "",
            f"Tests (compiled Triton on the GPU): {counts}; deselected: {deselected or 'none'}", "",
            *[t.read_text() for t in tables], f"Took {summary['seconds']} s."]
    (out / "gpu-check.md").write_text("\n".join(text) + "\n")
    say(f"\nsummary: tests {'ok' if summary['tests_ok'] else 'FAILED'} {counts}; benchmark "
        f"{'ok' if summary['bench_ok'] else 'FAILED'} ({len(tables)} tables); {summary['seconds']} s; "
        f"results in {out}")
    log.close()
    return 0 if summary["tests_ok"] and summary["bench_ok"] else 1


def _run(command: list[str], env: dict, say, returncode: bool = False):
    """Runs ``command``, echoing its output as it comes; returns its output (or its exit code)."""
    say("$ " + " ".join(command))
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        say(lines[-1])
    code = process.wait()
    return code if returncode else "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
