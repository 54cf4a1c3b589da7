"""The CPU backend's kernel sets, and every switch that tunes the CPU backend, in one place.

Two sets, both the same maths as `models.compute.XLA`:
- `ONEDNN`: float32 convolutions (forward and both backward ones) by oneDNN's kernels, the
  library PyTorch uses on CPUs, through `onednn_conv` (built on first use where `g++` and
  `libdnnl-dev` are installed); block outputs materialised; responses' moments taken in cache.
  For a program on one CPU device: oneDNN's kernels use every core by themselves, and GSPMD
  cannot split a custom call over devices (it would gather the batch and repeat the whole
  convolution on each).
- `CANONICAL`: XLA's convolutions with a canonical VJP (`fast_conv.conv_nhwc`), for programs
  over several CPU devices or where oneDNN cannot be built.

`for_devices` picks one; `use_cpu_cores` gives the CPU backend its devices before it starts.
RESNET_JAX_ONEDNN=0 turns oneDNN off (to measure against, or to rule it out).
"""
import os
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from resnet_jax.kernels.cpu import fast_conv, onednn_conv
from resnet_jax.kernels.cpu.moments import InCacheMoments
from resnet_jax.models.compute import Kernels

# Without oneDNN, XLA:CPU runs one program per device, and at the zoo's layer sizes its
# convolutions barely use a second core; a batch sharded over several CPU devices keeps every core
# busy (BatchNorm's statistics stay the whole batch's: the step is one GSPMD program). Two devices
# per core, a power of two so that batches split, at most 8, trained fastest (benchmarks/run.py).
DEVICES_PER_CORE = 2
MAX_DEVICES = 8


def materialize(x: jax.Array) -> jax.Array:
    """A residual block's output (float32), kept as a buffer.

    XLA:CPU fuses cheap elementwise producers into every consumer, duplicating them. In an
    unrolled stage block k's output is relu(bn(conv) + x_k), and XLA recomputes x_k from x_{k-1},
    and so on back to the stage's input, in the forward pass and in every backward ReLU: fusions
    quadratic in depth. A custom call stops the duplication."""
    return onednn_conv.materialize(x) if x.dtype == jnp.float32 else x


ONEDNN = Kernels(conv_general_dilated=fast_conv.onednn_conv_general_dilated,
                 materialize=materialize, response_tap=InCacheMoments, name="cpu-onednn")
CANONICAL = Kernels(conv_general_dilated=fast_conv.conv_general_dilated, name="cpu-xla")


def for_devices(devices: Sequence[jax.Device]) -> Kernels:
    """The set for a program over these CPU devices: `ONEDNN` on one device where the library
    builds (building it now, not at trace time), else `CANONICAL`."""
    return ONEDNN if len(devices) == 1 and onednn_conv.available() else CANONICAL


def default_device_count(cores: Optional[int] = None, onednn: Optional[bool] = None) -> int:
    """How many devices the CPU backend should have: one where oneDNN's kernels will be used
    (`onednn`; by default whether they can be built here), else `DEVICES_PER_CORE` per core of
    `cores` (by default this process's), a power of two, at most `MAX_DEVICES`."""
    if onednn is None:
        onednn = onednn_conv.buildable()
    if onednn:
        return 1
    cores = cores or len(os.sched_getaffinity(0))
    wanted = min(DEVICES_PER_CORE * cores, MAX_DEVICES)
    return 1 << (wanted.bit_length() - 1)


# With several CPU devices, each device's program runs on its own thread and hands none of its
# operations to the shared pool: an all-reduce blocks its thread until every device arrives, so a
# handed-off all-reduce can hold a thread that another device's next operation waits for
# (a deadlock). docs/performance.md has the measurements.
SEQUENTIAL_DEVICES = "--xla_cpu_multi_thread_eigen=false"


def use_cpu_cores(batch_sizes: Sequence[int] = ()) -> int:
    """Set up the CPU backend before it starts (the CLIs call this first thing) and return its
    device count: `default_device_count()`, halved until it splits every one of `batch_sizes`,
    unless the user chose a count (JAX_NUM_CPU_DEVICES, jax.config's jax_num_cpu_devices, or
    XLA_FLAGS' --xla_force_host_platform_device_count); with more than one device, also
    SEQUENTIAL_DEVICES unless XLA_FLAGS sets that flag. Harmless with an accelerator: only the
    CPU client changes, and meshes take the default backend's devices. -1: a backend had already
    started, and nothing was changed."""
    xla_flags = os.environ.get("XLA_FLAGS", "")
    given = re.search(r"xla_force_host_platform_device_count=(\d+)", xla_flags)
    count = jax.config.jax_num_cpu_devices
    if count < 1 and given:
        count = int(given.group(1))
    if count < 1:
        count = default_device_count()
        while any(size % count for size in batch_sizes):
            count //= 2
        try:
            jax.config.update("jax_num_cpu_devices", count)
        except RuntimeError:  # a program that embeds us already started JAX: keep its devices
            return -1
    if count > 1 and "xla_cpu_multi_thread_eigen" not in xla_flags:
        os.environ["XLA_FLAGS"] = f"{xla_flags} {SEQUENTIAL_DEVICES}".strip()
    return count
