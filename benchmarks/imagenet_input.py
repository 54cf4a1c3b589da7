"""The ImageNet training input against tf.data, in one run, on ImageNet-like JPEGs:

    python -m benchmarks.imagenet_input [--folder DIR] [--images 256] [--repeats 5] \
        [--workers 1,2] [--step_model resnet18] [--memory_images 256] [--json out.json]

Rows:
- per_core: images/s of one process, one thread, decoding and cropping as the training input does
  (augment.imagenet_train_crop: only the scale augmentation's window decoded, and resized once)
  beside the same with the whole image decoded (where libjpeg's headers are missing) and a
  tf.data pipeline doing the same sampling with `tf.io.decode_and_crop_jpeg`, a bilinear resize
  to 224 and a flip, restricted to one thread; the three take turns over the same in-memory
  JPEGs, round by round, and `ratio` is the median of the rounds' ratios (above 1: ours is
  faster);
- workers_N: images/s of the grain pipeline the trainer runs (data/imagenet.py's train_dataset
  over the folder, files read from disk), N worker processes pinned with this process to N
  cores, after every worker has delivered its first batch; with its ratio to 1 worker;
- step: images/s of the trainer's jitted train step of `--step_model` at 224x224 on this
  machine's CPUs, and the per-core input rate over it (the input keeps a step fed when >= 1);
- tpu_host: what a host's vCPUs at the measured per-core rate would supply, beside the rate a
  ResNet-50 step needs per host (benchmarks/scaling.py's model, docs/scaling.md);
- memory: peak RSS of `python -m resnet_jax.evaluate` and `analyze`, each in its own process, on
  generated validation folders of `--memory_images` and 4x as many JPEGs (a random-weight
  ResNet-18 checkpoint at 64x64, the smallest ImageNet-style input, so that the decoding of
  whole photographs dominates): streamed, the peak does not grow with the split.

The JPEGs are made by benchmarks/imagenet_jpegs.py (into a temporary folder unless --folder
holds them already). The flip and colour shift of our pipeline run on the device, so they are not
in the host's rate; tf.data's flip is. On a shared machine only the ratios mean much.
"""
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, SCALE = 224, (256, 480)
# vCPUs of one host, from the cloud providers' machine types (hyperthreads: two per core).
HOST_VCPUS = {"v4-8 (4 chips)": 240, "v5e-8 (8 chips)": 224, "8x A100 SXM": 96, "8x H100 SXM": 208}


def define_flags():
    flags.DEFINE_string("folder", None, "ILSVRC-style folder of JPEGs (default: generate one in a "
                        "temporary folder with benchmarks/imagenet_jpegs.py)")
    flags.DEFINE_integer("images", 256, "images per timed round (and generated, per split)")
    flags.DEFINE_integer("repeats", 5, "timed rounds of the per-core comparison")
    flags.DEFINE_list("workers", ["1", "2"], "worker-process counts for the workers rows")
    flags.DEFINE_integer("batch", 32, "images per batch in the workers rows")
    flags.DEFINE_string("step_model", "resnet18", "ImageNet net whose train step the input is "
                        "compared with ('' skips the step row)")
    flags.DEFINE_integer("step_batch", 8, "batch of the step row")
    flags.DEFINE_integer("memory_images", 256, "validation images of the smaller memory run "
                         "(the larger has 4x as many; 0 skips the memory rows)")
    flags.DEFINE_string("json", None, "write the rows here as JSON")


# ---------------------------------------------------------------------------------------------
# The two pipelines, one core each


def ours_call(encoded: List[bytes], window: bool = True):
    """The training input's decode-and-crop; window=False: the whole-image path a machine
    without libjpeg's headers takes (data/jpeg.py), for the before/after in one run."""
    from unittest import mock

    from resnet_jax.data import augment, jpeg

    def crops():
        for i, data in enumerate(encoded):
            augment.imagenet_train_crop(data, np.random.default_rng((0, 0, i)), size=SIZE,
                                        scale=SCALE)

    def call():
        if window:
            return crops()
        with mock.patch.object(jpeg, "_decode_window", lambda *a: None):
            return crops()
    return call


def tf_call(encoded: List[bytes]):
    """tf.data, one thread: the same sampling (shorter side S in [256, 480], a 224 crop of the
    image resized to S) as a window of the original, decode_and_crop_jpeg, resize, flip."""
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    def crop(data):
        shape = tf.io.extract_jpeg_shape(data)
        h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
        s = tf.random.uniform([], SCALE[0], SCALE[1] + 1, tf.int32)
        side = SIZE * tf.minimum(h, w) / tf.cast(s, tf.float32)  # the crop, in original pixels
        ch, cw = tf.cast(tf.round(side), tf.int32), tf.cast(tf.round(side), tf.int32)
        top = tf.random.uniform([], 0, shape[0] - ch + 1, tf.int32)
        left = tf.random.uniform([], 0, shape[1] - cw + 1, tf.int32)
        image = tf.io.decode_and_crop_jpeg(data, tf.stack([top, left, ch, cw]), channels=3)
        image = tf.image.resize(image, [SIZE, SIZE], method="bilinear")
        return tf.image.random_flip_left_right(tf.cast(tf.round(image), tf.uint8))

    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    ds = tf.data.Dataset.from_tensor_slices(encoded).map(crop).with_options(options)

    def call():
        for _ in ds:
            pass
    return call


def interleaved_rates(calls, count: int, repeats: int) -> List[List[float]]:
    """images/s of each call, the calls taking turns in every round (one untimed round first)."""
    for call in calls:
        call()
    rates = [[] for _ in calls]
    for _ in range(repeats):
        for call, mine in zip(calls, rates):
            start = time.perf_counter()
            call()
            mine.append(count / (time.perf_counter() - start))
    return rates


# ---------------------------------------------------------------------------------------------
# The trainer's pipeline with worker processes, and the train step


def workers_rate(folder: str, workers: int, batch: int, images: int,
                 seconds: float = 3.0) -> Tuple[float, int]:
    """(images/s, cores) of data/imagenet.py's grain pipeline with `workers` processes on
    `workers` cores (this process and its workers pinned to them, where the machine has as many:
    otherwise one worker's batching and this process's share would run on a spare core), once
    every worker has delivered a batch (their start is not the rate), over at least `images`
    images and `seconds`."""
    from resnet_jax.data import imagenet
    split = imagenet.open_split(f"folder:{folder}", "train")
    crops = imagenet.TrainCrops(split.source, len(split), batch, slice(0, batch), 0, SIZE, SCALE)
    allowed = sorted(os.sched_getaffinity(0))
    cores = allowed[:workers]
    os.sched_setaffinity(0, cores)  # inherited by the workers grain starts
    it = iter(imagenet.train_dataset(crops, 0, workers))
    try:
        for _ in range(workers + 1):
            next(it)
        count, start = 0, time.perf_counter()
        while count < max(2, images // batch) or time.perf_counter() - start < seconds:
            next(it)
            count += 1
        return count * batch / (time.perf_counter() - start), len(cores)
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
        os.sched_setaffinity(0, allowed)


def step_rate(model: str, batch: int, steps: int = 3) -> float:
    """images/s of the trainer's jitted step of an ImageNet net at 224x224, on a random batch."""
    import jax
    from resnet_jax import checkpoint, kernels, parallel, train
    from resnet_jax import state as state_lib
    from resnet_jax import config as config_lib
    config = config_lib.load_config(os.path.join(REPO, "configs", f"imagenet.py:{model}"))
    config.batch_size = batch
    mesh = parallel.make_mesh()
    net, _ = state_lib.create_model(config, 1000, kernels.for_devices(mesh.devices.flat))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, batch).astype(np.int32)
    data = parallel.global_batch((images, labels), parallel.batch_sharding(mesh), batch)
    state = state_lib.init_state(config, net, mesh, SIZE)
    step = train.make_train_step(config, net, mesh, checkpoint.Normalization(mean=(0.5,) * 3))
    state, metrics = step(state, *data)  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, *data)
    jax.block_until_ready(metrics)
    return steps * batch / (time.perf_counter() - start)


_PEAK_RSS = """
import runpy, sys
from benchmarks.analysis_memory import own_peak_rss_mib
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
    if e.code:
        raise
finally:
    print("peak MiB", own_peak_rss_mib(), flush=True)
"""


def peak_rss_mib(module: str, *args: str, cwd: Optional[str] = None) -> float:
    """`python -m module args` in its own process; its peak RSS in MiB (VmHWM, Linux)."""
    import subprocess
    path = [cwd, REPO, os.environ.get("PYTHONPATH")]  # `module`, and benchmarks/
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join(filter(None, path)))
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, module, *args], capture_output=True,
                          text=True, env=env, cwd=cwd)
    if proc.returncode:
        raise RuntimeError(f"{module} failed:\n{proc.stderr[-3000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("peak MiB"))
    return float(line.split()[2])


def memory_rows(tmp: str, count: int) -> List[Dict]:
    """Peak RSS of evaluate and analyze over `count` and 4 x `count` generated JPEGs."""
    import jax
    import jax.numpy as jnp
    import resnet_jax
    from benchmarks import imagenet_jpegs
    from resnet_jax import checkpoint
    classes, size = 4, 64
    model = resnet_jax.create_model("resnet18", num_classes=classes)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))
    ckpt = os.path.join(tmp, "checkpoint")
    checkpoint.save_model(ckpt, variables, model_name="resnet18",
                          model_options={"num_classes": classes},
                          normalization=checkpoint.Normalization(mean=(0.5,) * 3),
                          extra={"image_size": size})
    rows, peaks = [], {}
    for n in (count, 4 * count):
        folder = os.path.join(tmp, f"val{n}")
        imagenet_jpegs.write_folder(folder, n, classes, splits=("validation",))
        data = ["--data", f"folder:{folder}", "--split", "validation", "--batch_size", "64"]
        peaks[("evaluate", n)] = peak_rss_mib("resnet_jax.evaluate", "--checkpoint", ckpt, *data)
        peaks[("analyze", n)] = peak_rss_mib("resnet_jax.analyze", f"{ckpt}=net", *data,
                                             "--out", os.path.join(tmp, f"analysis{n}"))
    for command in ("evaluate", "analyze"):
        small, large = peaks[(command, count)], peaks[(command, 4 * count)]
        rows.append(dict(row="memory", command=command, images=(count, 4 * count),
                         peak_mib=(small, large), growth=large / small - 1))
    return rows


def required_per_host() -> Dict[str, float]:
    """images/s a ResNet-50 step needs from each host of 8 (or 4) accelerators (the model of
    docs/scaling.md)."""
    sys.path.insert(0, REPO)
    from benchmarks import scaling
    row = scaling.work(next(w for w in scaling.WORKLOADS if w.name == "resnet50"))
    return {h.name: scaling.step_time(row, h)["images_per_s"] * min(8, h.devices) / h.devices
            for h in scaling.HARDWARE if h.name in HOST_VCPUS}


# ---------------------------------------------------------------------------------------------


def run(folder: str, images: int, repeats: int, workers: List[int], batch: int,
        step_model: str, step_batch: int, memory_images: int = 0) -> List[Dict]:
    from resnet_jax.data import imagenet
    split = imagenet.open_split(f"folder:{folder}", "train")
    encoded = [split.source[i]["image"] for i in range(min(images, len(split)))]
    from resnet_jax.data import jpeg
    if jpeg.window_decoding() is not None:
        print(f"warning: {jpeg.window_decoding()}; 'ours' decodes whole images", flush=True)
    ours, whole, theirs = interleaved_rates(
        [ours_call(encoded), ours_call(encoded, window=False), tf_call(encoded)], len(encoded),
        repeats)
    per_core = statistics.median(ours)
    rows = [dict(row="per_core", ours=per_core, whole_image=statistics.median(whole),
                 tf_data=statistics.median(theirs),
                 ratio=statistics.median(a / b for a, b in zip(ours, theirs)),
                 whole_image_ratio=statistics.median(a / b for a, b in zip(whole, theirs)),
                 rounds=len(ours), images=len(encoded))]
    rates = {}
    for w in workers:
        rates[w], cores = workers_rate(folder, w, batch, images)
        rows.append(dict(row=f"workers_{w}", ours=rates[w], cores=cores,
                         ratio_to_1=rates[w] / rates[1] if 1 in rates else None))
    if step_model:
        rate = step_rate(step_model, step_batch)
        rows.append(dict(row="step", model=step_model, batch=step_batch, step=rate,
                         input_per_core_over_step=per_core / rate))
    for hw, need in required_per_host().items():
        supply = HOST_VCPUS[hw] * per_core
        rows.append(dict(row="tpu_host", hardware=hw, vcpus=HOST_VCPUS[hw],
                         implied=supply, resnet50_needs=need, ratio=supply / need))
    if memory_images:
        with tempfile.TemporaryDirectory() as tmp:
            rows += memory_rows(tmp, memory_images)
    return rows


def format_row(r: Dict) -> str:
    if r["row"] == "per_core":
        return (f"per core: ours {r['ours']:.0f} images/s, tf.data {r['tf_data']:.0f} images/s, "
                f"ratio {r['ratio']:.2f} (whole-image decode {r['whole_image']:.0f} images/s, "
                f"ratio {r['whole_image_ratio']:.2f}; median of {r['rounds']} rounds of "
                f"{r['images']} images)")
    if r["row"].startswith("workers_"):
        extra = f", {r['ratio_to_1']:.2f}x one worker" if r.get("ratio_to_1") else ""
        return (f"{r['row'].replace('_', ' ')} on {r['cores']} cores: {r['ours']:.0f} images/s"
                f"{extra}")
    if r["row"] == "memory":
        (a, b), (pa, pb) = r["images"], r["peak_mib"]
        return (f"{r['command']} peak RSS: {pa:.0f} MiB over {a} images, {pb:.0f} MiB over {b} "
                f"({100 * r['growth']:+.1f} %)")
    if r["row"] == "step":
        return (f"train step {r['model']} batch {r['batch']}: {r['step']:.1f} images/s; input "
                f"per core / step = {r['input_per_core_over_step']:.1f}")
    return (f"{r['hardware']} host: {r['vcpus']} vCPUs x per-core rate = {r['implied']:,.0f} "
            f"images/s; ResNet-50 needs {r['resnet50_needs']:,.0f} ({r['ratio']:.2f}x)")


def main(argv):
    from resnet_jax.errors import UserError, exit_on_user_error
    with exit_on_user_error():
        workers = [int(w) for w in FLAGS.workers]
        if FLAGS.images < 1 or FLAGS.repeats < 1 or min(workers, default=1) < 1:
            raise UserError("--images, --repeats and --workers must be positive")
        with tempfile.TemporaryDirectory() as tmp:
            folder = FLAGS.folder
            if folder is None:
                from benchmarks import imagenet_jpegs
                folder = tmp
                imagenet_jpegs.write_folder(folder, FLAGS.images, splits=("train",))
            rows = run(folder, FLAGS.images, FLAGS.repeats, workers, FLAGS.batch,
                       FLAGS.step_model, FLAGS.step_batch, FLAGS.memory_images)
        for r in rows:
            print(format_row(r), flush=True)
        if FLAGS.json:
            with open(FLAGS.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    from resnet_jax import cli
    define_flags()
    cli.absl_run(main, __name__, positional=0)
