"""Checkpoints -> per-layer response statistics -> CSV/JSON, the paper's Figure 7 and a table.

    python -m resnet_jax.analyze /runs/plain20=plain-20 /runs/resnet20=ResNet-20 \
        --data folder:../shared/data/cifar10-jpeg --split test --out /tmp/fig7

Each argument is a training workdir or a converted checkpoint, optionally `=LABEL` (default: the
net's name, e.g. ResNet-20; a path that exists is never split at its `=`: `resnet_jax.runs`).
A layer's response is its BN output before ReLU and the residual addition
(`responses.capture_responses`); its std is accumulated batch by batch inside one jitted function
per model, which returns per-layer moments and never the responses themselves, so memory
does not grow with the number of images. Per-batch moments are merged on the host in float64
(Chan et al.), one batch behind the device so the host never stalls it. Started on every host of
a pod slice (as evaluate and the trainer are), each process analyses every n-th batch on its own
devices, the moments are merged across processes, and process 0 writes: the same batches, and so
the same numbers, as one process.

Choices the paper leaves open, with their defaults:
  --bn inference   BN with its running averages, as the trained net is used (`batch`: with the
                   statistics of each batch of --batch_size images; then the std of a layer is
                   sqrt(mean(gamma^2) + var(beta)) of its BN, whatever the weights before it);
  --pool all       one std over all of N, H, W and C (`channel`: per channel, then averaged);
  --include_stem   the first 3x3 conv (CIFAR nets) is layer 1, as the paper's plot seems to have;
  --num_images     the whole split.
"""

if __name__ == "__main__":  # the console script's start-up (resnet_jax.cli), before any import
    from resnet_jax import cli
    cli.start("analyze")

import csv
import dataclasses
import functools
import json
import math
import os
import re
import statistics
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from resnet_jax import checkpoint, cli, kernels, lines, parallel, progress, storage
from resnet_jax import runs as runs_lib
from resnet_jax.kernels import cpu
from resnet_jax.data import imagenet, sources
from resnet_jax.data.batching import num_batches, padded_batches
from resnet_jax.errors import UserError, exit_on_user_error
from resnet_jax.models import layout
from resnet_jax.responses import (capture_responses, image_moments, merge_moments, pool_channels,
                                  pool_moments)

BN_MODES = ("inference", "batch")
POOLS = ("all", "channel")
COLUMNS = ("layer_index", "layer", "stage", "block", "kernel", "std", "mean", "count")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # labels name files too


@dataclasses.dataclass(frozen=True)
class Settings:
    batch_norm: str = "inference"
    pool: str = "all"
    include_stem: bool = True
    batch_size: int = 250

    def __post_init__(self):
        if self.batch_norm not in BN_MODES:
            raise UserError(f"--bn must be one of {', '.join(BN_MODES)}, not {self.batch_norm!r}")
        if self.pool not in POOLS:
            raise UserError(f"--pool must be one of {', '.join(POOLS)}, not {self.pool!r}")
        if self.batch_size < 1:
            raise UserError(f"--batch_size must be positive, not {self.batch_size}")


# ---------------------------------------------------------------------------------------------
# Statistics: importable, no files.

@struct.dataclass
class LayerMoments:
    """(count, mean, M2) per channel of every layer's response, the layers side by side along the
    last axis in depth order; `layers` names each and its channel count."""
    layers: Tuple[Tuple[str, int], ...] = struct.field(pytree_node=False)
    count: Any
    mean: Any
    m2: Any

    @property
    def moments(self) -> Tuple[Any, Any, Any]:
        return self.count, self.mean, self.m2

    def by_layer(self, pool: str = "channel") -> Dict:
        """{layer: (count, mean, M2)}: per channel, or over all channels with `pool='all'`."""
        bounds = np.cumsum([c for _, c in self.layers])[:-1]
        parts = [np.split(np.asarray(a), bounds, axis=-1) for a in self.moments]
        out = {name: tuple(p[i] for p in parts) for i, (name, _) in enumerate(self.layers)}
        return {k: pool_channels(m) for k, m in out.items()} if pool == "all" else out


def batch_moments_fn(model, normalization: Callable, settings: Settings) -> Callable:
    """A model's one analysis function: `fn(variables)(uint8 images, mask)` -> `LayerMoments`
    over the unmasked images, with a leading axis of one entry per device the batch was split
    over (fold them with `fold_moments`). Reuse `fn` across checkpoints of the same net (compiled
    once per batch shape) and `fn(variables)` across batches: it places the variables once.

    Each device reduces its own rows: one all-reduce per layer and moment across devices would
    cost more than the reduction itself. BN in batch mode still sees the whole batch (one GSPMD
    program); only the moments are per device. All layers are pooled at once, side by side."""
    train = settings.batch_norm == "batch"
    rngs = {"dropout": jax.random.key(0)} if train else None  # VGG's dropout comes after the taps

    def batch_moments(variables, images, mask, groups: int):
        per_image = capture_responses(model, variables, normalization(images), train=train,
                                      rngs=rngs, reduce=image_moments)
        layers = tuple((name, mean.shape[-1]) for name, (_, mean, _) in per_image.items())
        count, mean, m2 = (jnp.concatenate(a, axis=1) for a in zip(*(
            (jnp.broadcast_to(n[:, None], mean.shape), mean, m2)
            for n, mean, m2 in per_image.values())))
        split = lambda a: a.reshape((groups, -1) + a.shape[1:])
        pool = functools.partial(pool_moments, per_channel=True)
        pooled = jax.vmap(pool)((split(count), split(mean), split(m2)), mask=split(mask))
        return LayerMoments(layers, *pooled)

    jitted = jax.jit(batch_moments, static_argnames="groups")

    def for_variables(variables) -> Callable:
        placed = {}  # devices used -> (mesh, the variables replicated over it)

        def call(images: np.ndarray, mask: np.ndarray) -> LayerMoments:
            devices = math.gcd(len(images), jax.local_device_count())
            if devices not in placed:
                mesh = parallel.make_mesh(jax.local_devices()[:devices])
                placed[devices] = mesh, jax.device_put(variables, parallel.replicated(mesh))
            mesh, on_mesh = placed[devices]
            images, mask = jax.device_put((images, mask), parallel.batch_sharding(mesh))
            return jitted(on_mesh, images, mask, groups=mesh.size)

        return call

    for_variables.step = jitted  # for resnet_jax.compile: the program, to lower abstractly
    return for_variables


def stream_moments(fn: Callable, variables, images: np.ndarray, settings: Settings,
                   progress: Optional[Callable[[int], None]] = None) -> Dict:
    """{layer: (count, mean, M2)} in float64 over all `images`, batch by batch, with `fn` from
    `batch_moments_fn`; per channel, or over all channels (`settings.pool`). `progress(images
    done by all processes)` after each batch."""
    if len(images) == 0:
        raise UserError("no images to analyse; check --num_images and the split")
    batch_size, devices = settings.batch_size, jax.local_device_count()
    if settings.batch_norm == "inference":  # the numbers do not depend on it: fill every device
        batch_size = -(-batch_size // devices) * devices
    moments_of = fn(variables)
    batches, processes = num_batches(len(images), batch_size), jax.process_count()
    if batches < processes:
        raise UserError(f"{len(images)} images make {batches} batches of {batch_size}, fewer than "
                        f"the {processes} processes that share them; lower --batch_size")
    total, pending = None, None
    for i, (batch, _, mask) in enumerate(padded_batches(
            images, np.zeros(len(images), np.int32), batch_size,
            shard=(jax.process_index(), processes))):
        if settings.batch_norm == "batch" and not mask.all():
            # Padding would join the batch statistics; run the remainder at its own size instead.
            batch, mask = batch[mask], mask[mask]
        current = moments_of(batch, mask)  # dispatched; the host merges the previous batch
        total = _merge_host(total, pending)
        pending = current
        if progress:
            progress(min(len(images), (i + 1) * processes * batch_size))
    return merge_processes(_merge_host(total, pending)).by_layer(settings.pool)


def merge_processes(moments: LayerMoments) -> LayerMoments:
    """Every process's moments merged, on every process (each analysed its share of the batches).
    The float64 arrays travel as raw bits: jax (without x64) would round them to float32."""
    if jax.process_count() == 1:
        return moments
    from jax.experimental import multihost_utils
    gathered = [np.asarray(multihost_utils.process_allgather(
        np.ascontiguousarray(a, np.float64).view(np.uint32))).view(np.float64)
        for a in moments.moments]
    return LayerMoments(moments.layers,
                        *functools.reduce(merge_moments, zip(*gathered)))


def fold_moments(per_device: LayerMoments) -> LayerMoments:
    """`batch_moments_fn`'s per-device moments -> one (count, mean, M2) per channel, float64."""
    count, mean, m2 = (np.asarray(a, np.float64) for a in jax.device_get(per_device.moments))
    merged = functools.reduce(merge_moments, zip(count, mean, m2))
    return LayerMoments(per_device.layers, *merged)


def _merge_host(total: Optional[LayerMoments], per_device: Optional[LayerMoments]):
    if per_device is None:
        return total
    moments = fold_moments(per_device)
    if total is None:
        return moments
    return LayerMoments(total.layers, *merge_moments(total.moments, moments.moments))


def layer_rows(moments: Dict, params, settings: Settings) -> List[Dict]:
    """One row per 3x3 layer in depth order: COLUMNS. With per-channel pooling, std and mean are
    the averages over channels of each channel's std and mean; count is the number of response
    values (N*H*W*C) either way."""
    rows, params = [], layout.unstack_blocks(params)
    for layer, (count, mean, m2) in moments.items():
        parts = layer.split("/")
        if len(parts) == 1 and not settings.include_stem:
            continue
        block = next((int(p[5:]) for p in parts if re.fullmatch(r"block\d+", p)), None)
        rows.append(dict(
            layer_index=len(rows) + 1, layer=layer,
            stage=parts[0] if parts[0].startswith("stage") else "stem",
            block="" if block is None else block,
            kernel="x".join(map(str, np.shape(_node(params, parts)["kernel"]))),
            std=float(np.mean(np.sqrt(m2 / count))), mean=float(np.mean(mean)),
            count=int(np.sum(np.broadcast_to(count, np.shape(mean))))))  # values, all channels
    return rows


def _node(tree, parts: Sequence[str]):
    return functools.reduce(lambda node, name: node[name], parts, tree)


def check_finite(rows: List[Dict], path: str, step: int) -> None:
    """A NaN or infinite std would draw a wrong figure: refuse, naming the checkpoint and layer."""
    bad = [r for r in rows if not (math.isfinite(r["std"]) and math.isfinite(r["mean"]))]
    if bad:
        raise UserError(f"checkpoint {path!r} step {step}: the response of {bad[0]['layer']} "
                        f"has std {bad[0]['std']} ({len(bad)} of {len(rows)} layers not finite); "
                        "nothing written: the checkpoint is damaged or its run diverged")


def response_statistics(model, variables, normalization: Callable, images: np.ndarray,
                        settings: Settings = Settings()) -> List[Dict]:
    """Figure 7's numbers for one network: a row per 3x3 layer (see `layer_rows`)."""
    fn = batch_moments_fn(model, normalization, settings)
    moments = stream_moments(fn, variables, images, settings)
    return layer_rows(moments, variables["params"], settings)


def summary_row(label: str, rows: List[Dict], baseline: Optional[List[Dict]]) -> Dict:
    stds = [r["std"] for r in rows]
    mean_std = statistics.fmean(stds)
    ratio = mean_std / statistics.fmean(r["std"] for r in baseline) if baseline else 1.0
    return dict(label=label, layers=len(stds), mean_std=mean_std,
                median_std=statistics.median(stds), ratio=ratio)


def format_table(summary: List[Dict], baseline: str) -> str:
    lines = [f"{'model':<16}{'layers':>7}{'mean std':>10}{'median':>10}"
             f"{'mean / ' + baseline:>{max(12, len(baseline) + 9)}}"]
    for s in summary:
        lines.append(f"{s['label']:<16}{s['layers']:>7}{s['mean_std']:>10.4f}"
                     f"{s['median_std']:>10.4f}{s['ratio']:>{max(12, len(baseline) + 9)}.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command: validate everything, compute everything, then write everything at once.

@dataclasses.dataclass
class Run:
    path: str
    label: str
    loaded: checkpoint.LoadedModel
    steps: List[int]  # the steps to draw over training; [loaded.step] without --over_training


def display_name(model_name: str) -> str:
    """'resnet20' -> 'ResNet-20', 'plain56' -> 'plain-56', as the paper's legends."""
    m = re.fullmatch(r"(resnet|plain|vgg)(\d+)", model_name)
    if not m:
        return model_name
    return {"resnet": "ResNet", "plain": "plain", "vgg": "VGG"}[m[1]] + "-" + m[2]


def is_residual(model) -> bool:
    return bool(getattr(model, "residual", False))


def open_runs(specs: Sequence[str], step: Optional[int], over_training: bool) -> List[Run]:
    """PATH[=LABEL] -> loaded runs, with every problem found before any work is done; their models
    compute with the kernels for this process's devices."""
    if not specs:
        raise UserError("name at least one training workdir or checkpoint, e.g. "
                        "`python -m resnet_jax.analyze /tmp/resnet20=ResNet-20 --out /tmp/fig7`")
    runs, seen = [], {}
    for spec in specs:
        path, label = runs_lib.split_label(spec)
        loaded = checkpoint.load_model(path, step, kernels.for_devices(jax.local_devices()))
        label = label or display_name(loaded.metadata["model"])
        if not _LABEL.match(label):
            raise UserError(f"label {label!r} of {path!r} must be letters, digits, '.', '_', "
                            "'+' or '-' (it names the output files)")
        if label in seen:
            raise UserError(f"label {label!r} given twice ({seen[label]!r} and {path!r}); "
                            "name each as PATH=LABEL")
        seen[label] = path
        steps = [loaded.step]
        if over_training:
            with checkpoint.manager(path, read_only=True) as mngr:
                steps = sorted(s for s in mngr.all_steps() if step is None or s <= step)
        runs.append(Run(path, label, loaded, steps))
    return runs


def analyze(specs: Sequence[str], *, data: str, split: str, out: str,
            data_dir: Optional[str] = None, settings: Settings = Settings(),
            num_images: Optional[int] = None,
            step: Optional[int] = None, over_training: bool = False,
            baseline: Optional[str] = None) -> str:
    """The whole command; returns the table it printed into `out`/table.txt."""
    from resnet_jax import plots  # matplotlib only where figures are drawn

    runs = open_runs(specs, step, over_training)
    labels = [r.label for r in runs]
    baseline = baseline or labels[0]
    if baseline not in labels:
        raise UserError(f"--baseline {baseline!r} is none of the labels: {', '.join(labels)}")
    storage.check_writable(out, "--out")  # before any image is read
    meta = runs[0].loaded.metadata
    image_size = runs[0].loaded.normalization.input_size  # the net's own (metadata's image_size)
    if imagenet.is_imagenet_input(image_size):  # any image size; decoded batch by batch
        dataset = imagenet.open_split(data, split, data_dir)
    else:
        dataset = sources.load(data, split, data_dir=data_dir, image_size=image_size,
                               num_classes=getattr(runs[0].loaded.model, "num_classes", 10))
    if num_images is not None:
        if not 0 < num_images <= len(dataset):
            raise UserError(f"--num_images must be in 1..{len(dataset)} for {dataset.name}, "
                            f"not {num_images}")
    if imagenet.is_imagenet_input(image_size):
        images = imagenet.DecodedCrops(dataset.source, size=image_size, count=num_images,
                                       resize=imagenet.eval_resize(image_size, meta))
    else:
        images = dataset.images[:num_images]

    common = dict(data=dataset.name, num_images=len(images), bn=settings.batch_norm,
                  pool=settings.pool, include_stem=settings.include_stem,
                  batch_size=settings.batch_size)
    work = [(run, s, dict(common, checkpoint=str(storage.path(run.path)), step=s,
                          checksums=checkpoint.read_metadata(run.path, s).get("checksums")))
            for run in runs for s in run.steps]
    done = _finished(out, [(run.label, key) for run, _, key in work])
    shown = progress.Checkpoints(len(work), len(images), enabled=parallel.is_main_process())
    results, history, fns = {}, {}, {}
    for (run, s, key), rows in zip(work, done):
        if rows is not None:
            shown.skip()
            shown.say(f"analyze: {run.label} step {s} is in {out} already (an earlier run "
                      "with the same arguments): skipped")
        else:
            shown.start(f"{run.label} step {s}")
            if run.label not in fns:  # one per net, compiled once for all its checkpoints
                fns[run.label] = batch_moments_fn(run.loaded.model, run.loaded.normalization,
                                                  settings)
            loaded = (run.loaded if s == run.loaded.step else
                      checkpoint.load_model(run.path, s, run.loaded.model.kernels))
            rows = layer_rows(stream_moments(fns[run.label], loaded.variables, images, settings, shown),
                              loaded.variables["params"], settings)
            check_finite(rows, run.path, s)
            shown.end()
            if parallel.is_main_process():
                lines.write_json(_kept_path(out, run.label, s), dict(key=key, value=rows))
        history.setdefault(run.label, {})[s] = rows
    for run in runs:
        results[run.label] = history[run.label][run.loaded.step]

    summary = [summary_row(label, rows, results[baseline]) for label, rows in results.items()]
    table = format_table(summary, baseline)

    if not parallel.is_main_process():  # every process has the results; process 0 writes
        return table
    with tempfile.TemporaryDirectory(prefix="analyze-") as tmp:  # whole files, then out
        for run in runs:
            rows = results[run.label]
            _write_csv(os.path.join(tmp, f"{run.label}.csv"), rows)
            meta = dict(label=run.label, checkpoint=str(storage.path(run.path)), step=run.loaded.step,
                        model=run.loaded.metadata["model"],
                        model_options=run.loaded.metadata.get("model_options", {}), **common,
                        summary=next(s for s in summary if s["label"] == run.label), layers=rows)
            lines.write_json(os.path.join(tmp, f"{run.label}.json"), meta)
            if over_training:
                steps = history[run.label]
                _write_csv(os.path.join(tmp, f"{run.label}_over_training.csv"),
                           [dict(step=s, **r) for s, rows in steps.items() for r in rows])
                plots.over_training(os.path.join(tmp, f"{run.label}_over_training"), run.label,
                                    {s: [r["std"] for r in rows] for s, rows in steps.items()})
        plots.figure7(os.path.join(tmp, "figure7"),
                      [(r.label, [row["std"] for row in results[r.label]],
                        is_residual(r.loaded.model)) for r in runs])
        with open(os.path.join(tmp, "table.txt"), "w") as f:
            f.write(table + "\n")
        storage.upload(tmp, out)
    return table


def _kept_path(out: str, label: str, step: int) -> str:
    """Where a checkpoint's rows are kept once computed (local or gs://), with their key."""
    return f"{storage.path(out)}/.finished/{label}/{step}.json"


def _kept(path: str, key: Dict) -> Optional[List[Dict]]:
    try:
        kept = json.loads(storage.path(path).read_text())
    except (OSError, ValueError):
        return None  # none kept, or unreadable: computed again
    return kept.get("value") if isinstance(kept, dict) and kept.get("key") == key else None


def _finished(out: str, keys: List[Tuple[str, Dict]]) -> List[Optional[List[Dict]]]:
    """The rows of each (label, key) that an earlier run with the same key (checkpoint, its
    checksums, data, settings) kept in `out`, else None; with several processes, only those
    that every process found, so that all skip the same checkpoints."""
    found = [_kept(_kept_path(out, label, key["step"]), key) for label, key in keys]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        have = np.array([rows is not None for rows in found])
        every = np.asarray(multihost_utils.process_allgather(have)).all(axis=0)
        found = [rows if ok else None for rows, ok in zip(found, every)]
    return found


def _write_csv(path: str, rows: List[Dict]):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


FLAGS = flags.FLAGS


def define_flags():
    """Defined when the CLI runs, not on import: other modules' CLIs use some of the same names."""
    flags.DEFINE_string("data", "cifar10", "tfds name (cifar10), folder:PATH (ImageFolder "
                        "PATH/<split>/<class>/*) or synthetic[:N]")
    flags.DEFINE_string("split", "test", "split of --data to run over")
    flags.DEFINE_string("data_dir", None, "tfds data directory")
    flags.DEFINE_string("out", None, "output directory (a CSV and JSON per model, figure7.png/pdf, "
                        "table.txt); files of the same names are replaced")
    flags.DEFINE_enum("bn", "inference", BN_MODES,
                      "BN with its running averages (inference) or each batch's statistics (batch)")
    flags.DEFINE_enum("pool", "all", POOLS,
                      "std over all of N,H,W,C (all) or per channel then averaged (channel)")
    flags.DEFINE_bool("include_stem", True, "count the first 3x3 conv (CIFAR nets) as layer 1")
    flags.DEFINE_integer("num_images", None, "analyse the first N images (default: all of them)")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest of each run)")
    flags.DEFINE_integer("batch_size", 250, "images per jitted step (the last batch is padded)")
    flags.DEFINE_bool("over_training", False,
                      "also draw each run's curve at every saved step up to --step")
    flags.DEFINE_string("baseline", None, "label the table's ratios refer to (default: the first)")


def main(argv):
    checkpoint.quiet_orbax()
    with exit_on_user_error():
        cpu.use_cpu_cores()
        parallel.initialize_distributed()  # on every host of a pod slice: each its batches
        if not FLAGS.out:
            raise UserError("--out is required: the directory for the CSV, JSON and figure")
        table = analyze(argv[1:], data=FLAGS.data, split=FLAGS.split, data_dir=FLAGS.data_dir,
                        out=FLAGS.out,
                        settings=Settings(FLAGS.bn, FLAGS.pool, FLAGS.include_stem,
                                          FLAGS.batch_size),
                        num_images=FLAGS.num_images, step=FLAGS.step,
                        over_training=FLAGS.over_training, baseline=FLAGS.baseline)
        if parallel.is_main_process():
            print(table)
            print(f"wrote {FLAGS.out}/figure7.png, .pdf, table.txt and a CSV and JSON per model")


def run():
    define_flags()
    cli.absl_run(main, __name__)

