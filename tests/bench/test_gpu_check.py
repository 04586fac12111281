"""make gpu-check and the GPU benchmark refuse at once, in one clear line, where there is no CUDA device (what they
do on a GPU, tests/gpu/ and bench/gpu.py, runs there: make gpu-check)."""
import re
import subprocess
import sys
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
    assert {"fastopt.AdamW 4-bit states", "fastopt.StableSPAM 4-bit states", gpu.BASELINE} <= {
        c.name for c in gpu.CONTENDERS}
    subprocess.run([sys.executable, "-m", "py_compile", str(ROOT / "tests" / "gpu" / "test_cuda.py")], check=True)
