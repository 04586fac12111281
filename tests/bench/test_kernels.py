"""bench.kernels (make bench-kernels) links a small driver against the built extension and times every CPU kernel:
each row is there, and the driver checks what it timed (codec round trips within half a map step, the reduction
against a plain loop; it exits non-zero otherwise). Quick mode: one call per round, so no number is judged."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_kernels_runs_every_kernel():
    out = subprocess.run([sys.executable, "-m", "bench.kernels", "--quick"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    rows = {m.group(1).strip() + " | " + m.group(2).strip(): float(m.group(3))
            for m in re.finditer(r"^\| ([^|]+) \| ([^|]+) \| ([0-9.]+) \|$", out, re.M)}
    for kernel in ["AdamW", "Stable-SPAM (AdaGN only)", "Stable-SPAM (AdaClip + AdaGN)", "SPAM"]:
        for moments in ["fp32", "4-bit", "8-bit"]:
            assert rows[f"{kernel} step | {moments}"] > 0
    assert sum(key.startswith("encode, ") for key in rows) == 4 and sum(key.startswith("decode, ") for key in rows) == 4
    assert any("linear: arithmetic" in key for key in rows)  # the 4-bit second moment's encoder
    assert sum(key.startswith("Stable-SPAM gradient reduction") for key in rows) == 2
    assert "Checked: every codec's round trip is within half a map step" in out


def test_bench_kernels_times_a_chosen_isa():
    out = subprocess.run([sys.executable, "-m", "bench.kernels", "--quick", "--isa", "scalar"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "ISA scalar, one thread" in out
    assert re.search(r"^\| AdamW step \| 8-bit \| [0-9.]+ \|$", out, re.M)


def test_bench_kernels_refuses_an_unknown_isa():
    run = subprocess.run([sys.executable, "-m", "bench.kernels", "--quick", "--isa", "neon"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "invalid choice: 'neon'" in run.stderr
