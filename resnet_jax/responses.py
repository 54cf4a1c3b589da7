"""The responses of Fig. 7: which modules they are, capture in depth order, streaming moments.

A layer's response is the output of its `Response` marker (the BN output after a 3x3 conv, before
ReLU and the residual addition). Layer names are the marker's module path with `response` read
as `conv`, e.g. `stage2/block3/conv1`: the conv whose response it is. Blocks that run under
`nn.scan` (`stageS/blocks`, stacked) are unstacked into `blockN` names, so a name never depends
on how the stage is compiled.
"""
import contextlib
import re
from typing import Any, Callable, Dict, Optional, Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models import layout
from resnet_jax.models.layers import Response


_REDUCED = "reduced_responses"  # the collection each response's reduction is sown into


def is_response(module: nn.Module, method_name: str) -> bool:
    """The `capture_intermediates` filter that records exactly the responses:
    `model.apply(variables, x, capture_intermediates=is_response, mutable=["intermediates"])`."""
    return isinstance(module, Response) and method_name == "__call__"


def _layer_name(path: Tuple[str, ...]) -> str:
    return "/".join(p.replace("response", "conv") for p in path)


def _flatten(tree, path=()):
    """Depth-first over the sown tree; flax fills it in call order, and `unstack_blocks` puts a
    stage's scanned blocks where they ran."""
    for key, value in tree.items():
        if key == "__call__":
            yield path, value[0]
        else:
            yield from _flatten(value, path + (key,))


def capture_responses(model: nn.Module, variables, images, *, train: bool = False,
                      rngs=None, reduce: Optional[Callable] = None) -> Dict[str, Any]:
    """Every 3x3 conv layer's response, ordered by depth, keyed by layer name, recorded with
    flax's `capture_intermediates` (filter `is_response`).

    Pure and traceable. `reduce`, a function of one response, runs where the response is made
    (inside the scan over a stage's blocks too) and only its result is kept: a jitted forward
    pass then holds no response longer than the layers need it. With `reduce=image_moments`
    (what Figure 7 needs), the model's kernels may take the moments where they make them cheaply
    (`Kernels.response_tap`; the CPU's: from each conv's output while it is in cache). With
    `train=True`, BN normalises with the batch's statistics (the updated running averages are
    discarded).

    A dict returned from `jax.jit` (or `eval_shape`) comes back with its keys sorted as strings,
    `stage1/block10` before `stage1/block2`: `in_depth_order` puts it back."""
    chex.assert_rank(images, 4)
    if reduce is None:  # flax's own recording, stacked over a scanned stage's blocks
        collection, recording = "intermediates", contextlib.nullcontext()
        kwargs = dict(capture_intermediates=is_response)
    else:
        # capture_intermediates keeps whole responses, which a scan stacks over its blocks;
        # reducing at the same tap keeps only the reduction (a few numbers per layer).
        # The zoo's networks carry their kernels (models/compute.py); other modules have none.
        factory = getattr(getattr(model, "kernels", None), "response_tap", None)
        in_cache = factory() if factory is not None and reduce is image_moments else None

        def tap(next_fun, args, kwargs, context):
            if in_cache is not None:
                out = in_cache.intercept(next_fun, args, kwargs, context)
                if out is not None:
                    return out
            out = next_fun(*args, **kwargs)
            if is_response(context.module, context.method_name):
                reduced = in_cache.lookup(args[0]) if in_cache is not None else None
                if reduced is None:
                    reduced = reduce(out)
                context.module.sow(_REDUCED, "__call__", reduced)
            return out

        collection, recording, kwargs = _REDUCED, nn.intercept_methods(tap), {}
    mutable = [collection, "batch_stats"] if train else [collection]
    with recording:
        _, state = model.apply(variables, images, train=train, rngs=rngs, mutable=mutable, **kwargs)
    return {_layer_name(path): r
            for path, r in _flatten(layout.unstack_blocks(state[collection]))}


def _depth_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def in_depth_order(by_layer: Dict[str, Any]) -> Dict[str, Any]:
    """`capture_responses`'s dict (or any keyed by its layer names) in depth order, whatever
    order its keys come in: names number their stages, blocks and convs in depth order."""
    return {name: by_layer[name] for name in sorted(by_layer, key=_depth_key)}


def image_count(x):
    """Elements of each image per channel of x [N, ..., C], as the count [N] of its moments."""
    return jnp.full(x.shape[:1], float(x.size // (x.shape[0] * x.shape[-1])), jnp.float32)


def image_moments(response):
    """(count [N], mean [N, C], M2 [N, C]) of each image of a response [N, ..., C], per channel,
    in float32; `pool_moments` merges them over images and channels.

    One pass, from sums of d = x - x0 and d^2 with x0 the image's first pixel: near its mean, so
    M2 = sum(d^2) - sum(d)^2 / n cancels nothing large (the shifted-data algorithm)."""
    r = jnp.asarray(response, jnp.float32)
    x0 = r.reshape(r.shape[0], -1, r.shape[-1])[:, 0]
    d = r - x0.reshape((r.shape[0],) + (1,) * (r.ndim - 2) + (r.shape[-1],))
    axes = tuple(range(1, r.ndim - 1))
    s1, s2 = jnp.sum(d, axes), jnp.sum(d * d, axes)
    count = image_count(r)
    n = count[:, None]
    return count, x0 + s1 / n, jnp.maximum(s2 - s1 * s1 / n, 0.0)


def pool_moments(per_image, *, per_channel: bool = False, mask=None):
    """`image_moments` -> (count, mean, M2) over the images where `mask` (bool [N]) is true:
    per channel with `per_channel` (count [C] too), else over everything (`pool_channels`).
    An image's count is [N], or [N, C] where channels differ in it (layers side by side, as
    `analyze` pools them, all in one go). Chan's merge: exact for any split."""
    count, mean, m2 = per_image
    rows = jnp.ones(mean.shape[:1]) if mask is None else jnp.asarray(mask, jnp.float32)
    chex.assert_shape(rows, mean.shape[:1])
    # Sums over images as products with `rows`: XLA:CPU reduces the leading axis of [N, C] in a
    # slow loop (ResNet-20's 688 channels side by side: 1.7 ms a batch), a product in 0.1 ms.
    # HIGHEST: TPUs would otherwise multiply float32 in bfloat16 (8 bits of mantissa).
    over_images = lambda a: jnp.dot(rows, a, precision=jax.lax.Precision.HIGHEST)
    count = jnp.broadcast_to(count.reshape(count.shape[0], -1), mean.shape)
    n = over_images(count)
    some = jnp.maximum(n, 1.0)  # all rows masked (a device's share of padding): (0, mean, 0)
    pooled_mean = jnp.where(n > 0, over_images(count * mean) / some, mean[0])
    pooled_m2 = over_images(m2 + count * jnp.square(mean - pooled_mean))
    if per_channel:
        return n, pooled_mean, pooled_m2
    return pool_channels((n, pooled_mean, pooled_m2))


def pool_channels(per_channel):
    """(count, mean, M2) per channel, [..., C] each -> one over all channels; numpy or jax."""
    n, mean, m2 = per_channel
    total = n.sum(-1)
    overall = (n * mean).sum(-1) / (total + (total == 0))
    return total, overall, m2.sum(-1) + (n * (mean - overall[..., None]) ** 2).sum(-1)


def moments(response, *, per_channel: bool = False, mask=None):
    """(count, mean, M2) of one response [N, ..., C] over its rows where `mask` (bool [N]) is
    true, in float32: M2 is the sum of squared deviations, pooled over all but C by
    `per_channel`, over everything otherwise. Moments of batches merge exactly with
    `merge_moments`, so a split of any size streams through."""
    return pool_moments(image_moments(response), per_channel=per_channel, mask=mask)


def response_moments(responses: Dict[str, jax.Array], *, per_channel: bool = False, mask=None):
    """{layer: `moments` of its response} for responses already captured."""
    return {name: moments(r, per_channel=per_channel, mask=mask) for name, r in responses.items()}


def merge_moments(a, b):
    """Chan, Golub & LeVeque's parallel update of (count, mean, M2); either count may be 0."""
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    some = n + (n == 0)
    delta = mb - ma
    return n, ma + delta * (nb / some), sa + sb + delta * delta * (na * nb / some)
