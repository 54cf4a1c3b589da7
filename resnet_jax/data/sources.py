"""Where images come from: `cifar10` (tfds; downloads where there is internet), `folder:PATH`
(ImageFolder layout `PATH/<split>/<class>/*`, classes in sorted order), or `synthetic[:N]`.

CIFAR-sized splits are small (150 MB of uint8 for 50k images), so a source hands back the whole
split as numpy arrays: training keeps it in device memory and augments there, and evaluation
pads the last batch instead of dropping it. A decoded folder is cached as .npy beside nothing of
the user's: under $RESNET_JAX_CACHE (default ~/.cache/resnet_jax), keyed by the files' names,
classes and stamps (`storage.stamps`: size, inode and ctime, or on gs:// generation and
checksums), so a changed folder is decoded again whatever its modification times say.
"""
import dataclasses
import hashlib
import os
import unicodedata
import zlib
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from resnet_jax import storage
from resnet_jax.errors import UserError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
# The classifier's width of the tfds data sets the configs name; folders and synthetic data: 10.
NUM_CLASSES = {"imagenet2012": 1000, "cifar10": 10, "cifar100": 100}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".webp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int32 [N], indices into `classes`
    classes: Tuple[str, ...]  # the class list, by name: what a label means
    name: str  # e.g. "folder:/data/cifar10-jpeg:test"

    def __len__(self):
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


SOURCE_KINDS = "a tfds name such as cifar10, folder:PATH or synthetic[:N]"


def parse_source(source: str) -> Tuple[str, Any]:
    """'cifar10' -> ('tfds', 'cifar10'); 'folder:P' -> ('folder', P with ~ expanded);
    'synthetic:N' -> ('synthetic', N or None); anything else a UserError naming the forms (the
    one parser: config.validate reports it as a line about data.source)."""
    kind, _, arg = source.partition(":")
    if kind == "folder":
        if not arg:
            raise UserError("folder: needs a path, e.g. folder:../shared/data/cifar10-jpeg")
        return "folder", os.path.expanduser(arg)
    if kind == "synthetic":
        if not arg:
            return "synthetic", None
        if not arg.isdigit() or int(arg) < 1:
            raise UserError(f"synthetic:N needs a positive image count, not {arg!r}")
        return "synthetic", int(arg)
    if kind == "tfds":
        return "tfds", arg or "cifar10"
    if kind and not arg:
        return "tfds", kind
    raise UserError(f"unknown data source {source!r}; use {SOURCE_KINDS}")


def num_classes(source: str) -> int:
    """The number of classes of `source` known without loading it (10 when unknown: folders and
    synthetic data), for programs compiled without data."""
    name = source.split(":", 1)[-1].split("/")[0]
    return NUM_CLASSES.get(name, 10)


def load(source: str, split: str, *, data_dir: Optional[str] = None, image_size: int = 32,
         num_classes: int = 10, classes: Optional[Sequence[str]] = None,
         whose: str = "the model's") -> Dataset:
    """The whole `split` of `source` as uint8 images and int32 labels. `classes` (the training
    split's or a checkpoint's class list) numbers the labels by name, and a split whose classes
    differ is refused naming them (`whose` says where the list came from); without it, a folder
    split numbers its own sorted folders."""
    kind, arg = parse_source(source)
    if kind == "folder":
        dataset = _load_folder(arg, split, classes, whose)
    elif kind == "synthetic":  # random labels: they take the class list they are given
        dataset = _synthetic(split, arg or 256, image_size,
                             len(classes) if classes else num_classes)
        if classes is not None:
            dataset = dataclasses.replace(dataset, classes=tuple(classes))
    else:
        dataset = _load_tfds(arg, split, data_dir)
    if classes is not None:
        check_classes(dataset.name, dataset.classes, classes, whose)
    return dataset


def identity(source: str) -> str:
    """`source` as a resumed run compares it: a local folder by its resolved path, so a trailing
    slash or a symlink to the same folder is the same source, a gs:// one by its URL (the
    content is compared on its own, `fingerprint`)."""
    try:
        kind, arg = parse_source(source)
    except UserError:
        return source
    if kind != "folder":
        return source
    return f"folder:{arg.rstrip('/') if storage.is_remote(arg) else os.path.realpath(arg)}"


def fingerprint(dataset: Dataset) -> dict:
    """{'images': N, 'sha256': ...} of the pixels, labels and class names: the data's identity
    where it decides the numbers (the per-pixel mean and the training batches)."""
    h = hashlib.sha256(np.ascontiguousarray(dataset.images).data)
    h.update(np.ascontiguousarray(dataset.labels, np.int32).data)
    h.update("\0".join(dataset.classes).encode())
    return dict(images=len(dataset), sha256=h.hexdigest())


def synthetic_classes(num_classes: int) -> Tuple[str, ...]:
    return tuple(f"class{i}" for i in range(num_classes))


def check_classes(name: str, have: Sequence[str], want: Sequence[str],
                  whose: str = "the model's") -> None:
    """One line naming the classes that `have` (a split's) lacks or adds against `want`. Names
    compare in Unicode's NFC form: a file system may hand back `café` decomposed (NFD)."""
    have, want = tuple(map(nfc, have)), tuple(map(nfc, want))
    if have == want:
        return
    extra = [c for c in have if c not in want]
    missing = [c for c in want if c not in have]
    if not extra and not missing:
        raise UserError(f"{name} numbers its classes in another order than {whose} "
                        f"({', '.join(want[:5])}...)")
    names = lambda xs: ", ".join(xs[:5]) + (f" and {len(xs) - 5} more" if len(xs) > 5 else "")
    parts = ([f"has classes that {whose} list lacks: {names(extra)}"] if extra else []) + (
        [f"lacks {whose} classes {names(missing)}"] if missing else [])
    raise UserError(f"{name} {'; '.join(parts)} ({whose} {len(want)} classes: "
                    f"{', '.join(want[:10])}{'...' if len(want) > 10 else ''}); use data with "
                    "the same class folders")


def nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _synthetic(split, count, image_size, num_classes) -> Dataset:
    # Labels depend on the images (the mean of a fixed channel), so a model can learn them.
    # crc32, not hash(): str hashes differ from process to process, and so would the split
    rng = np.random.default_rng(zlib.crc32(split.encode()) if split != "train" else 0)
    images = rng.integers(0, 256, (count, image_size, image_size, 3), dtype=np.uint8)
    score = images[..., 0].reshape(count, -1).mean(1)
    edges = np.quantile(score, np.linspace(0, 1, num_classes + 1)[1:-1])
    labels = np.searchsorted(edges, score).astype(np.int32)
    return Dataset(images, labels, synthetic_classes(num_classes), f"synthetic:{count}:{split}")


def _subfolders(directory: str) -> List[str]:
    return sorted(p.name for p in storage.path(directory).iterdir() if p.is_dir())


def folder_files(root: str, split: str, classes: Optional[Sequence[str]] = None,
                  whose: str = "the model's"):
    """(classes, [(path, label)]) of ROOT/SPLIT/<class>/*; ROOT local or gs://."""
    if not storage.path(root).is_dir():
        raise UserError(f"data folder {root!r} does not exist; pass folder:PATH with "
                        "PATH/<split>/<class>/*.jpg")
    split_dir = os.path.join(root, split)
    if not storage.path(split_dir).is_dir():
        have = _subfolders(root)
        raise UserError(f"split {split!r} not found in {root!r} (it has: {', '.join(have) or 'nothing'})")
    folders = _subfolders(split_dir)
    if classes is not None:
        check_classes(f"folder {split_dir!r}", sorted(map(nfc, folders)),
                      sorted(map(nfc, classes)), whose)
    label = {nfc(c): i for i, c in enumerate(folders if classes is None else classes)}
    per_class = {c: sorted(p.name for p in storage.path(os.path.join(split_dir, c)).iterdir()
                           if p.name.lower().endswith(IMAGE_SUFFIXES)) for c in folders}
    if not any(per_class.values()):
        raise UserError(f"no images in {split_dir!r}; expected {split_dir}/<class>/*.jpg")
    empty = [c for c, names in per_class.items() if not names]
    if empty:  # an empty class would shift every later label, or train a class never seen
        raise UserError(f"no images in class folder {os.path.join(split_dir, empty[0])!r}"
                        f"{f' (and {len(empty) - 1} more)' if len(empty) > 1 else ''}; add "
                        "images or remove the folder")
    files = [(os.path.join(split_dir, c, f), label[nfc(c)]) for c in folders for f in per_class[c]]
    return tuple(folders if classes is None else classes), files


def _cache_path(split_dir: str, files) -> str:
    """The cache file of a folder split, keyed by what decides its pixels and labels: each
    file's name, class and `storage.stamps` (never its modification time alone, which `cp -p`,
    `rsync -a` and `tar` keep while replacing the bytes); no image is read to find it."""
    try:
        stamped = storage.stamps(split_dir, [p for p, _ in files])
    except OSError as e:  # a broken link, a file removed meanwhile, no permission
        raise UserError(f"cannot read image {e.filename!r} ({e.strerror or e}); remove or "
                        "replace it") from None
    h = hashlib.sha256(b"stamps\n")  # not the content hashes' key of older caches
    for (path, label), stamp in zip(files, stamped):
        h.update(f"{os.path.relpath(path, split_dir)}\0{label}\0{stamp}\n".encode())
    return storage.cache_dir(f"folder-{h.hexdigest()[:24]}.npz")


def _decode(path: str) -> np.ndarray:
    """uint8 [H, W, 3] of an image file, as the ImageNet input decodes it (`jpeg.decode`)."""
    from resnet_jax.data import jpeg
    try:
        return jpeg.decode(storage.read_bytes(path), name=path)
    except OSError as e:  # unreadable, or a file PIL finds truncated while decoding
        raise UserError(f"cannot read image {path!r} ({e.__class__.__name__}); remove or replace "
                        "it") from None


def _load_folder(root: str, split: str, classes: Optional[Sequence[str]] = None,
                 whose: str = "the model's") -> Dataset:
    classes, files = folder_files(root, split, classes, whose)
    name = f"folder:{root}:{split}"
    cache = _cache_path(os.path.join(root, split), files)
    if os.path.exists(cache):
        with np.load(cache, allow_pickle=False) as z:
            return Dataset(z["images"], z["labels"], classes, name)
    images = [_decode(p) for p, _ in files]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise UserError(f"images in {root}/{split} differ in size ({sorted(shapes)[:3]}...); "
                        "resize them to one size first")
    images = np.stack(images)
    labels = np.asarray([label for _, label in files], np.int32)
    try:  # the cache is an optimisation: a read-only home must not stop the run
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = cache + f".{os.getpid()}.tmp.npz"
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, cache)
    except OSError:
        pass
    return Dataset(images, labels, classes, name)


def _load_tfds(name: str, split: str, data_dir: Optional[str]) -> Dataset:
    import tensorflow_datasets as tfds
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared() and not _online():
            raise UserError(
                f"tfds has no prepared copy of {name!r} in {str(builder.data_dir)!r} and cannot "
                "download it (no internet); use an image folder instead: folder:PATH with "
                "PATH/<split>/<class>/*.jpg (train: --config.data.source=folder:PATH, "
                "evaluate/analyze: --data folder:PATH)")
        # as_data_source reads ArrayRecord only; tfds would prepare TFRecord by default
        builder.download_and_prepare(file_format="array_record")
        data = builder.as_data_source(split=split)
        images = np.stack([ex["image"] for ex in data])
        labels = np.asarray([ex["label"] for ex in data], np.int32)
    except UserError:
        raise
    except Exception as e:  # tfds raises many kinds; the user needs the source and the fix
        detail = (str(e).splitlines() or [""])[0][:160]
        raise UserError(f"tfds could not load {name!r} split {split!r} ({e.__class__.__name__}: "
                        f"{detail}); without internet point the data source at an image folder, "
                        "folder:PATH (train: --config.data.source, evaluate/analyze: --data)") from None
    return Dataset(images, labels, tuple(builder.info.features["label"].names), f"{name}:{split}")


def _online(host: str = "storage.googleapis.com", timeout: float = 5.0) -> bool:
    """Whether tfds's download host answers: without it tfds retries for minutes, silently."""
    import socket
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def holdout(dataset: Dataset, count: int, seed: int = 0) -> Tuple[Dataset, Dataset]:
    """(train, val): `count` images drawn at random (fixed by `seed`) as the validation set, the
    rest for training; the paper's 45k/5k split of CIFAR-10's training set is holdout(train, 5000)."""
    if not 0 < count < len(dataset):
        raise UserError(f"cannot hold out {count} of {len(dataset)} images of {dataset.name}; "
                        f"choose 0 < holdout < {len(dataset)}")
    order = np.random.default_rng(seed).permutation(len(dataset))
    val, train = np.sort(order[:count]), np.sort(order[count:])
    part = lambda idx, tag: Dataset(dataset.images[idx], dataset.labels[idx], dataset.classes,
                                    f"{dataset.name}[{tag}]")
    return part(train, f"-{count}"), part(val, f"holdout{count}")


def mean_image(images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """The per-pixel mean (Sec. 4.2) of uint8 [N, H, W, C] images, float32 [H, W, C] in [0, 1]."""
    total = np.zeros(images.shape[1:], np.float64)
    for start in range(0, len(images), chunk):
        total += images[start:start + chunk].sum(0, dtype=np.float64)
    return (total / (255.0 * len(images))).astype(np.float32)
