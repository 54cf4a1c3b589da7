"""A run's folder, local or gs://: what a resumed run must find unchanged, and the lock that
keeps a second trainer out (`Lock`).

Data identity is by content: the checkpoint's metadata records `sources.fingerprint` of the
training images (`train_data`), and a resume compares that, not the source string (a trailing
slash or a symlink to the same folder is the same data; a folder that grew is not).
"""
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
import uuid
from typing import Dict, Optional

import jax

from resnet_jax import storage
from resnet_jax.errors import UserError

log = logging.getLogger("resnet_jax.train")


def check_data(workdir: str, step: int, stored: Dict, meta: Dict, allow_change: bool) -> bool:
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
    """A local workdir is created and must take a file, a gs:// one be writable
    (storage.check_writable): one line now instead of a traceback after loading and compiling."""
    if "://" in workdir:
        return storage.check_writable(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir!r} is a file; name a directory")
    probe = os.path.join(workdir, f".write-test-{os.getpid()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("x")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write in --workdir {workdir!r} ({e.strerror or e}); choose a "
                        "writable directory") from None


def check_free_space(workdir: str, variables, copies: int = 3) -> None:
    """A checkpoint holds the weights, the momentum buffer and about a MiB of metadata: refuse
    to start without room for `copies` of that (orbax writes the next before it removes the
    oldest). A disk that fills later fails the save in one line (`_writing`)."""
    if "://" in workdir:
        return
    arrays = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(variables))
    need = copies * (2 * arrays + 2**20)
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise UserError(f"--workdir {workdir!r} has {free / 2**20:.0f} MiB free; checkpoints need "
                        f"about {need / 2**20:.0f} MiB; free space or choose another workdir")


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
        tmp = self.path.parent / f".{self.NAME}.{self.owner['token']}"
        tmp.write_text(json.dumps(dict(self.owner, heartbeat=time.time())))
        tmp.replace(self.path)  # whole or not at all (a rename on a local disk, a copy on gs://)

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
