"""Score a checkpoint (a training workdir or converted PyTorch weights) on a whole split.

    python -m resnet_jax.evaluate --checkpoint /tmp/resnet20 \
        --data folder:../shared/data/cifar10-jpeg --split test --json resnet20.json

Every image counts exactly once: batches have one fixed size (one compile) and the last one is
padded and masked. Inputs are normalised as the checkpoint's metadata says, so converted nets
(ImageNet mean/std) and nets trained here (the paper's per-pixel mean) need no flag.
"""

if __name__ == "__main__":  # the console script's start-up (resnet_jax.cli), before any import
    from resnet_jax import cli
    cli.start("evaluate")

import dataclasses
import sys
import time
from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from resnet_jax import checkpoint, cli, kernels, lines, parallel, progress, storage
from resnet_jax.kernels import cpu
from resnet_jax.data import imagenet, sources
from resnet_jax.data.batching import nonfinite_rows, padded_batches, topk_correct
from resnet_jax.errors import UserError, exit_on_user_error


class NonFiniteOutput(UserError):
    """The model gave NaN or infinite logits or loss: any accuracy would be wrong."""


def model_classes(loaded: checkpoint.LoadedModel) -> Optional[Tuple[str, ...]]:
    """The class list the checkpoint was trained on (None for converted weights, which do not
    record it: then only the number of classes is checked)."""
    classes = loaded.metadata.get("classes")
    return tuple(classes) if classes else None


def check_fits(loaded: checkpoint.LoadedModel, dataset: sources.Dataset):
    """Labels and image size against the model, before any batch runs."""
    num_classes = getattr(loaded.model, "num_classes", None)
    classes = model_classes(loaded)
    if classes is not None:
        sources.check_classes(dataset.name, dataset.classes, classes)
    elif num_classes is not None and dataset.num_classes != num_classes:
        raise UserError(f"{dataset.name} has {dataset.num_classes} classes but the model has "
                        f"{num_classes}; evaluate on data with the checkpoint's classes")
    if num_classes is not None and dataset.labels.size and (
            int(dataset.labels.max()) >= num_classes or int(dataset.labels.min()) < 0):
        bad = int(dataset.labels.max()) if int(dataset.labels.max()) >= num_classes \
            else int(dataset.labels.min())
        raise UserError(f"{dataset.name} has label {bad} but the model has "
                        f"{num_classes} classes; evaluate on data with the checkpoint's classes")
    mean = np.asarray(loaded.normalization.mean)
    if mean.ndim == 3 and mean.shape != dataset.images.shape[1:]:
        raise UserError(f"the checkpoint normalises {mean.shape[:2]} images per pixel but "
                        f"{dataset.name} has {dataset.images.shape[1:3]} images")


def stderr_progress(done: int, total: int, rate: Optional[float]):
    print(f"evaluate: {progress.images_line(done, total, rate)}", file=sys.stderr, flush=True)


def _rate(clock, done: int) -> Optional[float]:
    """Images a second since `clock` = (time, images done then), or None before any."""
    if clock is None or done <= clock[1]:
        return None
    return (done - clock[1]) / max(time.perf_counter() - clock[0], 1e-9)


class _Head:
    """The first `count` examples of a random-access source."""

    def __init__(self, source, count: int):
        self.source, self.count = source, count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        if not -self.count <= index < self.count:
            raise IndexError(index)
        return self.source[index % self.count]


def first_images(data, count: Optional[int]):
    """A Dataset or Split cut to its first `count` images (all of it for None); UserError
    unless 0 < count <= its length."""
    if count is None:
        return data
    if not 0 < count <= len(data):
        raise UserError(f"--num_images must be in 1..{len(data)} for {data.name}, not {count}")
    if isinstance(data, sources.Dataset):
        return dataclasses.replace(data, images=data.images[:count], labels=data.labels[:count])
    return dataclasses.replace(data, source=_Head(data.source, count))


def make_eval_step(model, mesh, normalization: checkpoint.Normalization):
    """jit(variables, images, labels, mask) -> summed loss and top-1/top-5 counts over the batch.
    Images [B, K, H, W, 3] are K crops of each image (10-crop testing): their softmax averages."""
    def eval_fn(variables, images, labels, mask):
        x = normalization(images)
        if x.ndim == 5:
            b, k = x.shape[:2]
            probs = jax.nn.softmax(model.apply(variables, x.reshape((b * k,) + x.shape[2:]), train=False))
            logits = jnp.log(probs.reshape(b, k, -1).mean(1))
        else:
            logits = model.apply(variables, x, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return dict(loss_sum=jnp.sum(jnp.where(mask, loss, 0.0)),
                    count=jnp.sum(mask, dtype=jnp.int32), **topk_correct(logits, labels, mask),
                    nonfinite=nonfinite_rows(logits, loss, mask))

    rep, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(eval_fn, in_shardings=(rep, batch, batch, batch), out_shardings=rep)


def evaluate_batches(eval_step, variables, batches, progress: Optional[Callable] = None,
                     total: int = 0, progress_every: int = 5) -> Dict:
    """{'top1', 'top5', 'loss', 'count', 'correct_top1', 'correct_top5'} over (images, labels,
    mask) batches; NonFiniteOutput if any image gets a NaN or infinite logit or loss, since no
    accuracy is then right. Sums stay on device (the host queues the next batch while one runs,
    two at most: `parallel.InFlight`); the host waits otherwise only for `progress(done, total,
    images_per_second)`, every `progress_every` batches, and at the end. The rate counts from
    the end of the first batch, so that its compile is not in it (None until then)."""
    totals, done, reported, clock = None, 0, True, None
    in_flight = parallel.InFlight()
    for i, (images, labels, mask) in enumerate(batches):
        out = eval_step(variables, images, labels, mask)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        in_flight.add(totals)
        done = min(done + len(labels), total) if total else done + len(labels)
        if progress and i == 0:
            jax.block_until_ready(totals)
            clock = (time.perf_counter(), done)
        reported = bool(progress) and (i + 1) % progress_every == 0
        if reported:
            jax.block_until_ready(totals)
            progress(done, total, _rate(clock, done))
    totals = jax.device_get(totals)
    if progress and not reported:
        progress(done, total, _rate(clock, done))
    count = int(totals["count"])
    if int(totals["nonfinite"]):
        raise NonFiniteOutput(f"{int(totals['nonfinite'])} of {count} images got non-finite "
                              "logits or loss (NaN/Inf weights)")
    return dict(top1=int(totals["top1"]) / max(count, 1), top5=int(totals["top5"]) / max(count, 1),
                loss=float(totals["loss_sum"]) / max(count, 1), count=count,
                correct_top1=int(totals["top1"]), correct_top5=int(totals["top5"]))


def evaluate(loaded: checkpoint.LoadedModel, dataset: sources.Dataset, batch_size: int = 500,
             progress: Optional[Callable[[int, int, float], None]] = stderr_progress,
             progress_every: int = 5) -> Dict:
    """{'top1', 'top5' (fractions), 'loss', 'count', 'correct_top1', 'correct_top5', 'seconds'}
    of `loaded` on every image of `dataset`, over all local devices (the batch is rounded up to
    a multiple of their number); `progress(done, total, seconds)` about every `progress_every`
    batches. Non-finite outputs are a UserError naming the checkpoint's step."""
    check_fits(loaded, dataset)
    mesh = parallel.make_mesh(jax.local_devices())
    batch_size = -(-batch_size // mesh.size) * mesh.size
    eval_step = make_eval_step(loaded.model, mesh, loaded.normalization)
    start = time.perf_counter()
    try:
        result = evaluate_batches(eval_step, loaded.variables,
                                  padded_batches(dataset.images, dataset.labels, batch_size),
                                  progress, len(dataset), progress_every)
    except NonFiniteOutput as e:
        raise NonFiniteOutput(f"checkpoint {loaded.directory!r} step {loaded.step} on "
                              f"{dataset.name}: {e}; no score reported: the checkpoint is damaged or its run "
                              "diverged") from None
    return dict(result, seconds=round(time.perf_counter() - start, 3))


def evaluate_streamed(loaded: checkpoint.LoadedModel, split: imagenet.Split, batch_size: int = 500,
                      ten_crop: bool = False,
                      progress: Optional[Callable[[int, int, float], None]] = stderr_progress,
                      progress_every: int = 5, threads: int = 32) -> Dict:
    """`evaluate` for ImageNet-style data (images of any size, data/imagenet.py): the centre crop
    or ten crops of each, decoded batch by batch (the split is never held in memory), over every
    device of every process (after jax.distributed: each process decodes its own rows, and every
    process gets the one result)."""
    classes, num_classes = model_classes(loaded), getattr(loaded.model, "num_classes", None)
    if classes is not None:
        sources.check_classes(split.name, split.classes, classes)
    elif num_classes is not None and split.num_classes > num_classes:
        raise UserError(f"{split.name} has {split.num_classes} classes but the model has "
                        f"{num_classes}; evaluate on data with the checkpoint's classes")
    image_size = loaded.metadata["image_size"]
    mesh = parallel.make_mesh()
    batch_size = -(-batch_size // mesh.size) * mesh.size
    eval_step = make_eval_step(loaded.model, mesh, loaded.normalization)
    batches = imagenet.eval_batches(split.source, batch_size, mesh, size=image_size,
                                    resize=imagenet.eval_resize(image_size, loaded.metadata),
                                    ten_crop=ten_crop, threads=threads)
    start = time.perf_counter()
    result = evaluate_batches(eval_step, parallel.replicate(loaded.variables, mesh), batches,
                              progress, len(split), progress_every)
    return dict(result, seconds=round(time.perf_counter() - start, 3))


FLAGS = flags.FLAGS


def define_flags():
    """Defined when the CLI runs, not on import: other modules' CLIs use some of the same names."""
    flags.DEFINE_string("checkpoint", None, "checkpoint directory: a training workdir or the --out of "
                        "resnet_jax.convert")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    flags.DEFINE_string("data", "cifar10", "tfds name (cifar10), folder:PATH (ImageFolder "
                        "PATH/<split>/<class>/*) or synthetic[:N]")
    flags.DEFINE_string("split", "test", "split to score, all of it unless --num_images")
    flags.DEFINE_integer("num_images", None, "score only the split's first N images")
    flags.DEFINE_string("data_dir", None, "tfds data directory")
    flags.DEFINE_integer("batch_size", 500, "images per forward pass (the last batch is padded)")
    flags.DEFINE_string("json", None, "write the result here as JSON")
    flags.DEFINE_bool("ten_crop", False, "ImageNet-size nets: average the softmax of the standard "
                      "10 crops instead of scoring the centre crop")


def main(argv):
    with exit_on_user_error():
        if not FLAGS.checkpoint:
            raise UserError("--checkpoint is required: a training workdir or the --out of "
                            "resnet_jax.convert")
        if FLAGS.batch_size < 1:
            raise UserError(f"--batch_size must be positive, not {FLAGS.batch_size}")
        if FLAGS.json:  # before any work: a result is never computed and then lost
            storage.check_writable(FLAGS.json, "--json", file=True)
        cpu.use_cpu_cores()
        parallel.initialize_distributed()  # on every host of a pod slice (ImageNet-style data)
        checkpoint.quiet_orbax()
        loaded = checkpoint.load_model(FLAGS.checkpoint, FLAGS.step,
                                       kernels.for_devices(jax.local_devices()))
        image_size = loaded.normalization.input_size
        if imagenet.is_imagenet_input(image_size):
            split = first_images(imagenet.open_split(FLAGS.data, FLAGS.split, FLAGS.data_dir),
                                 FLAGS.num_images)
            name = split.name
            result = evaluate_streamed(loaded, split, FLAGS.batch_size, FLAGS.ten_crop)
        else:
            if model_classes(loaded) is None and FLAGS.data.startswith("folder:"):
                print("note: the checkpoint records no class list; labels follow the sorted "
                      "names of the class folders (convert --classes records one)",
                      file=sys.stderr, flush=True)
            dataset = first_images(sources.load(
                FLAGS.data, FLAGS.split, data_dir=FLAGS.data_dir, image_size=image_size,
                num_classes=getattr(loaded.model, "num_classes", 10),
                classes=model_classes(loaded)), FLAGS.num_images)
            name = dataset.name
            result = evaluate(loaded, dataset, FLAGS.batch_size)
        result.update(checkpoint=str(storage.path(FLAGS.checkpoint)), step=loaded.step,
                      model=loaded.metadata["model"], data=FLAGS.data, split=FLAGS.split)
        if not parallel.is_main_process():
            return
        print(f"{result['model']} step {result['step']} on {name}: top-1 "
              f"{100 * result['top1']:.2f}%, top-5 {100 * result['top5']:.2f}% "
              f"({result['count']} images)")
        if FLAGS.json:
            lines.write_json(FLAGS.json, result)


def run():
    define_flags()
    cli.absl_run(main, __name__, positional=0, usage="use --checkpoint DIR --data SOURCE")

