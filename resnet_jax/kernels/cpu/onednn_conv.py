"""oneDNN's convolutions (forward and both backward ones) as the CPU backend's convolution.

XLA:CPU runs the CIFAR nets' 3x3 convolutions at about 55 GFLOP/s; oneDNN, the library PyTorch
uses on CPUs, runs them at 200-270 GFLOP/s on the same cores, backward ones included. This module
compiles `onednn_conv.cc` (XLA FFI handlers around oneDNN) the first time a process needs it
(resnet_jax/native.py: cached under $RESNET_JAX_CACHE/kernels) and registers it with `jax.ffi`.
Where the build cannot happen (no C++ compiler, no oneDNN headers: on Debian or Ubuntu `apt-get
install g++ libdnnl-dev`), `available()` says so once in the log and the caller keeps XLA's
convolutions: the same network, only slower.

The same library holds `materialize`, an identity XLA cannot fuse through (kernels/cpu/__init__.py
says why), and `image_moments`, per-image moments of a conv's output as it is written
(kernels/cpu/moments.py).

RESNET_JAX_ONEDNN=0 turns it off (to measure against, or to rule it out).
"""
import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import native

_SOURCE = Path(__file__).with_name("onednn_conv.cc")
_TARGETS = {"resnet_jax_conv_forward": "ResnetJaxConvForward",
            "resnet_jax_conv_backward_data": "ResnetJaxConvBackwardData",
            "resnet_jax_conv_backward_weights": "ResnetJaxConvBackwardWeights",
            "resnet_jax_materialize": "ResnetJaxMaterialize",
            "resnet_jax_image_moments": "ResnetJaxImageMoments"}
Pads = Tuple[Tuple[int, int], ...]


# -march=native: the moments kernel's loops vectorise to the host's widest lanes
# (docs/performance.md). oneDNN JITs for the host anyway; only our own loops depend on it
# (resnet_jax/native.py keys the cache by the CPU).
_CXXFLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def _command(compiler: str, include: str) -> Tuple[str, ...]:
    return (compiler, *_CXXFLAGS, f"-I{include}")


def _library_path(compiler: str, include: str) -> Path:
    return native.library_path("onednn_conv", _SOURCE, _command(compiler, include),
                               key=[jax.__version__.encode()])


def _unbuildable() -> Optional[str]:
    """Why the library cannot be built here, or None; looks at files only, compiles nothing."""
    if os.environ.get("RESNET_JAX_ONEDNN", "1") == "0":
        return "RESNET_JAX_ONEDNN=0"
    if not native.has_header("oneapi/dnnl/dnnl.hpp"):
        return "oneDNN's headers not found (apt-get install libdnnl-dev, or set CPATH)"
    if native.compiler("CXX", "g++") is None:
        return "no C++ compiler (install g++ or set CXX)"
    return None


def buildable() -> bool:
    """Whether the kernels can be built here, without building them: what the CLIs ask at start,
    before they know the backend (a GPU or TPU host with oneDNN installed compiles nothing)."""
    return _unbuildable() is None


@functools.lru_cache(maxsize=None)
def _load() -> Optional[str]:
    """Registers the FFI targets; returns None, or why they are not there."""
    why_not = _unbuildable()
    if why_not is not None:
        return why_not
    compiler = native.compiler("CXX", "g++")
    include = jax.ffi.include_dir()
    try:
        path = native.build(_library_path(compiler, include), _SOURCE,
                            _command(compiler, include), ["-ldnnl"])
        library = ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:
        return f"{e} (apt-get install libdnnl-dev, or RESNET_JAX_ONEDNN=0 to stop trying)"
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    return None


def available() -> bool:
    """Whether the oneDNN convolutions are registered (building them on first call)."""
    why_not = _load()
    if why_not is not None:
        _log_once(why_not)
    return why_not is None


@functools.lru_cache(maxsize=None)
def _log_once(why_not: str) -> None:
    logging.info("oneDNN convolutions off, XLA's in use: %s", why_not)


def _registered(target: str) -> str:
    """`target`, its library built and registered first: a caller may hold `kernels.cpu.ONEDNN`
    without having asked `available()`, and XLA only finds a registered handler."""
    why_not = _load()
    if why_not is not None:
        raise RuntimeError(f"oneDNN's kernels are not available here ({why_not}); use "
                           "resnet_jax.kernels.for_devices(devices) to get the kernels that are")
    return target


def _call(target: str, out_shape, a, b, strides, pads):
    # vmap (bn_group_size's groups) runs the kernel once per group: each is a whole batch to it.
    return jax.ffi.ffi_call(_registered(target), jax.ShapeDtypeStruct(out_shape, jnp.float32),
                            vmap_method="sequential")(
        a, b, strides=np.asarray(strides, np.int64),
        padding=np.asarray([p for pair in pads for p in pair], np.int64))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, w: jax.Array, strides: Tuple[int, int], pads: Pads) -> jax.Array:
    """`lax.conv_general_dilated(x, w, strides, pads)` for float32 NHWC x and HWIO w."""
    out = [(n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in
           zip(x.shape[1:3], w.shape[:2], strides, pads)]
    return _call("resnet_jax_conv_forward", (x.shape[0], *out, w.shape[3]), x, w, strides, pads)


def _fwd(x, w, strides, pads):
    return conv(x, w, strides, pads), (x, w)


def _bwd(strides, pads, residuals, dy):
    x, w = residuals
    dx = _call("resnet_jax_conv_backward_data", x.shape, dy, w, strides, pads)
    dw = _call("resnet_jax_conv_backward_weights", w.shape, x, dy, strides, pads)
    return dx, dw


conv.defvjp(_fwd, _bwd)


@jax.custom_vjp
def materialize(x: jax.Array) -> jax.Array:
    """`x` (float32), through a custom call: XLA cannot fuse across it, so its consumers read
    `x`'s buffer instead of recomputing `x` from its producers (kernels/cpu/__init__.py says why)."""
    return jax.ffi.ffi_call(_registered("resnet_jax_materialize"),
                            jax.ShapeDtypeStruct(x.shape, x.dtype),
                            input_output_aliases={0: 0}, vmap_method="broadcast_all")(x)


materialize.defvjp(lambda x: (materialize(x), None), lambda _, g: (g,))


def image_moments(x: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """(x, mean, M2) for float32 x [N, ..., C]: per image and channel the mean and the sum of
    squared deviations ([N, C] each), and x itself, for the consumers to read instead. Not
    differentiable.

    The kernel only reads x; the optimization barrier makes x's other consumers wait for it, so
    it runs right after x is made, while x is in cache. It is ordered by the barrier, not by
    aliasing x through the kernel, which would keep XLA from writing the BN+ReLU in place."""
    stats = jax.ShapeDtypeStruct((x.shape[0], x.shape[-1]), jnp.float32)
    mean, m2 = jax.ffi.ffi_call(_registered("resnet_jax_image_moments"), (stats, stats),
                                vmap_method="sequential")(x)
    return jax.lax.optimization_barrier((x, mean, m2))
