"""The launchers in launch/: syntax and shellcheck, a --help that names every option, the gcloud,
srun and ssh commands they would run (--dry-run), bad options refused in one line, and the local
launchers' process handling (environment, a failing process stops its peers)."""
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import require_native

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
RUNNABLE = [s for s in SCRIPTS if s != "lib.sh"]  # lib.sh is sourced, not run


def run(script, *args, env=None, timeout=60, cwd=REPO):
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_every_launcher_is_here():
    assert set(RUNNABLE) >= {"tpu_vm.sh", "slurm.sbatch", "multihost.sh", "local_multiprocess.sh",
                             "figure7.sh"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
    require_native(shutil.which("shellcheck") is None
                   and "shellcheck is not installed (apt-get install shellcheck)" or None)
    result = subprocess.run(["shellcheck", "-x", str(LAUNCH / script)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _options(script: str):
    """The long options a script's argument loop accepts (its `case` patterns)."""
    text = (LAUNCH / script).read_text()
    patterns = re.findall(r"^\s+((?:-[-\w]+\|?)+)\)", text, flags=re.M)
    return sorted({o for p in patterns for o in p.split("|") if o.startswith("--") and o != "--"})


@pytest.mark.parametrize("script", RUNNABLE)
def test_help_explains_every_option(script):
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage:")
    options = _options(script)
    assert "--help" in options and len(options) >= 2
    for option in options:
        assert re.search(rf"(^|\s|\[){re.escape(option)}\b", result.stdout), \
            f"{script} --help does not explain {option}"


@pytest.mark.parametrize("script", RUNNABLE)
def test_unknown_option_is_one_line_and_exit_2(script):
    result = run(script, "--no-such-option", "--dry-run")
    if script == "slurm.sbatch":  # everything it does not know goes to the trainer
        result = run(script, "--dry-run", "--gpus-per-node", "eight", "--config", "x")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


# --- tpu_vm.sh ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_gcloud_path(tmp_path_factory):
    """A PATH with the few tools tpu_vm.sh needs besides gcloud (which may be installed here)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    for tool in ("bash", "dirname", "git"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return str(bin_dir)


def tpu(*args, path):
    result = run("tpu_vm.sh", "--dry-run", "--name", "r110", "--zone", "us-central2-b", *args,
                 env={"PATH": path})  # a dry run needs no gcloud
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if not line.startswith("#")]


def test_tpu_dry_run_create_spot_pod_slice(no_gcloud_path):
    (create,) = tpu("-t", "v4-32", "--spot", "create", path=no_gcloud_path)
    assert create == ("gcloud compute tpus tpu-vm create r110 --zone=us-central2-b "
                      "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot")
    (create,) = tpu("-t", "v5litepod-8", "--preemptible", "create", path=no_gcloud_path)
    assert "--version=v2-alpha-tpuv5-lite --preemptible" in create


def test_tpu_dry_run_install_and_train_on_all_workers(no_gcloud_path):
    pack, scp, install = tpu("install", path=no_gcloud_path)
    assert pack.startswith("git -C ") and pack.endswith(" HEAD")
    assert scp.startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in scp
    assert install.startswith("gcloud compute tpus tpu-vm ssh r110 --zone=us-central2-b --worker=all")
    # a supported Python on every image (theirs is 3.10), then the package with jax[tpu] and gcsfs
    assert "pip install -q --user -U uv" in install
    assert "uv venv -q --allow-existing --python 3.11 ~/.venv-resnet-jax" in install
    assert 'pip install -q --python ~/.venv-resnet-jax/bin/python -e "$HOME/resnet_jax[tpu]"' in install
    (train,) = tpu("-t", "v4-32", "-c", "configs/cifar10.py:resnet110", "-w", "gs://b/r110",
                   "train", "--", "--config.seed=3", path=no_gcloud_path)
    assert "--worker=all" in train
    assert ("~/.venv-resnet-jax/bin/python -m resnet_jax.train --config configs/cifar10.py:resnet110 --workdir gs://b/r110 "
            "--config.seed=3") in train


def test_tpu_dry_run_resume_recreates_and_trains_the_same_workdir(no_gcloud_path):
    commands = tpu("-t", "v4-32", "--spot", "-w", "gs://b/r110", "resume", path=no_gcloud_path)
    verbs = [c.split()[4] if c.startswith("gcloud") else c.split()[0] for c in commands]
    assert verbs == ["describe", "delete", "create", "git", "scp", "ssh", "ssh"]
    assert commands[1].endswith("--quiet") and commands[2].endswith("--spot")
    assert "--workdir gs://b/r110" in commands[-1]


def test_tpu_dry_run_logs_status_stop_delete(no_gcloud_path):
    (logs,) = tpu("--worker", "0", "logs", path=no_gcloud_path)
    assert "--worker=0" in logs and "tail" in logs and "train.log" in logs
    (status,) = tpu("status", path=no_gcloud_path)
    assert status.startswith("gcloud compute tpus tpu-vm describe r110")
    (stop,) = tpu("stop", path=no_gcloud_path)
    assert "--worker=all" in stop and "kill -TERM" in stop
    (delete,) = tpu("delete", path=no_gcloud_path)
    assert delete == "gcloud compute tpus tpu-vm delete r110 --zone=us-central2-b --quiet"


@pytest.mark.parametrize("args, message", [
    (["-t", "v4-32", "-w", "/tmp/run", "train"], "must be gs://"),
    (["train"], "--workdir is needed"),
    (["-t", "v4", "create"], "accelerator type"),
    ([], "no command given"),
    (["create", "delete"], "one command at a time"),
])
def test_tpu_bad_input(args, message):
    result = run("tpu_vm.sh", "--dry-run", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_tpu_without_gcloud_says_so(no_gcloud_path):
    result = run("tpu_vm.sh", "status", env={"PATH": no_gcloud_path})
    assert result.returncode == 2 and "gcloud is not installed" in result.stderr


# --- slurm.sbatch ------------------------------------------------------------------------------


def test_slurm_one_task_per_node_sees_every_gpu():
    result = run("slurm.sbatch", "--dry-run", "--config", "c.py:resnet20", "--workdir", "/s/r",
                 env={"SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "1",
                      "SLURM_GPUS_ON_NODE": "8"})
    assert result.returncode == 0, result.stderr
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in result.stdout
    assert ("srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 python3 -m resnet_jax.train "
            "--config c.py:resnet20 --workdir /s/r") in result.stdout


def test_slurm_one_task_per_gpu():
    result = run("slurm.sbatch", "--dry-run", "--", "--config", "c.py:resnet20",
                 env={"SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "8(x2)",
                      "SLURM_GPUS_ON_NODE": "8"})
    assert result.returncode == 0, result.stderr
    assert "JAX_LOCAL_DEVICE_IDS" not in result.stdout
    assert "srun --nodes=2 --ntasks-per-node=8 " in result.stdout


@pytest.mark.parametrize("env, args, message", [
    ({"SLURM_NTASKS_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "8"}, ["--dry-run", "--config", "x"],
     "use 1 (one task per node) or 8"),
    ({}, ["--config", "x"], "not inside a SLURM job"),
    ({"SLURM_GPUS_ON_NODE": "8"}, ["--dry-run"], "no trainer flags"),
])
def test_slurm_bad_input(env, args, message):
    clean = {k: "" for k in ("SLURM_JOB_ID", "SLURM_NTASKS_PER_NODE", "SLURM_GPUS_ON_NODE")}
    result = run("slurm.sbatch", *args, env={**clean, **env})
    assert result.returncode == 2 and message in result.stderr, result.stderr


# --- figure7.sh --------------------------------------------------------------------------------


def test_figure7_dry_run_trains_five_nets_then_analyses(tmp_path):
    result = run("figure7.sh", "--dry-run", "-r", str(tmp_path), "-L",
                 "launch/local_multiprocess.sh -n 2 -d 2 --cmd", "--", "--config.num_steps=100")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    models = ["plain20", "plain56", "resnet20", "resnet56", "resnet110"]
    for line, model in zip(lines, models):
        assert line == (f"launch/local_multiprocess.sh -n 2 -d 2 --cmd python3 -m resnet_jax.train "
                        f"--config configs/cifar10.py:{model} --workdir {tmp_path}/{model} "
                        "--config.num_steps=100")
    assert lines[5] == ("python3 -m resnet_jax.analyze "
                        + " ".join(f"{tmp_path}/{m}" for m in models)
                        + f" --data cifar10 --split test --out {tmp_path}/figure7")
    assert len(lines) == 6


def test_figure7_skips_finished_runs(tmp_path):
    (tmp_path / "figure7" / "logs").mkdir(parents=True)
    (tmp_path / "figure7" / "logs" / "resnet56.done").write_text("2026-01-01T00:00:00Z\n")
    result = run("figure7.sh", "--dry-run", "-r", str(tmp_path))
    assert result.returncode == 0, result.stderr
    trained = [l for l in result.stdout.splitlines() if "resnet_jax.train" in l]
    assert len(trained) == 4 and not any(":resnet56 " in l for l in trained)
    assert "resnet56 finished before" in result.stderr
    assert f"{tmp_path}/resnet56 " in result.stdout.splitlines()[-1]  # still analysed


def test_figure7_gcs_root_needs_local_out():
    result = run("figure7.sh", "--dry-run", "-r", "gs://bucket/f7")
    assert result.returncode == 2 and "pass --out" in result.stderr


# --- local_multiprocess.sh and multihost.sh: real processes, no JAX computation ---------------

PRINT_ENV = ("import os; print('|'.join(os.environ.get(k, '') for k in ('JAX_PROCESS_ID', "
             "'JAX_NUM_PROCESSES', 'JAX_COORDINATOR_ADDRESS', 'JAX_PLATFORMS', 'XLA_FLAGS')))")


def test_local_multiprocess_environment(tmp_path):
    result = run("local_multiprocess.sh", "-n", "3", "-d", "2", "-p", "23456", "-l", str(tmp_path),
                 "--cmd", sys.executable, "-c", PRINT_ENV)
    assert result.returncode == 0, result.stderr
    seen = sorted(line for line in result.stdout.splitlines())
    flags = "--xla_force_host_platform_device_count=2"
    for i, line in enumerate(seen):
        assert line.startswith(f"[{i}] {i}|3|127.0.0.1:23456|cpu|") and line.endswith(flags), line
        assert (tmp_path / f"process_{i}.log").read_text().startswith(f"{i}|3|")
        assert (tmp_path / f"process_{i}.pid").read_text().strip().isdigit()


def test_local_multiprocess_failure_stops_the_peers(tmp_path):
    # Process 1 fails at once; process 0 would sleep for a minute and must be stopped.
    code = ("import os, sys, time\n"
            "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
            "time.sleep(60)\n")
    start = time.monotonic()
    result = run("local_multiprocess.sh", "-n", "2", "-g", "2", "-l", str(tmp_path),
                 "--cmd", sys.executable, "-c", code)
    assert result.returncode == 3
    assert time.monotonic() - start < 30
    assert "process 1" in result.stderr and "stopping the others" in result.stderr
    pid0 = int((tmp_path / "process_0.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid0, 0)


def test_local_multiprocess_sigkilled_process_gives_137(tmp_path):
    code = "import time; time.sleep(60)"
    proc = subprocess.Popen(["bash", str(LAUNCH / "local_multiprocess.sh"), "-g", "2", "-l",
                             str(tmp_path), "--cmd", sys.executable, "-c", code],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pidfile = tmp_path / "process_1.pid"
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGKILL, err


def test_local_multiprocess_passes_sigterm_to_every_process(tmp_path):
    # Each process saves-and-exits on SIGTERM, as the trainer does; the launcher then exits 0.
    code = ("import os, signal, sys, time\n"
            "def done(*_):\n"
            "    print('stopped', os.environ['JAX_PROCESS_ID'], flush=True); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, done)\n"
            "print('up', flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen(["bash", str(LAUNCH / "local_multiprocess.sh"), "-n", "3", "-l",
                             str(tmp_path), "--cmd", sys.executable, "-c", code],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(
            (tmp_path / f"process_{i}.log").exists() and "up" in (tmp_path / f"process_{i}.log").read_text()
            for i in range(3)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert sorted(l for l in out.splitlines() if "stopped" in l) == \
        ["[0] stopped 0", "[1] stopped 1", "[2] stopped 2"]


def test_multihost_dry_run_sets_the_coordinator(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two GPU boxes\nalice@gpu1\ngpu2  # the second\n")
    result = run("multihost.sh", "--dry-run", "-f", str(hostfile), "-p", "4000", "-r", "/srv/resnet",
                 "-e", "NCCL_DEBUG=INFO", "--", "--config", "configs/cifar10.py:resnet110",
                 "--workdir", "/shared/runs/a b")
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stdout.splitlines() if not l.startswith("#")]
    assert len(lines) == 2
    for i, (line, host) in enumerate(zip(lines, ["alice@gpu1", "gpu2"])):
        assert line.startswith(f"ssh -o BatchMode=yes {host} 'cd /srv/resnet && ")
        assert (f"exec env JAX_COORDINATOR_ADDRESS=gpu1:4000 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={i} "
                "NCCL_DEBUG=INFO python3 -m resnet_jax.train --config configs/cifar10.py:resnet110 "
                "--workdir ") in line
        assert "a b" in line


def test_multihost_runs_each_process_through_ssh(tmp_path):
    # A stand-in for ssh that runs the remote command here: what reaches the "hosts" is a shell
    # command line, so this checks the quoting and the per-process environment for real.
    fake_ssh = tmp_path / "ssh"
    fake_ssh.write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        echo "host=${@: -2:1}" >&2
        exec bash -c "${!#}"
        """))
    fake_ssh.chmod(0o755)
    result = run("multihost.sh", "--ssh", f"{fake_ssh} -o BatchMode=yes", "-H", "127.0.0.1,localhost",
                 "-p", "23457", "--cmd", sys.executable, "-c", PRINT_ENV + " # it's quoted")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "[0] host=127.0.0.1" in lines and "[1] host=localhost" in lines
    seen = sorted(line for line in lines if "|" in line)
    assert seen[0].startswith("[0] 0|2|127.0.0.1:23457|")
    assert seen[1].startswith("[1] 1|2|127.0.0.1:23457|")


def test_multihost_needs_hosts():
    result = run("multihost.sh", "--dry-run", "--", "--config", "x")
    assert result.returncode == 2 and "no hosts" in result.stderr
