"""Checkpoint directories: round trip, and a mismatch caught before orbax restores anything."""
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import resnet_jax
from resnet_jax import checkpoint
from resnet_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
NORM = checkpoint.Normalization(mean=np.full((32, 32, 3), 0.5, np.float32))


def _variables(name, **options):
    """Random variables of the right shapes (model.init would compile for tens of seconds)."""
    model = resnet_jax.create_model(name, **options)
    rng = np.random.default_rng(0)
    return model, jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                               checkpoint.abstract_variables(model))


def test_save_then_load_round_trips(tmp_path):
    model, variables = _variables("resnet20", shortcut="B")
    checkpoint.save_model(str(tmp_path / "c"), variables, model_name="resnet20",
                          model_options={"shortcut": "B"}, normalization=NORM, step=7,
                          extra={"source": "test"})
    loaded = checkpoint.load_model(str(tmp_path / "c"))
    assert loaded.step == 7 and loaded.metadata["source"] == "test"
    assert loaded.model.shortcut == "B"
    jax.tree.map(np.testing.assert_array_equal, loaded.variables, dict(variables))
    np.testing.assert_array_equal(loaded.normalization.mean, NORM.mean)
    shapes = checkpoint.stored_shapes(str(tmp_path / "c"), 7)
    assert shapes["params/stage2/blocks/conv1/kernel"] == (2, 3, 3, 32, 32)
    assert shapes["batch_stats/bn1/mean"] == (16,)


def _mislabelled(tmp_path):
    """resnet20 weights whose metadata says resnet32."""
    _, variables = _variables("resnet20")
    directory = str(tmp_path / "c")
    checkpoint.save_model(directory, variables, model_name="resnet32", model_options={},
                          normalization=NORM)
    return directory


def test_mismatch_names_the_stored_net_and_the_first_parameters(tmp_path):
    directory = _mislabelled(tmp_path)
    with pytest.raises(UserError) as e:
        checkpoint.load_model(directory)
    msg = str(e.value)
    assert "holds resnet20 weights but its metadata names resnet32" in msg
    assert "params/stage1/blocks/bn1/bias (2, 16) where the model has (4, 16)" in msg
    assert "\n" not in msg


def test_mismatch_through_a_cli_leaves_no_traceback(tmp_path):
    directory = _mislabelled(tmp_path)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "resnet_jax.evaluate", "--checkpoint", directory,
                           "--data", "synthetic:8"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: checkpoint") and proc.stderr.count("\n") == 1, proc.stderr
    assert "holds resnet20 weights" in proc.stderr
    assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr


def test_missing_directory_step_and_used_out(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint in"):
        checkpoint.load_model(str(tmp_path / "empty"))
    directory = _mislabelled(tmp_path)
    with pytest.raises(UserError, match=r"no step 3 in .* it has steps \[0\]"):
        checkpoint.load_model(directory, step=3)
    with pytest.raises(UserError, match="is not empty"):
        checkpoint.save_model(directory, {"params": {}}, model_name="resnet20", model_options={},
                              normalization=NORM)


def test_bucket_workdirs_are_not_made_local():
    """A TPU VM's workdir is a gs:// URL; os.path.abspath would turn it into ./gs:/bucket/..."""
    from resnet_jax import checkpoint
    assert str(checkpoint._path("gs://bucket/runs/resnet56")) == "gs://bucket/runs/resnet56"
    assert str(checkpoint._path("runs/x")).startswith("/")
