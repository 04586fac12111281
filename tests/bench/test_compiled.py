"""bench/compiled.py: the three ways of stepping one optimizer, and the split of a step's time at the kernels."""
from bench import compiled
from fastopt.ops import cpu


def test_study_steps_one_optimizer_three_ways_and_splits_the_time_at_the_kernels(monkeypatch):
    monkeypatch.setattr(compiled, "llama_shapes", lambda **_: [(300, 40), (40,)])  # one quantized, one not
    original = cpu._call
    result = compiled.run("llama-20m", rounds=3, warmup=1, only=["AdamW 4-bit"])
    assert cpu._call is original  # the clock is gone
    rows = result["rows"]
    assert [r["path"] for r in rows] == list(compiled.PATHS)
    assert {r["optimizer"] for r in rows} == {"fastopt.AdamW 4-bit states"}
    assert rows[0]["vs_eager"] == 1.0
    for r in rows:
        assert 0 < r["kernel_ms"] < r["ms_per_step"] and r["host_ms"] > 0
    assert result["params"] == 12_040
    assert "| fastopt.AdamW 4-bit states | compiled, size_asserts off |" in compiled.table(result)
