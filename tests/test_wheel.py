"""The wheel that `make wheel` builds works on its own: installed into a fresh venv (not the source tree),
it imports its compiled kernels and runs an AdamW step through the C++ path."""
import os
import subprocess
import sysconfig
import venv
from pathlib import Path

import torch

from fastopt import _ext

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = """
import fastopt, torch
from fastopt import _ext
from fastopt.ops import adam as adam_ops
assert _ext.load() == "installed", _ext.load()
def no_reference(*a, **k): raise AssertionError("reference path ran")
adam_ops._reference = no_reference
p = torch.nn.Parameter(torch.ones(1000)); p.grad = torch.ones(1000)
fastopt.AdamW([p], lr=0.1, weight_decay=0.0).step()
print(fastopt.__file__, torch.ops.fastopt.cpu_isa(), p[0].item())
"""


def test_wheel_installs_and_runs_the_cpp_kernel(tmp_path):
    wheels = sorted((ROOT / "dist").glob("fastopt-*.whl"))
    assert wheels, "no wheel in dist/: run `make wheel` (make test does)"
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    # Borrow torch and numpy from the test environment instead of downloading them again.
    # A .pth line only extends sys.path; the .pth files there (fastopt's editable install) are not run.
    site = Path(subprocess.check_output([env_dir / "bin" / "python", "-c",
                                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([env_dir / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    str(wheels[-1])], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    out = subprocess.run([env_dir / "bin" / "python", "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    module_file, isa, value = out.stdout.split()
    assert Path(module_file).is_relative_to(env_dir), module_file  # the wheel, not the source tree
    _ext.load()
    assert isa == torch.ops.fastopt.cpu_isa()
    assert abs(float(value) - (1 - 0.1)) < 1e-6  # first Adam step moves each weight by lr
