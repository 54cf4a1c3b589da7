"""ImageNet input on the host: encoded images read by random access, from tfds `imagenet2012`
(an ArrayRecord data source prepared once by the user into their data_dir, a gs:// path on a TPU
VM) or an image folder of any sizes (`folder:PATH`, PATH/<split>/<class>/*.JPEG), each process
building only its own rows of every global batch.

Training (`HostInput`) is a grain pipeline: for each of this process's rows, the record's bytes
and the scale augmentation's crop (augment.imagenet_train_crop: only the crop's window decoded
and resized), batched, in `workers` worker processes (grain's mp_prefetch); a thread turns the
batches into global arrays, mirrors and colour-shifts them on the device (augment.flip_lighting)
and keeps `prefetch` of them ready ahead of the step. The order follows CIFAR's rule
(data/pipeline.py): epoch e is the permutation seeded by (seed, e); row r of step s draws its
crop from numpy's Generator seeded by (seed, s, r), its flip and colour from fold_in(key(seed),
s). A batch is therefore a function of (seed, step): a resumed run, or one on other devices,
processes or worker counts, sees the same batches, with no iterator state to checkpoint.

Evaluation (`eval_batches`) streams a split in padded, masked batches, decoding with a thread
pool (PIL decodes and resizes outside the GIL): no split is ever held in memory.
"""
import concurrent.futures
import dataclasses
import os
import queue
import sys
import threading
import time
from typing import Any, Iterator, Optional, Tuple

import jax
import numpy as np

from resnet_jax import parallel, storage
from resnet_jax.data import augment, batching, jpeg, pipeline, sources
from resnet_jax.errors import UserError


# ---------------------------------------------------------------------------------------------
# Where the records come from: {'image': encoded bytes, 'label': int} by index


class FolderSource:
    """An image folder's split, PATH/<split>/<class>/*, classes in sorted order, by random access;
    records are the files' bytes (picklable, so grain's workers can read it)."""

    def __init__(self, root: str, split: str):
        self.classes, files = sources.folder_files(root, split)  # the folder rule of data/sources.py
        self.paths = [p for p, _ in files]
        self.labels = np.asarray([label for _, label in files], np.int32)
        self.num_classes = len(self.classes)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index: int):
        return {"image": storage.read_bytes(self.paths[index]), "label": int(self.labels[index]),
                "path": self.paths[index]}


@dataclasses.dataclass
class Split:
    source: Any  # len() and [index] -> {'image': bytes, 'label': int}
    classes: Tuple[str, ...]  # what a label means, by name
    name: str  # e.g. 'imagenet2012:validation', 'folder:/data/ilsvrc:train'

    def __len__(self):
        return len(self.source)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def open_split(data: str, split: str, data_dir: Optional[str] = None) -> Split:
    """`data` is a tfds name (imagenet2012, prepared as ArrayRecord) or folder:PATH."""
    kind, arg = sources.parse_source(data)
    if kind == "folder":
        folder = FolderSource(arg, split)
        return Split(folder, tuple(folder.classes), f"folder:{arg}:{split}")
    if kind != "tfds":
        raise UserError(f"ImageNet-style input reads a tfds data set or folder:PATH, not {data!r}")
    source = tfds_source(arg, split, data_dir)
    return Split(source, tuple(source.dataset_info.features["label"].names), f"{arg}:{split}")


def tfds_source(name: str, split: str, data_dir: Optional[str]):
    """Random access to a prepared tfds split, images left encoded (decoded by the pipeline)."""
    import tensorflow_datasets as tfds
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:  # noqa: BLE001 - tfds raises many kinds; the user needs where and how
        raise UserError(f"cannot open tfds {name!r} split {split!r} in data_dir {data_dir!r} "
                        f"({e.__class__.__name__}); prepare it once with tfds build {name} "
                        "--file_format=array_record --data_dir=DIR, then pass "
                        "--config.data.data_dir=DIR (or --data_dir=DIR)") from None


# ---------------------------------------------------------------------------------------------
# Training


class TrainCrops:
    """Record k of the training stream -> (uint8 crop [size, size, 3], int32 label): k counts
    this process's rows, step by step. Picklable, for grain's worker processes."""

    def __init__(self, source, num_images: int, batch_size: int, rows: slice, seed: int,
                 size: int, scale: Tuple[int, int]):
        self.source, self.rows, self.seed = source, rows, seed
        self.size, self.scale = size, tuple(scale)
        self.order = pipeline.EpochOrder(num_images, batch_size, seed)

    def __call__(self, k: int):
        local = self.rows.stop - self.rows.start
        step, row = divmod(int(k), local)
        row += self.rows.start
        index = int(self.order(step)[row])
        ex = self.source[index]
        rng = np.random.default_rng((self.seed, step, row))
        return (augment.imagenet_train_crop(ex["image"], rng, size=self.size, scale=self.scale,
                                            name=_name(ex, index)),
                np.int32(ex["label"]))


def _name(example, index: int) -> str:
    """How an error names an image: its file, or its index in the split."""
    return repr(example["path"]) if "path" in example else f"image {index} of the split"


def train_dataset(crops: TrainCrops, start_step: int, workers: int):
    """grain: this process's batches from `start_step` on, made in `workers` processes (0: in
    this one). Worker w makes batches w, w + workers, ...; grain hands them back in order."""
    import grain
    local = crops.rows.stop - crops.rows.start
    stop = sys.maxsize // (2 * local)  # "forever"; the loop stops asking
    ds = grain.MapDataset.range(start_step * local, stop * local).map(crops).batch(
        local, batch_fn=_stack)
    # One reading thread a process: the processes are the parallelism. grain's default (16
    # threads, each decoding) makes a worker no faster and two workers slower than one.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    if workers:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app
            flags.FLAGS.mark_as_parsed()  # (tests, notebooks, benchmarks) their defaults
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                         per_worker_buffer_size=2))
    return it


def _stack(examples):
    return np.stack([im for im, _ in examples]), np.asarray([lb for _, lb in examples], np.int32)


def default_workers() -> int:
    """One worker process per CPU core this process may use, less one for the training loop."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - 1)


class HostInput:
    """Augmented training batches of `batch_size` (global), `prefetch` of them made ahead; this
    process decodes only its rows. `batch(step)` -> (uint8 images [B, size, size, 3], int32
    labels [B]), sharded along `data`; `input_wait` counts the seconds callers waited in it."""

    def __init__(self, source, batch_size: int, mesh: jax.sharding.Mesh, *, seed: int = 0,
                 size: int = 224, scale: Tuple[int, int] = (256, 480),
                 pca_std: float = augment.PCA_STD, workers: int = -1, prefetch: int = 2):
        parallel.check_batch_size(batch_size, mesh)
        if len(source) < batch_size:
            raise UserError(f"the training split has {len(source)} images, fewer than one batch "
                            f"of {batch_size}; lower batch_size")
        self.batch_size, self.seed = batch_size, seed
        self.workers = default_workers() if workers < 0 else workers
        self.prefetch = max(1, prefetch)
        self.sharding = parallel.batch_sharding(mesh)
        self.rows = parallel.process_rows(self.sharding, batch_size)
        self.crops = TrainCrops(source, len(source), batch_size, self.rows, seed, size, scale)
        self.indices = self.crops.order
        self.steps_per_epoch = self.indices.steps_per_epoch
        key = jax.random.key(seed)
        self._augment = jax.jit(
            lambda images, step: augment.flip_lighting(images, jax.random.fold_in(key, step), pca_std),
            out_shardings=self.sharding)
        self.input_wait = 0.0
        self._next, self._producer = None, None

    def batch(self, step: int) -> Tuple[jax.Array, jax.Array]:
        if step != self._next:  # the first call, or a jump: (re)start the stream at `step`
            self.close()
            self._producer = _Producer(self, step)
        start = time.perf_counter()
        try:
            out = self._producer.get()
        except BaseException:  # a bad image, a dead worker: stop the workers, then report
            self.close()
            raise
        self.input_wait += time.perf_counter() - start
        self._next = step + 1
        return out

    def _global(self, step: int, images: np.ndarray, labels: np.ndarray):
        images = parallel.global_array(images, self.sharding, self.batch_size)
        labels = parallel.global_array(labels, self.sharding, self.batch_size)
        return self._augment(images, np.int32(step)), labels

    def close(self):
        if self._producer is not None:
            self._producer.stop()
            self._producer, self._next = None, None


class _Producer:
    """A thread moving the grain stream's batches to the devices, `prefetch` ready at a time."""

    def __init__(self, host: HostInput, start_step: int):
        self.queue: "queue.Queue" = queue.Queue(host.prefetch)
        self.stopping = threading.Event()
        self.iterator = iter(train_dataset(host.crops, start_step, host.workers))
        self.thread = threading.Thread(target=self._run, args=(host, start_step), daemon=True,
                                       name="imagenet-input")
        self.thread.start()

    def _run(self, host: HostInput, step: int):
        try:
            while not self.stopping.is_set():
                images, labels = next(self.iterator)
                self._put(("batch", host._global(step, images, labels)))
                step += 1
        except BaseException as e:  # noqa: BLE001 - handed to the loop's thread, raised there
            self._put(("error", e))

    def _put(self, item):
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def get(self):
        kind, value = self.queue.get()
        if kind == "error":
            raise value
        return value

    def stop(self):
        self.stopping.set()
        self.thread.join()
        close = getattr(self.iterator, "close", None)
        if close:
            close()


# ---------------------------------------------------------------------------------------------
# Evaluation and the mean image

# Checkpoints of nets at least this large take ImageNet-style input in evaluate and analyze: any
# image size, shorter side resized to image_size * 256 / 224, the centre (or ten) crops.
MIN_IMAGENET_SIZE = 64


def is_imagenet_input(image_size: int) -> bool:
    return image_size >= MIN_IMAGENET_SIZE


def eval_resize(image_size: int, metadata: Optional[dict] = None) -> int:
    """The shorter side evaluation crops come from: the training config's `data.eval_resize`
    where the checkpoint recorded one, else the paper's 256 for 224 scaled to `image_size`."""
    data = ((metadata or {}).get("config") or {}).get("data") or {}
    return int(data.get("eval_resize") or round(image_size * 256 / 224))


class DecodedCrops:
    """A split's evaluation crops as an array that decodes on indexing: `len()`, and `[slice]` or
    `[int array]` -> uint8 [n, size, size, 3] (or [n, 10, size, size, 3] with ten_crop), so the
    code that batches a numpy split (data/batching.py) streams this one, one batch in memory."""

    def __init__(self, source, *, size: int, resize: int, ten_crop: bool = False,
                 threads: int = 32, count: Optional[int] = None):
        self.source, self.size, self.resize, self.ten_crop = source, size, resize, ten_crop
        self.count = len(source) if count is None else min(count, len(source))
        self.threads = threads

    def __len__(self):
        return self.count

    @property
    def shape(self):
        crop = (10,) if self.ten_crop else ()
        return (self.count,) + crop + (self.size, self.size, 3)

    def _crop(self, index: int) -> np.ndarray:
        ex = self.source[int(index)]
        image = jpeg.decode(ex["image"], _name(ex, int(index)))
        return augment.imagenet_eval(image, size=self.size, resize=self.resize,
                                     ten_crop=self.ten_crop)

    def __getitem__(self, key) -> np.ndarray:
        index = np.arange(self.count)[key]
        if index.ndim != 1:
            raise TypeError("DecodedCrops takes a slice or a 1-D index array")
        with concurrent.futures.ThreadPoolExecutor(min(self.threads, max(1, len(index)))) as pool:
            crops = list(pool.map(self._crop, index))
        return np.stack(crops) if crops else np.zeros((0,) + self.shape[1:], np.uint8)



def eval_batches(source, batch_size: int, mesh: jax.sharding.Mesh, *, size: int = 224,
                 resize: int = 256, ten_crop: bool = False, threads: int = 32
                 ) -> Iterator[Tuple[jax.Array, jax.Array, jax.Array]]:
    """(images, labels, mask) over the whole split: centre crops [B, size, size, 3] or 10 crops
    [B, 10, size, size, 3]; the last batch padded and masked (data/batching.py). Each process
    decodes only its rows, one batch ahead of the caller."""
    parallel.check_batch_size(batch_size, mesh, "eval_batch_size")
    sharding = parallel.batch_sharding(mesh)
    rows = parallel.process_rows(sharding, batch_size)
    order = np.arange(len(source))

    def load(index):
        ex = source[int(index)]
        image = jpeg.decode(ex["image"], _name(ex, int(index)))
        return (augment.imagenet_eval(image, size=size, resize=resize, ten_crop=ten_crop),
                np.int32(ex["label"]))

    def host_batch(index):
        out = list(pool.map(load, index[rows]))
        return np.stack([im for im, _ in out]), np.asarray([lb for _, lb in out], np.int32)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool, \
            concurrent.futures.ThreadPoolExecutor(1) as ahead:
        # padded_batches over indices: the padding rows and the mask follow the one shared rule
        batches = batching.padded_batches(order, order, batch_size)
        pending = None
        for index, _, mask in batches:
            nxt = (ahead.submit(host_batch, index), np.asarray(mask)[rows])
            if pending is not None:
                yield _global_eval(pending, sharding, batch_size)
            pending = nxt
        if pending is not None:
            yield _global_eval(pending, sharding, batch_size)


def _global_eval(pending, sharding, batch_size):
    future, mask = pending
    images, labels = future.result()
    return (parallel.global_array(images, sharding, batch_size),
            parallel.global_array(labels, sharding, batch_size),
            parallel.global_array(mask, sharding, batch_size))


def mean_image(source, count: int = 5000, size: int = 224, resize: int = 256, threads: int = 32,
               seed: int = 0) -> np.ndarray:
    """The per-pixel mean (Sec. 3.4) of centre crops of `count` random training images, float32
    [size, size, 3] in [0, 1]; with random crops and flips it is close to a per-channel mean."""
    pick = np.random.default_rng(seed).choice(len(source), min(count, len(source)), replace=False)

    def crop(i):
        ex = source[int(i)]
        return augment.imagenet_eval(jpeg.decode(ex["image"], _name(ex, int(i))), size=size,
                                     resize=resize)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        total = sum(c.astype(np.float64) for c in pool.map(crop, pick))
    return (total / (255.0 * len(pick))).astype(np.float32)
