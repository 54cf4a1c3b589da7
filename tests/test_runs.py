"""RUN=LABEL parsing, shared by analyze and plots."""
import pytest

from resnet_jax import analyze, checkpoint, plots, runs
from resnet_jax.errors import UserError


def test_an_existing_path_with_equals_is_that_path_not_another_run_labelled(tmp_path):
    (tmp_path / "lr").mkdir()
    (tmp_path / "lr=0.1").mkdir()
    spec = str(tmp_path / "lr=0.1")
    assert runs.split_label(spec) == (spec, "")
    assert runs.split_label(spec + "=fast") == (spec, "fast")  # the last '=' labels it
    assert runs.split_label(str(tmp_path / "lr") + "=slow") == (str(tmp_path / "lr"), "slow")
    assert runs.split_label(str(tmp_path / "gone")) == (str(tmp_path / "gone"), "")
    assert plots._labelled(spec) == ("lr=0.1", spec)


def test_analyze_opens_the_path_that_exists(tmp_path, monkeypatch):
    (tmp_path / "lr").mkdir()
    (tmp_path / "lr=0.1").mkdir()
    opened = []

    def load_model(path, *a, **k):
        opened.append(path)
        raise UserError("stop")
    monkeypatch.setattr(checkpoint, "load_model", load_model)
    with pytest.raises(UserError, match="stop"):
        analyze.open_runs([str(tmp_path / "lr=0.1")], None, False)
    assert opened == [str(tmp_path / "lr=0.1")]
