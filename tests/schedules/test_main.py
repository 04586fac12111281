"""The preview CLI, run as a user would: python -m fastopt.schedules SPEC --steps N --plot PNG."""

import subprocess
import sys

import pytest

from fastopt.schedules import WSD
from fastopt.schedules.__main__ import main


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "fastopt.schedules", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def table(stdout):
    """{step: (value, label)} from the printed rows."""
    rows = {}
    for line in stdout.splitlines()[2:]:
        if line.startswith("wrote "):
            continue
        step, value, label = line.split(maxsplit=2)
        rows[int(step)] = (float(value), label)
    return rows


def test_prints_key_points_and_writes_plot(tmp_path):
    result = run_cli("WSD(peak=3e-4, total=10000, warmup=500, decay=0.2)", "--steps", "12000", "--plot", "out.png",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sched = WSD(peak=3e-4, total=10000, warmup=500, decay=0.2)
    assert result.stdout.splitlines()[0] == repr(sched)
    rows = table(result.stdout)
    assert sorted(rows) == [0, 499, 500, 7999, 8000, 9999, 10000, 11999]
    assert [rows[s][1] for s in (0, 500, 8000, 10000)] == ["warmup", "stable", "decay", "end"]
    assert rows[9999][1] == "decay (last step)"
    for step, (value, _) in rows.items():
        assert value == pytest.approx(sched(step), rel=1e-5, abs=1e-12)
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.stdout.splitlines()[-1] == "wrote out.png"


def test_steps_default_to_the_schedule_length(capsys):
    main(["Cosine(1.0, 100)"])
    assert sorted(table(capsys.readouterr().out)) == [0, 99]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["WSD(peak=-1, total=10)"], "WSD: peak must be >= 0, got -1"),
        (["Cycle(WSD(1.0, 10))"], "give --steps >= 1 (this schedule has no length of its own)"),
    ],
)
def test_bad_input_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
