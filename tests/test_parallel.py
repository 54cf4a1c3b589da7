"""jax.distributed start-up rules, the data mesh and process-local rows, and the refusal of a
workdir that several processes cannot all see."""
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from resnet_jax import parallel
from resnet_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def no_cluster(monkeypatch):
    for var in parallel.ENV_VARS + ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)


def test_a_lone_process_does_not_start_the_runtime(no_cluster):
    assert parallel.initialize_distributed() is False
    assert parallel.initialize_distributed(num_processes=1) is False
    assert not jax.distributed.is_initialized()


def test_partial_settings_name_what_is_missing(no_cluster, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    with pytest.raises(UserError, match=r"missing: --num_processes \(or JAX_NUM_PROCESSES\), "
                                        r"--process_id \(or JAX_PROCESS_ID\)"):
        parallel.initialize_distributed()
    with pytest.raises(UserError, match="process id 2 is outside 0..1"):
        parallel.initialize_distributed(num_processes=2, process_id=2)


def test_global_batch_on_one_device():
    mesh = parallel.make_mesh(jax.devices()[:1])
    sharding = parallel.batch_sharding(mesh)
    assert parallel.process_rows(sharding, 8) == slice(0, 8)
    x = parallel.global_batch(np.arange(8.0), sharding, 8)
    np.testing.assert_array_equal(np.asarray(x), np.arange(8.0))
    with pytest.raises(UserError, match="batch_size 6 does not split over 4 devices"):
        parallel.check_batch_size(6, type("M", (), {"devices": np.empty(4, object)})())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_host_local_workdirs_with_two_processes_fail_early(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jc"))
    env.pop("XLA_FLAGS", None)
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "resnet_jax.train", "--config", f"{REPO}/configs/cpu.py:tiny",
         "--workdir", str(tmp_path / f"host{i}"), "--coordinator_address", address,
         "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 2, err[-2000:]
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "is not shared: processes [1] of 2 cannot see" in errors[0]
    assert not any((tmp_path / "host1").glob("*shared-check*"))
