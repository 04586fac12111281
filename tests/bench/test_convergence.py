"""The convergence study on a tiny model: it trains, fastopt.AdamW follows torch.optim.AdamW step for step, and the
json/md/png outputs are written. Seconds, not minutes: one layer of width 32, 30 steps."""
import json

from bench.convergence import OPTIMIZERS, Config, study, write

TINY = Config(steps=30, batch=4, context=32, dim=32, layers=1, heads=2, evals=2, val_batches=2, last=5)


def test_tiny_study_tracks_torch_and_writes_outputs(tmp_path, one_thread):
    entries = [e for e in OPTIMIZERS if e.name in ("torch.optim.AdamW", "fastopt.AdamW")]
    result = study(TINY, entries, progress=False)
    torch_run, fastopt_run = result["curves"]["torch.optim.AdamW"], result["curves"]["fastopt.AdamW"]

    for run in (torch_run, fastopt_run):
        losses, val = run["train_loss"], run["val_loss"]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # starts at ln(256) = 5.5 nats/byte
        assert val[-1][1] < val[0][1] - 0.3
    assert len(fastopt_run["train_loss"]) == len(torch_run["train_loss"]) == TINY.steps
    for a, b in zip(fastopt_run["train_loss"], torch_run["train_loss"]):
        assert abs(a - b) <= 1e-4 * abs(b)
    for row in result["rows"]:  # exp_avg and exp_avg_sq in fp32, plus a 4-byte step counter per tensor
        assert 8.0 < row["state_bytes_per_param"] < 8.01

    write(result, tmp_path)
    saved = json.loads((tmp_path / "convergence.json").read_text())
    assert saved["curves"]["fastopt.AdamW"]["train_loss"] == fastopt_run["train_loss"]
    assert "| fastopt.AdamW |" in (tmp_path / "convergence.md").read_text()
    assert (tmp_path / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
