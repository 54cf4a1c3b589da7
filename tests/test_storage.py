"""resnet_jax.storage: local paths made absolute, URLs kept whole, a URL cut to one slash refused
rather than written as a local folder, and whole files written with the usual mode."""
import os
import stat

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


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_have_the_umasks_mode_as_other_outputs(tmp_path, umask):
    """mkstemp's 0600 survived the rename: eval JSON, figures and the lock were private while
    metrics.jsonl and checkpoints were not."""
    old = os.umask(umask)
    try:
        storage.write(str(tmp_path / "r.json"), "{}")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o666 & ~umask
    assert (tmp_path / "r.json").stat().st_mode == (tmp_path / "plain").stat().st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "r.json"]  # no temporary left
