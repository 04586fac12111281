"""Compute cost of each CPU kernel, per element, on L2-resident data (no memory-bandwidth noise):

    python -m bench.kernels [--quick]

Compiles bench/kernels.cpp with csrc/cpu_kernels.cpp (torch-free, the extension's flags) into a temporary
folder and runs it with the quantization maps of fastopt/quant/formats.py. Needs g++ on the PATH."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fastopt._build import CSRC, CXX_FLAGS
from fastopt.quant import FORMATS

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)  # one call per round: runs everything, times nothing
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        print("bench.kernels needs g++ (or c++) on the PATH", file=sys.stderr)
        return 2
    maps = [",".join(repr(x) for x in FORMATS[(bits, signed)].qmap) for bits in (4, 8) for signed in (True, False)]
    flags = [f for f in CXX_FLAGS if f != "-fopenmp"]
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "kernels"
        subprocess.run([compiler, *flags, f"-I{CSRC}", str(CSRC / "cpu_kernels.cpp"), str(HERE / "kernels.cpp"),
                        "-o", str(binary)], check=True)
        return subprocess.run([str(binary), *maps, *(["quick"] if quick else [])]).returncode


if __name__ == "__main__":
    sys.exit(main())
