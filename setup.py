"""Builds libfastopt_cpu.so, the C++ CPU kernels, into the package (fastopt/_build.py does the work).

The library uses neither torch nor Python headers, so building needs no torch, and the wheel is tagged
py3-none-<platform>: one wheel for every Python 3 and every torch that fastopt's Python code supports."""
import importlib.util
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# fastopt/_build.py holds the library's sources, flags and build; load it without importing the package.
_spec = importlib.util.spec_from_file_location("fastopt_build", ROOT / "fastopt" / "_build.py")
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)


class BuildLibrary(build_ext):
    """Builds the one "extension" (a plain shared library loaded with ctypes, no Python module) with _build.build."""

    def get_ext_filename(self, fullname: str) -> str:
        return str(Path(*fullname.split(".")[:-1], _build.LIBRARY))

    def build_extension(self, ext: Extension) -> None:
        _build.build(Path(self.get_ext_fullpath(ext.name)), _build.OBJECTS, log=self.announce)


class PlatformWheel(bdist_wheel):
    """py3-none-<platform>: the wheel holds a compiled library, but nothing in it depends on the Python version."""

    def get_tag(self):
        return "py3", "none", super().get_tag()[2]


setup(
    ext_modules=[Extension("fastopt.libfastopt_cpu", sources=[f"csrc/{s}" for s in _build.SOURCES],
                           depends=[f"csrc/{h.name}" for h in _build.headers(ROOT / "csrc")])],
    cmdclass={"build_ext": BuildLibrary, "bdist_wheel": PlatformWheel},
)
