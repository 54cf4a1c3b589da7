"""Fixed-size batches over a whole split, and counting over them.

Every batch has the same shape, so a jitted step compiles once; the last partial batch is padded
with copies of image 0 and carries a mask of zeros there, so metrics cover every image exactly
once and nothing is dropped.
"""
from typing import Iterator, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def num_batches(count: int, batch_size: int) -> int:
    return -(-count // batch_size)


def padded_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                   shard: Tuple[int, int] = (0, 1)
                   ) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield `(images, labels, mask)` of exactly `batch_size` rows each; mask is bool [batch_size],
    False on the padding of the last batch. `shard=(i, n)`: only batches i, i + n, ... (the others
    are never indexed: a lazily decoding `images` decodes nothing else)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    count = len(labels)
    if len(images) != count:
        raise ValueError(f"{len(images)} images but {count} labels")
    index_of, shards = shard
    for start in range(index_of * batch_size, count, shards * batch_size):
        stop = min(start + batch_size, count)
        index = np.arange(start, start + batch_size)
        mask = index < stop
        index = np.where(mask, index, 0)  # pad with image 0: real pixels, no NaN from zeros
        if stop - start == batch_size:  # a view, no copy, for all but the last batch
            yield images[start:stop], labels[start:stop], mask
        else:
            yield images[index], labels[index], mask


def topk_correct(logits: jax.Array, labels: jax.Array, mask: jax.Array, ks=(1, 5)) -> dict:
    """{f'top{k}': number of unmasked rows whose label is among the k highest logits}, as int32.

    A tie ranks the lower class index first, as `argmax` does, so top-1 agrees with argmax and a
    constant output does not score every row as correct. A row with a non-finite logit or a
    label outside [0, classes) is never correct (every comparison with NaN is false, and so
    would rank it first); `nonfinite_rows` counts the former for the caller to refuse."""
    num_classes = logits.shape[-1]
    valid = (labels >= 0) & (labels < num_classes) & jnp.all(jnp.isfinite(logits), axis=-1)
    index = jnp.clip(labels, 0, num_classes - 1)[:, None]
    label_logit = jnp.take_along_axis(logits, index, axis=-1)
    classes = jnp.arange(num_classes)
    ahead = (logits > label_logit) | ((logits == label_logit) & (classes < labels[:, None]))
    rank = jnp.sum(ahead, axis=-1)  # 0 for the top prediction
    mask = mask.astype(bool) & valid
    return {f"top{k}": jnp.sum((rank < k) & mask, dtype=jnp.int32) for k in ks}


def nonfinite_rows(logits: jax.Array, loss: jax.Array, mask: jax.Array) -> jax.Array:
    """Number of unmasked rows whose logits or loss are NaN or infinite, as int32."""
    bad = ~(jnp.all(jnp.isfinite(logits), axis=-1) & jnp.isfinite(loss))
    return jnp.sum(bad & mask.astype(bool), dtype=jnp.int32)
