"""Shared fixtures. Tests that need ../shared (the real CIFAR-10, the PyTorch nets' weights) skip
on a user's clone without it; `.ci/run` sets RESNET_JAX_REQUIRE_SHARED=1, which turns that skip
into a failure, so CI always runs them."""
import os
import pathlib
import subprocess
import sys

# Eight simulated CPU devices for the sharding tests; must precede the first import of jax.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# CPU only, in this process and the CLIs it starts, whatever plugins are installed: libtpu (in
# the test extra, for test_compile.py's deviceless TPU compiles, which need no TPU backend) would
# otherwise start a TPU backend in every process and print five lines about finding no TPU on
# stderr, where the CLIs' errors must be one line.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from resnet_jax import preload  # noqa: E402
from resnet_jax.kernels import cpu  # noqa: E402

cpu.use_cpu_cores()  # as every CLI does: the flags several CPU devices need

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("RESNET_JAX_SHARED", REPO.parent / "shared"))


def require_native(why_not):
    """oneDNN's kernels, the JPEG window decoder and tcmalloc need system packages a user's machine
    may lack (skip there);
    `.ci/run` installs them and sets RESNET_JAX_REQUIRE_NATIVE=1, which makes a skip a failure."""
    if why_not is None:
        return
    if os.environ.get("RESNET_JAX_REQUIRE_NATIVE") == "1":
        pytest.fail(f"{why_not}; RESNET_JAX_REQUIRE_NATIVE=1 forbids skipping", pytrace=False)
    pytest.skip(why_not)


@pytest.fixture
def onednn():
    """oneDNN's convolutions, built and registered (kernels/cpu/onednn_conv.py)."""
    from resnet_jax.kernels.cpu import onednn_conv
    if not onednn_conv.available():
        require_native(f"oneDNN convolutions unavailable: {onednn_conv._load()}")


@pytest.fixture
def jpeg_window():
    """The JPEG window decoder (data/jpeg_crop.c), built."""
    from resnet_jax.data import jpeg
    require_native(jpeg.window_decoding())


@pytest.fixture
def tcmalloc() -> str:
    """The tcmalloc library `preload.use_tcmalloc` preloads."""
    library = preload.tcmalloc_library()
    require_native(library is None and "tcmalloc is not installed "
                    "(apt-get install libtcmalloc-minimal4)" or None)
    return library


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
def torch_reference() -> pathlib.Path:
    """The PyTorch reference nets the benchmark measures against (bench/torch_cifar.py)."""
    return _need(SHARED / "bench" / "torch_cifar.py")


@pytest.fixture(scope="session")
def akamaster_dir() -> pathlib.Path:
    """Trained CIFAR ResNet-20/32/44/56 from the public PyTorch reproduction, as .npz."""
    return _need(SHARED / "data" / "pretrained" / "akamaster-cifar10")


@pytest.fixture(scope="session")
def torch_bench() -> pathlib.Path:
    return _need(SHARED / "bench" / "torch_cifar.py")


def fresh_python(code: str, xla_flags: str = "") -> list:
    """Run `code` in a new interpreter (no JAX backend yet) and return its printed words."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=pathlib.Path(__file__).resolve().parents[1])
    return out.stdout.split()


def refuse_write_probes(monkeypatch) -> None:
    """storage.check_writable's probe file meets a read-only file system (as root, a folder's
    mode cannot make it so); every other file storage opens opens as before."""
    from resnet_jax import storage

    def read_only(path, *args, **kwargs):
        if ".write-test-" in str(path):
            raise OSError(30, "Read-only file system")
        return open(path, *args, **kwargs)
    monkeypatch.setattr(storage, "open", read_only, raising=False)


def tiny_config(**changes):
    """configs/cpu.py:tiny with `changes` ({'data.source': ..., 'lr': ...}) applied."""
    from resnet_jax.config import load_config
    c = load_config(str(REPO / "configs" / "cpu.py") + ":tiny")
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def by_kind(variables) -> dict:
    """{'params/kernel': all conv and dense kernels flattened into one vector, 'params/bias': ...}."""
    import jax
    import numpy as np
    kinds = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        kind = f"{path[0].key}/{path[-1].key}"
        kinds.setdefault(kind, []).append(np.asarray(leaf, np.float64).ravel())
    return {kind: np.concatenate(parts) for kind, parts in kinds.items()}


def differences_by_kind(a, b, start) -> dict:
    """Per kind of variable: |a - b| / |b - start|, how far apart two trainings ended relative to
    how far the variables of that kind moved. Two meshes (or processes) add in other orders, so
    their runs differ by float rounding, and a ReLU input that rounding moves across zero flips
    one element's gradient: a few percent of one array, and every array before it. A real
    difference (BN statistics of some rows only, a gradient not reduced) moves every array of
    its kind by as much as training did."""
    import numpy as np
    a, b, start = by_kind(a), by_kind(b), by_kind(start)
    assert a.keys() == b.keys() == start.keys()
    return {k: np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k] - start[k]) for k in a}


GCS_BUCKET = "resnet-jax-test"
GCS_ENV = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT",
           "FSSPEC_GCS_TOKEN", "GOOGLE_CLOUD_PROJECT", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


@pytest.fixture(scope="session")
def gcs_emulator():
    """A local Cloud Storage (tests/gcs_emulator.py) for this session, with one bucket
    (GCS_BUCKET), and the environment that points gcsfs, google-cloud-storage and TensorStore at
    it without credentials, in this process and the ones it starts. The storage packages are test
    dependencies: a missing one fails the tests that use it."""
    import importlib.util
    for module in ("gcsfs", "google.cloud.storage", "gcp_storage_emulator"):
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"{module} is not installed; pip install -e '.[test]'", pytrace=False)
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "gcs_emulator.py"), GCS_BUCKET],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = f"http://127.0.0.1:{server.stdout.readline().strip()}"
    # gcsfs's hierarchical-bucket probe asks a storage-control API the emulator lacks (gcsfs
    # reads this switch when imported, hence before the import below).
    # CLOUD_STORAGE_EMULATOR_ENDPOINT: array_record's own reader (grain's ArrayRecord source).
    env = dict(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
               CLOUD_STORAGE_EMULATOR_ENDPOINT=url, FSSPEC_GCS_TOKEN="anon",
               GOOGLE_CLOUD_PROJECT="test", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    assert set(env) == set(GCS_ENV)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec.config
    import gcsfs
    fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        yield url
    finally:
        server.kill()
        server.wait()
        fsspec.config.conf.get("gcs", {}).pop("token", None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def gcs_dir(gcs_emulator, request) -> str:
    """A gs:// folder of its own for the test, in the emulator's bucket."""
    import uuid
    return f"gs://{GCS_BUCKET}/{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
