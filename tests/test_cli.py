"""resnet_jax.cli: the start-up every command shares; here, that a machine without TPU chips
never starts libtpu (installed for deviceless compiles), so CPU commands print nothing of it."""
import importlib.util
import os
import subprocess
import sys

import pytest

from resnet_jax import cli


def test_platforms_leave_out_an_absent_tpu_and_respect_the_user():
    assert cli.platforms_without_absent_tpu({"JAX_PLATFORMS": "tpu"}) == ""
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail("libtpu is not installed (the test extra brings it)")
    if not os.path.exists("/dev/accel0") and not os.path.exists("/dev/vfio"):
        assert cli.platforms_without_absent_tpu({}).split(",")[-1] == "cpu"
        assert "tpu" not in cli.platforms_without_absent_tpu({})


@pytest.mark.slow
def test_a_cpu_command_prints_nothing_of_libtpu():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    done = subprocess.run([sys.executable, "-m", "resnet_jax.summary", "resnet20",
                           "--image_size", "32"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resnet20" in done.stdout.lower() or "ResNet-20" in done.stdout
    assert "TPU" not in done.stderr and "libtpu" not in done.stderr, done.stderr[-2000:]
