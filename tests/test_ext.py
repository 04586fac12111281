"""The compiled kernels: really what runs on CPU (no silent fallback to the reference path), free of torch and Python
(so one build serves every version of both), and loaded with care: a library of another fastopt version is refused
with a clear message, then the JIT build or the reference path takes over, and importing never fails."""
import ctypes
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import fastopt
from fastopt import _build, _ext
from fastopt.ops import adam as adam_ops


def test_kernels_are_installed_and_registered():
    assert _ext.load() == "installed", "libfastopt_cpu.so is not built: run `make build`"
    assert fastopt.cpu_isa() in ("avx512vbmi", "avx512", "avx2", "scalar")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastopt::adam_step", "CPU")


def test_adamw_on_cpu_runs_the_cpp_kernel(monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("the reference path ran instead of the C++ kernel")

    monkeypatch.setattr(adam_ops, "_reference", no_reference)
    p = torch.nn.Parameter(torch.randn(1000))
    opt = fastopt.AdamW([p])
    p.grad = torch.randn(1000)
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(before, p.detach())


def test_set_cpu_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown isa 'sse9'"):
        fastopt.set_cpu_isa("sse9")
    assert fastopt.set_cpu_isa("auto") == fastopt.cpu_isa()


def dynamic_section(library: Path) -> tuple[list[str], set[str]]:
    """(the libraries it needs, the symbols it leaves undefined) as readelf reads them."""
    needed = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    symbols = subprocess.run(["readelf", "--dyn-syms", "-W", str(library)], capture_output=True, text=True,
                             check=True).stdout
    undefined = {line.split()[7].split("@")[0] for line in symbols.splitlines()
                 if len(line.split()) >= 8 and line.split()[6] == "UND"}
    return [line.split("[")[1].rstrip("]") for line in needed.splitlines() if "(NEEDED)" in line], undefined


def check_free_of_torch_and_python(library: Path) -> None:
    """Nothing of torch, Python or an OpenMP runtime: the library runs on the OpenMP runtime torch brings, which
    fastopt/_ext.py finds in the process and hands over."""
    needed, undefined = dynamic_section(library)
    assert set(needed) <= {"libstdc++.so.6", "libm.so.6", "libgcc_s.so.1", "libc.so.6", "ld-linux-x86-64.so.2"}, needed
    foreign = sorted(s for s in undefined if s.startswith(("_ZN2at", "_ZN3c10", "_ZN5torch", "Py", "_Py", "GOMP_",
                                                           "omp_")))
    assert not foreign, foreign
    assert {"memcpy", "_Znwm"} <= undefined  # the check reads what it should


def test_library_links_neither_torch_nor_python():
    check_free_of_torch_and_python(_ext.INSTALLED)


@pytest.fixture
def stale_library(tmp_path) -> Path:
    """A library that answers the ABI version of some other fastopt (0)."""
    source = tmp_path / "stale.c"
    source.write_text("int fastopt_abi_version(void) { return 0; }\n")
    library = tmp_path / "libfastopt_cpu.so"
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    return library


def test_a_library_of_another_version_is_refused(stale_library):
    with pytest.raises(RuntimeError, match=r"C ABI version 0, this fastopt needs 1: it was built from another fastopt"):
        _ext._open(stale_library)


def test_a_stale_library_falls_back_to_the_reference_path_with_one_warning(stale_library, monkeypatch):
    monkeypatch.setattr(_ext, "INSTALLED", stale_library)
    monkeypatch.setenv("FASTOPT_NO_JIT", "1")
    with pytest.warns(RuntimeWarning) as caught:
        assert _ext._load.__wrapped__() == (None, None)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "C ABI version 0" in message and "FASTOPT_NO_JIT=1 forbids a JIT build" in message
    assert "reference path" in message and "make build" in message


def test_a_stale_library_falls_back_to_a_jit_build(stale_library, monkeypatch, tmp_path):
    """The JIT build compiles csrc/ with the flags of every other build (fastopt/_build.py) into a cache folder.
    Where the editable install left its objects (build/objects: the same compiler, flags and sources), the cache
    starts from copies of them, and only what is out of date is compiled again (the link, at least): every build
    runs the compiler on these flags, so the suite need not compile the kernels once more for this test."""
    monkeypatch.setattr(_ext, "INSTALLED", stale_library)
    monkeypatch.delenv("FASTOPT_NO_JIT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if _build.OBJECTS.is_dir():
        shutil.copytree(_build.OBJECTS, _ext.jit_cache() / "objects")  # file times kept: up to date where they were
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a JIT build that works is silent
        how, library = _ext._load.__wrapped__()
    assert how == "jit" and Path(library._name).is_relative_to(tmp_path / "cache")
    assert library.fastopt_best_isa() == _ext.library().fastopt_best_isa()
    check_free_of_torch_and_python(Path(library._name))
    flags = (Path(library._name).parent / "objects" / "flags.txt").read_text()
    assert all(flag in flags for flag in _build.CXX_FLAGS + _build.LD_FLAGS)


def test_a_cpu_without_avx2_is_reported_once(monkeypatch):
    class Baseline:  # a library whose CPU has no AVX2
        def __getattr__(self, name):
            return {"fastopt_abi_version": lambda: _ext.ABI_VERSION, "fastopt_best_isa": lambda: 0}.get(
                name, lambda *args: 0)

    monkeypatch.setattr(ctypes, "CDLL", lambda path: Baseline())
    monkeypatch.setattr(_ext, "openmp_entry", lambda: 1)
    with pytest.warns(RuntimeWarning, match="this CPU has no AVX2: the C\\+\\+ kernels run their baseline") as caught:
        _ext._open(Path("baseline.so"))
    assert len(caught) == 1


def test_kernels_run_on_the_openmp_runtime_torch_loaded():
    entry = _ext.openmp_entry()
    mapped = [line.split() for line in open("/proc/self/maps") if "libgomp" in line]
    assert len({m[-1] for m in mapped}) == 1, mapped  # one OpenMP runtime in the process: torch's
    assert any(int(m[0].split("-")[0], 16) <= entry < int(m[0].split("-")[1], 16) for m in mapped)


def test_without_an_openmp_runtime_the_kernels_run_serially_alike(monkeypatch):
    def trajectory():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(300_000))
        opt = fastopt.StableSPAM([p], state_bits=4)
        for _ in range(3):
            p.grad = torch.randn_like(p)
            opt.step()
        return p.detach()

    threaded, entry = trajectory(), _ext.openmp_entry()
    monkeypatch.setattr(_ext, "openmp_entry", lambda: None)
    try:
        with pytest.warns(RuntimeWarning, match="no OpenMP runtime in this process") as caught:
            _ext._open(_ext.INSTALLED)  # the same library: its threads are now the caller's alone
        assert len(caught) == 1
        assert torch.equal(trajectory(), threaded)
    finally:
        _ext.library().fastopt_set_parallel(entry)
