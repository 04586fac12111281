"""Every fused backend against the reference, for every op of the database in tests/ops/opinfo.py: the C++ kernels
on each ISA this CPU runs, Triton in its interpreter (compiled, on a CUDA GPU: make gpu-check)."""
import pytest

from tests.conftest import on_cpu_isa
from tests.ops.opinfo import parity_cases

# the skipped step of the SPAM family computes with an inf gradient (and stores nothing): numpy, running the
# interpreter, warns
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")


@pytest.mark.parametrize("op,backend,isa,case", parity_cases())
def test_backend_matches_reference(op, backend, isa, case):
    if isa is not None:
        with on_cpu_isa(isa):
            ours = op.run(backend, case)
    else:
        ours = op.run(backend, case)
    op.check(ours, op.run("reference", case), case)
