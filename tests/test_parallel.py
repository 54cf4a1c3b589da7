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


@pytest.mark.parametrize("cores, devices", [(1, 2), (2, 4), (3, 4), (4, 8), (64, 8)])
def test_default_cpu_devices_two_per_core_power_of_two_at_most_eight(cores, devices):
    assert parallel.default_cpu_devices(cores, onednn=False) == devices


def test_default_cpu_devices_one_with_onednn(monkeypatch):
    """One device where oneDNN can be built, decided without building it (the CLIs ask before
    they know whether the CPU is the backend at all)."""
    assert parallel.default_cpu_devices(64, onednn=True) == 1
    monkeypatch.setattr(parallel.onednn_conv, "_load", lambda: pytest.fail("built the library"))
    monkeypatch.setattr(parallel.onednn_conv, "_include_dirs", lambda: [])
    assert parallel.default_cpu_devices(64) == 8
    monkeypatch.setattr(parallel.onednn_conv, "_unbuildable", lambda: None)
    assert parallel.default_cpu_devices(64) == 1


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


def _fresh_python(code: str, xla_flags: str = "") -> list:
    """Run `code` in a new interpreter (no JAX backend yet) and return its printed words."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=pathlib.Path(__file__).resolve().parents[1])
    return out.stdout.split()


USE_CPU_CORES = """
import os, sys
from resnet_jax import parallel
count = parallel.use_cpu_cores(tuple(int(a) for a in sys.argv[1:]))
import jax
print(count, jax.device_count(), "multi_thread_eigen=false" in os.environ.get("XLA_FLAGS", ""))
"""


def test_use_cpu_cores_gives_the_default_and_runs_devices_sequentially():
    count, devices, sequential = _fresh_python(USE_CPU_CORES)
    assert int(count) == int(devices) == parallel.default_cpu_devices()
    assert sequential == str(int(devices) > 1)


def test_use_cpu_cores_halves_until_every_batch_splits():
    code = USE_CPU_CORES.replace("tuple(int(a) for a in sys.argv[1:])", "(6, 10)")
    count, devices, _ = _fresh_python(code)
    assert int(count) == int(devices) == min(2, parallel.default_cpu_devices())


def test_use_cpu_cores_keeps_the_users_count():
    count, devices, sequential = _fresh_python(
        USE_CPU_CORES, "--xla_force_host_platform_device_count=3")
    assert (int(count), int(devices), sequential) == (3, 3, "True")


def test_use_cpu_cores_after_the_backend_started_changes_nothing():
    code = "import jax; jax.devices()\n" + USE_CPU_CORES
    count, devices, sequential = _fresh_python(code)
    assert (int(count), int(devices), sequential) == (-1, 1, "False")


def test_in_flight_waits_for_the_output_depth_steps_back(monkeypatch):
    waited = []
    monkeypatch.setattr(parallel.jax, "block_until_ready", waited.append)
    in_flight = parallel.InFlight(depth=2)
    for step in range(5):
        in_flight.add(step)
        assert waited == list(range(max(0, step - 1)))  # never more than 2 unwaited
