"""python -m bench's output: what the peers print while loading is held back, not shown between the progress bar and
the table."""
import os
import warnings

from bench.run import held_back


def test_held_back_keeps_what_the_block_prints(capfd):
    with held_back() as lines:
        print("from Python")
        os.write(2, b"from C, on stderr\n")
        warnings.warn("a peer's deprecation warning")
    print("after")
    out, err = capfd.readouterr()
    assert (out, err) == ("after\n", "")
    assert sorted(lines) == ["from C, on stderr", "from Python"]


def test_verbose_shows_it(capfd):
    with held_back(enabled=False) as lines:
        print("shown")
    assert capfd.readouterr().out == "shown\n" and lines == []
