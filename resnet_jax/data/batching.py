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


def padded_batches(images: np.ndarray, labels: np.ndarray, batch_size: int
                   ) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield `(images, labels, mask)` of exactly `batch_size` rows each; mask is bool [batch_size],
    False on the padding of the last batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    count = len(labels)
    if len(images) != count:
        raise ValueError(f"{len(images)} images but {count} labels")
    for start in range(0, count, batch_size):
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
    constant output does not score every row as correct."""
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    classes = jnp.arange(logits.shape[-1])
    ahead = (logits > label_logit) | ((logits == label_logit) & (classes < labels[:, None]))
    rank = jnp.sum(ahead, axis=-1)  # 0 for the top prediction
    mask = mask.astype(bool)
    return {f"top{k}": jnp.sum((rank < k) & mask, dtype=jnp.int32) for k in ks}
