"""The multi-host path on one machine: launch/local_multiprocess.sh starts two JAX processes on
127.0.0.1 with two CPU devices each (jax.distributed, gloo collectives), running the real trainer
on configs/cpu.py:tiny. Compared with one process holding all four devices:

- the two processes end with the same parameters and BN statistics: each kind of variable (conv
  kernels, BN scales, biases, running means, ...) moved from its initial value by the same amount,
  within 10 % of how far it moved, and the two nets' logits moved alike;
- their checkpoint restores in one process (this one, on one device);
- a run whose process 1 is SIGKILLed after a checkpoint, restarted with the same command, resumes
  from the last complete checkpoint and ends exactly where the uninterrupted run ended;
- SIGTERM to the launcher (a preemption notice) stops both processes at one step, with a
  complete checkpoint of it, and exit status 0.

lr is 0.01 rather than the tiny config's 0.1: this 4-channel net at 0.1 multiplies float
summation-order differences about tenfold per step (0.1: 9e-2 relative after 5 steps; 0.01:
4e-6), which would hide what the test is about. Differences are compared per kind, not per array,
and relative to how far training moved them (conftest.differences_by_kind): the two runs add in
other orders, and where rounding moves one ReLU input across zero, that element's gradient
flips, which moves one array by a few percent and every array before it (1.2e-2 of the movement
of the BN scales here, a 3e-2 difference in one BN bias on an AVX2-only machine). A real
difference (BN statistics of one process's rows, a gradient not reduced, other rows) changes
every array of its kind by about as much as it moved. That every parameter array moved is
checked too, so equal-because-unchanged cannot pass.
"""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import differences_by_kind
from resnet_jax import checkpoint, parallel
from resnet_jax import state as state_lib
from resnet_jax import config as config_lib

pytestmark = pytest.mark.slow  # every test here starts processes or trains

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "local_multiprocess.sh"
CONFIG = "configs/cpu.py:tiny"
STEPS = 5
FLAGS = ["--config", CONFIG, f"--config.num_steps={STEPS}", "--config.lr=0.01",
         "--config.checkpoint_every=2"]  # checkpoints at 2, 4 and 5
TIMEOUT = 600  # a hung collective must fail the test, not CI


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               PYTHON=sys.executable)
    for key in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    env.update(extra)
    return env


def two_processes(workdir, log_dir, *overrides):
    """Start the trainer as 2 processes x 2 CPU devices; returns the launcher's Popen. Its own
    session, so that a failed test can end the launcher and its processes together."""
    return subprocess.Popen(["bash", str(LAUNCHER), "-n", "2", "-d", "2", "-g", "2", "-l",
                             str(log_dir), "--", *FLAGS, *overrides, "--workdir", str(workdir)],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc) -> str:
    """Its output once it ends; killed (with its processes) if it does not end in time."""
    try:
        return proc.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        stop(proc)
        pytest.fail(f"no end within {TIMEOUT} s:\n{proc.communicate()[0][-3000:]}")


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for_checkpoint(proc, workdir, step: int):
    deadline = time.monotonic() + TIMEOUT
    while not (workdir / str(step)).is_dir():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before checkpoint {step}:\n{finish(proc)[-3000:]}")
        if time.monotonic() > deadline:
            stop(proc)
            pytest.fail(f"no checkpoint {step} within {TIMEOUT} s")
        time.sleep(0.05)


def complete_steps(workdir) -> list:
    """Steps orbax has finalised: a directory named by the step (tmp directories carry a suffix)."""
    return sorted(int(p.name) for p in pathlib.Path(workdir).iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_process")
    result = subprocess.run([sys.executable, "-m", "resnet_jax.train", *FLAGS, "--workdir", str(workdir)],
                            cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT,
                            env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 4 devices (1 processes)" in result.stderr
    return checkpoint.load_model(str(workdir))


@pytest.fixture(scope="module")
def two_process_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two_processes")
    logs = tmp_path_factory.mktemp("two_processes_logs")
    proc = two_processes(workdir, logs)
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "on 4 devices (2 processes)" in out
    return workdir


TOLERANCE = 0.1


def relative_differences(a, b) -> dict:
    """Per array: |a - b| / |b| (Frobenius norms), keyed by path."""
    flat_a = dict(jax.tree_util.tree_leaves_with_path(a))
    flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
    assert flat_a.keys() == flat_b.keys()
    out = {}
    for path, x in flat_a.items():
        x, y = np.asarray(x, np.float64), np.asarray(flat_b[path], np.float64)
        assert x.shape == y.shape, jax.tree_util.keystr(path)
        out[jax.tree_util.keystr(path)] = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)
    return out


def initial_variables():
    config = config_lib.load_config(CONFIG)
    model, _ = state_lib.create_model(config, num_classes=10)
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    return jax.device_get(state_lib.init_state(config, model, mesh, 32).variables)


def test_two_processes_train_like_one(one_process, two_process_dir):
    two = checkpoint.load_model(str(two_process_dir))
    assert one_process.step == two.step == STEPS
    start = initial_variables()
    diffs = differences_by_kind(two.variables, one_process.variables, start)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < TOLERANCE, f"{worst}: {diffs[worst]:.2e} of how far it moved"
    moved = relative_differences(one_process.variables["params"], start["params"])
    assert min(moved.values()) > 1e-4  # every parameter array moved: the ratios mean something
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    logits = [np.asarray(one_process.model.apply(v, one_process.normalization(images),
                                                 train=False), np.float64)
              for v in (two.variables, one_process.variables, start)]
    assert np.linalg.norm(logits[0] - logits[1]) < TOLERANCE * np.linalg.norm(logits[1] - logits[2])


def test_comparison_by_kind_fails_a_real_difference(one_process):
    """What the comparison must catch: one kind of variable (here the BN running means, as if
    each process had kept its own rows' statistics) off by half of how far it moved."""
    start = initial_variables()
    same = differences_by_kind(one_process.variables, one_process.variables, start)
    assert max(same.values()) == 0.0
    stats = one_process.variables["batch_stats"]
    other = dict(one_process.variables, batch_stats=jax.tree.map(
        lambda m, s: m + 0.5 * (m - s), stats, start["batch_stats"]))
    diffs = differences_by_kind(other, one_process.variables, start)
    assert diffs["batch_stats/mean"] > 4 * TOLERANCE


def test_two_process_checkpoint_restores_in_one_process(two_process_dir):
    assert jax.process_count() == 1
    loaded = checkpoint.load_model(str(two_process_dir))
    assert loaded.metadata["model"] == "resnet20"
    assert loaded.metadata["model_options"]["widths"] == [4, 8, 16]
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    logits = loaded.model.apply(loaded.variables, loaded.normalization(images), train=False)
    assert logits.shape == (8, 10) and np.all(np.isfinite(logits))


def test_killed_process_and_restart_resume_from_last_complete_checkpoint(tmp_path, two_process_dir):
    """SIGKILL process 1 once the step-2 checkpoint is complete. Process 0 cannot finish any
    later checkpoint without it (orbax commits a step only when every process has written), so
    the launcher stops it. The restart must resume from the newest complete step, on both
    processes: process 0 says so, and a process 1 that started elsewhere would feed different
    gradients (or a different number of steps) and could not end on the uninterrupted run's
    parameters."""
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    proc = two_processes(workdir, logs)
    wait_for_checkpoint(proc, workdir, 2)
    os.kill(int((logs / "process_1.pid").read_text()), signal.SIGKILL)
    out = finish(proc)
    assert proc.returncode != 0, "the run finished before the kill landed:\n" + out[-2000:]
    assert "process 1" in out and "stopping the others" in out
    saved = complete_steps(workdir)
    assert saved and saved[-1] < STEPS, saved
    last = saved[-1]

    restart = two_processes(workdir, logs)
    out = finish(restart)
    assert restart.returncode == 0, out[-3000:]
    resumed = re.findall(r"resumed from \S+ step (\d+)", out)
    assert resumed == [str(last)], resumed  # process 0 logs; process 1 logs warnings only
    assert complete_steps(workdir)[-1] == STEPS

    diffs = relative_differences(checkpoint.load_model(str(workdir)).variables,
                                 checkpoint.load_model(str(two_process_dir)).variables)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-6, f"{worst}: {diffs[worst]:.2e} relative"


def test_sigterm_stops_both_processes_at_one_saved_step(tmp_path):
    """What a TPU VM preemption or SLURM's --signal does: every process gets SIGTERM; JAX's
    preemption sync point makes them stop after the same step, save it together, exit 0."""
    workdir = tmp_path / "run"
    # Far more steps than it will take: the stop must come from the signal, not the end.
    proc = two_processes(workdir, tmp_path / "logs", "--config.num_steps=1000")
    wait_for_checkpoint(proc, workdir, 2)
    proc.send_signal(signal.SIGTERM)  # the launcher passes it to both processes
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    (result,) = re.findall(r'^\[0\] (\{"step".*\})$', out, flags=re.M)
    result = json.loads(result)
    assert result["preempted"] is True and 2 <= result["step"] < 1000
    assert complete_steps(workdir)[-1] == result["step"]  # saved by both: orbax committed it
