"""The responses of Fig. 7: which modules they are, capture in depth order, streaming moments.

A layer's response is the output of its `Response` marker (the BN output after a 3x3 conv, before
ReLU and the residual addition). Layer names are the marker's module path with `response` read
as `conv`, e.g. `stage2/block3/conv1`: the conv whose response it is. Blocks that run under
`nn.scan` (`stageS/blocks`, stacked) are unstacked into `blockN` names, so a name never depends
on how the stage is compiled.
"""
import contextlib
from typing import Any, Callable, Dict, Optional, Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models.layers import Response


_REDUCED = "reduced_responses"  # the collection each response's reduction is sown into


def is_response(module: nn.Module, method_name: str) -> bool:
    """The `capture_intermediates` filter that records exactly the responses:
    `model.apply(variables, x, capture_intermediates=is_response, mutable=["intermediates"])`."""
    return isinstance(module, Response) and method_name == "__call__"


def _layer_name(path: Tuple[str, ...]) -> str:
    return "/".join(p.replace("response", "conv") for p in path)


def _flatten(tree, path=()):
    """Depth-first over the sown tree; flax fills it in call order."""
    for key, value in tree.items():
        if key == "__call__":
            yield path, value[0]
        else:
            yield from _flatten(value, path + (key,))


def _in_depth_order(tree):
    """(path, response) in depth order, scanned blocks unstacked: a `blocks` scope holds each of
    its responses stacked over blocks, so emit them block by block, not response by response."""
    entries = list(_flatten(tree))
    done = set()
    for path, value in entries:
        if "blocks" not in path:
            yield path, value
            continue
        scope = path[: path.index("blocks")]
        if scope in done:
            continue
        done.add(scope)
        group = [(p, v) for p, v in entries if p[: len(scope)] == scope and "blocks" in p]
        for b in range(jax.tree.leaves(value)[0].shape[0]):
            for p, v in group:
                i = p.index("blocks")
                yield p[:i] + (f"block{b + 1}",) + p[i + 1:], jax.tree.map(lambda a: a[b], v)


def capture_responses(model: nn.Module, variables, images, *, train: bool = False,
                      rngs=None, reduce: Optional[Callable] = None) -> Dict[str, Any]:
    """Every 3x3 conv layer's response, ordered by depth, keyed by layer name, recorded with
    flax's `capture_intermediates` (filter `is_response`).

    Pure and traceable. `reduce`, a function of one response, runs where the response is made
    (inside the scan over a stage's blocks too) and only its result is kept: with a reduction
    such as `moments`, a jitted forward pass holds no response longer than the layers need it,
    and the cost over a plain forward pass is one fused read of each. With `train=True`, BN
    normalises with the batch's statistics (the updated running averages are discarded)."""
    chex.assert_rank(images, 4)
    if reduce is None:  # flax's own recording, stacked over a scanned stage's blocks
        collection, recording = "intermediates", contextlib.nullcontext()
        kwargs = dict(capture_intermediates=is_response)
    else:
        # capture_intermediates keeps whole responses, which a scan stacks over its blocks;
        # reducing at the same tap keeps only the reduction (a few numbers per layer).
        def tap(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if is_response(context.module, context.method_name):
                context.module.sow(_REDUCED, "__call__", reduce(out))
            return out

        collection, recording, kwargs = _REDUCED, nn.intercept_methods(tap), {}
    mutable = [collection, "batch_stats"] if train else [collection]
    with recording:
        _, state = model.apply(variables, images, train=train, rngs=rngs, mutable=mutable, **kwargs)
    return {_layer_name(path): r for path, r in _in_depth_order(state[collection])}


def moments(response, *, per_channel: bool = False, mask=None):
    """(count, mean, M2) of one response [N, ..., C] over its rows where `mask` (bool [N]) is
    true, in float32: M2 is the sum of squared deviations, pooled over all but C by
    `per_channel`, over everything otherwise.

    One pass, numerically sound: sums of d = x - shift and of d^2, with shift = row 0's channel
    means (near the true means), so M2 = sum(d^2) - sum(d)^2 / n cancels nothing large (the
    shifted-data algorithm). Channels pool with Chan's merge. Moments of batches merge exactly
    with `merge_moments`, so a split of any size streams through."""
    r = jnp.asarray(response, jnp.float32)
    rows = jnp.ones(r.shape[0], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    chex.assert_shape(rows, (r.shape[0],))
    channels = r.shape[-1]
    shift = jnp.mean(r[0].reshape(-1, channels), axis=0)
    d = r - shift
    n = jnp.sum(rows) * (r.size // (r.shape[0] * channels))  # per channel
    s1 = jnp.einsum("n,n...c->c", rows, d)  # the mask as a contraction: no masked copy
    s2 = jnp.einsum("n,n...c->c", rows, d * d)
    some = jnp.maximum(n, 1.0)  # all rows masked (a device's share of padding): (0, shift, 0)
    mean = shift + s1 / some
    m2 = jnp.maximum(s2 - s1 * s1 / some, 0.0)
    if per_channel:
        return n, mean, m2
    pooled = jnp.mean(mean)
    return n * channels, pooled, jnp.sum(m2) + n * jnp.sum(jnp.square(mean - pooled))


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
