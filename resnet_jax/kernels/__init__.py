"""Faster kernel sets for one kind of device, chosen by the devices a program runs on.

Models compute with `models.compute.XLA` unless given another `Kernels`; this package builds the
others (today: the CPU's, `kernels.cpu`) and `for_devices` is the one place that chooses:

    kernels = resnet_jax.kernels.for_devices(mesh.devices.flat)
    model = resnet_jax.create_model("resnet56", kernels=kernels)

The choice follows the *target* devices, never the host's default backend: a program compiled for
TPU devices from a CPU host (resnet_jax.compile) gets exactly the program a TPU host would build.
"""
from typing import Iterable

import jax

from resnet_jax.models.compute import XLA, Kernels


def for_devices(devices: Iterable[jax.Device]) -> Kernels:
    """The fastest kernels for a program over `devices`: the CPU's sets for CPU devices (imported
    only then), XLA's for GPUs and TPUs, whose compilers need no help."""
    devices = list(devices)
    if devices and all(d.platform == "cpu" for d in devices):
        from resnet_jax.kernels import cpu
        return cpu.for_devices(devices)
    return XLA
