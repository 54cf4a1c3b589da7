"""resnet_jax.load: a checkpoint directory or a PyTorch state dict -> model, variables and
preprocessing, quietly; the net of a state dict inferred from its keys."""
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

import resnet_jax
from resnet_jax import checkpoint, convert
from resnet_jax.errors import UserError


def test_load_reads_a_checkpoint_and_a_state_dict_alike(akamaster_dir, tmp_path, caplog):
    source = str(akamaster_dir / "resnet20.npz")
    out, name, _ = convert.convert(source, None, str(tmp_path / "ckpt"))  # the net inferred
    assert name == "resnet20"
    with caplog.at_level(logging.INFO):
        stored = resnet_jax.load(out)
    assert not [r for r in caplog.records if "orbax" in r.pathname]  # no "read only" notes
    direct = resnet_jax.load(source)
    # the same metadata, whichever way the net was converted (the version of the package included)
    assert json.loads(json.dumps(direct.metadata)) == {
        k: v for k, v in stored.metadata.items() if k not in ("checksums", checkpoint.DIGEST)}
    for loaded in (stored, direct):
        assert loaded.metadata["model"] == "resnet20" and loaded.model.input_size == 32
        assert loaded.normalization.input_size == 32
        np.testing.assert_allclose(loaded.normalization.std, (0.229, 0.224, 0.225))
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), np.uint8)
    logits = [m.model.apply(m.variables, m.normalization(images)) for m in (stored, direct)]
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)
    assert np.abs(logits[0]).max() > 1  # trained weights, not zeros
    features = stored.model.apply(stored.variables, stored.normalization(images), features=True)
    assert features["pooled"].shape == (4, 64) and features["stage2"].shape == (4, 16, 16, 32)


def test_load_names_what_is_wrong(tmp_path):
    with pytest.raises(UserError, match="checkpoint directory .* does not exist"):
        resnet_jax.load(str(tmp_path / "nothing"))
    np.savez(tmp_path / "odd.npz", **{"conv1.weight": np.zeros((4, 3, 3, 3)),
                                      "linear.weight": np.zeros((10, 4))})
    with pytest.raises(UserError, match="cannot tell which net this state dict holds; pass "
                       r"--model NAME \(models: plain18"):
        resnet_jax.load(str(tmp_path / "odd.npz"))


@pytest.mark.slow
def test_convert_cli_infers_the_net(akamaster_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "resnet_jax.convert",
                           str(akamaster_dir / "resnet32.npz"), "--out", str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == (f"wrote resnet32 (inferred from its keys; --model NAME "
                                           f"for another) to {tmp_path / 'c'}")
    assert proc.stdout.splitlines()[1].startswith("unchecked: the shapes fit")
    assert resnet_jax.load(str(tmp_path / "c")).metadata["model"] == "resnet32"


# The `train` extra's packages (pyproject.toml): the light core must load and convert without them.
TRAIN_EXTRA = ("ml_collections", "tensorflow_datasets", "grain", "matplotlib", "tensorboardX",
               "simplejpeg", "tensorflow", "PIL")


def test_load_and_convert_need_only_the_light_core(akamaster_dir):
    """As on an install without the train extra: importing any of its packages fails."""
    code = ("import sys\n"
            f"for name in {TRAIN_EXTRA!r}:\n"
            "    sys.modules[name] = None  # import raises ModuleNotFoundError\n"
            "import resnet_jax\n"
            "from resnet_jax import convert, summary\n"
            "print(resnet_jax.load(sys.argv[1]).metadata['model'])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(akamaster_dir / "resnet20.npz")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["resnet20"]
