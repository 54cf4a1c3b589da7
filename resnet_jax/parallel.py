"""Many processes, many devices, one program: `jax.distributed` start-up, the data-parallel mesh,
and host-local arrays turned into global ones.

Contract of `initialize_distributed` (the launchers build on it): call it once, first thing, before
anything touches a JAX backend. It starts `jax.distributed` when this process is one of several
and does nothing for a lone process. Where the processes come from, in this order: explicit
arguments (the train CLI's --coordinator_address/--num_processes/--process_id flags), else the
environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (all three, for
hand-started processes such as launch/local_multiprocess.sh or ssh), else JAX's own cluster
detection (Cloud TPU VM pod slices, SLURM with srun, Open MPI's mpirun, Kubernetes JobSets), which
fills in all three. A single process (num_processes 1, or nothing set and no cluster found) is a
no-op and returns False; a started or already started runtime returns True. A partial set of
variables (say an address without a process id) is a UserError, not a hang.
"""
import collections
import os
import uuid
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax.errors import UserError

DATA_AXIS = "data"
ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _cluster_detected() -> bool:
    """True under a multi-host launcher that jax.distributed recognises by itself."""
    try:  # jax's detectors are private; without them only explicit settings start the runtime
        from jax._src import clusters
        return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types
                   if not env.opt_in_only_method)
    except Exception:  # noqa: BLE001 - a detector that breaks means "no cluster", not a crash
        return False


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
    """Start jax.distributed if this is one of several processes (see the module docstring)."""
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if num_processes == 1 and process_id in (None, 0):
        return False
    if all(given):
        if not 0 <= process_id < num_processes:
            raise UserError(f"process id {process_id} is outside 0..{num_processes - 1}; each of the "
                            f"{num_processes} processes needs its own id")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if any(given):
        missing = [f"{flag} (or {env})" for flag, env, g in zip(
            ("--coordinator_address", "--num_processes", "--process_id"), ENV_VARS, given) if not g]
        raise UserError("a multi-process run needs the coordinator address, the process count and "
                        f"this process's id; missing: {', '.join(missing)}")
    if _cluster_detected():
        jax.distributed.initialize()
        return True
    return False


class InFlight:
    """At most `depth` dispatched CPU computations left unfinished: `add` each step's output, and
    it waits for the one `depth` steps back. XLA:CPU with several devices can deadlock when one
    device runs far ahead of an all-reduce the others wait in, so the loops that dispatch steps
    in a row use this; two ahead keep a device busy while the host queues the next. Outputs on
    GPUs or TPUs pass through: their runtimes bound their own queues."""

    def __init__(self, depth: int = 2):
        self.depth = depth
        self._queue = collections.deque()

    def add(self, outputs):
        leaf = jax.tree.leaves(outputs)[0]
        if next(iter(leaf.devices())).platform != "cpu":
            return
        self._queue.append(outputs)
        if len(self._queue) > self.depth:
            jax.block_until_ready(self._queue.popleft())


def is_main_process() -> bool:
    """Process 0 logs, writes metrics and reports; every process takes part in checkpoints."""
    return jax.process_index() == 0


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh over every device of every process (or `devices`), axis `data`. Devices are
    grouped by process, so each process holds one contiguous run of a batch's rows."""
    devices = sorted(jax.devices() if devices is None else devices,
                     key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`, the rest whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size"):
    devices = mesh.devices.size
    if batch_size % devices:
        raise UserError(f"{what} {batch_size} does not split over {devices} devices; use a "
                        f"multiple of {devices}")


def process_rows(sharding: NamedSharding, global_size: int) -> slice:
    """The contiguous rows of a global batch that this process's devices hold (and so feeds)."""
    index_map = sharding.addressable_devices_indices_map((global_size,))
    rows = sorted({(s[0].start or 0, global_size if s[0].stop is None else s[0].stop)
                   for s in index_map.values()})
    start, stop = rows[0][0], rows[-1][1]
    covered = sum(b - a for a, b in rows)
    if covered != stop - start:  # a mesh that interleaves processes; make_mesh never builds one
        raise ValueError(f"this process's rows {rows} are not contiguous")
    return slice(start, stop)


def global_array(local: np.ndarray, sharding: NamedSharding, global_size: int) -> jax.Array:
    """This process's rows of a batch -> the global array sharded along `data`."""
    return jax.make_array_from_process_local_data(
        sharding, local, (global_size,) + tuple(local.shape[1:]))


def global_batch(arrays, sharding: NamedSharding, global_size: int):
    """Each process passes the whole global batch (every process computes the same one, as the
    deterministic CIFAR and evaluation pipelines do); only its own rows are copied to devices."""
    rows = process_rows(sharding, global_size)
    return jax.tree.map(lambda a: global_array(np.asarray(a)[rows], sharding, global_size), arrays)


def replicate(tree, mesh: Mesh):
    """Host values (identical on every process) -> arrays replicated over the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a), np.shape(a)), tree)


def check_shared_directory(path: str):
    """With several processes, `path` must be one directory that every process sees (GCS, NFS):
    checkpoints written to host-local disks cannot be restored. Process 0 writes a marker; after a
    barrier every process looks for it; all fail together with one message if any cannot see it."""
    if jax.process_count() == 1:
        return
    from etils import epath
    from jax.experimental import multihost_utils

    token = multihost_utils.broadcast_one_to_all(np.frombuffer(uuid.uuid4().bytes, np.uint32))
    marker = epath.Path(path) / f".shared-check-{''.join(f'{int(t):08x}' for t in token)}"
    if is_main_process():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("written by process 0 to check that every process sees this directory\n")
    multihost_utils.sync_global_devices("shared-check-written")
    seen = np.asarray(marker.exists(), np.int32)
    all_seen = multihost_utils.process_allgather(seen)
    multihost_utils.sync_global_devices("shared-check-read")
    if is_main_process():
        marker.unlink(missing_ok=True)
    blind = [i for i, s in enumerate(np.ravel(all_seen)) if not s]
    if blind:
        raise UserError(f"workdir {path!r} is not shared: processes {blind} of {jax.process_count()} "
                        "cannot see what process 0 wrote there; use a directory every host reaches "
                        "(a gs:// bucket on TPU VMs, a shared file system on GPU hosts)")
