"""Data sources: tfds's own download path is importable, and its failures are one clear line."""
import pytest
import tensorflow_datasets as tfds

from resnet_jax.data import sources
from resnet_jax.errors import UserError


def test_tfds_cifar10_builder_resolves_its_code(tmp_path):
    """tfds imports importlib_resources lazily, only when preparing a data set, and does not
    declare it: without our dependency on it, the default `cifar10` source fails on a fresh
    machine before downloading anything."""
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    assert builder.code_path is not None and builder.code_path.name == "cifar.py"


def test_tfds_failure_is_one_line_naming_the_folder_alternative(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Max retries exceeded\nwith a long second line")

    monkeypatch.setattr(tfds, "builder", offline)
    with pytest.raises(UserError) as e:
        sources.load("cifar10", "train")
    message = str(e.value)
    assert "\n" not in message
    assert "cifar10" in message and "ConnectionError" in message and "folder:PATH" in message
