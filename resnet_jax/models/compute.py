"""How a network's layers are computed: the `Kernels` value every network of the zoo takes.

A `Kernels` changes how the same maths runs, never what it computes: the same parameters, the
same outputs up to float rounding, whichever set a program uses. The default, `XLA`, is portable
(GPU, TPU, any CPU): lax's convolution, no barriers, and each stage's identical blocks unrolled
where that keeps compile times short (`unroll`). Faster sets for one kind of device are built
outside `models/` (resnet_jax.kernels.cpu) and passed in by the caller:
`create_model("resnet56", kernels=resnet_jax.kernels.for_devices(jax.devices()))`.
"""
import dataclasses
from typing import Any, Callable, Optional

from jax import lax


def _identity(x):
    return x


# The longest run of identical blocks that `Stage` unrolls by default. Unrolled, XLA schedules
# and rematerialises across blocks (under a rolled scan it must save every block's elementwise
# intermediates for the backward pass); rolled, a net compiles once per stage however deep.
# 35 is ResNet-152's deepest stage (36 blocks: block0 and 35 identical ones); ResNet-1202's 199 stay
# rolled so that it compiles in seconds.
MAX_UNROLLED_BLOCKS = 35


def unroll_up_to(max_blocks: int) -> Callable[[int, Any], int]:
    """An unroll policy: a stage's `length` identical blocks all in one scan iteration when there
    are at most `max_blocks` of them, else one block per iteration."""
    def unroll(length: int, dtype) -> int:
        del dtype
        return length if length <= max_blocks else 1
    return unroll


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The swappable parts of a network's computation.

    conv_general_dilated: `lax.conv_general_dilated`'s signature; every conv layer calls it.
    materialize: applied to each residual block's output; the identity, or a barrier that keeps
        a backend from recomputing the output in every consumer.
    unroll: (length, dtype) -> how many of a stage's `length` identical blocks one iteration of
        its `nn.scan` runs (parameters are stacked the same way whatever it says).
    response_tap: None, or a factory of objects with `intercept(next_fun, args, kwargs, context)`
        and `lookup(response)` that `responses.capture_responses(reduce=image_moments)` uses to
        take a response's per-image moments where these kernels make them cheaply.
    name: for logs.
    """

    conv_general_dilated: Callable = lax.conv_general_dilated
    materialize: Callable = _identity
    unroll: Callable[[int, Any], int] = unroll_up_to(MAX_UNROLLED_BLOCKS)
    response_tap: Optional[Callable[[], Any]] = None
    name: str = "xla"


XLA = Kernels()
