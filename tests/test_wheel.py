"""The wheel that `make wheel` builds works on its own: a manylinux wheel for every Python 3, whose kernels link neither
torch nor Python and whose metadata tells the truth; installed into a fresh venv next to the torch of the environment
running the test (the pinned torch 2.13 in `make test`, torch 2.11 in `make test-oldest`; not the source tree), pip
resolves its requirements against that torch, and it runs AdamW (fp32, 8-bit, 4-bit states) and StableSPAM (4-bit)
through the C++ path with exactly the results of the tree's build."""
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
import torch

from tests.test_ext import check_free_of_torch_and_python

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {  # name: (optimizer, keyword arguments); params of 4096+ elements, so that 4/8 bits really quantize
    "AdamW": ("AdamW", {}),
    "AdamW 8-bit": ("AdamW", {"state_bits": 8}),
    "AdamW 4-bit": ("AdamW", {"state_bits": 4}),
    "StableSPAM 4-bit": ("StableSPAM", {"state_bits": 4}),
}
STEPS = """
import hashlib, json, sys
import torch, fastopt

def run(optimizer, options):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5000, 70000, 130)]
    opt = getattr(fastopt, optimizer)(params, lr=1e-2, weight_decay=0.1, **options)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in params)).hexdigest()

if __name__ == "__main__":
    print(json.dumps({name: run(*config) for name, config in json.loads(sys.argv[1]).items()}))
"""
CHECK = """
import json, sys
import fastopt
from fastopt import _ext
from fastopt.ops import adam as adam_ops, spam as spam_ops
from steps import run
def no_reference(*a, **k): raise AssertionError("the reference path ran instead of the C++ kernels")
adam_ops._reference = spam_ops._stable_spam_reference = no_reference
print(json.dumps({"loaded": _ext.load(), "library": str(_ext.INSTALLED), "fastopt": fastopt.__file__,
                  "isa": fastopt.cpu_isa(), "steps": {n: run(*c) for n, c in json.loads(sys.argv[1]).items()}}))
"""


def built_wheel() -> Path:
    wheels = sorted((ROOT / "dist").glob("fastopt-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in dist/ (make wheel; make test does), found {wheels}"
    return wheels[0]


def test_wheel_is_manylinux_for_every_python_3():
    wheel = built_wheel()
    assert re.fullmatch(r"fastopt-[0-9.]+-py3-none-manylinux_2_28_x86_64\.whl", wheel.name), wheel.name
    shown = subprocess.run([Path(sys.executable).parent / "auditwheel", "show", str(wheel)], capture_output=True,
                           text=True, check=True).stdout
    # the library itself would even pass an older policy; the wheel says 2_28, as torch's own wheels do
    found = re.search(r'consistent with\s+the following platform tag:\s+"manylinux_2_(\d+)_x86_64"', shown)
    assert found and int(found.group(1)) <= 28, shown
    assert sorted((ROOT / "dist").glob("fastopt-*.tar.gz")), "make wheel builds the sdist too"


def test_the_sdist_holds_every_file_a_build_needs():
    """make wheel builds the wheel from the checkout, beside the sdist: a build from the sdist needs every tracked file
    of the package, the C++ sources and the build's description."""
    sdists = sorted((ROOT / "dist").glob("fastopt-*.tar.gz"))
    assert len(sdists) == 1, sdists
    with tarfile.open(sdists[0]) as sdist:
        held = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    tracked = subprocess.run(["git", "ls-files", "csrc", "fastopt", "setup.py", "pyproject.toml", "README.md"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert tracked and set(tracked) <= held, sorted(set(tracked) - held)


def test_wheel_metadata_tells_the_truth():
    with zipfile.ZipFile(built_wheel()) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        tags = wheel.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
    assert "Requires-Dist: torch>=2.11" in metadata.splitlines()
    assert "Requires-Python: >=3.10" in metadata.splitlines()
    assert "Root-Is-Purelib: false" in tags and "Tag: py3-none-manylinux_2_28_x86_64" in tags
    assert "fastopt/libfastopt_cpu.so" in names
    assert not [n for n in names if n.endswith(".so") and n != "fastopt/libfastopt_cpu.so"], names  # nothing grafted


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel, beside this environment's pinned torch (borrowed, not downloaded again): every
    distribution of this environment but fastopt's own editable install is linked into a folder that a .pth adds."""
    tmp = tmp_path_factory.mktemp("wheel")
    env_dir, borrowed = tmp / "venv", tmp / "borrowed"
    venv.create(env_dir, with_pip=False)  # this environment's pip installs into it: nothing there shadows borrowed
    borrowed.mkdir()
    here = Path(sysconfig.get_paths()["purelib"])
    for entry in here.iterdir():
        if not entry.name.lower().startswith(("fastopt", "__editable__", "_fastopt")) and entry.suffix != ".pth":
            (borrowed / entry.name).symlink_to(entry)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "borrowed.pth").write_text(f"{borrowed}\n")
    # no --no-deps: pip must find the wheel's requirements (torch>=2.11, numpy) satisfied by what is there
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the source tree stays out of sight
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
                              "--disable-pip-version-check", str(built_wheel())], capture_output=True, text=True,
                             timeout=300, env=env)
    assert install.returncode == 0, install.stdout + install.stderr
    torch_version = re.escape(torch.__version__.split("+")[0])
    satisfied = rf"Requirement already satisfied: torch>=2\.11 in \S*borrowed .*\({torch_version}"
    assert re.search(satisfied, install.stdout), install.stdout
    return env_dir


def test_wheel_runs_every_state_format_through_the_cpp_kernels(wheel_venv, tmp_path):
    script = tmp_path / "steps.py"
    script.write_text(STEPS)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    installed = subprocess.run([wheel_venv / "bin" / "python", "-c", CHECK, json.dumps(CONFIGS)],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    got = json.loads(installed.stdout.splitlines()[-1])
    assert got["loaded"] == "installed"
    assert Path(got["fastopt"]).is_relative_to(wheel_venv) and Path(got["library"]).is_relative_to(wheel_venv)
    check_free_of_torch_and_python(Path(got["library"]))
    import fastopt

    assert got["isa"] == fastopt.cpu_isa()
    tree = subprocess.run([sys.executable, str(script), json.dumps(CONFIGS)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=True)
    assert got["steps"] == json.loads(tree.stdout.splitlines()[-1])  # bit for bit the tree's build
    assert len(set(got["steps"].values())) == len(CONFIGS)  # and the configurations really differ
