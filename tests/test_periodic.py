"""What the loop does every so often: responses logged while training (the numbers analyze gives
for the same checkpoint and images), drawn from the metrics alone, and a profiler trace of chosen
steps."""
import glob
import json
import os

import numpy as np
import pytest

from conftest import tiny_config
from resnet_jax import analyze, checkpoint, metrics_log, plots, train
from resnet_jax import workdir as workdir_lib
from resnet_jax.data import sources

PROBE_IMAGES = 48


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run: responses of 48 test images at every evaluation (steps 10 and 20), the
    steps 12..14 traced."""
    workdir = str(tmp_path_factory.mktemp("run") / "w")
    result = train.train_and_evaluate(
        tiny_config(responses_images=PROBE_IMAGES, profile_steps=(12, 15)), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return workdir, result, rows


@pytest.mark.slow
def test_responses_while_training_are_analyzes_numbers(run):
    workdir, _, rows = run
    logged = {r["step"]: r for r in rows if "response_std" in r}
    assert sorted(logged) == [10, 20]
    loaded = checkpoint.load_model(workdir, 20)
    images = sources.load("synthetic:512", "test").images[:PROBE_IMAGES]
    expected = analyze.response_statistics(loaded.model, loaded.variables, loaded.normalization,
                                           images)
    row = logged[20]
    assert row["response_layers"] == [r["layer"] for r in expected]
    np.testing.assert_allclose(row["response_std"], [r["std"] for r in expected], rtol=1e-6)
    np.testing.assert_allclose(row["response_mean"], [r["mean"] for r in expected], rtol=1e-5,
                               atol=1e-7)
    assert logged[10]["response_std"] != row["response_std"]  # training moved them


@pytest.mark.slow
def test_profiler_traces_the_chosen_steps_and_training_goes_on(run):
    workdir, result, _ = run
    traces = glob.glob(os.path.join(workdir, "tensorboard", "plugins", "profile", "*",
                                    "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    assert result["step"] == 20 and not result.get("preempted")


def test_profile_steps_and_responses_keys_are_checked():
    from resnet_jax.config import validate
    for bad in [(5,), (5, 5), (7, 3), (-1, 2), ("a", 3)]:
        assert any("profile_steps" in p for p in validate(tiny_config(profile_steps=bad)))
    assert any("responses_images" in p for p in validate(tiny_config(responses_images=-1)))
    assert not validate(tiny_config(profile_steps=(0, 1), responses_every=3))


def test_a_run_started_without_the_periodic_keys_resumes_with_them_changed():
    """Responses and profiles do not change training: a workdir saved before these keys existed
    (or with other values) resumes without --allow_config_change."""
    stored = json.loads(tiny_config().to_json_best_effort())
    for key in ("responses_images", "responses_every", "profile_steps", "profile_every_process"):
        del stored[key]
    now = tiny_config(responses_images=7, profile_steps=(1, 2), lr=0.2)
    assert workdir_lib.config_changes(dict(config=stored), now) == ["lr 0.1 -> 0.2"]


def test_responses_go_to_tensorboard_per_layer_and_as_a_histogram():
    class Recorder:
        def __init__(self):
            self.scalars, self.histograms = {}, {}

        def add_scalar(self, name, value, step):
            self.scalars[name] = (value, step)

        def add_histogram(self, name, values, step):
            self.histograms[name] = (list(values), step)

    tb = Recorder()
    metrics_log.to_tensorboard(tb, 7, dict(loss=0.5, response_layers=["conv1", "stage1/block0/conv1"],
                                         response_std=[0.9, 0.8], response_mean=[0.1, 0.2]))
    assert tb.scalars == {"loss": (0.5, 7), "response_std/conv1": (0.9, 7),
                          "response_std/stage1/block0/conv1": (0.8, 7),
                          "response_mean/conv1": (0.1, 7),
                          "response_mean/stage1/block0/conv1": (0.2, 7)}
    assert tb.histograms == {"response_std": ([0.9, 0.8], 7), "response_mean": ([0.1, 0.2], 7)}


def _refused(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        plots.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and says in err, err


def _metrics(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_plots_draws_figure7_and_the_std_over_training_from_metrics_alone(tmp_path, monkeypatch,
                                                                           capsys):
    layers = ["conv1", "stage1/block0/conv1", "stage1/block0/conv2"]
    rows = [dict(step=100, loss=1.0, train_top1=0.5),
            dict(step=200, response_layers=layers, response_std=[1.0, 0.9, 0.8]),
            dict(step=400, response_layers=layers, response_std=[0.7, 0.6, 0.5]),
            dict(step=400, response_layers=layers, response_std=[0.75, 0.65, 0.55])]  # resumed
    run = _metrics(tmp_path / "a.metrics.jsonl", rows)
    drawn = []
    monkeypatch.setattr(plots, "figure7", lambda stem, curves: drawn.append(curves))
    monkeypatch.setattr(plots, "separation_over_training",
                        lambda stem, nets: drawn.append(nets))
    plots.main(["--figure", "7", f"{run}=plain-20", "--out", str(tmp_path / "f")])
    assert drawn.pop() == [("plain-20, step 400", [0.75, 0.65, 0.55], False)]
    plots.main(["--figure=7", "--step", "200", f"{run}=ResNet-20", "--out", str(tmp_path / "f")])
    assert drawn.pop() == [("ResNet-20", [1.0, 0.9, 0.8], True)]
    plots.main(["--figure", "responses", run, "--out", str(tmp_path / "f")])
    assert drawn.pop() == [("a", {200: [1.0, 0.9, 0.8], 400: [0.75, 0.65, 0.55]})]
    _refused(["--figure", "7", "--step", "300", run, "--out", str(tmp_path / "f")],
             "logged responses at steps 200, 400, not at 300", capsys)
    bare = _metrics(tmp_path / "b.metrics.jsonl", rows[:1])
    _refused(["--figure", "7", bare, "--out", str(tmp_path / "f")],
             "holds no response statistics; train with", capsys)


def test_plots_draws_figure1_training_and_test_error_apart(tmp_path, monkeypatch, capsys):
    a = _metrics(tmp_path / "plain20.metrics.jsonl",
                 [dict(step=100, train_top1=0.4), dict(step=200, train_top1=0.6, val_top1=0.5)])
    b = _metrics(tmp_path / "plain56.metrics.jsonl",
                 [dict(step=100, train_top1=0.3), dict(step=200, train_top1=0.5, val_top1=0.45)])
    drawn = []
    monkeypatch.setattr(plots, "figure1", lambda stem, runs: drawn.append(runs))
    plots.main(["--figure", "1", f"{a}=plain-20", f"{b}=plain-56", "--out", str(tmp_path / "f1")])
    (label_a, ca), (label_b, cb) = drawn.pop()
    assert (label_a, label_b) == ("plain-20", "plain-56")
    np.testing.assert_allclose(ca.train_error, [0.6, 0.4])
    np.testing.assert_allclose(cb.test_error, [0.55])
    for argv, says in [(["--figure", "9"], "--figure must be one of 1, 6, 7, responses"),
                       (["--figure", "1", "--panel", "x"], "--panel is for Figure 6"),
                       (["--step", "5"], "--step picks the logged step of Figure 7")]:
        _refused(argv + [a, "--out", str(tmp_path / "bad")], says, capsys)
    assert not (tmp_path / "bad.png").exists()
