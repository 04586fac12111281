"""The tests of the Triton path that need a CUDA GPU (make gpu-check runs them, compiled, with TRITON_INTERPRET=0).
Where there is none they are not collected: everything of theirs that a CPU can run is tested elsewhere, in Triton's
interpreter (tests/ops/test_parity.py, tests/kernels/triton/), and tests/bench/test_gpu_check.py checks that
make gpu-check refuses to run without one."""
import torch

from tests.conftest import TRITON_DEVICE

collect_ignore_glob = [] if TRITON_DEVICE.type == "cuda" else ["test_*.py"]
