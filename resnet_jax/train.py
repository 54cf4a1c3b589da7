"""Training: the paper's recipes as one jitted, sharded step and a loop around it.

    python -m resnet_jax.train --config configs/cifar10.py:resnet56 --workdir runs/resnet56
    python -m resnet_jax.train --config configs/cpu.py:resnet20 --workdir /tmp/r20 \
        --config.data.source=folder:../shared/data/cifar10-jpeg --config.num_steps=2000

One `jax.jit` step runs on a 1-D `data` mesh over every device of every process: the global batch
is split along `data`, parameters and optimizer state are replicated, the state's buffers are
donated. BatchNorm therefore normalises over the global batch (jit over a sharded batch computes
exact global means). The paper had 64 images per GPU on CIFAR (128 on two GPUs) and 32 per GPU on
ImageNet (256 on eight), each GPU with its own statistics; `bn_group_size` reproduces that on any
device count: the batch is cut into groups of that many images, the network runs on each group
(vmap) with its own BN statistics, and the running averages are the mean over the groups.

The loop: resume from the latest complete checkpoint in the workdir (refusing one of another
model), feed batches that depend only on (seed, step), log every `log_every` steps (the only
host syncs, besides evaluation), evaluate and save asynchronously every `checkpoint_every` steps
and at the end, keep the latest K plus the best by validation top-1. SIGTERM (a preempted TPU VM)
and Ctrl-C save and exit 0; a NaN/Inf loss or validation output stops before anything
non-finite is saved. The config is checked whole (`resnet_jax.config.validate`) before any data
loads; a damaged latest checkpoint is reported and the newest intact one resumed; a workdir
written with another data set, batch or schedule is refused unless --allow_config_change.
"""

if __name__ == "__main__":  # the console script's start-up (resnet_jax.cli), before any import
    from resnet_jax import cli
    cli.start("train")

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags
from absl import logging as absl_logging

import resnet_jax
import resnet_jax.kernels
from resnet_jax import (checkpoint, cli, errors, lines, metrics_log, parallel, periodic,
                        progress, storage)
from resnet_jax import schedule as schedule_lib
from resnet_jax import workdir as workdir_lib
from resnet_jax import config as config_lib
from resnet_jax.data import pipeline, sources
from resnet_jax.evaluate import NonFiniteOutput, evaluate_batches, make_eval_step
from resnet_jax.errors import UserError, exit_on_user_error
from resnet_jax.kernels import cpu
from resnet_jax.models import XLA, Kernels, layout

BEST_METRIC = "val_top1"
# The console: the trainer's own lines at INFO; orbax and jax (absl logging) only warnings.
log = logging.getLogger("resnet_jax.train")


# Kept here for the tests and benchmarks that load configs through the trainer.
load_config = config_lib.load_config


# ---------------------------------------------------------------------------------------------
# State, optimizer, steps


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32: steps taken
    params: Any
    batch_stats: Any
    opt_state: Any
    schedule: schedule_lib.ScheduleState  # what the learning rate depends on besides the step

    @property
    def variables(self):
        return {"params": self.params, "batch_stats": self.batch_stats}

    def train_item(self):
        """Everything but the weights: the checkpoint's `train` item (the schedule's fields
        flat beside the step and optimizer state, `schedule_lib.stored`)."""
        return dict(step=self.step, opt_state=self.opt_state,
                    **schedule_lib.stored(self.schedule))


def decay_mask(config, params):
    if config.weight_decay_on == "all":
        return jax.tree.map(lambda _: True, params)
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def optimizer(config) -> optax.GradientTransformation:
    """PyTorch's SGD: g + wd * w into a momentum buffer (no dampening); the step multiplies by -lr
    itself, so the learning rate can depend on state (warm-up, plateaus)."""
    return optax.chain(optax.add_decayed_weights(config.weight_decay, functools.partial(decay_mask, config)),
                       optax.trace(decay=config.momentum))


def create_model(config, num_classes: int, kernels: Kernels = XLA):
    """(the config's model computing with `kernels`, the options its checkpoints record)."""
    options = dict(config.model_options)
    options["num_classes"] = num_classes
    model_options = dict(options)  # what the checkpoint's metadata records (JSON-able)
    options["dtype"] = jnp.dtype(config.compute_dtype)  # one of config.DTYPES (validate)
    # Any image size: the trainer takes its data's, which the checkpoint records (image_size).
    return (resnet_jax.create_model(config.model, kernels=kernels, input_size=None, **options),
            model_options)


def _init_fn(config, model, image_size: int):
    def init():
        variables = model.init(jax.random.key(config.seed),
                               jnp.zeros((1, image_size, image_size, 3), jnp.float32))
        params = variables["params"]
        return TrainState(step=jnp.int32(0), params=params,
                          batch_stats=variables.get("batch_stats", {}),
                          opt_state=optimizer(config).init(params),
                          schedule=schedule_lib.init(config))
    return init


def init_state(config, model, mesh, image_size: int) -> TrainState:
    """Fresh state (the same on any mesh: initialisation is a function of the seed), replicated.
    The init runs whole on every device, so partitionable threefry buys nothing here, and
    XLA:CPU compiles it about 5x slower (30 s instead of 6 s for a ResNet-20 on two cores)."""
    with jax.threefry_partitionable(False):
        return jax.jit(_init_fn(config, model, image_size), out_shardings=parallel.replicated(mesh))()


def abstract_state(config, model, mesh, image_size: int) -> TrainState:
    """Shapes, dtypes and the replicated sharding on *this* mesh: the restore target, so a
    checkpoint written on any number of devices lands on the current ones."""
    sharding = parallel.replicated(mesh)
    shapes = jax.eval_shape(_init_fn(config, model, image_size))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def _forward(model, config, variables, x, rng):
    """Training-mode forward; with bn_group_size, each group of images has its own BN statistics."""
    def apply(xs):
        return model.apply(variables, xs, train=True, mutable=["batch_stats"], rngs={"dropout": rng})
    group = config.bn_group_size
    if not group or group >= x.shape[0]:
        logits, updates = apply(x)
        return logits, updates.get("batch_stats", {})
    logits, updates = jax.vmap(apply)(x.reshape((-1, group) + x.shape[1:]))
    stats = jax.tree.map(lambda s: s.mean(0), updates.get("batch_stats", {}))
    return logits.reshape((x.shape[0],) + logits.shape[2:]), stats


def make_train_step(config, model, mesh, normalization: checkpoint.Normalization):
    """jit(state, uint8 images [B,H,W,3], int32 labels [B]) -> (state, metrics); the state is
    donated, the batch sharded along `data`, everything else replicated."""
    tx = optimizer(config)
    dropout_key = jax.random.fold_in(jax.random.key(config.seed), 1)

    def step_fn(state: TrainState, images, labels):
        x = normalization(images)

        def loss_fn(params):
            logits, stats = _forward(model, config, {"params": params, "batch_stats": state.batch_stats},
                                     x, jax.random.fold_in(dropout_key, state.step))
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (logits, stats)

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        lr = schedule_lib.learning_rate(config, state.step, state.schedule)
        params = jax.tree.map(lambda p, u: p - lr.astype(p.dtype) * u, state.params, updates)
        correct = jnp.sum(jnp.argmax(logits, -1) == labels, dtype=jnp.int32)
        sched = schedule_lib.warmup(config, state.schedule, state.step,
                                    1.0 - correct / labels.shape[0])
        new = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                            opt_state=opt_state, schedule=sched)
        return new, dict(loss=loss, correct=correct, lr=lr)

    rep, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(step_fn, in_shardings=(rep, batch, batch), out_shardings=(rep, rep),
                   donate_argnums=0)


# ---------------------------------------------------------------------------------------------
# Data, checkpoints, metrics


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


def save(mngr: ocp.CheckpointManager, state: TrainState, meta: Dict, metrics: Dict) -> int:
    """Start an asynchronous save of `state` at its step (returns once arrays are on the host),
    in the stored layout (`layout.to_checkpoint`: the optimizer state's copies of the parameters
    too), with the checksums `restore` verifies."""
    step = int(jax.device_get(state.step))
    if step not in mngr.all_steps():
        model = layout.to_checkpoint(state.variables)
        train = layout.to_checkpoint(state.train_item())
        meta = checkpoint.for_saving(mngr, step, meta, model=model, train=train)
        with _writing(mngr, step):
            mngr.save(step, metrics=metrics, args=ocp.args.Composite(
                model=ocp.args.StandardSave(model), train=ocp.args.StandardSave(train),
                metadata=ocp.args.JsonSave(meta)))
    return step


def wait_for_saves(mngr: ocp.CheckpointManager, step: int) -> None:
    with _writing(mngr, step):
        mngr.wait_until_finished()


class WriteFailed(UserError):
    """The workdir stopped taking files (full, or made read-only) during training."""
    exit_at_once = True


@contextlib.contextmanager
def _writing(mngr, step: int):
    """A failed write (a full disk, a workdir made read-only) as one line; earlier steps stay."""
    try:
        yield
    except Exception as e:
        raise WriteFailed(f"could not write the checkpoint of step {step} in "
                          f"{str(mngr.directory)!r} ({checkpoint.first_line(e)}); the steps saved "
                          "before it are kept; free space or fix permissions and rerun the same "
                          "command to resume") from None


def restore(mngr: ocp.CheckpointManager, step: int, target: TrainState) -> TrainState:
    """The state saved at `step`, verified against its checksums (checkpoint.DamagedCheckpoint),
    in the model's layout and placed as `target` says."""
    directory = str(mngr.directory)
    meta = checkpoint.read_metadata(directory, step, mngr=mngr)
    restored = checkpoint.restore_checked(mngr, directory, step, meta, dict(
        model=target.variables, train=target.train_item()))
    train = dict(restored["train"])
    step, opt_state = train.pop("step"), train.pop("opt_state")
    return target.replace(**restored["model"], step=step, opt_state=opt_state,
                          schedule=schedule_lib.restored(train, target.schedule))


def resume(mngr: ocp.CheckpointManager, steps,
           target: TrainState) -> Tuple[Optional[TrainState], List[int]]:
    """(the state of the newest intact step among `steps`, the damaged steps newer than it): a
    damaged step is reported in one line and left in place, never deleted."""
    damaged = []
    for step in sorted(steps, reverse=True):
        try:
            return restore(mngr, step, target), damaged
        except checkpoint.DamagedCheckpoint as e:
            damaged.append(step)
            log.warning("%s; left in place, trying the step before it", e)
    if damaged:
        raise UserError(f"every checkpoint in {str(mngr.directory)!r} is damaged (steps "
                        f"{sorted(damaged)}, see above); choose another --workdir")
    return None, damaged


def _json_normal(value):
    return json.loads(json.dumps(value))


# Config keys a resumed run may change: they do not change what is trained. The model is
# compared on its own (`check_model`): another model is refused whatever the flags.
FREE_TO_CHANGE = ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "keep_best",
                  "eval_batch_size", "data.data_dir", "responses_images", "responses_every",
                  "profile_steps", "profile_every_process")
MODEL_KEYS = ("model", "model_options")


def _flatten(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def config_changes(stored: Dict, config: ml_collections.ConfigDict) -> List[str]:
    """['lr 0.1 -> 0.2', ...]: what differs between the config in a checkpoint's metadata and
    `config`, but for FREE_TO_CHANGE and the model; none for converted weights (no config)."""
    if not stored.get("config"):
        return []
    before = _flatten(_json_normal(stored["config"]))
    now = _flatten(json.loads(config.to_json_best_effort()))
    for side in (before, now):  # the same folder however named; its content: check_workdir
        side["data.source"] = sources.identity(str(side.get("data.source", "")))
    return [f"{key} {before.get(key, '(absent)')!r} -> {now.get(key, '(absent)')!r}"
            for key in sorted(set(before) | set(now))
            if key not in FREE_TO_CHANGE and key.split(".")[0] not in MODEL_KEYS
            and before.get(key) != now.get(key)]


def check_model(workdir: str, step: int, stored: Dict, model: str, options: Dict) -> None:
    """Refuses a workdir holding another model; `options` without num_classes (before the data
    is loaded) compare with the stored ones without it too."""
    theirs = dict(stored.get("model_options") or {})
    if "num_classes" not in options:
        theirs.pop("num_classes", None)
    if (stored.get("model"), theirs) != (model, _json_normal(options)):
        raise UserError(f"workdir {workdir!r} holds a checkpoint of {stored.get('model')} "
                        f"{stored.get('model_options')} (step {step}), not of {model} "
                        f"{_json_normal(options)}; choose another --workdir")


def newest_metadata(mngr: ocp.CheckpointManager, workdir: str) -> Tuple[Optional[int], Dict]:
    """(step, metadata) of the newest step whose metadata reads; (None, {}) if none does
    (`resume` reports damaged steps)."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            return step, checkpoint.read_metadata(workdir, step, mngr=mngr)
        except checkpoint.DamagedCheckpoint:
            continue
    return None, {}


def check_config_unchanged(workdir: str, config, allow_change: bool = False) -> None:
    """Before any data loads: a workdir trained with another data set, batch, schedule or
    optimizer is refused (naming each change) unless `allow_change`."""
    if "://" not in workdir and not os.path.isdir(workdir):
        return
    with checkpoint.manager(workdir, read_only=True) as mngr:
        step, stored = newest_metadata(mngr, workdir)
    if step is None:
        return
    check_model(workdir, step, stored, config.model, dict(config.model_options))
    changes = config_changes(stored, config)
    if changes and not allow_change:
        raise UserError(f"workdir {workdir!r} (step {step}) was trained with another config: "
                        f"{'; '.join(changes)}; rerun with the same config, choose another "
                        "--workdir, or pass --allow_config_change to resume with this one")
    if changes:
        log.warning("resuming %s with a changed config: %s", workdir, "; ".join(changes))


def check_workdir(mngr: ocp.CheckpointManager, workdir: str, meta: Dict,
                  allow_change: bool = False) -> List[int]:
    """The workdir's steps (empty for a fresh workdir); refuses another model's, or one trained
    on other classes or (unless `allow_change`) other images."""
    step, stored = newest_metadata(mngr, workdir)
    if step is None:
        return mngr.all_steps()
    check_model(workdir, step, stored, meta["model"], meta["model_options"])
    if stored.get("classes") and stored["classes"] != meta["classes"]:
        sources.check_classes("the data of this run", meta["classes"], stored["classes"],
                              f"workdir {workdir!r} (step {step})'s")
    if workdir_lib.check_data(workdir, step, stored, meta, allow_change):
        log.warning("resuming %s on changed training data", workdir)
    return mngr.all_steps()


class MetricWriter:
    """metrics.jsonl (whole lines only: `lines.LineLog`) and TensorBoard events in the workdir,
    from process 0 only. A resumed run appends, so a step can appear twice; the later record is
    the one that the run continued from. A remote workdir (gs://...) gets its rows in parts, one
    per `flush`, which the loop calls at each checkpoint (metrics_log.RemoteLog)."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter
        self.path = storage.path(workdir) / "metrics.jsonl"
        self.remote = metrics_log.RemoteLog(workdir) if "://" in workdir else None
        if self.remote is None:  # workdir_lib.prepare made the folder
            self.jsonl = lines.LineLog(self.path)
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Dict[str, float]):
        if self.enabled:
            self._guarded(self._write, step, scalars)

    def flush(self):
        if self.enabled and self.remote:
            self._guarded(self.remote.flush)

    def _guarded(self, fn, *args):
        try:
            fn(*args)
        except (Exception if self.remote else OSError) as e:  # gcsfs raises its own HttpError
            raise WriteFailed(f"cannot write metrics to {str(self.path)!r} ("
                              f"{getattr(e, 'strerror', None) or e}); free space or fix "
                              "permissions and rerun the same command to resume") from None

    def _write(self, step: int, scalars: Dict[str, float]):
        if self.remote:
            return self.remote.add(step, scalars)
        self.jsonl.append(lines.dumps(dict(step=step, **scalars)) + "\n")
        metrics_log.to_tensorboard(self.tb, step, scalars)
        self.tb.flush()

    def close(self):
        if self.enabled and self.remote:
            self.flush()
        elif self.enabled:
            self.jsonl.close()
            self.tb.close()


class Preemption:
    """SIGTERM or Ctrl-C (SIGINT) -> save and stop. Alone, a flag set by a handler (a second
    Ctrl-C interrupts at once); with several processes, JAX's preemption sync point (SIGTERM), so
    that every process stops at the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: Optional[str] = None  # the signal's name
        self.multi = jax.process_count() > 1
        self._previous = {} if self.multi else {s: signal.signal(s, self._handle)
                                                for s in self.SIGNALS}

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        signal.signal(signal.SIGINT, self._previous[signal.SIGINT])

    def reached(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                self.requested = "SIGTERM"
        return bool(self.requested)

    def close(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def itstime(step: int, every: int, last: int) -> bool:
    """Whether a periodic action of period `every` (validated >= 1) falls after `step` steps;
    the last step always (big_vision's utils.itstime)."""
    return step == last or step % every == 0


class TrainingDiverged(UserError):
    pass


# ---------------------------------------------------------------------------------------------
# The loop


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Every problem of the config (`resnet_jax.config.validate`) as one UserError, a line each."""
    problems = config_lib.validate(config, num_devices)
    if problems:
        raise UserError("\n".join(problems))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh: Optional[jax.sharding.Mesh] = None,
                       allow_config_change: bool = False) -> Dict[str, Any]:
    """Train `config` in `workdir` (resuming if it holds a checkpoint); returns the last metrics,
    with 'preempted': True if SIGTERM or Ctrl-C stopped it. A workdir written with another
    config is refused unless `allow_config_change`."""
    mesh = mesh or parallel.make_mesh()
    check_config(config, mesh.devices.size)
    create_model(config, num_classes=10)  # an unknown model or option fails before data loads
    workdir_lib.prepare(workdir)
    with workdir_lib.Lock(workdir, enabled=parallel.is_main_process()), \
            errors.stop_on_sigterm(enabled=jax.process_count() == 1):  # else JAX's sync point
        return _train(config, workdir, mesh, allow_config_change)


def _train(config, workdir: str, mesh, allow_config_change: bool) -> Dict[str, Any]:
    """train_and_evaluate's work, in a checked and locked workdir."""
    check_config_unchanged(workdir, config, allow_config_change)
    parallel.check_shared_directory(workdir)
    main = parallel.is_main_process()
    data = make_data(config, mesh)
    model, model_options = create_model(config, len(data.classes),
                                        resnet_jax.kernels.for_devices(mesh.devices.flat))
    workdir_lib.check_free_space(workdir, checkpoint.abstract_variables(model, data.image_size))
    meta = checkpoint.metadata(config.model, model_options, data.normalization, extra=dict(
        image_size=data.image_size, dataset=config.data.source, classes=list(data.classes),
        train_data=data.fingerprint,
        config=json.loads(config.to_json_best_effort())))
    if main:
        log.info("%s on %d devices (%d processes); %s", config.model, mesh.devices.size,
                 jax.process_count(), data.description)

    mngr = checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints,
                              best_metric=BEST_METRIC, keep_best=config.keep_best)
    writer = preemption = profiler = None
    try:
        steps = check_workdir(mngr, workdir, meta, allow_config_change)
        writer = MetricWriter(workdir, main)
        preemption = Preemption()
        profiler = periodic.Profiler(config.profile_steps, os.path.join(workdir, "tensorboard"),
                                     config.profile_every_process)
        result = _loop(config, workdir, mesh, model, meta, data, mngr, steps, writer, preemption,
                       profiler)
    except BaseException:
        # quietly: a second error would hide the first
        _close_all(data.train, profiler, preemption, writer, mngr, quietly=True)
        raise
    with _writing(mngr, result["step"]):
        _close_all(data.train, profiler, preemption, writer, mngr)
    return result


def _close_all(*things, quietly: bool = False):
    """Close each of `things` that can be (the host input pipeline's workers among them)."""
    for thing in things:
        if not hasattr(thing, "close"):
            continue
        if quietly:
            with contextlib.suppress(Exception):
                thing.close()
        else:
            thing.close()


def _loop(config, workdir, mesh, model, meta, data: Data, mngr, steps, writer, preemption,
          profiler):
    main = parallel.is_main_process()
    image_size = data.image_size
    state, damaged = resume(mngr, steps, abstract_state(config, model, mesh, image_size))
    last_saved = None if state is None else int(jax.device_get(state.step))
    if state is None:
        state = init_state(config, model, mesh, image_size)
    elif main:
        log.info("resumed from %s step %d%s", workdir, last_saved,
                 f" (the damaged steps {damaged} are left in place)" if damaged else "")
    source = data.train
    train_step = make_train_step(config, model, mesh, data.normalization)
    eval_step = make_eval_step(model, mesh, data.normalization)
    probe = periodic.ResponseProbe(model, data.normalization,
                                   data.val_images(config.responses_images)) \
        if config.responses_images else None

    def run_eval(batches, split: str):
        try:
            return evaluate_batches(eval_step, state.variables, batches())
        except NonFiniteOutput as e:
            wait_for_saves(mngr, step)
            kept = f"the last good checkpoint (step {last_saved}) is kept" \
                if last_saved is not None else "no checkpoint had been saved"
            raise TrainingDiverged(f"{split} at step {step}: {e}; training stopped and {kept} "
                                   f"in {workdir!r}") from None

    step = int(jax.device_get(state.step))
    warmup_logged = bool(jax.device_get(state.schedule.warmup_end) >= 0)
    pending = []
    clock = (time.perf_counter(), step)
    input_wait = 0.0  # seconds the loop waited for batches since the last log: input-bound if ~all
    result: Dict[str, Any] = dict(step=step)

    def flush():
        """The host sync: check the loss, log, write metrics."""
        nonlocal pending, clock, warmup_logged, input_wait
        if not pending:
            return
        got = jax.device_get(pending)
        first = step - len(got) + 1
        for i, m in enumerate(got):
            if not np.isfinite(m["loss"]):
                wait_for_saves(mngr, step)
                kept = f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None \
                    else "no checkpoint had been saved"
                raise TrainingDiverged(f"loss became {m['loss']} at step {first + i}; training "
                                       f"stopped and {kept} in {workdir!r}; lower --config.lr or "
                                       "check the data")
        now = time.perf_counter()
        rate = (step - clock[1]) * config.batch_size / max(now - clock[0], 1e-9)
        scalars = dict(loss=float(np.mean([m["loss"] for m in got])),
                       train_top1=float(sum(m["correct"] for m in got)) / (len(got) * config.batch_size),
                       lr=float(got[-1]["lr"]), images_per_s=rate, input_wait=input_wait / len(got))
        eta = (config.num_steps - step) * config.batch_size / rate if rate > 0 else float("inf")
        if main:
            log.info("step %d/%d  loss %.4f  acc %.2f%%  lr %.4g  %.0f img/s  input wait %.0f "
                     "ms/step  ETA %s", step, config.num_steps, scalars["loss"],
                     100 * scalars["train_top1"], scalars["lr"], rate,
                     1000 * scalars["input_wait"], progress.hms(eta))
            if not warmup_logged and config.warmup_lr:
                end = int(jax.device_get(state.schedule.warmup_end))
                if end >= 0:
                    log.info("warm-up over: training error fell below %.0f%% at step %d; lr %g "
                             "-> schedule", 100 * config.warmup_until_error, end, config.warmup_lr)
                    writer.write(end, dict(warmup_end=end))
                    warmup_logged = True
        writer.write(step, scalars)
        result.update(scalars)
        pending = []
        input_wait = 0.0
        clock = (time.perf_counter(), step)

    def evaluate_and_save():
        nonlocal state, last_saved
        val = run_eval(data.val, "validation")
        state = state.replace(schedule=schedule_lib.plateau(config, state.schedule,
                                                            1.0 - val["top1"], mesh))
        scalars = {f"val_{k}": v for k, v in val.items()}
        writer.write(step, scalars)
        result.update(scalars, val_step=step)  # a preempted run's result is of a later step
        if main:
            log.info("step %d  val top-1 %.2f%%  top-5 %.2f%%  loss %.4f", step,
                     100 * val["top1"], 100 * val["top5"], val["loss"])
        if step in damaged:  # orbax does not write over a step: that one stays as it was found
            log.warning("step %d is not saved: the damaged checkpoint of that step is in the way "
                        "(remove %s to let a run save it)", step,
                        os.path.join(str(mngr.directory), str(step)))
        else:
            last_saved = save(mngr, state, meta, {BEST_METRIC: val["top1"]})
        writer.flush()
        clock_reset()

    def clock_reset():
        nonlocal clock
        clock = (time.perf_counter(), step)

    in_flight = parallel.InFlight()
    while step < config.num_steps:
        asked = time.perf_counter()
        images, labels = source.batch(step)
        input_wait += time.perf_counter() - asked
        with profiler.step(step):
            state, metrics = train_step(state, images, labels)
        pending.append(metrics)
        in_flight.add(metrics)
        step += 1
        profiler.after(step, state)
        at_end = step == config.num_steps
        if itstime(step, config.checkpoint_every, config.num_steps):
            flush()
            evaluate_and_save()
        elif itstime(step, config.log_every, config.num_steps):
            flush()
        if probe and itstime(step, config.responses_every or config.checkpoint_every,
                             config.num_steps):
            writer.write(step, probe(state.variables))
            clock_reset()
        if not at_end and preemption.reached(step):
            flush()
            # not evaluated (preemption leaves seconds): ranks last for keep-best, kept as latest
            if step not in damaged:
                last_saved = save(mngr, state, meta, {BEST_METRIC: -1.0})
            wait_for_saves(mngr, step)
            if main:
                log.info("%s: saved step %d in %s; rerun the same command to resume",
                         preemption.requested, step, workdir)
            return dict(result, step=step, preempted=True)

    if "val_top1" not in result:  # a finished workdir run again: report, do not retrain
        if step in mngr.all_steps():
            result.update({f"val_{k}": v for k, v in run_eval(data.val, "validation").items()},
                          val_step=step)
        else:
            evaluate_and_save()
    if data.test is not None:
        test = run_eval(data.test, "test")
        writer.write(step, {f"test_{k}": v for k, v in test.items()})
        result.update({f"test_{k}": v for k, v in test.items()})
        if main:
            log.info("test top-1 %.2f%%", 100 * test["top1"])
    wait_for_saves(mngr, step)
    return dict(result, step=step)


# ---------------------------------------------------------------------------------------------
# Command line

FLAGS = flags.FLAGS


def _define_flags():
    from ml_collections import config_flags
    config_flags.DEFINE_config_file(
        "config", None, "a shipped config or a file and its argument, e.g. cifar10:resnet56 or "
        "configs/cifar10.py:resnet56; "
        "override any key with --config.KEY=VALUE", lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl and TensorBoard events; a "
                        "workdir holding a checkpoint of the same model is resumed")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (several processes "
                        "started by hand; else JAX_COORDINATOR_ADDRESS or cluster detection)")
    flags.DEFINE_integer("num_processes", None, "number of processes (else JAX_NUM_PROCESSES)")
    flags.DEFINE_integer("process_id", None, "this process's index (else JAX_PROCESS_ID)")
    flags.DEFINE_bool("allow_config_change", False, "resume a workdir although its checkpoint "
                      "was trained with another data set, batch size, schedule or optimizer")
    flags.DEFINE_bool("describe", False, "print every config key with its value in --config "
                      "(without --config: the defaults), its default and its meaning, then exit")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options go as --flag=value")
    if FLAGS.describe:
        print(config_lib.describe(FLAGS.config or config_lib.default_config()))
        return
    with exit_on_user_error():
        check_config(FLAGS.config, num_devices=1)  # the device count is checked once known
        cpu.use_cpu_cores((FLAGS.config.batch_size, FLAGS.config.eval_batch_size))
        parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
        absl_logging.set_verbosity(absl_logging.WARNING)
        checkpoint.quiet_orbax()
        if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # a resumed run skips compiling
            jax.config.update("jax_compilation_cache_dir", os.path.join(os.environ.get(
                "RESNET_JAX_CACHE", os.path.expanduser("~/.cache/resnet_jax")), "jax-compile"))
        log.setLevel(logging.INFO if parallel.is_main_process() else logging.WARNING)
        if not FLAGS.workdir:
            raise UserError("--workdir is required (checkpoints and metrics go there)")
        result = train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                    allow_config_change=FLAGS.allow_config_change)
        if parallel.is_main_process():
            print(lines.dumps(result), flush=True)


def run():
    _define_flags()
    with exit_on_user_error():
        sys.argv[1:] = config_lib.command_line(sys.argv[1:])
    cli.absl_run(main, __name__)


