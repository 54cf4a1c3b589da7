"""oneDNN's convolutions (forward and both backward ones) as the CPU backend's convolution.

XLA:CPU runs the CIFAR nets' 3x3 convolutions at about 55 GFLOP/s; oneDNN, the library PyTorch
uses on CPUs, runs them at 200-270 GFLOP/s on the same cores, backward ones included. This module
compiles `onednn_conv.cc` (XLA FFI handlers around oneDNN) the first time a process needs it,
caches the library under $RESNET_JAX_CACHE/kernels (default ~/.cache/resnet_jax), and registers
it with `jax.ffi`. Where the build cannot happen (no C++ compiler, no oneDNN headers: on Debian
or Ubuntu `apt-get install g++ libdnnl-dev`), `available()` says so once in the log and the
caller keeps XLA's convolutions: the same network, only slower.

The same library holds `materialize`, an identity XLA cannot fuse through (kernels/cpu/__init__.py
says why), and `image_moments`, per-image moments of a conv's output as it is written
(kernels/cpu/moments.py).

RESNET_JAX_ONEDNN=0 turns it off (to measure against, or to rule it out).
"""
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).with_name("onednn_conv.cc")
_TARGETS = {"resnet_jax_conv_forward": "ResnetJaxConvForward",
            "resnet_jax_conv_backward_data": "ResnetJaxConvBackwardData",
            "resnet_jax_conv_backward_weights": "ResnetJaxConvBackwardWeights",
            "resnet_jax_materialize": "ResnetJaxMaterialize",
            "resnet_jax_image_moments": "ResnetJaxImageMoments"}
Pads = Tuple[Tuple[int, int], ...]


def _cache_dir() -> Path:
    root = os.environ.get("RESNET_JAX_CACHE", os.path.expanduser("~/.cache/resnet_jax"))
    return Path(root) / "kernels"


# -march=native: the moments kernel's loops vectorise to the host's widest lanes (AVX-512 here:
# its cost per stage-3 layer fell from 11 % to 4 % of conv+BN+ReLU). oneDNN JITs for the host
# anyway; only our own loops depend on it, and so the cache key names the CPU (`_cpu_signature`).
_CXXFLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def _cpu_signature() -> bytes:
    """What the CPU can run, for the cache key: a home directory shared by hosts of different
    CPUs (a cluster's NFS) must not hand one host a library built for another's instructions."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("flags", "Features", "model name"))]
        return "".join(sorted(set(lines))).encode()
    except OSError:
        return f"{platform.machine()} {platform.processor()}".encode()


def _library_path(compiler: str, include: str) -> Path:
    key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), include.encode(), compiler.encode(),
                                     jax.__version__.encode(), " ".join(_CXXFLAGS).encode(),
                                     _cpu_signature()])).hexdigest()[:16]
    return _cache_dir() / f"onednn_conv-{key}.so"


def _compile(compiler: str, include: str, out: Path) -> None:
    """Builds the library into `out` atomically: processes that start together (one per host
    device, tests) either find a whole library or build their own copy and rename it over."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [compiler, *_CXXFLAGS, f"-I{include}", str(_SOURCE), "-o", tmp, "-ldnnl"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise OSError(f"{compiler} failed: {last}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _include_dirs():
    """Where the compiler looks for headers by default, plus this Python's prefix (conda)."""
    extra = os.environ.get("CPATH", "") + ":" + os.environ.get("CPLUS_INCLUDE_PATH", "")
    return ["/usr/include", "/usr/local/include", os.path.join(sys.prefix, "include"),
            *filter(None, extra.split(":"))]


def _unbuildable() -> Optional[str]:
    """Why the library cannot be built here, or None; looks at files only, compiles nothing."""
    if os.environ.get("RESNET_JAX_ONEDNN", "1") == "0":
        return "RESNET_JAX_ONEDNN=0"
    if not any(os.path.isfile(os.path.join(d, "oneapi", "dnnl", "dnnl.hpp"))
               for d in _include_dirs()):
        return "oneDNN's headers not found (apt-get install libdnnl-dev, or set CPATH)"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
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
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    include = jax.ffi.include_dir()
    path = _library_path(compiler, include)
    try:
        if not path.exists():
            _compile(compiler, include, path)
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
    it runs right after x is made, while x is in cache (unordered, XLA ran it after the fused
    BN+ReLU). Ordering it by aliasing x through the kernel instead made x's buffer hold two
    values, and XLA then gave the BN+ReLU a fresh output buffer rather than writing in place:
    2.9 -> 4-8 ms per plain-20 step of stage-1 BN+ReLU."""
    stats = jax.ShapeDtypeStruct((x.shape[0], x.shape[-1]), jnp.float32)
    mean, m2 = jax.ffi.ffi_call(_registered("resnet_jax_image_moments"), (stats, stats),
                                vmap_method="sequential")(x)
    return jax.lax.optimization_barrier((x, mean, m2))
