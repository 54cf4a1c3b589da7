"""resnet_jax.storage: local paths made absolute, URLs kept whole, and a URL cut to one slash
refused rather than written as a local folder."""
import pytest

from resnet_jax import storage
from resnet_jax.errors import UserError


def test_a_url_cut_to_one_slash_is_refused_not_written_locally(tmp_path, monkeypatch):
    """os.path.join/normpath turn gs://b/x into gs:/b/x, which analyze wrote as ./gs:/b/x."""
    monkeypatch.chdir(tmp_path)
    assert str(storage.path("gs://bucket/runs/r56")) == "gs://bucket/runs/r56"
    assert str(storage.path("runs/x")) == str(tmp_path / "runs" / "x")
    for call in (storage.path, lambda p: storage.write(p, "x")):
        with pytest.raises(UserError, match=r"'gs:/bucket/x' looks like a URL with one slash.*"
                                            r"'gs://bucket/x'"):
            call("gs:/bucket/x")
    assert list(tmp_path.iterdir()) == []
    assert str(storage.path("./gs:/x")) == str(tmp_path / "gs:" / "x")  # a local folder, said so
