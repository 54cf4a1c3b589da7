"""The workdir's guarantees: the data a resume continues on, and the lock."""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from resnet_jax import checkpoint, parallel, train, workdir
from resnet_jax import state as state_lib
from resnet_jax.data import sources, splits
from resnet_jax.errors import UserError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_JAX_CACHE", str(tmp_path / "cache"))


def _images(folder, count, start=0):
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        cls = ("ant", "bee")[i % 2]
        os.makedirs(folder / "train" / cls, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            folder / "train" / cls / f"{i}.png")


def _random_variables(model):
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                        checkpoint.abstract_variables(model))


def _meta(config, dataset):
    model, options = state_lib.create_model(config, len(dataset.classes))
    norm = checkpoint.Normalization(np.zeros(3))
    return checkpoint.metadata(config.model, options, norm, extra=dict(
        classes=list(dataset.classes), dataset=config.data.source,
        train_data=sources.fingerprint(dataset),
        config=json.loads(config.to_json_best_effort()))), model


def test_resume_compares_the_data_by_content_not_by_the_source_string(tmp_path):
    """A train/ folder that grew from 20 to 70 images was resumed silently (its per-pixel mean
    changed too), while the same folder through a trailing slash or a symlink was refused."""
    _images(tmp_path / "d", 20)
    config = tiny_config(**{"data.source": f"folder:{tmp_path / 'd'}"})
    meta, model = _meta(config, sources.load(config.data.source, "train"))
    variables = _random_variables(model)
    checkpoint.save_model(str(tmp_path / "w"), variables, model_name=meta["model"],
                          model_options=meta["model_options"],
                          normalization=checkpoint.Normalization(np.zeros(3)), step=4,
                          extra={k: meta[k] for k in ("classes", "dataset", "train_data",
                                                      "config")})
    os.symlink(tmp_path / "d", tmp_path / "link")
    for same in (f"folder:{tmp_path / 'd'}/", f"folder:{tmp_path / 'link'}"):
        other = tiny_config(**{"data.source": same})
        now, _ = _meta(other, sources.load(same, "train"))
        with checkpoint.manager(str(tmp_path / "w"), read_only=True) as mngr:
            opened = workdir.read(mngr, str(tmp_path / "w"))
            opened.check_config(other)
            opened.check_data(now)
            assert opened.steps == [4]
    _images(tmp_path / "d", 50, start=20)
    grown, _ = _meta(config, sources.load(config.data.source, "train"))
    with checkpoint.manager(str(tmp_path / "w"), read_only=True) as mngr:
        with pytest.raises(UserError, match=r"was trained on other data: its training split had 20 "
                                            r"images, '.*' has 70 images; .*--allow_config_change"):
            workdir.read(mngr, str(tmp_path / "w")).check_data(grown)
        workdir.read(mngr, str(tmp_path / "w"), allow_change=True).check_data(grown)


@pytest.fixture
def fast_lock(monkeypatch):
    monkeypatch.setattr(workdir.Lock, "SETTLE", 0.0)


def _hold(path, **owner):
    (path / workdir.Lock.NAME).write_text(json.dumps(owner))


def test_a_live_trainer_keeps_a_second_out_naming_it(tmp_path, fast_lock, monkeypatch):
    """Two trainers on one workdir both exited 0 with their metrics rows interleaved."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _hold(tmp_path, host=socket.gethostname(), pid=other.pid, started=time.time(),
              heartbeat=time.time(), token="theirs")
        with pytest.raises(workdir.WorkdirInUse, match=rf"in use by the trainer pid {other.pid} "
                                                       rf"on host '{socket.gethostname()}'"):
            workdir.Lock(str(tmp_path)).acquire()
        # and before any data loads
        monkeypatch.setattr(splits, "make_data", lambda *a: pytest.fail("data loaded"))
        with pytest.raises(workdir.WorkdirInUse):
            train.train_and_evaluate(tiny_config(), str(tmp_path),
                                     mesh=parallel.make_mesh(jax.devices()[:1]))
    finally:
        other.kill()
        other.wait()
    # its pid has exited: taken over at once, and released at the end
    with workdir.Lock(str(tmp_path)) as lock:
        held = json.loads((tmp_path / workdir.Lock.NAME).read_text())
        assert held["pid"] == os.getpid() and held["token"] == lock.owner["token"]
    assert not (tmp_path / workdir.Lock.NAME).exists()


def test_a_lock_of_another_host_is_stale_only_once_its_heartbeat_stops(tmp_path, fast_lock):
    now = time.time()
    _hold(tmp_path, host="tpu-vm-7", pid=1234, started=now - 3600, heartbeat=now - 5, token="t")
    with pytest.raises(workdir.WorkdirInUse, match="pid 1234 on host 'tpu-vm-7'"):
        workdir.Lock(str(tmp_path)).acquire()
    _hold(tmp_path, host="tpu-vm-7", pid=1234, started=now - 3600,
          heartbeat=now - workdir.Lock.STALE - 1, token="t")
    with workdir.Lock(str(tmp_path)):
        pass
    (tmp_path / workdir.Lock.NAME).write_text('{"host": "tpu')  # garbled, and old
    os.utime(tmp_path / workdir.Lock.NAME, (now - 1000, now - 1000))
    with workdir.Lock(str(tmp_path)):
        pass


def test_the_heartbeat_renews_the_lock(tmp_path, fast_lock, monkeypatch):
    monkeypatch.setattr(workdir.Lock, "HEARTBEAT", 0.05)
    with workdir.Lock(str(tmp_path)):
        first = json.loads((tmp_path / workdir.Lock.NAME).read_text())["heartbeat"]
        deadline = time.time() + 30
        while json.loads((tmp_path / workdir.Lock.NAME).read_text())["heartbeat"] == first:
            assert time.time() < deadline, "no heartbeat"
            time.sleep(0.05)


def test_sigterm_before_the_first_step_is_one_line_and_frees_the_workdir(tmp_path, fast_lock,
                                                                        monkeypatch, capsys):
    """SIGTERM during data loading killed the process with libtpu's stack dump (rc 143)."""
    import signal
    from resnet_jax import errors

    def preempted(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("SIGTERM did not stop the data loading")
    monkeypatch.setattr(splits, "make_data", preempted)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        with errors.exit_on_user_error():
            train.train_and_evaluate(tiny_config(), str(tmp_path),
                                     mesh=parallel.make_mesh(jax.devices()[:1]))
    assert e.value.code == 0
    assert capsys.readouterr().err == ("SIGTERM before the first step: nothing to save; rerun the "
                                       "same command to start\n")
    assert signal.getsignal(signal.SIGTERM) is before
    assert not (tmp_path / workdir.Lock.NAME).exists()
