"""gs:// as a TPU VM user runs it, against a local Cloud Storage (conftest.gcs_emulator): the
preflight's one-line errors; the remote metrics log; a run preempted (SIGTERM), resumed, killed
(SIGKILL) while it saves and resumed again, ending where an uninterrupted local run ends; a
damaged step found and skipped; evaluate, analyze, plots and compile reading and writing gs://;
two processes sharing one gs:// workdir.

Runs reuse test_train's CLI helpers and its uninterrupted local run (same config, same steps).
"""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from etils import epath

from conftest import GCS_BUCKET, GCS_ENV
from resnet_jax import metrics_log, plots, storage
from resnet_jax.errors import UserError
from test_multiprocess import finish as finish_launcher
from test_multiprocess import two_processes
import test_train
from test_train import REPO, RUN, TINY, assert_trees_close, finish, params_of, start, train_cli, wait_for

env, uninterrupted = test_train.env, test_train.uninterrupted  # fixtures shared with test_train


def _gcs_env(env):
    """test_train's environment for the CLIs, pointed at the emulator (conftest.gcs_emulator)."""
    return dict(env, **{k: os.environ[k] for k in GCS_ENV})


def _cli(tool, *args, env):
    proc = subprocess.run([sys.executable, "-m", f"resnet_jax.{tool}", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert not (REPO / "gs:").exists(), "a gs:// path was written as a local folder gs:/"
    return proc


def _objects(url: str):
    """The names of every object under `url`, relative to it (epath has no recursive glob on
    gs://)."""
    import fsspec
    prefix = url[len("gs://"):].rstrip("/") + "/"
    return [p[len(prefix):] for p in fsspec.filesystem("gs").find(url)]


def _one_error_line(proc, *phrases):
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


# ---------------------------------------------------------------------------------------------
# Preflight


def test_preflight_names_the_missing_package_credentials_and_bucket(gcs_dir, monkeypatch):
    storage.check_writable(gcs_dir)  # the emulator's bucket takes a file
    assert not list(epath.Path(gcs_dir).glob(".write-test-*"))  # and the probe is gone
    with pytest.raises(UserError, match=r"bucket gs://no-such-bucket does not exist.*buckets create"):
        storage.check_writable("gs://no-such-bucket/run")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "gcsfs", None)  # what `import gcsfs` meets where it is absent
        with pytest.raises(UserError, match=r"needs gcsfs \(not installed\); pip install 'resnet-jax\[gcs\]'"):
            storage.check_writable(gcs_dir)
    with monkeypatch.context() as m:  # a real bucket's check, with no usable credentials
        m.delenv("STORAGE_EMULATOR_HOST")
        m.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(REPO / "no-such-key.json"))
        with pytest.raises(UserError, match=r"no Google Cloud credentials .*application-default login"):
            storage.check_writable(gcs_dir)


def test_preflight_names_the_role_a_read_only_account_lacks(gcs_dir, monkeypatch):
    """The emulator grants everything; a bucket that refuses writes is what gcsfs makes of HTTP
    403, an OSError('Forbidden: ...')."""
    def forbidden(self, *args, **kwargs):
        raise OSError(f"Forbidden: {self}\nno storage.objects.create permission")
    monkeypatch.setattr(type(epath.Path(gcs_dir)), "write_text", forbidden)
    with pytest.raises(UserError, match=r"cannot write there \(OSError: Forbidden.*roles/storage.objectAdmin"):
        storage.check_writable(gcs_dir)


@pytest.mark.slow
def test_train_on_a_missing_bucket_is_one_line_before_any_data(gcs_emulator, env):
    proc = _cli("train", "--config", TINY, "--workdir", "gs://no-such-bucket/run",
                env=_gcs_env(env))
    _one_error_line(proc, "--workdir gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist")


# ---------------------------------------------------------------------------------------------
# The metrics log


def test_remote_log_writes_a_part_per_flush_and_reads_back_as_one(gcs_dir):
    log = metrics_log.RemoteLog(gcs_dir)
    for step in (1, 2, 3):
        log.add(step, dict(train_top1=0.1 * step, loss=1.0))
    assert not (epath.Path(gcs_dir) / "metrics").exists()  # nothing written between flushes
    log.flush()
    log.add(4, dict(val_top1=0.5))
    log.flush()
    log.flush()  # nothing new: no empty part
    resumed = metrics_log.RemoteLog(gcs_dir)  # a resumed run continues the numbering
    resumed.add(3, dict(train_top1=0.9, loss=0.5))  # step 3 again: the resumed run's counts
    resumed.flush()
    assert sorted(p.name for p in (epath.Path(gcs_dir) / "metrics").iterdir()) == \
        ["00000.jsonl", "00001.jsonl", "00002.jsonl"]
    events = list((epath.Path(gcs_dir) / "tensorboard").iterdir())
    assert len(events) == 3 and all(p.name.startswith("events.out.tfevents.") for p in events)
    _, lines = metrics_log.read_lines(gcs_dir)
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3, 4, 3]
    curves = plots.read_curves(gcs_dir)
    assert list(curves.train_steps) == [1, 2, 3] and curves.train_error[-1] == pytest.approx(0.1)


def test_image_folders_on_gcs_load_as_local_ones(gcs_dir, tmp_path, monkeypatch):
    """folder:gs://...: the in-memory loader (CIFAR-sized) and the host pipeline's random-access
    source read the same images, labels and bytes as from a local copy."""
    import io
    import numpy as np
    from PIL import Image
    from resnet_jax.data import imagenet, sources
    monkeypatch.setenv("RESNET_JAX_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for i, name in enumerate(["test/cat/a.png", "test/cat/b.png", "test/dog/c.png"]):
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(png, "PNG")
        (tmp_path / "local" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "local" / name).write_bytes(png.getvalue())
        epath.Path(f"{gcs_dir}/{name}").write_bytes(png.getvalue())
    remote = sources.load(f"folder:{gcs_dir}", "test")
    local = sources.load(f"folder:{tmp_path / 'local'}", "test")
    assert remote.classes == local.classes == ("cat", "dog")
    np.testing.assert_array_equal(remote.images, local.images)
    np.testing.assert_array_equal(remote.labels, [0, 0, 1])
    record = imagenet.FolderSource(gcs_dir, "test")[2]
    assert record["label"] == 1 and record["image"] == (tmp_path / "local/test/dog/c.png").read_bytes()
    replaced = io.BytesIO()  # the cache is keyed by the listing's generations and checksums
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(replaced, "PNG")
    epath.Path(f"{gcs_dir}/test/cat/a.png").write_bytes(replaced.getvalue())
    np.testing.assert_array_equal(sources.load(f"folder:{gcs_dir}", "test").images[0], 7)
    with pytest.raises(UserError, match="split 'train' not found in .* \\(it has: test\\)"):
        sources.load(f"folder:{gcs_dir}", "train")


def test_grain_reads_array_record_shards_on_gcs(gcs_dir, tmp_path):
    """The ImageNet input (tfds data_dir on gs://) reads ArrayRecord shards through grain, whose
    reader opens gs:// itself: no gcsfuse mount is needed."""
    import grain.python as grain
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(str(tmp_path / "shard"), "group_size:1")
    for i in range(5):
        writer.write(b"record %d" % i)
    writer.close()
    epath.Path(f"{gcs_dir}/shard").write_bytes((tmp_path / "shard").read_bytes())
    source = grain.ArrayRecordDataSource([f"{gcs_dir}/shard"])
    assert len(source) == 5 and source[3] == b"record 3"


def test_a_failed_remote_metrics_write_is_one_line(gcs_dir, monkeypatch):
    from resnet_jax import periodic, workdir
    writer = periodic.MetricWriter(gcs_dir, enabled=True)
    writer.write(1, dict(loss=1.0))

    def refused(self):
        raise RuntimeError("HTTP 503: service unavailable")  # what gcsfs raises is no OSError
    monkeypatch.setattr(metrics_log.RemoteLog, "flush", refused)
    with pytest.raises(workdir.WriteFailed, match=r"cannot write metrics to '.*/metrics' .*HTTP 503.*rerun the same"):
        writer.flush()


# ---------------------------------------------------------------------------------------------
# Training, interrupted, on gs://


@pytest.fixture(scope="module")
def gcs_run(gcs_emulator, env):
    """RUN on gs://: SIGTERM at step 3 (saves it), resumed and SIGKILLed while step 8 saves,
    resumed to the end; (workdir, the last run's output)."""
    workdir = f"gs://{GCS_BUCKET}/run-{uuid.uuid4().hex[:8]}"
    env = _gcs_env(env)
    proc = start(workdir, *RUN, env=env)
    wait_for(proc, r"step 3/12 ")
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == 0 and "SIGTERM: saved step" in out, out[-3000:]
    proc = start(workdir, *RUN, env=env)
    lines = wait_for(proc, r"step 8  val")  # the save of step 8 starts right after this line
    while proc.poll() is None and not any(p.name.startswith("8")
                                          for p in epath.Path(workdir).iterdir()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # while step 8's files are being written
    proc.wait()
    assert any("resumed from" in ln for ln in lines), "".join(lines[-20:])
    result, out = train_cli(workdir, *RUN, env=env)
    assert result["step"] == 12 and "resumed from" in out
    return workdir, env


@pytest.mark.slow
def test_preempted_and_killed_run_on_gcs_ends_as_the_uninterrupted_local_run(gcs_run, uninterrupted):
    workdir, _ = gcs_run
    assert_trees_close(params_of(workdir), params_of(uninterrupted), rtol=1e-6)
    curves = plots.read_curves(workdir)  # the three runs' parts, read as one log
    assert list(curves.train_steps) == list(range(1, 13))
    assert list(curves.test_steps) == [4, 8, 12]
    assert list((epath.Path(workdir) / "tensorboard").iterdir())


@pytest.mark.slow
def test_a_damaged_step_on_gcs_is_found_and_skipped(gcs_run):
    source, env = gcs_run
    workdir = f"{source}-damaged"
    for name in _objects(source):
        epath.Path(f"{workdir}/{name}").write_bytes(epath.Path(f"{source}/{name}").read_bytes())
    arrays = [epath.Path(f"{workdir}/{n}") for n in _objects(workdir) if n.startswith("12/") and "/d/" in n]
    largest = max(arrays, key=lambda f: len(f.read_bytes()))
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x40
    largest.write_bytes(bytes(data))
    result, out = train_cli(workdir, *RUN, "--config.num_steps=16", env=env)
    assert result["step"] == 16 and "Traceback" not in out
    assert "step 12 is damaged" in out and "resumed from" in out, out[-3000:]
    assert "step 8 (the damaged steps [12] are left in place)" in out


@pytest.mark.slow
def test_evaluate_analyze_and_plots_read_and_write_gcs(gcs_run):
    workdir, env = gcs_run
    out = f"{workdir}-outputs"
    proc = _cli("evaluate", "--checkpoint", workdir, "--data", "synthetic:64", "--json",
                f"{out}/eval.json", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(epath.Path(f"{out}/eval.json").read_text())
    assert result["step"] == 12 and result["count"] == 64 and result["checkpoint"] == workdir
    proc = _cli("analyze", workdir, "--data", "synthetic:32", "--batch_size", "16", "--out",
                f"{out}/analysis", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = {p.name for p in epath.Path(f"{out}/analysis").iterdir()}
    assert {"figure7.png", "figure7.pdf", "table.txt"} <= written
    (label,) = [n[:-4] for n in written if n.endswith(".csv")]
    meta = json.loads(epath.Path(f"{out}/analysis/{label}.json").read_text())
    assert meta["checkpoint"] == workdir and meta["step"] == 12
    proc = _cli("plots", f"{out}/analysis/{label}.csv", "--out", f"{out}/figure7", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _cli("plots", f"{workdir}=tiny", "--out", f"{out}/figure6", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for figure in ("figure6", "figure7"):
        assert epath.Path(f"{out}/{figure}.png").read_bytes()[:4] == b"\x89PNG"
        assert epath.Path(f"{out}/{figure}.pdf").read_bytes()[:4] == b"%PDF"


def test_analyze_keeps_its_finished_checkpoints_in_the_bucket(gcs_dir, tmp_path, monkeypatch):
    """analyze --out gs://... kept each finished checkpoint's rows through os.makedirs/open:
    in ./gs:/bucket/... under the working directory, where a rerun never looked."""
    from resnet_jax import analyze, checkpoint
    from test_analyze import NORM, OPTIONS, _init
    net = str(tmp_path / "r20")
    checkpoint.save_model(net, _init("resnet20", 0)[1], model_name="resnet20",
                          model_options=OPTIONS, normalization=NORM, step=7)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    out = f"{gcs_dir}/analysis"
    run = lambda: analyze.analyze([net], data="synthetic:8", split="test", out=out,
                                  settings=analyze.Settings(batch_size=8))
    table = run()
    assert list((tmp_path / "cwd").iterdir()) == []
    assert ".finished/ResNet-20/7.json" in _objects(out) and "table.txt" in _objects(out)
    monkeypatch.setattr(analyze, "stream_moments", lambda *a: pytest.fail("computed again"))
    assert run() == table  # the rerun finds the kept rows in the bucket


@pytest.mark.slow
def test_two_processes_share_a_gcs_workdir(gcs_emulator, tmp_path):
    workdir = f"gs://{GCS_BUCKET}/two-{uuid.uuid4().hex[:8]}"
    proc = two_processes(workdir, tmp_path)
    out = finish_launcher(proc)
    assert proc.returncode == 0 and "on 4 devices (2 processes)" in out, out[-3000:]
    steps = sorted(int(p.name) for p in epath.Path(workdir).iterdir() if p.name.isdigit())
    assert steps == [2, 4, 5]
    assert params_of(workdir)["params"]  # written by both, restored by this one process
    _, lines = metrics_log.read_lines(workdir)  # process 0 alone logs: each row once
    steps = [json.loads(ln)["step"] for ln in lines if "loss" in json.loads(ln)]
    assert steps == sorted(set(steps)) and steps[-1] == 5


@pytest.mark.slow
def test_compile_writes_its_json_to_gcs(gcs_dir, env):
    proc = _cli("compile", "--config", TINY, "--topology", "v5e:2x2", "--programs", "eval",
                "--json", f"{gcs_dir}/compile.json", env=_gcs_env(env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(epath.Path(f"{gcs_dir}/compile.json").read_text())
    assert result["topology"] == "v5e:2x2" and [r["program"] for r in result["reports"]] == ["eval"]
