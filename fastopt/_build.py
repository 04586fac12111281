"""The one description of the C++ extension, shared by setup.py (wheels, editable installs) and the JIT
build in fastopt/_ext.py. Imports only the standard library (setup.py loads it by path). Portable flags
only, never -march=native: the kernels pick their ISA at run time."""
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ["ops.cpp", "cpu_kernels.cpp"]
# -ffp-contract=fast (GCC's default for C++, spelled out): a·b + c becomes one FMA alike in the hand-written SIMD
# code and in the auto-vectorized loops, which is what makes the AVX-512 and AVX2 kernels agree bit for bit.
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", "-Wall"]
LD_FLAGS = ["-fopenmp"]


def extension_kwargs(relative: bool = True) -> dict:
    sources = [f"csrc/{s}" if relative else str(CSRC / s) for s in SOURCES]
    return {
        "sources": sources,
        "extra_compile_args": {"cxx": CXX_FLAGS},
        "extra_link_args": LD_FLAGS,
        "depends": [f"csrc/{h.name}" if relative else str(h) for h in sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.inc"))],
    }
