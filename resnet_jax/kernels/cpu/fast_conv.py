"""The CPU backend's convolution: `lax.conv_general_dilated`'s signature, computed by oneDNN's
kernels (`onednn_conv`) or by XLA's with a canonical VJP (`conv_nhwc`).

XLA:CPU hands a convolution to its fast (Eigen) kernel only in canonical form: NHWC input,
HWIO kernel, NHWC output. Autodiff's two backward convolutions are not canonical (dw contracts
over the batch); XLA rewrites them at the top level of a program but not inside a while loop
(jax-ml/jax issue 12868), where they fall to a naive loop emitter. `Stage` runs its identical
blocks under `nn.scan`, i.e. a while loop where it is not unrolled. `conv_nhwc`'s VJP writes dx
and dw as canonical convolutions with explicit transposes: the same sums as autodiff's, so the
same network (the forward pass is `lax`'s own call).

Only for programs that run on the CPU: the caller picks these through `resnet_jax.kernels`.
"""
import functools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.kernels.cpu import onednn_conv

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


def _plain_nhwc(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                dimension_numbers, feature_group_count, batch_group_count, preferred_element_type):
    """(strides, pads) of a plain 2-D NHWC/HWIO convolution (all of the zoo's), else None."""
    if dimension_numbers is None or lhs.ndim != 4:  # lax's default is NCHW
        return None
    if (any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
            or feature_group_count != 1 or batch_group_count != 1
            or preferred_element_type is not None
            or (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                != lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))):
        return None
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    return strides, tuple((int(lo), int(hi)) for lo, hi in padding)


def _conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                          rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                          batch_group_count=1, precision=None, preferred_element_type=None,
                          *, onednn: bool):
    plain = _plain_nhwc(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count, batch_group_count,
                        preferred_element_type)
    if plain is None:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    strides, pads = plain
    if onednn and lhs.dtype == rhs.dtype == jnp.float32:
        return onednn_conv.conv(lhs, rhs, strides, pads)
    return conv_nhwc(lhs, rhs, strides, pads, precision)


def conv_general_dilated(*args, **kwargs):
    """`lax.conv_general_dilated`; a plain 2-D NHWC convolution through `conv_nhwc`."""
    return _conv_general_dilated(*args, **kwargs, onednn=False)


def onednn_conv_general_dilated(*args, **kwargs):
    """`lax.conv_general_dilated`; a plain 2-D NHWC convolution in float32 through oneDNN's
    kernels (which must be `onednn_conv.available()`), in other dtypes through `conv_nhwc`."""
    return _conv_general_dilated(*args, **kwargs, onednn=True)
