"""Global batches on the mesh: the training split kept in device memory and augmented there, and
evaluation batches over a whole split.

Training order is a function of (seed, step) alone: epoch e is the permutation drawn from
numpy's Generator seeded with (seed, e), cut into `len // batch_size` batches (the few images left
over differ from epoch to epoch, so none is left out for good); the crop and flip draws come from
`fold_in(key(seed), step)`. A run resumed at step s therefore sees exactly the batches an
uninterrupted run would, on any number of devices or processes. Every process computes the same
indices and feeds only its own rows of them; the pixels never leave the devices.
"""
import time
from typing import Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import parallel
from resnet_jax.data import augment, batching
from resnet_jax.data.sources import Dataset
from resnet_jax.errors import UserError


class EpochOrder:
    """`order(step)`: the image indices (int32 [batch_size]) of the global batch at `step`; epoch
    e is the permutation seeded by (seed, e), cut into `size // batch_size` batches."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.steps_per_epoch = size // batch_size
        self._epoch = (None, None)

    def __call__(self, step: int) -> np.ndarray:
        epoch, i = divmod(int(step), self.steps_per_epoch)
        if self._epoch[0] != epoch:
            order = np.random.default_rng((self.seed, epoch)).permutation(self.size)
            self._epoch = (epoch, order.astype(np.int32))
        return self._epoch[1][i * self.batch_size:(i + 1) * self.batch_size]


class DeviceInput:
    """Augmented training batches of `batch_size` (global) from a split held on every device."""

    def __init__(self, dataset: Dataset, batch_size: int, mesh: jax.sharding.Mesh, *,
                 seed: int = 0, pad: int = 4, augment_images: bool = True):
        parallel.check_batch_size(batch_size, mesh)
        if len(dataset) < batch_size:
            raise UserError(f"{dataset.name} has {len(dataset)} images, fewer than one batch of "
                            f"{batch_size}; lower batch_size")
        self.batch_size = batch_size
        self.indices = EpochOrder(len(dataset), batch_size, seed)
        self.steps_per_epoch = self.indices.steps_per_epoch
        self.sharding = parallel.batch_sharding(mesh)
        self.images = parallel.replicate(dataset.images, mesh)
        self.labels = parallel.replicate(dataset.labels, mesh)
        key = jax.random.key(seed)

        def make(images, labels, index, step):
            x = images[index]
            if augment_images:
                x = augment.pad_crop_flip(x, jax.random.fold_in(key, step), pad)
            return x, labels[index]

        self._make = jax.jit(make, out_shardings=(self.sharding, self.sharding))

    def batch(self, step: int) -> Tuple[jax.Array, jax.Array]:
        """(uint8 images [B, H, W, 3], int32 labels [B]), sharded along `data`; no host sync."""
        index = parallel.global_batch(self.indices(step), self.sharding, self.batch_size)
        return self._make(self.images, self.labels, index, jnp.int32(step))


def eval_batches(dataset: Dataset, batch_size: int, mesh: jax.sharding.Mesh
                 ) -> Iterator[Tuple[jax.Array, jax.Array, jax.Array]]:
    """(images, labels, mask) over the whole split, sharded; the last batch padded and masked."""
    parallel.check_batch_size(batch_size, mesh, "eval_batch_size")
    sharding = parallel.batch_sharding(mesh)
    for arrays in batching.padded_batches(dataset.images, dataset.labels, batch_size):
        yield parallel.global_batch(arrays, sharding, batch_size)


def input_throughput(dataset: Dataset, batch_size: int = 128, mesh: Optional[jax.sharding.Mesh] = None,
                     steps: int = 50, warmup: int = 3, seed: int = 0) -> float:
    """Images/s of producing augmented global training batches on the mesh, as the training loop
    does (index upload, gather, crop, flip), measured to the last batch being ready."""
    source = DeviceInput(dataset, batch_size, mesh or parallel.make_mesh(), seed=seed)
    for step in range(warmup):
        jax.block_until_ready(source.batch(step))
    start = time.perf_counter()
    out = [source.batch(warmup + i) for i in range(steps)]
    jax.block_until_ready(out)
    return steps * batch_size / (time.perf_counter() - start)
