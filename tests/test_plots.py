"""Figure 6 from training metrics: the curves read back what the trainer logged, and the command
writes the figure or names the problem in one line."""
import json
import subprocess
import sys

import numpy as np
import pytest

from resnet_jax import plots
from resnet_jax.errors import UserError


def _metrics(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_curves_are_errors_by_step_and_a_resumed_step_counts_once(tmp_path):
    _metrics(tmp_path / "metrics.jsonl", [
        {"step": 100, "loss": 2.0, "train_top1": 0.25, "lr": 0.1},
        {"step": 200, "loss": 1.8, "train_top1": 0.40, "lr": 0.1},
        {"step": 200, "val_top1": 0.5, "val_top5": 0.9, "val_loss": 1.5},
        {"step": 200, "loss": 1.7, "train_top1": 0.45, "lr": 0.1},  # logged again after a resume
        {"step": 400, "val_top1": 0.625, "val_top5": 0.95, "val_loss": 1.2}])
    c = plots.read_curves(str(tmp_path))
    np.testing.assert_array_equal(c.train_steps, [100, 200])
    np.testing.assert_allclose(c.train_error, [0.75, 0.55])
    np.testing.assert_array_equal(c.test_steps, [200, 400])
    np.testing.assert_allclose(c.test_error, [0.5, 0.375])


@pytest.mark.slow
def test_command_writes_figure6_and_refuses_what_it_cannot_read(tmp_path):
    a = _metrics(tmp_path / "a.metrics.jsonl", [{"step": s, "train_top1": s / 1000}
                                                for s in (100, 200)])
    (tmp_path / "run").mkdir()
    _metrics(tmp_path / "run" / "metrics.jsonl", [{"step": 100, "val_top1": 0.3}])
    out = tmp_path / "fig" / "figure6"
    cmd = [sys.executable, "-m", "resnet_jax.plots", f"{a}=plain-20", str(tmp_path / "run"),
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "fig" / "figure6.png").stat().st_size > 0
    assert (tmp_path / "fig" / "figure6.pdf").stat().st_size > 0
    bad = subprocess.run(cmd[:3] + [str(tmp_path / "nowhere"), "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "holds no metrics.jsonl" in bad.stderr
    (tmp_path / "broken.jsonl").write_text('{"step": 1, "train_top1"')
    with pytest.raises(UserError, match="broken.jsonl:1 is not a JSON line"):
        plots.read_curves(str(tmp_path / "broken.jsonl"))
