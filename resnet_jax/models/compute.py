"""How a network's layers are computed: the `Kernels` value every network of the zoo takes.

A `Kernels` changes how the same maths runs, never what it computes: the same parameters, the
same outputs up to float rounding, whichever set a program uses. The default, `XLA`, is portable
(GPU, TPU, any CPU): lax's convolution and no barriers. Faster sets for one kind of device are
built outside `models/` (resnet_jax.kernels.cpu) and passed in by the caller:
`create_model("resnet56", kernels=resnet_jax.kernels.for_devices(jax.devices()))`.
"""
import dataclasses
from typing import Any, Callable, Optional

from jax import lax


def _identity(x):
    return x


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The swappable parts of a network's computation.

    conv_general_dilated: `lax.conv_general_dilated`'s signature; every conv layer calls it.
    materialize: applied to each residual block's output; the identity, or a barrier that keeps
        a backend from recomputing the output in every consumer.
    response_tap: None, or a factory of objects with `intercept(next_fun, args, kwargs, context)`
        and `lookup(response)` that `responses.capture_responses(reduce=image_moments)` uses to
        take a response's per-image moments where these kernels make them cheaply.
    name: for logs.
    """

    conv_general_dilated: Callable = lax.conv_general_dilated
    materialize: Callable = _identity
    response_tap: Optional[Callable[[], Any]] = None
    name: str = "xla"


XLA = Kernels()
