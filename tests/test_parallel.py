"""jax.distributed start-up rules, the data mesh and process-local rows, and the refusal of a
workdir that several processes cannot all see."""
import os
import pathlib
import socket
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from resnet_jax import parallel, preload
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


USE_TCMALLOC = """
import os
from resnet_jax import preload
preload.use_tcmalloc()
with open("/proc/self/maps") as f:
    print("tcmalloc" in f.read(), os.getpid(), os.environ.get(preload.PRELOADED, "-"))
"""


def test_the_restart_comes_before_jax():
    """The CLIs restart themselves (use_tcmalloc) first thing; that is cheap only while neither
    resnet_jax nor its preload module imports JAX. The package's exports still load on use."""
    code = ("import sys, resnet_jax, resnet_jax.preload; print('jax' in sys.modules); "
            "print(resnet_jax.create_model('resnet20').depth)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "20"]


def test_use_tcmalloc_restarts_the_command_with_it_preloaded(tcmalloc):
    """The same process (pid), started again with tcmalloc mapped; once, not in a loop."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", preload.PRELOADED)}
    proc = subprocess.Popen([sys.executable, "-c", USE_TCMALLOC], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    mapped, pid, preloaded = out.split()
    assert (mapped, int(pid)) == ("True", proc.pid), err
    assert preloaded == tcmalloc
    off = subprocess.run([sys.executable, "-c", USE_TCMALLOC], capture_output=True, text=True,
                         env=dict(env, RESNET_JAX_TCMALLOC="0"), check=True).stdout.split()
    assert (off[0], off[2]) == ("False", "-")


def test_in_flight_waits_for_the_output_depth_steps_back(monkeypatch):
    waited = []
    monkeypatch.setattr(parallel.jax, "block_until_ready", waited.append)
    in_flight = parallel.InFlight(depth=2)
    steps = [jax.numpy.full((), step) for step in range(5)]
    for step, out in enumerate(steps):
        in_flight.add(out)
        assert waited == steps[:max(0, step - 1)]  # never more than 2 unwaited


def test_in_flight_leaves_accelerators_alone(monkeypatch):
    """The throttle is for XLA:CPU's dispatch; outputs on a GPU or TPU are never waited for."""
    waited = []
    monkeypatch.setattr(parallel.jax, "block_until_ready", waited.append)
    tpu = types.SimpleNamespace(platform="tpu")
    out = types.SimpleNamespace(devices=lambda: [tpu])
    in_flight = parallel.InFlight(depth=2)
    for _ in range(5):
        in_flight.add(out)
    assert waited == []
