"""Shared fixtures. Tests that need ../shared (the real CIFAR-10, the PyTorch nets' weights) skip
on a user's clone without it; `.ci/run` sets RESNET_JAX_REQUIRE_SHARED=1, which turns that skip
into a failure, so CI always runs them."""
import os
import pathlib

# Eight simulated CPU devices for the sharding tests; must precede the first import of jax.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from resnet_jax import parallel  # noqa: E402

parallel.use_cpu_cores()  # as every CLI does: the flags several CPU devices need

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("RESNET_JAX_SHARED", REPO.parent / "shared"))


def _need(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        msg = f"{path} is absent (set RESNET_JAX_SHARED to the shared/ folder)"
        if os.environ.get("RESNET_JAX_REQUIRE_SHARED") == "1":
            pytest.fail(msg + "; RESNET_JAX_REQUIRE_SHARED=1 forbids skipping", pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def cifar_jpeg() -> pathlib.Path:
    """The real CIFAR-10 as JPEG files, `{train,test}/<class>/*.jpg`."""
    return _need(SHARED / "data" / "cifar10-jpeg")


@pytest.fixture(scope="session")
def akamaster_dir() -> pathlib.Path:
    """Trained CIFAR ResNet-20/32/44/56 from the public PyTorch reproduction, as .npz."""
    return _need(SHARED / "data" / "pretrained" / "akamaster-cifar10")


@pytest.fixture(scope="session")
def torch_bench() -> pathlib.Path:
    return _need(SHARED / "bench" / "torch_cifar.py")
