"""Builds fastopt._C, the C++ CPU kernels. Needs torch already installed: `pip install --no-build-isolation .`"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as e:
    raise SystemExit("fastopt builds against the installed torch: install torch first, "
                     "then `pip install --no-build-isolation .`") from e

# fastopt/_build.py holds the extension's sources and flags; load it without importing the package.
_spec = importlib.util.spec_from_file_location("fastopt_build", Path(__file__).parent / "fastopt" / "_build.py")
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

setup(
    ext_modules=[CppExtension("fastopt._C", **_build.extension_kwargs())],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
