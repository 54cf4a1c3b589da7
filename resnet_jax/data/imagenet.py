"""ImageNet input on the host: tfds `imagenet2012` read by random access (a tfds data source in
ArrayRecord format, prepared once by the user into their data_dir, a gs:// path on a TPU VM),
decoded and augmented (data/augment.py) by a thread pool, each process building only its own rows
of the global batch.

The order follows CIFAR's rule (data/pipeline.py): epoch e is the permutation seeded by (seed, e);
image i of step s draws its augmentation from numpy's Generator seeded by (seed, s, i), so a
resumed run sees the same batches. This module is deliberately thin: it cannot be tested without
the data, and everything it does to pixels lives in augment.py, which is tested.
"""
import concurrent.futures
from typing import Iterator, Optional, Tuple

import jax
import numpy as np

from resnet_jax import parallel
from resnet_jax.data import augment, batching, pipeline
from resnet_jax.errors import UserError


def data_source(split: str, data_dir: Optional[str], name: str = "imagenet2012"):
    """Random access to a prepared tfds split (examples: {'image': uint8 HWC, 'label': int})."""
    import tensorflow_datasets as tfds
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001 - tfds raises many kinds; the user needs where and how
        raise UserError(f"cannot open tfds {name!r} split {split!r} in data_dir {data_dir!r} "
                        f"({e.__class__.__name__}); prepare it once with tfds build {name} "
                        "--file_format=array_record --data_dir=DIR, then pass "
                        "--config.data.data_dir=DIR") from None


class HostInput:
    """Augmented training batches of `batch_size` (global); this process decodes only its rows."""

    def __init__(self, source, batch_size: int, mesh: jax.sharding.Mesh, *, seed: int = 0,
                 size: int = 224, scale: Tuple[int, int] = (256, 480),
                 pca_std: float = augment.PCA_STD, threads: int = 32):
        parallel.check_batch_size(batch_size, mesh)
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.size, self.scale, self.pca_std = size, tuple(scale), pca_std
        self.indices = pipeline.EpochOrder(len(source), batch_size, seed)
        self.steps_per_epoch = self.indices.steps_per_epoch
        self.sharding = parallel.batch_sharding(mesh)
        self.rows = parallel.process_rows(self.sharding, batch_size)
        self.pool = concurrent.futures.ThreadPoolExecutor(threads)

    def _example(self, step: int, row: int, index: int):
        ex = self.source[int(index)]
        rng = np.random.default_rng((self.seed, step, row))
        image = augment.imagenet_train(np.asarray(ex["image"]), rng, size=self.size,
                                       scale=self.scale, pca_std=self.pca_std)
        return image, np.int32(ex["label"])

    def batch(self, step: int) -> Tuple[jax.Array, jax.Array]:
        index = self.indices(step)
        rows = range(self.rows.start, self.rows.stop)
        out = list(self.pool.map(lambda r: self._example(step, r, index[r]), rows))
        images = np.stack([im for im, _ in out])
        labels = np.asarray([lb for _, lb in out], np.int32)
        return (parallel.global_array(images, self.sharding, self.batch_size),
                parallel.global_array(labels, self.sharding, self.batch_size))


def eval_batches(source, batch_size: int, mesh: jax.sharding.Mesh, *, size: int = 224,
                 resize: int = 256, ten_crop: bool = False, threads: int = 32
                 ) -> Iterator[Tuple[jax.Array, jax.Array, jax.Array]]:
    """(images, labels, mask) over the whole split: centre crops [B, size, size, 3] or 10 crops
    [B, 10, size, size, 3]; the last batch padded and masked (data/batching.py)."""
    sharding = parallel.batch_sharding(mesh)
    rows = parallel.process_rows(sharding, batch_size)
    order = np.arange(len(source))

    def load(index):
        ex = source[int(index)]
        return (augment.imagenet_eval(np.asarray(ex["image"]), size=size, resize=resize,
                                      ten_crop=ten_crop), np.int32(ex["label"]))

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        # padded_batches over indices: the padding rows and the mask follow the one shared rule
        for index, _, mask in batching.padded_batches(order, order, batch_size):
            out = list(pool.map(load, index[rows]))
            images = np.stack([im for im, _ in out])
            labels = np.asarray([lb for _, lb in out], np.int32)
            yield (parallel.global_array(images, sharding, batch_size),
                   parallel.global_array(labels, sharding, batch_size),
                   parallel.global_array(np.asarray(mask)[rows], sharding, batch_size))


def mean_image(source, count: int = 5000, size: int = 224, resize: int = 256, threads: int = 32,
               seed: int = 0) -> np.ndarray:
    """The per-pixel mean (Sec. 3.4) of centre crops of `count` random training images, float32
    [size, size, 3] in [0, 1]; with random crops and flips it is close to a per-channel mean."""
    pick = np.random.default_rng(seed).choice(len(source), min(count, len(source)), replace=False)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        crops = pool.map(lambda i: augment.imagenet_eval(np.asarray(source[int(i)]["image"]),
                                                         size=size, resize=resize), pick)
        total = sum(c.astype(np.float64) for c in crops)
    return (total / (255.0 * len(pick))).astype(np.float32)
