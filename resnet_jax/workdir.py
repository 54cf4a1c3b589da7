"""A run's folder, local or gs://: opened once (`open_workdir`: the lock that keeps a second
trainer out, the stored metadata read once, every check of a resumed run once), and the train
state's checkpoints in it (`save`, `restore`, `resume`).

A resumed run must find unchanged what it trains: the model (always), the config but for
FREE_TO_CHANGE, the classes, and the training data (unless --allow_config_change).

Data identity is by content: the checkpoint's metadata records `sources.fingerprint` of the
training images (`train_data`), and a resume compares that, not the source string (a trailing
slash or a symlink to the same folder is the same data; a folder that grew is not).
"""
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
import uuid
from typing import Dict, Iterator, List, Optional, Tuple

import jax
import ml_collections
import orbax.checkpoint as ocp

from resnet_jax import checkpoint, parallel, storage
from resnet_jax import schedule as schedule_lib
from resnet_jax.data import sources
from resnet_jax.errors import UserError, first_line

log = logging.getLogger("resnet_jax.train")


def _data_changed(workdir: str, step: int, stored: Dict, meta: Dict, allow_change: bool) -> bool:
    """Refuses (UserError) a resume whose training data differ from those that `stored` (the
    newest step's metadata) was trained on, unless `allow_change`; True if they differ.
    Steps saved before fingerprints were recorded pass."""
    before, now = stored.get("train_data"), meta.get("train_data")
    if not before or not now or before == now:
        return False
    if not allow_change:
        count = (f"{now['images']} images" if now["images"] != before["images"]
                 else "as many images with other content")
        raise UserError(f"workdir {workdir!r} (step {step}) was trained on other data: its "
                        f"training split had {before['images']} images, {meta.get('dataset')!r} "
                        f"has {count}; restore the data, choose another --workdir, or pass "
                        "--allow_config_change to resume on these")
    return True


def prepare(workdir: str) -> None:
    """The workdir checked (storage.check_writable: one line now instead of a traceback after
    loading and compiling) and, on a local disk, created."""
    storage.check_writable(workdir)
    if not storage.is_remote(workdir):
        os.makedirs(workdir, exist_ok=True)


def check_free_space(workdir: str, variables, copies: int = 3) -> None:
    """A checkpoint holds the weights, the momentum buffer and about a MiB of metadata: refuse
    to start without room for `copies` of that (orbax writes the next before it removes the
    oldest). A disk that fills later fails the save in one line (`writing`)."""
    if storage.is_remote(workdir):
        return
    arrays = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(variables))
    need = copies * (2 * arrays + 2**20)
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise UserError(f"--workdir {workdir!r} has {free / 2**20:.0f} MiB free; checkpoints need "
                        f"about {need / 2**20:.0f} MiB; free space or choose another workdir")


# ---------------------------------------------------------------------------------------------
# Opening a workdir: the stored metadata read once, each check once

# Config keys a resumed run may change: they do not change what is trained. The model is
# compared on its own (`check_model`): another model is refused whatever the flags.
FREE_TO_CHANGE = ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "keep_best",
                  "eval_batch_size", "data.data_dir", "responses_images", "responses_every",
                  "profile_steps", "profile_every_process")
MODEL_KEYS = ("model", "model_options")


@dataclasses.dataclass
class Workdir:
    """An open workdir: its checkpoint manager, its steps, and the newest step whose metadata
    reads (`step`, None in a fresh workdir or one whose every step is damaged) with that
    metadata (`stored`)."""
    path: str
    mngr: ocp.CheckpointManager
    step: Optional[int]
    stored: Dict
    allow_change: bool = False
    damaged: Tuple[int, ...] = ()  # steps `resume` found damaged and left in place
    meta: Dict = dataclasses.field(default_factory=dict)  # this run's, for its checkpoints

    @property
    def steps(self) -> List[int]:
        return self.mngr.all_steps()

    def check_config(self, config: ml_collections.ConfigDict) -> None:
        """Before any data loads: another model is refused; another data set, batch, schedule
        or optimizer too (naming each change) unless `allow_change`."""
        if self.step is None:
            return
        check_model(self.path, self.step, self.stored, config.model, dict(config.model_options))
        changes = config_changes(self.stored, config)
        if changes and not self.allow_change:
            raise UserError(f"workdir {self.path!r} (step {self.step}) was trained with another "
                            f"config: {'; '.join(changes)}; rerun with the same config, choose "
                            "another --workdir, or pass --allow_config_change to resume with "
                            "this one")
        if changes:
            log.warning("resuming %s with a changed config: %s", self.path, "; ".join(changes))

    def check_data(self, meta: Dict) -> None:
        """Once the data are loaded (`meta`: the run's checkpoint metadata, kept for `save`): the
        number of classes and the classes by name must match, the training images too unless
        `allow_change`."""
        self.meta = meta
        if self.step is None:
            return
        theirs = (self.stored.get("model_options") or {}).get("num_classes")
        if theirs is not None and theirs != meta["model_options"]["num_classes"]:
            check_model(self.path, self.step, self.stored, meta["model"], meta["model_options"])
        if self.stored.get("classes") and self.stored["classes"] != meta["classes"]:
            sources.check_classes("the data of this run", meta["classes"], self.stored["classes"],
                                  f"workdir {self.path!r} (step {self.step})'s")
        if _data_changed(self.path, self.step, self.stored, meta, self.allow_change):
            log.warning("resuming %s on changed training data", self.path)


    def resume(self, target):
        """The train state of the newest intact step (`restore`), or None in a fresh workdir: a
        damaged step is reported in one line and left in place, never deleted, and remembered
        for `save`; every step damaged is a UserError."""
        damaged, state = [], None
        for step in sorted(self.steps, reverse=True):
            try:
                state = restore(self.mngr, step, target)
                break
            except checkpoint.DamagedCheckpoint as e:
                damaged.append(step)
                log.warning("%s; left in place, trying the step before it", e)
        if state is None and damaged:
            raise UserError(f"every checkpoint in {str(self.mngr.directory)!r} is damaged (steps "
                            f"{sorted(damaged)}, see above); choose another --workdir")
        self.damaged = tuple(damaged)
        if state is not None and parallel.is_main_process():
            log.info("resumed from %s step %d%s", self.path, int(jax.device_get(state.step)),
                     f" (the damaged steps {damaged} are left in place)" if damaged else "")
        return state

    def save(self, state, metrics: Dict) -> Optional[int]:
        """Start an asynchronous save of the train state `state` at its step with this run's
        metadata (`checkpoint.save`: the model and train items, the optimizer state's copies of
        the parameters stored stacked too): the step saved, or None where a damaged checkpoint
        of that step is in the way (orbax does not write over a step: that one stays as it was
        found)."""
        step = int(jax.device_get(state.step))
        if step in self.damaged:
            log.warning("step %d is not saved: the damaged checkpoint of that step is in the way "
                        "(remove %s to let a run save it)", step,
                        os.path.join(str(self.mngr.directory), str(step)))
            return None
        if step not in self.mngr.all_steps():
            with writing(self.mngr, step):
                checkpoint.save(self.mngr, step, self.meta, metrics, model=state.variables,
                                train=state.train_item())
        return step

    def wait(self, step: int) -> None:
        """Until every save has finished (`step` names the latest in a failure's line)."""
        with writing(self.mngr, step):
            self.mngr.wait_until_finished()


def read(mngr: ocp.CheckpointManager, workdir: str, allow_change: bool = False) -> Workdir:
    """The workdir `mngr` manages, with the metadata of its newest step that reads (`resume`
    reports the damaged ones)."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            return Workdir(workdir, mngr, step, checkpoint.read_metadata(workdir, step, mngr=mngr),
                           allow_change)
        except checkpoint.DamagedCheckpoint:
            continue
    return Workdir(workdir, mngr, None, {}, allow_change)


@contextlib.contextmanager
def open_workdir(workdir: str, config: ml_collections.ConfigDict, allow_change: bool = False,
                 best_metric: Optional[str] = None) -> Iterator[Workdir]:
    """The workdir made (`prepare`), locked (`Lock`, by process 0), seen by every process
    (parallel.check_shared_directory), its metadata read and checked against `config`; the
    checkpoint manager keeps `config.keep_checkpoints` and the `config.keep_best` best by
    `best_metric`, and is closed (its saves finished) on the way out."""
    prepare(workdir)
    with Lock(workdir, enabled=parallel.is_main_process()):
        parallel.check_shared_directory(workdir)
        mngr = checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints,
                                  best_metric=best_metric, keep_best=config.keep_best)
        try:
            opened = read(mngr, workdir, allow_change)
            opened.check_config(config)
            yield opened
        except BaseException:
            with contextlib.suppress(Exception):  # quietly: a second error would hide the first
                mngr.close()
            raise
        with writing(mngr, mngr.latest_step()):
            mngr.close()


def _json_normal(value):
    return json.loads(json.dumps(value))


def _flatten(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def config_changes(stored: Dict, config: ml_collections.ConfigDict) -> List[str]:
    """['lr 0.1 -> 0.2', ...]: what differs between the config in a checkpoint's metadata and
    `config`, but for FREE_TO_CHANGE and the model; none for converted weights (no config)."""
    if not stored.get("config"):
        return []
    before = _flatten(_json_normal(stored["config"]))
    now = _flatten(json.loads(config.to_json_best_effort()))
    for side in (before, now):  # the same folder however named; its content: check_data
        side["data.source"] = sources.identity(str(side.get("data.source", "")))
    return [f"{key} {before.get(key, '(absent)')!r} -> {now.get(key, '(absent)')!r}"
            for key in sorted(set(before) | set(now))
            if key not in FREE_TO_CHANGE and key.split(".")[0] not in MODEL_KEYS
            and before.get(key) != now.get(key)]


def check_model(workdir: str, step: int, stored: Dict, model: str, options: Dict) -> None:
    """Refuses a workdir holding another model; `options` without num_classes (before the data
    is loaded) compare with the stored ones without it too."""
    theirs = dict(stored.get("model_options") or {})
    if "num_classes" not in options:
        theirs.pop("num_classes", None)
    if (stored.get("model"), theirs) != (model, _json_normal(options)):
        raise UserError(f"workdir {workdir!r} holds a checkpoint of {stored.get('model')} "
                        f"{stored.get('model_options')} (step {step}), not of {model} "
                        f"{_json_normal(options)}; choose another --workdir")


# ---------------------------------------------------------------------------------------------
# The train state's checkpoints


class WriteFailed(UserError):
    """The workdir stopped taking files (full, or made read-only) during training."""
    exit_at_once = True


@contextlib.contextmanager
def writing(mngr, step: int):
    """A failed write (a full disk, a workdir made read-only) as one line; earlier steps stay.
    A UserError (a non-finite state refused before writing) is already its own line."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        raise WriteFailed(f"could not write the checkpoint of step {step} in "
                          f"{str(mngr.directory)!r} ({first_line(e)}); the steps saved "
                          "before it are kept; free space or fix permissions and rerun the same "
                          "command to resume") from None


def restore(mngr: ocp.CheckpointManager, step: int, target):
    """The train state saved at `step`, verified against its checksums
    (checkpoint.DamagedCheckpoint), in the model's layout and placed as `target` says."""
    directory = str(mngr.directory)
    meta = checkpoint.read_metadata(directory, step, mngr=mngr)
    restored = checkpoint.restore_checked(mngr, directory, step, meta, dict(
        model=target.variables, train=target.train_item()))
    train = dict(restored["train"])
    step, opt_state = train.pop("step"), train.pop("opt_state")
    return target.replace(**restored["model"], step=step, opt_state=opt_state,
                          schedule=schedule_lib.restored(train, target.schedule))


# ---------------------------------------------------------------------------------------------
# The lock: one trainer per workdir


class WorkdirInUse(UserError):
    """Another trainer holds the workdir."""


class Lock:
    """`workdir/trainer.lock`, a small JSON file naming its owner (host, pid, start time) and a
    heartbeat the owner rewrites every `HEARTBEAT` seconds from a daemon thread. It works the
    same on a local disk and on object storage (storage.path; no POSIX lock, which gs:// lacks).

    A lock is live unless its owner is on this host and its pid has exited (a SIGKILLed run is
    taken over at once), or its heartbeat is older than `STALE` seconds (an owner on another
    host, or a reused pid, lost). A live lock refuses the second trainer naming the first; a
    stale one is taken over with a warning. Taking over writes the new owner and reads it back
    `SETTLE` seconds later, so of two trainers starting together one sees the other's token and
    is refused. `enabled`
    False (processes other than 0 of a multi-process run) makes it a no-op."""

    NAME = "trainer.lock"
    HEARTBEAT = 20.0
    STALE = 120.0
    SETTLE = 1.0

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = storage.path(workdir) / self.NAME
        self.enabled = enabled
        self.owner = dict(host=socket.gethostname(), pid=os.getpid(), started=time.time(),
                          token=uuid.uuid4().hex)
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self) -> None:
        held = self._read()
        if held is not None:
            why = stale_because(held, time.time(), self.STALE)
            if not why:
                raise WorkdirInUse(
                    f"workdir {str(self.path.parent)!r} is in use by the trainer pid "
                    f"{held.get('pid')} on host {held.get('host')!r} (started "
                    f"{_when(held.get('started'))}, alive {time.time() - held['heartbeat']:.0f} s "
                    "ago); wait for it to finish or stop it, or choose another --workdir")
            log.warning("taking over the lock of %s: %s", self.path.parent, why)
        self._write()
        time.sleep(self.SETTLE)  # a trainer that read no lock just before ours has written by now
        mine = self._read()
        if mine is None or mine.get("token") != self.owner["token"]:
            raise WorkdirInUse(f"workdir {str(self.path.parent)!r} was taken by another trainer "
                               f"starting at the same time ({_who(mine)}); choose another "
                               "--workdir")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
        self._thread.start()

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        held = self._read()
        if held is not None and held.get("token") == self.owner["token"]:
            self.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT):
            held = self._read()
            if held is None or held.get("token") != self.owner["token"]:
                log.warning("the lock of %s was taken by %s", self.path.parent, _who(held))
                return
            try:
                self._write()
            except OSError as e:  # a full disk: the loop reports it at its next write
                log.warning("cannot renew the lock of %s (%s)", self.path.parent, e)

    def _write(self) -> None:
        """Whole or not at all (storage.write: a rename on a local disk, one object on gs://)."""
        storage.write(str(self.path), json.dumps(dict(self.owner, heartbeat=time.time())))

    def _read(self) -> Optional[Dict]:
        try:
            held = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # unreadable: as old as the file
            return dict(heartbeat=self._mtime(), host="?", pid="?")
        if not isinstance(held, dict) or not isinstance(held.get("heartbeat"), (int, float)):
            return dict(heartbeat=self._mtime(), host="?", pid="?")
        return held

    def _mtime(self) -> float:
        try:
            return self.path.stat().mtime
        except OSError:
            return 0.0


def stale_because(held: Dict, now: float, stale_after: float) -> str:
    """Why the lock `held` no longer keeps anyone out, or '' if it does."""
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) \
            and not _alive(held["pid"]):
        return f"its trainer (pid {held['pid']} on this host) has exited"
    age = now - held["heartbeat"]
    if age > stale_after:
        return f"its trainer ({_who(held)}) has not renewed it for {age:.0f} s"
    return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _who(held: Optional[Dict]) -> str:
    if not held:
        return "nobody"
    return f"pid {held.get('pid')} on host {held.get('host')!r}"


def _when(t) -> str:
    if not isinstance(t, (int, float)):
        return "at an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def run_metadata(config: ml_collections.ConfigDict, model_options: Dict, data) -> Dict:
    """A training run's checkpoint metadata (`Workdir.check_data` compares it with the stored
    one, `save` stores it): the model, its input normalisation, the data (`splits.make_data`'s:
    source, classes, the training images' fingerprint) and the whole config."""
    return checkpoint.metadata(config.model, model_options, data.normalization, extra=dict(
        image_size=data.image_size, dataset=config.data.source, classes=list(data.classes),
        train_data=data.fingerprint, config=json.loads(config.to_json_best_effort())))
