"""The paper's building blocks: conv, BN, the response tap, shortcuts A/B/C, basic and bottleneck
blocks, and a stage of blocks.

Blocks take `conv` and `norm` by injection (as in flax's examples/imagenet), so one definition
serves train/eval BN, float32/bfloat16 and any `compute.Kernels`.
"""
import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from resnet_jax.models import layout
from resnet_jax.models.compute import XLA, Kernels

ModuleDef = Any

# He et al. 2015 (the paper's ref. [13]): zero-mean Gaussian, std sqrt(2 / fan_in); untruncated,
# as PyTorch's kaiming_normal_, so a network initialised here starts like the reference ones.
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

# PyTorch's BatchNorm2d defaults: eps 1e-5, running = 0.9 * running + 0.1 * batch.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv_padding(kernel_size: int):
    """PyTorch/Caffe's symmetric `k // 2` padding; 'SAME' pads a stride-2 conv asymmetrically,
    which shifts the sampling grid and breaks imported weights."""
    return ((kernel_size // 2, kernel_size // 2),) * 2


class Conv(nn.Conv):
    """nn.Conv with the paper's defaults: no bias (BN follows), He init, symmetric padding."""

    use_bias: bool = False
    kernel_init: Callable = he_normal

    def __post_init__(self):
        if self.padding == "SAME":
            k = self.kernel_size[0] if isinstance(self.kernel_size, (tuple, list)) else self.kernel_size
            object.__setattr__(self, "padding", conv_padding(k))
        super().__post_init__()


class Response(nn.Module):
    """Identity marker on a 3x3 conv layer's response: its BN output, before ReLU and before the
    residual addition (the quantity of the paper's Fig. 7). `responses.capture_responses` records
    exactly the outputs of these modules through `capture_intermediates`."""

    @nn.compact
    def __call__(self, x):
        return x


class Shortcut(nn.Module):
    """The paper's shortcut options (Sec. 3.3): A, identity with zero-padding for new channels;
    B, projection only where the shape changes; C, projection everywhere."""

    features: int
    strides: int
    option: str
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x):
        reshape = self.strides != 1 or x.shape[-1] != self.features
        if self.option == "C" or (self.option == "B" and reshape):
            x = self.conv(self.features, (1, 1), self.strides, padding="VALID", name="conv")(x)
            return self.norm(name="bn")(x)
        if not reshape:
            return x
        # Option A as the public PyTorch reproduction has it (and so its trained weights load):
        # subsample by taking every `strides`-th pixel, put the identity in the middle channels.
        x = x[:, :: self.strides, :: self.strides, :]
        extra = self.features - x.shape[-1]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class Block(nn.Module):
    """What basic and bottleneck blocks share: the last BN, then the shortcut and the ReLU."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    residual: bool = True
    shortcut: str = "A"
    act: Callable = nn.relu
    zero_init_last: bool = False  # the last BN's gamma starts at 0: each block starts as identity
    kernels: Kernels = XLA

    def finish(self, x, y, bn_name: str, response_name: Optional[str] = None):
        """`x` the block's input, `y` its last conv's output -> the block's output. The last
        conv's BN output is a response where that conv is a 3x3 one (`response_name`)."""
        scale_init = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
        y = self.norm(name=bn_name, scale_init=scale_init)(y)
        if response_name:
            y = Response(name=response_name)(y)
        if not self.residual:
            return self.act(y)
        y = y + Shortcut(y.shape[-1], self.strides, self.shortcut, self.conv, self.norm,
                         name="shortcut")(x)
        return self.kernels.materialize(self.act(y))


class BasicBlock(Block):
    """Two 3x3 convs (Fig. 2 / Fig. 5 left); `residual=False` gives the plain counterpart."""

    @nn.compact
    def __call__(self, x):
        y = self.conv(self.features, (3, 3), self.strides, name="conv1")(x)
        y = self.act(Response(name="response1")(self.norm(name="bn1")(y)))
        y = self.conv(self.features, (3, 3), name="conv2")(y)
        return self.finish(x, y, "bn2", "response2")


class Bottleneck(Block):
    """1x1 reduce, 3x3, 1x1 expand to 4x (Fig. 5 right). `stride_in_3x3=False` is the paper's
    layout (the stride in the first 1x1 conv); True is torchvision's "v1.5"."""

    stride_in_3x3: bool = False

    @nn.compact
    def __call__(self, x):
        s1, s3 = (1, self.strides) if self.stride_in_3x3 else (self.strides, 1)
        y = self.conv(self.features, (1, 1), s1, padding="VALID", name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), s3, name="conv2")(y)
        y = self.act(Response(name="response2")(self.norm(name="bn2")(y)))
        y = self.conv(4 * self.features, (1, 1), padding="VALID", name="conv3")(y)
        return self.finish(x, y, "bn3")


def _apply_block(block, x, _):
    return block(x), None


class Stage(nn.Module):
    """A stage of `num_blocks` blocks (a row of Table 1): `block0` may change the shape; the
    identical rest are separate modules `block1`, `block2`, ..., or, past
    `layout.MAX_UNROLLED_BLOCKS` of them, one rolled `nn.scan` (`blocks`, parameters stacked on a
    leading axis), which compiles once however deep the net. The choice depends on the number of
    blocks alone, so a network has one parameter tree whatever its kernels (`models/layout.py`)."""

    block: ModuleDef  # a block class partially applied with everything but features/strides
    features: int
    num_blocks: int
    strides: int

    @nn.compact
    def __call__(self, x):
        x = self.block(self.features, self.strides, name="block0")(x)
        identical = self.num_blocks - 1
        if layout.runs_scanned(identical):
            scan = nn.scan(_apply_block, variable_axes={True: 0},
                           split_rngs={"params": True, "dropout": True}, length=identical)
            x, _ = scan(self.block(self.features, 1, name=layout.SCANNED), x, None)
        else:
            for b in range(1, self.num_blocks):
                x = self.block(self.features, 1, name=layout.block_name(b))(x)
        return x


def _keyword(default):
    return dataclasses.field(default=default, kw_only=True)


class Network(nn.Module):
    """Options every network of the zoo shares (keyword-only), and its input and output ends."""

    dtype: Any = _keyword(jnp.float32)  # compute dtype: bfloat16 on TPU/GPU
    param_dtype: Any = _keyword(jnp.float32)
    bn_momentum: float = _keyword(BN_MOMENTUM)
    bn_epsilon: float = _keyword(BN_EPSILON)
    # How the layers are computed (models/compute.py): XLA's, portable, unless the caller passes
    # a faster set for the devices the program runs on (resnet_jax.kernels.for_devices).
    kernels: Kernels = _keyword(XLA)
    # The side of the square images the net expects, checked on every call; None: any size
    # (registry.create_model sets it from the net's preprocessing unless told otherwise).
    input_size: Optional[int] = _keyword(None)

    def begin(self, x, train: bool):
        """NHWC RGB images -> (images in the compute dtype, conv, norm) for this network, after
        refusing, in one line each, what would otherwise run and give wrong numbers."""
        check_input(x, self.input_size, type(self).__name__)
        self.check_mode(train)
        conv, norm = make_conv_norm(train, self.dtype, self.param_dtype, self.bn_momentum,
                                    self.bn_epsilon, self.kernels)
        return jnp.asarray(x, self.dtype), conv, norm

    def check_mode(self, train: bool):
        """Training mode is explicit: BN statistics are updated exactly when `train=True` and
        the `batch_stats` collection is mutable, and nothing else is accepted."""
        if self.is_initializing():
            return
        stats = self.is_mutable_collection("batch_stats")
        if stats and not train:
            raise ModelUsageError(
                "apply(..., mutable=['batch_stats']) without train=True computes in eval mode and "
                "leaves BN statistics unchanged; pass train=True to train, or drop mutable")
        if train and not stats and self.has_batch_norm():
            raise ModelUsageError("train=True updates BN statistics: apply with "
                                  "mutable=['batch_stats'] (or train=False to evaluate)")

    def has_batch_norm(self) -> bool:
        return True

    def outputs(self, x, stages, features: bool):
        """The end of every net: logits from the pooled features `x`, or with `features=True`
        {'stage1': ..., 'pooled': x} (each stage's output, then the pooled features) for use as
        a backbone, without the classifier."""
        if features:
            return {**stages, "pooled": x}
        return self.classify(x)

    def dense(self, features: int, name: str):
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def classify(self, x):
        """The classifier (`fc`); logits in float32 whatever the compute dtype."""
        return jnp.asarray(self.dense(self.num_classes, "fc")(x), jnp.float32)


class ModelUsageError(ValueError):
    """A network called in a way that would run and give wrong numbers; the message names the
    fix."""


def check_input(x, input_size: Optional[int], net: str) -> None:
    """Refuse images that are not a float NHWC RGB batch [N, S, S, 3] with S = `input_size`."""
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 4:
        hint = "; a single image: x[None]" if len(shape) == 3 else ""
        raise ModelUsageError(f"{net} takes a batch of NHWC images [N, H, W, 3], not shape "
                              f"{shape}{hint}")
    if shape[-1] != 3:
        if shape[1] == 3:
            raise ModelUsageError(f"{net} takes NHWC images [N, H, W, 3]; these {shape} look NCHW: "
                                  "jnp.transpose(x, (0, 2, 3, 1))")
        raise ModelUsageError(f"{net} takes RGB images, 3 channels on the last axis, not "
                              f"{shape[-1]} (shape {shape})")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ModelUsageError(
            f"{net} takes normalised float images, not {jnp.dtype(x.dtype).name}: "
            "x = resnet_jax.preprocessing(name)(images) does (images / 255 - mean) / std")
    if input_size is not None and shape[1:3] != (input_size, input_size):
        raise ModelUsageError(
            f"{net} expects {input_size}x{input_size} images, not {shape[1]}x{shape[2]}: resize "
            "them, or create_model(..., input_size=None) to run it at any size")


def make_conv_norm(train: bool, dtype, param_dtype, bn_momentum: float, bn_epsilon: float,
                   kernels: Kernels = XLA):
    """The conv and norm that every block of one network shares, convolving with `kernels`."""
    conv = functools.partial(Conv, dtype=dtype, param_dtype=param_dtype,
                             conv_general_dilated=kernels.conv_general_dilated)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=bn_momentum,
                             epsilon=bn_epsilon, dtype=dtype, param_dtype=param_dtype)
    return conv, norm


def global_average_pool(x):
    return jnp.mean(x, axis=(1, 2))

