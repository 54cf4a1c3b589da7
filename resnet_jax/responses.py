"""The responses of Fig. 7: which modules they are, capture in depth order, streaming moments.

A layer's response is the output of its `Response` marker (the BN output after a 3x3 conv, before
ReLU and the residual addition). Layer names are the marker's module path with `response` read
as `conv`, e.g. `stage2/block3/conv1`: the conv whose response it is. Blocks that run under
`nn.scan` (`stageS/blocks`, stacked) are unstacked into `blockN` names, so a name never depends
on how the stage is compiled.
"""
from typing import Dict, Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models.layers import Response


def _is_response(module: nn.Module, method_name: str) -> bool:
    return isinstance(module, Response) and method_name == "__call__"


def _layer_name(path: Tuple[str, ...]) -> str:
    return "/".join(p.replace("response", "conv") for p in path)


def _flatten(tree, path=()):
    """Depth-first over the intermediates tree; flax fills it in call order."""
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
        for b in range(value.shape[0]):
            for p, v in group:
                i = p.index("blocks")
                yield p[:i] + (f"block{b + 1}",) + p[i + 1:], v[b]


def capture_responses(model: nn.Module, variables, images, *, train: bool = False,
                      rngs=None) -> Dict[str, jax.Array]:
    """Every 3x3 conv layer's response, ordered by depth, keyed by layer name.

    Pure and traceable: call it inside `jax.jit` and reduce there, so the responses are never all
    materialised. With `train=True`, BN normalises with the batch's statistics (the updated
    running averages are discarded)."""
    chex.assert_rank(images, 4)
    mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
    _, state = model.apply(variables, images, train=train, rngs=rngs,
                           capture_intermediates=_is_response, mutable=mutable)
    return {_layer_name(path): r for path, r in _in_depth_order(state["intermediates"])}


def response_moments(responses: Dict[str, jax.Array], *, per_channel: bool = False, mask=None):
    """Per layer: count, mean and M2 (sum of squared deviations) of its response, in float32.

    Pooled over N, H, W and C by default; `per_channel=True` keeps a C axis. `mask` (bool [N])
    leaves out padded rows, so a fixed-size last batch counts only its real images. These merge
    exactly across batches with `merge_moments` (Chan et al.), so a split of any size streams
    through."""
    moments = {}
    for name, r in responses.items():
        r = jnp.asarray(r, jnp.float32)
        rows = jnp.ones(r.shape[0], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
        chex.assert_shape(rows, (r.shape[0],))
        w = rows.reshape((-1,) + (1,) * (r.ndim - 1))
        axes = tuple(range(r.ndim - 1)) if per_channel else tuple(range(r.ndim))
        per_row = r.size // r.shape[0] // (r.shape[-1] if per_channel else 1)
        count = jnp.sum(rows) * per_row
        mean = jnp.sum(r * w, axis=axes) / count
        m2 = jnp.sum(w * jnp.square(r - mean), axis=axes)
        moments[name] = (count, mean, m2)
    return moments


def merge_moments(a, b):
    """Chan, Golub & LeVeque's parallel update of (count, mean, M2)."""
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), sa + sb + delta * delta * (na * nb / n)
