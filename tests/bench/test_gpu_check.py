"""make gpu-check and the GPU benchmark refuse at once, in one clear line, where there is no CUDA device (what they
do on a GPU, tests/gpu/ and bench/gpu.py, runs there: make gpu-check)."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_make_gpu_check_refuses_without_a_cuda_device(tmp_path):
    assert not torch.cuda.is_available()
    run = subprocess.run(["make", "-s", "gpu-check", f"PYTHON={sys.executable}", f"GPU_CHECK_OUT={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if not re.match(r"make(\[\d+\])?: ", line)]  # make's own
    assert lines == [f"make gpu-check: no CUDA device here (torch {torch.__version__} sees none); run it on a "
                     "machine with an NVIDIA GPU"], run.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_gpu_benchmark_refuses_without_a_cuda_device():
    run = subprocess.run([sys.executable, "-m", "bench", "--device", "cuda"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == (f"python -m bench --device cuda: no CUDA device here (torch {torch.__version__} "
                                  "sees none)")


def test_gpu_code_compiles():
    """What runs only on a GPU is at least valid Python, imports, and names what exists here."""
    import bench.gpu as gpu
    import bench.gpu_check as check

    for path in check.TESTS:
        assert (ROOT / path).is_file(), path
    # a selection that picks nothing would fail there (pytest's exit code 5), found only on a GPU machine; the
    # tests/gpu/ files are collected only where there is a CUDA device
    here = {path: selection for path, (selection, _) in check.TESTS.items() if not path.startswith("tests/gpu/")}
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *here],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stdout[-500:]
    for path, selection in here.items():
        assert any(line.startswith(path + "::") and selection in line for line in listed.stdout.splitlines()), path
    assert {"fastopt.AdamW 4-bit states", "fastopt.StableSPAM 4-bit states", gpu.BASELINE} <= {
        c.name for c in gpu.CONTENDERS}
    subprocess.run([sys.executable, "-m", "py_compile", str(ROOT / "tests" / "gpu" / "test_cuda.py")], check=True)


def test_a_part_past_its_limit_is_killed_with_its_children():
    """A hung test file or benchmark must not take the GPU machine's whole lease: killed with what it started (a
    child holding the output open would otherwise keep the check waiting)."""
    import bench.gpu_check as check

    said = []
    start = time.monotonic()
    code, output = check._run([sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '60']); "
                               "print('started', flush=True); time.sleep(60)"], dict(os.environ), said.append, 2)
    assert time.monotonic() - start < 20
    assert code is None and output == "started"
    assert said[-1] == "(killed: ran past 2 s)"
    assert check._run([sys.executable, "-c", "print('a'); raise SystemExit(3)"], dict(os.environ), said.append,
                      60) == (3, "a")


def test_preflight_names_what_triton_and_inductor_lack(monkeypatch, tmp_path):
    import bench.gpu_check as check

    assert check.preflight() == ([], [])  # this machine builds Triton's launchers (the AOT test does)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(check.shutil, "which", lambda name: None)
    monkeypatch.setattr(check.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    fatal, partial = check.preflight()
    assert fatal == ["no C compiler (CC, gcc or clang), which Triton needs to build its kernel launchers",
                     f"no Python.h in {tmp_path}, which Triton needs to build its kernel launchers"]
    assert partial == ["no C++ compiler: torch.compile's tests will fail (Inductor compiles the step's host part)"]


def test_results_are_written_as_far_as_the_check_came(tmp_path):
    import bench.gpu_check as check

    assert check.pytest_counts("x\n3 passed, 1 failed, 2 errors in 4.0s") == {"passed": 3, "failed": 1, "errors": 2}
    assert check.pytest_counts("") == {}
    summary = {"device": "GPU", "torch": "2.11", "cuda": "13.0", "triton": "3.6.0", "python": "3.12",
               "tests": {"passed": 3}, "test_failures": [], "deselected": []}
    assert check._write(tmp_path, summary, time.time()) == 0
    assert "Benchmark: not run yet" in (tmp_path / "gpu-check.md").read_text()
    assert json.loads((tmp_path / "gpu-check.json").read_text())["tests"] == {"passed": 3}
