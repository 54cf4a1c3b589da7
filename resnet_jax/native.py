"""Native libraries of this package, compiled on the machine that runs them.

A source (`kernels/cpu/onednn_conv.cc`, `data/jpeg_crop.c`) is compiled the first time a process
needs it and cached under $RESNET_JAX_CACHE/kernels (default ~/.cache/resnet_jax), named by a
hash of everything the build depends on: the source, the compiler, its flags and the CPU (the
builds use -march=native, and a home directory shared by hosts of different CPUs, a cluster's
NFS, must not hand one host a library built for another's instructions). Callers check for
headers and a compiler first (`has_header`, `compiler`) and say what to install when they lack
them; nothing here raises past an `OSError` with the compiler's last line.
"""
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence


def cache_dir() -> Path:
    from resnet_jax import storage
    return Path(storage.cache_dir("kernels"))


def cpu_signature() -> bytes:
    """What the CPU can run, for the cache key."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("flags", "Features", "model name"))]
        return "".join(sorted(set(lines))).encode()
    except OSError:
        return f"{platform.machine()} {platform.processor()}".encode()


def include_dirs() -> list:
    """Where the compiler looks for headers by default, plus this Python's prefix (conda)."""
    extra = ":".join(os.environ.get(v, "") for v in ("CPATH", "C_INCLUDE_PATH",
                                                      "CPLUS_INCLUDE_PATH"))
    return ["/usr/include", "/usr/local/include", os.path.join(sys.prefix, "include"),
            *filter(None, extra.split(":"))]


def has_header(relative: str) -> bool:
    return any(os.path.isfile(os.path.join(d, relative)) for d in include_dirs())


def compiler(variable: str, default: str) -> Optional[str]:
    """The compiler $variable names (CC, CXX), else `default`, as a path; None if not installed."""
    return shutil.which(os.environ.get(variable, default))


def library_path(name: str, source: Path, command: Sequence[str], key: Iterable[bytes] = ()) -> Path:
    """Where the build of `source` by `command` (the compiler and its flags) is cached."""
    digest = hashlib.sha256(b"\0".join([source.read_bytes(), " ".join(command).encode(),
                                        cpu_signature(), *key])).hexdigest()[:16]
    return cache_dir() / f"{name}-{digest}.so"


def build(out: Path, source: Path, command: Sequence[str], libraries: Sequence[str]) -> Path:
    """Compiles `source` into the shared library `out` unless it is there; atomically, so that
    processes that start together (one per host device, input workers, tests) either find a whole
    library or build their own copy and rename it over."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([*command, str(source), "-o", tmp, *libraries],
                              capture_output=True, text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise OSError(f"{command[0]} failed: {last}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out
