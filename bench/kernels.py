"""Compute cost of each CPU kernel, per element, on L2-resident data (no memory-bandwidth noise):

    python -m bench.kernels [--quick] [--isa avx512vbmi|avx512|avx2|scalar]

Compiles the small driver bench/kernels.cpp (it includes only csrc/kernels.h) and links it against the built
libfastopt_cpu.so, so it times exactly the kernels fastopt ships and never recompiles them; the quantization maps of
fastopt/quant/formats.py are passed as arguments. Needs g++ on the PATH and the kernels built (`make build`)."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fastopt import _ext
from fastopt._build import CSRC
from fastopt.quant import FORMATS

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one call per round: runs everything, times nothing")
    parser.add_argument("--isa", choices=["avx512vbmi", "avx512", "avx2", "scalar"],
                        help="time the kernels of this ISA instead of the CPU's best (it must support it)")
    args = parser.parse_args(argv)
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        print("bench.kernels needs g++ (or c++) on the PATH", file=sys.stderr)
        return 2
    if not _ext.INSTALLED.exists():
        print(f"bench.kernels needs the built kernels (make build): {_ext.INSTALLED} is missing", file=sys.stderr)
        return 2
    maps = [",".join(repr(x) for x in FORMATS[(bits, signed)].qmap) for bits in (4, 8) for signed in (True, False)]
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "kernels"
        subprocess.run([compiler, "-O2", "-std=c++17", f"-I{CSRC}", str(HERE / "kernels.cpp"), str(_ext.INSTALLED),
                        f"-Wl,-rpath,{_ext.INSTALLED.parent}", "-o", str(binary)], check=True)
        options = (["quick"] if args.quick else []) + ([f"isa={args.isa}"] if args.isa else [])
        return subprocess.run([str(binary), *maps, *options]).returncode


if __name__ == "__main__":
    sys.exit(main())
