"""Figure 6 from training metrics and Figure 7 from analysis CSVs: the curves read back what the
trainer and the analysis wrote, and the command writes the figure or names the problem in one
line."""
import csv
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


def _responses(path, stds, order=None, step=None):
    """An analysis CSV as resnet_jax.analyze writes it (its columns), rows in `order`; with
    `step`, `stds` is step -> curve, as in an _over_training.csv."""
    curves = stds if step else {None: stds}
    rows = [dict(**({"step": s} if step else {}), layer_index=i + 1, layer=f"l{i}",
                 stage="stage1", block=0, kernel="3x3x16x16", std=v, mean=0.0, count=10)
            for s, curve in curves.items() for i, v in enumerate(curve)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([rows[i] for i in (order or range(len(rows)))])
    return path


def test_figure7_from_analysis_csvs_in_depth_order(tmp_path, monkeypatch):
    """Nets analysed apart (the 8k runs' CSVs in docs/runs) drawn beside each other: each curve is
    its CSV's std in layer order whatever the rows' order, plain nets dashed."""
    a = _responses(tmp_path / "ResNet-20.csv", [0.9, 0.7, 0.5], order=[2, 0, 1])
    b = _responses(tmp_path / "p.csv", [1.2, 1.0, 0.8])
    assert plots.read_responses(str(a)) == {None: [0.9, 0.7, 0.5]}
    drawn = []
    monkeypatch.setattr(plots, "figure7", lambda stem, curves: drawn.append((stem, curves)))
    plots.main([str(a), f"{b}=plain-20", "--out", str(tmp_path / "f7")])
    assert drawn == [(str(tmp_path / "f7"), [("ResNet-20", [0.9, 0.7, 0.5], True),
                                             ("plain-20", [1.2, 1.0, 0.8], False)])]
    monkeypatch.undo()
    plots.main([str(a), f"{b}=plain-20", "--out", str(tmp_path / "f7")])
    assert (tmp_path / "f7.png").stat().st_size > 0 and (tmp_path / "f7.pdf").stat().st_size > 0


def test_figure7_refuses_what_is_not_an_analysis_csv(tmp_path, capsys):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="not a per-layer CSV of resnet_jax.analyze"):
        plots.read_responses(str(tmp_path / "other.csv"))
    gap = _responses(tmp_path / "gap.csv", [1.0, 2.0])
    gap.write_text(gap.read_text().replace("\n2,", "\n3,"))
    with pytest.raises(UserError, match="gap.csv does not hold layer_index 1..2 once each"):
        plots.read_responses(str(gap))
    twice = _responses(tmp_path / "twice.csv", [1.0, 2.0])
    twice.write_text(twice.read_text().replace("\n2,", "\n1,"))
    with pytest.raises(UserError, match="twice.csv does not hold layer_index 1..1 once each"):
        plots.read_responses(str(twice))
    with pytest.raises(UserError, match="cannot read"):
        plots.read_responses(str(tmp_path / "missing.csv"))
    _metrics(tmp_path / "metrics.jsonl", [{"step": 100, "val_top1": 0.3}])
    with pytest.raises(SystemExit) as exit_:
        plots.main([str(gap), str(tmp_path), "--out", str(tmp_path / "f")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "either analysis CSVs (Figure 7) or training runs" in err
    with pytest.raises(SystemExit):
        plots.main([str(gap), "--out", str(tmp_path / "nothing" / "f")])
    assert not (tmp_path / "nothing").exists()  # bad input writes nothing, not even the folder


def test_nets_over_training_side_by_side(tmp_path, monkeypatch):
    """analyze --over_training's CSVs of two nets -> one figure of both: each net's curves by
    step, in layer order; a mix with single-step CSVs is refused."""
    a = _responses(tmp_path / "ResNet-20_over_training.csv",
                   {4000: [0.9, 0.8], 8000: [0.7, 0.6]}, order=[3, 1, 2, 0], step=True)
    b = _responses(tmp_path / "plain-20_over_training.csv", {4000: [1.0, 1.1]}, step=True)
    drawn = []
    monkeypatch.setattr(plots, "separation_over_training",
                        lambda stem, nets: drawn.append((stem, nets)))
    plots.main([str(a), str(b), "--out", str(tmp_path / "f")])
    assert drawn == [(str(tmp_path / "f"), [("ResNet-20", {4000: [0.9, 0.8], 8000: [0.7, 0.6]}),
                                            ("plain-20", {4000: [1.0, 1.1]})])]
    monkeypatch.undo()
    plots.main([str(a), str(b), "--out", str(tmp_path / "f")])
    assert (tmp_path / "f.png").stat().st_size > 0 and (tmp_path / "f.pdf").stat().st_size > 0
    single = _responses(tmp_path / "ResNet-20.csv", [0.9, 0.7])
    with pytest.raises(SystemExit):
        plots.main([str(a), str(single), "--out", str(tmp_path / "g")])
    short = _responses(tmp_path / "short_over_training.csv", {1: [1.0, 2.0], 2: [1.0]}, step=True)
    with pytest.raises(UserError, match="step 2 of .* does not hold layer_index 1..2 once each"):
        plots.read_responses(str(short))


def test_figure6_in_panels_one_per_schedule(tmp_path, monkeypatch, capsys):
    """`--panel TITLE` starts a panel: runs of the 64k and the 8k schedule each on their own
    iterations axis, the runs after each title in it; a title with no run, or panels of analysis
    CSVs, are refused in one line."""
    full = _metrics(tmp_path / "full.metrics.jsonl", [{"step": 64000, "val_top1": 0.9}])
    short = _metrics(tmp_path / "short.metrics.jsonl", [{"step": 8000, "val_top1": 0.8}])
    drawn = []
    monkeypatch.setattr(plots, "figure6", lambda stem, panels: drawn.append((stem, panels)))
    plots.main(["--panel", "64k", f"{full}=ResNet-20", "--panel=8k", f"{short}=ResNet-20",
                str(full), "--out", str(tmp_path / "f6")])
    (stem, panels), = drawn
    assert stem == str(tmp_path / "f6")
    assert [(title, [label for label, _ in runs]) for title, runs in panels] == [
        ("64k", ["ResNet-20"]), ("8k", ["ResNet-20", "full"])]
    assert panels[1][1][0][1].test_steps.tolist() == [8000]
    drawn.clear()
    plots.main([str(short), "--out", str(tmp_path / "f6")])  # no --panel: one untitled panel
    assert [(title, len(runs)) for title, runs in drawn[0][1]] == [(None, 1)]
    monkeypatch.undo()
    plots.main(["--panel", "64k", str(full), "--panel", "8k", str(short), "--out",
                str(tmp_path / "two")])
    assert (tmp_path / "two.png").stat().st_size > 0 and (tmp_path / "two.pdf").stat().st_size > 0
    capsys.readouterr()
    csv_ = _responses(tmp_path / "ResNet-20.csv", [0.9, 0.7])
    for argv, says in [(["--panel", "64k", "--panel", "8k", str(short)],
                        "every --panel needs a RUN"),
                       (["--panel", "a", str(csv_)], "--panel is for training runs"),
                       ([str(short), "--panel"], "--panel needs a value")]:
        with pytest.raises(SystemExit) as exit_:
            plots.main(argv + ["--out", str(tmp_path / "bad")] if "needs a value" not in says
                       else ["--out", str(tmp_path / "bad")] + argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    assert not list(tmp_path.glob("bad*"))
