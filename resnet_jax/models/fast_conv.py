"""A drop-in `lax.conv_general_dilated` that trains fast on the CPU backend, and the two
structural choices that go with it there (`scan_unroll`, `materialize`).

On the CPU, float32 convolutions go to oneDNN (`onednn_conv`: about 4x XLA's own kernels,
backward ones included) where it is installed and the program has one device (the CLIs' default
then); everything else gets XLA's convolutions with the VJP below.

XLA:CPU hands a convolution to its fast (Eigen) kernel only in canonical form: NHWC input,
HWIO kernel, NHWC output. Autodiff's two backward convolutions are not canonical (dw contracts
over the batch); XLA rewrites them at the top level of a program but not inside a while loop
(jax-ml/jax issue 12868), where they fall to a naive loop emitter. `Stage` runs its identical
blocks under `nn.scan`, i.e. a while loop, so without this a ResNet-20 train step takes ~20x
longer. Here the VJP writes dx and dw as canonical convolutions with explicit transposes:
the same sums as autodiff's, so the same network (the forward pass is `lax`'s own call).

`conv_general_dilated` picks this only on the CPU backend, at trace time: GPU and TPU keep
XLA's own convolutions, which their compilers canonicalise everywhere.
"""
import functools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.models import onednn_conv

NHWC = ("NHWC", "HWIO", "NHWC")
Pads = Tuple[Tuple[int, int], ...]


def _conv(x, w, strides, pads, lhs_dilation=(1, 1), rhs_dilation=(1, 1), precision=None):
    return lax.conv_general_dilated(x, w, strides, pads, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=NHWC,
                                    precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_nhwc(x, w, strides: Tuple[int, int], pads: Pads, precision=None):
    """`lax.conv_general_dilated(x, w, strides, pads)` on NHWC/HWIO with a canonical VJP."""
    return _conv(x, w, strides, pads, precision=precision)


def _fwd(x, w, strides, pads, precision):
    return _conv(x, w, strides, pads, precision=precision), (x, w)


def _bwd(strides, pads, precision, residuals, dy):
    x, w = residuals
    spatial_in, kernel, spatial_out = x.shape[1:3], w.shape[:2], dy.shape[1:3]
    # The input rows each output row saw span (out - 1) * stride + 1 positions of the padded
    # input; rows past that (when stride does not divide the padded size) got no gradient.
    span = [(o - 1) * s + 1 for o, s in zip(spatial_out, strides)]

    # dx: the transposed convolution. Dilate dy by the stride, correlate with the kernel
    # flipped in space and with in/out swapped; pad so that it lines up with x again.
    w_t = jnp.swapaxes(w[::-1, ::-1], 2, 3)
    dx_pads = tuple((k - 1 - lo, n + lo - d) for k, (lo, _), n, d in
                    zip(kernel, pads, spatial_in, span))
    dx = _conv(dy, w_t, (1, 1), dx_pads, lhs_dilation=strides, precision=precision)

    # dw[i, j, c, o] = sum_{n, h, w} x_pad[n, h*s + i, w*s + j, c] dy[n, h, w, o]: a convolution
    # of x (channels as batch, batch as features) with dy as the kernel, dilated by the stride.
    dw_pads = tuple((lo, k - 1 + d - n - lo) for k, (lo, _), n, d in
                    zip(kernel, pads, spatial_in, span))
    dw = _conv(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)), (1, 1), dw_pads,
               rhs_dilation=strides, precision=precision)
    return dx.astype(x.dtype), jnp.transpose(dw, (1, 2, 0, 3)).astype(w.dtype)


conv_nhwc.defvjp(_fwd, _bwd)


def _is_nhwc(lhs, rhs, dimension_numbers) -> bool:
    if dimension_numbers is None:  # lax's default is NCHW
        return False
    return (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated`; where the backend is the CPU and the convolution is a plain 2-D
    NHWC one (all of the zoo's), oneDNN's for float32 where `onednn_conv.usable()`, else
    `conv_nhwc`."""
    plain = (jax.default_backend() == "cpu" and lhs.ndim == 4
             and not any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
             and feature_group_count == 1 and batch_group_count == 1
             and preferred_element_type is None and _is_nhwc(lhs, rhs, dimension_numbers))
    if not plain:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if lhs.dtype == rhs.dtype and cpu_kernels(lhs.dtype):
        return onednn_conv.conv(lhs, rhs, strides, pads)
    return conv_nhwc(lhs, rhs, strides, pads, precision)


# The longest run of identical blocks that `Stage` unrolls on the CPU. Under a rolled scan each
# block's saved activations are copied into stacked buffers in the forward pass and out again in
# the backward pass (ResNet-110: 250 of 1350 ms per train step); unrolled, they stay where they
# were made. 17 is ResNet-110's (18 blocks a stage): its train step compiles in 8-9 s unrolled.
# Longer stages (ResNet-1202's 199, ResNet-152's 36) stay rolled, for compile time.
MAX_UNROLLED_BLOCKS = 17


def cpu_kernels(dtype) -> bool:
    """Whether work in `dtype` goes to the native CPU kernels (`onednn_conv`) here."""
    return (jax.default_backend() == "cpu" and dtype == jnp.float32
            and onednn_conv.usable())


def scan_unroll(length: int, dtype) -> int:
    """How many of a stage's `length` identical blocks (computing in `dtype`) one iteration of
    its scan runs: all of them on the CPU with the oneDNN kernels, where it was measured
    (ResNet-56's train step 683 -> 581 ms, ResNet-110's 1350 -> 1150 ms with `materialize`);
    one elsewhere (GPU and TPU: not measured, so left as they were)."""
    return length if length <= MAX_UNROLLED_BLOCKS and cpu_kernels(dtype) else 1


def materialize(x: jax.Array) -> jax.Array:
    """A residual block's output, kept as a buffer on the CPU with the oneDNN kernels.

    XLA:CPU fuses cheap elementwise producers into every consumer, duplicating them. In an
    unrolled stage block k's output is relu(bn(conv) + x_k), and XLA recomputed x_k from
    x_{k-1}, and so on back to the stage's input, in the forward pass and in every backward
    ReLU: fusions of up to 60 operands, quadratic in depth (ResNet-110's train step: 230 ms of
    elementwise work instead of 45; ResNet-56's evaluation: 43 ms instead of 13). A custom call
    stops the duplication; elsewhere this is the identity."""
    return onednn_conv.materialize(x) if cpu_kernels(x.dtype) else x
