"""A run's data splits, whichever pipeline serves them: what the training loop needs from a data
set (`Data`), built from the config (`make_data`)."""
import dataclasses
import functools
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from resnet_jax import checkpoint
from resnet_jax.data import pipeline, sources


@dataclasses.dataclass
class Data:
    """What the loop needs from a data set, whichever pipeline serves it."""
    train: Any  # .batch(step) -> (uint8 images, int32 labels), global and sharded
    val: Callable[[], Iterator]  # -> (images, labels, mask) batches over the validation split
    test: Optional[Callable[[], Iterator]]  # evaluated once at the end, if held apart from val
    normalization: checkpoint.Normalization
    classes: Tuple[str, ...]  # the training split's, by name; the other splits are checked by it
    image_size: int
    description: str
    val_images: Callable[[int], Any]  # n -> the first n validation images (uint8), for responses
    fingerprint: Optional[Dict] = None  # sources.fingerprint of the training split, if in memory


def load_splits(config) -> Tuple[sources.Dataset, sources.Dataset, Optional[sources.Dataset]]:
    """(train, val, test) in memory: with a holdout, val is carved from the training split and
    test is evaluated once at the end; without, the test split is the validation split."""
    d = config.data
    load = functools.partial(sources.load, d.source, data_dir=d.data_dir or None)
    train = load(d.train_split)
    test = load(d.test_split, classes=train.classes, whose=f"the {d.train_split!r} split's")
    if d.holdout:
        train, val = sources.holdout(train, d.holdout)
        return train, val, test
    return train, test, None


def make_data(config, mesh) -> Data:
    """`data.pipeline='device'`: CIFAR-sized splits in device memory, augmented there;
    `'host'`: tfds imagenet2012 or an image folder read, decoded and cropped on each host
    (data/imagenet.py)."""
    d = config.data
    if d.pipeline == "host":
        return _host_data(config, mesh)
    train, val, test = load_splits(config)
    evals = lambda ds: (lambda: pipeline.eval_batches(ds, config.eval_batch_size, mesh))
    return Data(
        train=pipeline.DeviceInput(train, config.batch_size, mesh, seed=config.seed, pad=d.pad,
                                   augment_images=d.pad > 0),
        val=evals(val), test=evals(test) if test is not None else None,
        normalization=checkpoint.Normalization(sources.mean_image(train.images)),
        classes=train.classes, image_size=train.images.shape[1],
        description=f"train {train.name} ({len(train)}), val {val.name} ({len(val)})",
        val_images=lambda n: val.images[:n], fingerprint=sources.fingerprint(train))


def _host_data(config, mesh) -> Data:
    from resnet_jax.data import imagenet
    d = config.data
    data_dir = d.data_dir or None
    train = imagenet.open_split(d.source, d.train_split, data_dir)
    val = imagenet.open_split(d.source, d.test_split, data_dir)
    sources.check_classes(val.name, val.classes, train.classes, f"{train.name}'s")
    crop = dict(size=d.image_size, resize=d.eval_resize)
    return Data(
        train=imagenet.HostInput(train.source, config.batch_size, mesh, seed=config.seed,
                                 size=d.image_size, scale=d.scale, pca_std=d.pca_std,
                                 workers=d.workers, prefetch=d.prefetch),
        val=lambda: imagenet.eval_batches(val.source, config.eval_batch_size, mesh,
                                          ten_crop=d.ten_crop, threads=d.threads, **crop),
        test=None,
        normalization=checkpoint.Normalization(imagenet.mean_image(
            train.source, d.mean_images, threads=d.threads, **crop)),
        classes=train.classes, image_size=d.image_size,
        description=f"train {train.name} ({len(train)}), val {val.name} ({len(val)})",
        val_images=lambda n: imagenet.DecodedCrops(val.source, count=n, threads=d.threads, **crop))

