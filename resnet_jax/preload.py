"""tcmalloc for the command line tools, loaded by restarting the command before JAX is imported.

glibc's malloc serves XLA's large per-step buffers with fresh mmaps and returns them on free, so
every step page-faults its working set in again: 220k faults and 0.5 s of system time per
ResNet-56 train step of 1.05 s on 2 cores (getrusage). tcmalloc keeps freed pages: no faults, a
step of 0.69 s. It has to be loaded before anything allocates, hence LD_PRELOAD and a fresh start
of the same command; and this module imports nothing heavy (nor does `resnet_jax` itself), so
the CLIs restart before importing JAX and the restart costs next to nothing.
"""
import ctypes.util
import logging
import os
import sys
from typing import Optional

PRELOADED = "RESNET_JAX_PRELOADED"  # what use_tcmalloc added to LD_PRELOAD (the benchmark reads it)


def tcmalloc_library() -> Optional[str]:
    """The installed tcmalloc's library name (the minimal build first), or None."""
    return next(filter(None, map(ctypes.util.find_library, ("tcmalloc_minimal", "tcmalloc"))), None)


def use_tcmalloc() -> None:
    """Restart this command (same process id, arguments and environment) with tcmalloc preloaded,
    where the system has it (Debian/Ubuntu: apt-get install libtcmalloc-minimal4) and it is not
    loaded yet. The CLIs call this before their imports; RESNET_JAX_TCMALLOC=0 turns it off."""
    preload = os.environ.get("LD_PRELOAD", "")
    if (os.environ.get("RESNET_JAX_TCMALLOC", "1") == "0" or "tcmalloc" in preload
            or not sys.platform.startswith("linux")):
        return
    library = tcmalloc_library()
    if library is None:
        logging.info("tcmalloc not found (apt-get install libtcmalloc-minimal4); glibc's malloc "
                     "costs CPU training about a third of its speed")
        return
    env = dict(os.environ, LD_PRELOAD=f"{library} {preload}".strip(), **{PRELOADED: library})
    # Buffers of a GiB are routine here; tcmalloc would report each one on stderr.
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
