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
saves and exits 0; a NaN/Inf loss stops before anything non-finite is saved.
"""

if __name__ == "__main__":  # before the imports below, while a restart costs nothing (preload)
    from resnet_jax import preload
    preload.use_tcmalloc()

import dataclasses
import functools
import importlib.util
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

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
from resnet_jax import checkpoint, parallel
from resnet_jax.data import pipeline, sources
from resnet_jax.evaluate import evaluate_batches, make_eval_step
from resnet_jax.errors import UserError, exit_on_user_error
from resnet_jax.kernels import cpu
from resnet_jax.models import XLA, Kernels

BEST_METRIC = "val_top1"
# The console: the trainer's own lines at INFO; orbax and jax (absl logging) only warnings.
log = logging.getLogger("resnet_jax.train")


def default_config() -> ml_collections.ConfigDict:
    """Every knob of the trainer with the paper's CIFAR-10 values (Sec. 4.2); the files in configs/
    start from this and change what their recipe changes."""
    c = ml_collections.ConfigDict()
    c.model = "resnet56"
    # Passed to resnet_jax.create_model; a config lists the ones its nets take so overrides are
    # checked (--config.model_options.shortcut=B).
    c.model_options = ml_collections.ConfigDict(dict(shortcut="A", widths=(16, 32, 64),
                                                     zero_init_last=False))
    c.data = ml_collections.ConfigDict(dict(
        source="cifar10",    # tfds name, folder:PATH or synthetic[:N]
        data_dir="",         # tfds data_dir ('' = tfds's default)
        train_split="train",
        test_split="test",
        holdout=0,           # 5000: train on 45k, validate on the other 5k (the paper's split for
                             # choosing the schedule); 0: train on all 50k, validate on test
        pad=4,               # pad-and-crop pixels; 0 turns augmentation off
        pipeline="device",   # the split in device memory, augmented there; 'host' for ImageNet
    ))
    c.seed = 0
    c.batch_size = 128       # global, over all devices and processes
    c.eval_batch_size = 512
    c.num_steps = 64_000
    # Learning rate: lr * lr_decay ** (number of boundaries passed), times the plateau factor.
    c.lr = 0.1
    c.lr_boundaries = (32_000, 48_000)
    c.lr_decay = 0.1
    c.lr_plateau_patience = 0  # > 0: also divide when val top-1 error has not improved by
    c.lr_plateau_min_delta = 0.001  # this much for that many evaluations (ImageNet, Sec. 3.4)
    # ResNet-110/1202's warm-up (Sec. 4.2): warmup_lr until the training error falls below
    # warmup_until_error, then the schedule. 0 turns it off. The training error is the batches'
    # running mean (weight warmup_smoothing on the past, ~20 batches): one lucky batch of 128 ended
    # ResNet-110's warm-up at step 15, and lr 0.1 then sent its loss from 2.3 to 2.9 (the paper's
    # warm-up lasts "about 400 iterations").
    c.warmup_lr = 0.0
    c.warmup_until_error = 0.8
    c.warmup_smoothing = 0.95
    c.momentum = 0.9
    c.weight_decay = 1e-4
    # 'all': every parameter, BN scale and bias included, as the paper's Caffe/Torch code and the
    # PyTorch reference run do (an L2 term on all weights); 'kernels': conv and dense kernels only.
    c.weight_decay_on = "all"
    c.bn_group_size = 0      # 0: BN over the global batch; G: over groups of G images (see above)
    c.compute_dtype = "float32"  # 'bfloat16' for TPU/GPU: activations in bf16, params in f32
    c.log_every = 100
    c.checkpoint_every = 2000  # evaluate and save
    c.keep_checkpoints = 3
    c.keep_best = 1
    c.lock()
    return c


def load_config(spec: str) -> ml_collections.ConfigDict:
    """'configs/cifar10.py:resnet56' -> that file's get_config('resnet56') (for tests and
    benchmarks; the CLI uses ml_collections' config_flags, which also applies overrides)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} not found; e.g. --config configs/cifar10.py:resnet56")
    module_spec = importlib.util.spec_from_file_location("_resnet_jax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path!r} has no get_config()")
    return module.get_config(arg) if arg else module.get_config()


# ---------------------------------------------------------------------------------------------
# State, optimizer, steps


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32: steps taken
    params: Any
    batch_stats: Any
    opt_state: Any
    lr_scale: jax.Array  # float32: 1, then / 10 per plateau
    warmup_done: jax.Array  # bool
    warmup_end: jax.Array  # int32: the step at which warm-up ended, -1 before
    warmup_error: jax.Array  # float32: running training error (warm-up rule; not checkpointed)
    best_error: jax.Array  # float32: best val top-1 error so far (plateau rule)
    stale_evals: jax.Array  # int32: evaluations since it last improved

    @property
    def variables(self):
        return {"params": self.params, "batch_stats": self.batch_stats}

    def train_item(self):
        """Everything but the weights: the checkpoint's `train` item."""
        return {k: getattr(self, k) for k in ("step", "opt_state", "lr_scale", "warmup_done",
                                               "warmup_end", "best_error", "stale_evals")}


def decay_mask(config, params):
    if config.weight_decay_on == "all":
        return jax.tree.map(lambda _: True, params)
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def optimizer(config) -> optax.GradientTransformation:
    """PyTorch's SGD: g + wd * w into a momentum buffer (no dampening); the step multiplies by -lr
    itself, so the learning rate can depend on state (warm-up, plateaus)."""
    if config.weight_decay_on not in ("all", "kernels"):
        raise UserError(f"weight_decay_on must be 'all' or 'kernels', not {config.weight_decay_on!r}")
    return optax.chain(optax.add_decayed_weights(config.weight_decay, functools.partial(decay_mask, config)),
                       optax.trace(decay=config.momentum))


def learning_rate(config, step, lr_scale, warmup_done):
    passed = jnp.sum(step >= jnp.asarray(config.lr_boundaries or (), jnp.int32))
    lr = config.lr * config.lr_decay ** passed * lr_scale
    if config.warmup_lr:
        lr = jnp.where(warmup_done, lr, config.warmup_lr)
    return lr.astype(jnp.float32)


def create_model(config, num_classes: int, kernels: Kernels = XLA):
    """(the config's model computing with `kernels`, the options its checkpoints record)."""
    options = dict(config.model_options)
    options["num_classes"] = num_classes
    model_options = dict(options)  # what the checkpoint's metadata records (JSON-able)
    if config.compute_dtype != "float32":
        if config.compute_dtype != "bfloat16":
            raise UserError(f"compute_dtype must be 'float32' or 'bfloat16', not {config.compute_dtype!r}")
        options["dtype"] = jnp.bfloat16
    return resnet_jax.create_model(config.model, kernels=kernels, **options), model_options


def _init_fn(config, model, image_size: int):
    def init():
        variables = model.init(jax.random.key(config.seed),
                               jnp.zeros((1, image_size, image_size, 3), jnp.float32))
        params = variables["params"]
        return TrainState(step=jnp.int32(0), params=params,
                          batch_stats=variables.get("batch_stats", {}),
                          opt_state=optimizer(config).init(params), lr_scale=jnp.float32(1.0),
                          warmup_done=jnp.asarray(not config.warmup_lr), warmup_end=jnp.int32(-1),
                          warmup_error=jnp.float32(1.0), best_error=jnp.float32(1.0),
                          stale_evals=jnp.int32(0))
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


def warmup_rule(config, state: TrainState, train_error) -> TrainState:
    """Sec. 4.2's warm-up ends for good at the first step where the running training error
    (`warmup_smoothing`) is below `warmup_until_error`; `warmup_end` records that step (counted
    from 1, as the log counts) for the log. The running error starts at 1 and is not in the
    checkpoint: a run resumed during warm-up measures it afresh (some 20 batches more at
    warmup_lr), which keeps old checkpoints restorable."""
    smoothing = config.warmup_smoothing
    error = smoothing * state.warmup_error + (1.0 - smoothing) * train_error
    done = state.warmup_done | (error < config.warmup_until_error)
    end = jnp.where(done & ~state.warmup_done, state.step + 1, state.warmup_end)
    return state.replace(warmup_done=done, warmup_end=end, warmup_error=error.astype(jnp.float32))


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
    if config.bn_group_size and config.batch_size % config.bn_group_size:
        raise UserError(f"bn_group_size {config.bn_group_size} does not divide batch_size "
                        f"{config.batch_size}")
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
        lr = learning_rate(config, state.step, state.lr_scale, state.warmup_done)
        params = jax.tree.map(lambda p, u: p - lr.astype(p.dtype) * u, state.params, updates)
        correct = jnp.sum(jnp.argmax(logits, -1) == labels, dtype=jnp.int32)
        state = warmup_rule(config, state, 1.0 - correct / labels.shape[0])
        new = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                            opt_state=opt_state)
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
    num_classes: int
    image_size: int
    description: str


def load_splits(config) -> Tuple[sources.Dataset, sources.Dataset, Optional[sources.Dataset]]:
    """(train, val, test) in memory: with a holdout, val is carved from the training split and
    test is evaluated once at the end; without, the test split is the validation split."""
    d = config.data
    load = functools.partial(sources.load, d.source, data_dir=d.data_dir or None)
    train = load(d.train_split)
    test = load(d.test_split)
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
    if d.pipeline != "device":
        raise UserError(f"data.pipeline must be 'device' or 'host', not {d.pipeline!r}")
    train, val, test = load_splits(config)
    evals = lambda ds: (lambda: pipeline.eval_batches(ds, config.eval_batch_size, mesh))
    return Data(
        train=pipeline.DeviceInput(train, config.batch_size, mesh, seed=config.seed, pad=d.pad,
                                   augment_images=d.pad > 0),
        val=evals(val), test=evals(test) if test is not None else None,
        normalization=checkpoint.Normalization(sources.mean_image(train.images)),
        num_classes=train.num_classes, image_size=train.images.shape[1],
        description=f"train {train.name} ({len(train)}), val {val.name} ({len(val)})")


def _host_data(config, mesh) -> Data:
    from resnet_jax.data import imagenet
    d = config.data
    data_dir = d.data_dir or None
    train = imagenet.open_split(d.source, d.train_split, data_dir)
    val = imagenet.open_split(d.source, d.test_split, data_dir)
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
        num_classes=train.num_classes, image_size=d.image_size,
        description=f"train {train.name} ({len(train)}), val {val.name} ({len(val)})")


def save(mngr: ocp.CheckpointManager, state: TrainState, meta: Dict, metrics: Dict) -> int:
    """Start an asynchronous save of `state` at its step (returns once arrays are on the host)."""
    step = int(jax.device_get(state.step))
    if step not in mngr.all_steps():
        mngr.save(step, metrics=metrics, args=ocp.args.Composite(
            model=ocp.args.StandardSave(state.variables),
            train=ocp.args.StandardSave(state.train_item()),
            metadata=ocp.args.JsonSave(meta)))
    return step


def restore(mngr: ocp.CheckpointManager, step: int, target: TrainState) -> TrainState:
    restored = mngr.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(target.variables),
        train=ocp.args.StandardRestore(target.train_item())))
    fresh = jax.device_put(np.float32(1.0), target.warmup_error.sharding)  # not checkpointed
    return target.replace(**restored["train"], **restored["model"], warmup_error=fresh)


def _json_normal(value):
    return json.loads(json.dumps(value))


def check_workdir(mngr: ocp.CheckpointManager, workdir: str, meta: Dict) -> Optional[int]:
    """The latest step to resume from, or None for a fresh workdir; refuses another model's."""
    step = mngr.latest_step()
    if step is None:
        return None
    stored = mngr.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
    mine = (meta["model"], _json_normal(meta["model_options"]))
    theirs = (stored.get("model"), stored.get("model_options"))
    if mine != theirs:
        raise UserError(f"workdir {workdir!r} holds a checkpoint of {theirs[0]} {theirs[1]} (step "
                        f"{step}), not of {mine[0]} {mine[1]}; choose another --workdir")
    return step


class MetricWriter:
    """metrics.jsonl and TensorBoard events in the workdir, from process 0 only. A resumed run
    appends, so a step can appear twice; the later record is the one that the run continued from.
    A remote workdir (gs://...) gets the JSONL rewritten whole at each write (object stores do not
    append; a run writes a few hundred lines)."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from etils import epath
        from tensorboardX import SummaryWriter
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.remote = "://" in workdir
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lines = self.path.read_text() if self.remote and self.path.exists() else ""
        self.jsonl = None if self.remote else open(self.path, "a")
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Dict[str, float]):
        if not self.enabled:
            return
        line = json.dumps(dict(step=step, **scalars)) + "\n"
        if self.remote:
            self.lines += line
            self.path.write_text(self.lines)
        else:
            self.jsonl.write(line)
            self.jsonl.flush()
        for name, value in scalars.items():
            self.tb.add_scalar(name, value, step)
        self.tb.flush()

    def close(self):
        if self.enabled:
            if self.jsonl:
                self.jsonl.close()
            self.tb.close()


class Preemption:
    """SIGTERM -> save and stop. Alone, a flag set by a handler; with several processes, JAX's
    preemption sync point, so that every process stops at the same step."""

    def __init__(self):
        self.requested = False
        self.multi = jax.process_count() > 1
        self._previous = None if self.multi else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self):
        if not self.multi:
            signal.signal(signal.SIGTERM, self._previous)


class TrainingDiverged(UserError):
    pass


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------------
# The loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh: Optional[jax.sharding.Mesh] = None) -> Dict[str, Any]:
    """Train `config` in `workdir` (resuming if it holds a checkpoint); returns the last metrics,
    with 'preempted': True if SIGTERM stopped it."""
    mesh = mesh or parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    create_model(config, num_classes=10)  # an unknown model or option fails before data loads
    parallel.check_shared_directory(workdir)
    main = parallel.is_main_process()
    data = make_data(config, mesh)
    model, model_options = create_model(config, data.num_classes,
                                        resnet_jax.kernels.for_devices(mesh.devices.flat))
    meta = checkpoint.metadata(config.model, model_options, data.normalization, extra=dict(
        image_size=data.image_size, dataset=config.data.source,
        config=json.loads(config.to_json_best_effort())))
    if main:
        log.info("%s on %d devices (%d processes); %s", config.model, mesh.devices.size,
                 jax.process_count(), data.description)

    with checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints,
                            best_metric=BEST_METRIC, keep_best=config.keep_best) as mngr:
        last_saved = check_workdir(mngr, workdir, meta)
        writer = MetricWriter(workdir, main)
        preemption = Preemption()
        try:
            return _loop(config, workdir, mesh, model, meta, data, mngr, last_saved, writer,
                         preemption)
        finally:
            preemption.close()
            writer.close()
            if hasattr(data.train, "close"):  # the host pipeline's thread and worker processes
                data.train.close()


def _loop(config, workdir, mesh, model, meta, data: Data, mngr, last_saved, writer, preemption):
    main = parallel.is_main_process()
    image_size = data.image_size
    if last_saved is None:
        state = init_state(config, model, mesh, image_size)
    else:
        state = restore(mngr, last_saved, abstract_state(config, model, mesh, image_size))
        if main:
            log.info("resumed from %s step %d", workdir, last_saved)
    source = data.train
    train_step = make_train_step(config, model, mesh, data.normalization)
    eval_step = make_eval_step(model, mesh, data.normalization)
    run_eval = lambda batches: evaluate_batches(eval_step, state.variables, batches())

    step = int(jax.device_get(state.step))
    warmup_logged = bool(jax.device_get(state.warmup_end) >= 0)
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
                mngr.wait_until_finished()
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
                     1000 * scalars["input_wait"], _hms(eta))
            if not warmup_logged and config.warmup_lr:
                end = int(jax.device_get(state.warmup_end))
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
        val = run_eval(data.val)
        state = plateau(config, state, 1.0 - val["top1"], mesh)
        scalars = {f"val_{k}": v for k, v in val.items()}
        writer.write(step, scalars)
        result.update(scalars)
        if main:
            log.info("step %d  val top-1 %.2f%%  top-5 %.2f%%  loss %.4f", step,
                     100 * val["top1"], 100 * val["top5"], val["loss"])
        last_saved = save(mngr, state, meta, {BEST_METRIC: val["top1"]})
        clock_reset()

    def clock_reset():
        nonlocal clock
        clock = (time.perf_counter(), step)

    in_flight = parallel.InFlight()
    while step < config.num_steps:
        asked = time.perf_counter()
        images, labels = source.batch(step)
        input_wait += time.perf_counter() - asked
        state, metrics = train_step(state, images, labels)
        pending.append(metrics)
        in_flight.add(metrics)
        step += 1
        at_end = step == config.num_steps
        if at_end or step % config.checkpoint_every == 0:
            flush()
            evaluate_and_save()
        elif step % config.log_every == 0:
            flush()
        if not at_end and preemption.reached(step):
            flush()
            # not evaluated (preemption leaves seconds): ranks last for keep-best, kept as latest
            last_saved = save(mngr, state, meta, {BEST_METRIC: -1.0})
            mngr.wait_until_finished()
            if main:
                log.info("SIGTERM: saved step %d in %s; rerun the same command to resume", step,
                         workdir)
            return dict(result, step=step, preempted=True)

    if "val_top1" not in result:  # a finished workdir run again: report, do not retrain
        if step in mngr.all_steps():
            result.update({f"val_{k}": v for k, v in run_eval(data.val).items()})
        else:
            evaluate_and_save()
    if data.test is not None:
        test = run_eval(data.test)
        writer.write(step, {f"test_{k}": v for k, v in test.items()})
        result.update({f"test_{k}": v for k, v in test.items()})
        if main:
            log.info("test top-1 %.2f%%", 100 * test["top1"])
    mngr.wait_until_finished()
    return dict(result, step=step)


def plateau(config, state: TrainState, val_error: float, mesh) -> TrainState:
    """ImageNet's rule (Sec. 3.4): divide the learning rate by 10 when the validation error has
    not improved by `lr_plateau_min_delta` for `lr_plateau_patience` evaluations. Host-side, at
    evaluations only; its bookkeeping lives in the state, so a resume continues it."""
    if not config.lr_plateau_patience:
        return state
    best, stale, scale = (float(x) for x in jax.device_get(
        (state.best_error, state.stale_evals, state.lr_scale)))
    if val_error < best - config.lr_plateau_min_delta:
        best, stale = val_error, 0
    else:
        stale += 1
    if stale >= config.lr_plateau_patience:
        scale, stale = scale * config.lr_decay, 0
        log.info("validation error plateaued at %.2f%%: lr scale now %g", 100 * best, scale)
    new = parallel.replicate(dict(best_error=np.float32(best), stale_evals=np.int32(stale),
                                  lr_scale=np.float32(scale)), mesh)
    return state.replace(**new)


# ---------------------------------------------------------------------------------------------
# Command line

FLAGS = flags.FLAGS


def _define_flags():
    from ml_collections import config_flags
    config_flags.DEFINE_config_file(
        "config", None, "a config file and its argument, e.g. configs/cifar10.py:resnet56; "
        "override any key with --config.KEY=VALUE", lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl and TensorBoard events; a "
                        "workdir holding a checkpoint of the same model is resumed")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (several processes "
                        "started by hand; else JAX_COORDINATOR_ADDRESS or cluster detection)")
    flags.DEFINE_integer("num_processes", None, "number of processes (else JAX_NUM_PROCESSES)")
    flags.DEFINE_integer("process_id", None, "this process's index (else JAX_PROCESS_ID)")


def check_overrides(argv) -> None:
    """config_flags meets an unknown --config.KEY with a traceback; name it in one line instead."""
    spec, overrides = None, []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            spec = argv[i + 1]
        elif arg.startswith(("--config=", "-config=")):
            spec = arg.split("=", 1)[1]
        elif arg.startswith(("--config.", "-config.")):
            overrides.append(arg.split(".", 1)[1].split("=", 1)[0])
    if spec is None:
        raise UserError("--config is required, e.g. --config configs/cifar10.py:resnet56")
    config = load_config(spec)
    for key in overrides:
        node = config
        for i, part in enumerate(key.split(".")):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                where = ".".join(key.split(".")[:i]) or "the config"
                raise UserError(f"unknown config key {key!r} ({part!r} is not in {where}; it has: "
                                f"{', '.join(known)})")
            node = node[part]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options go as --flag=value")
    with exit_on_user_error():
        cpu.use_cpu_cores((FLAGS.config.batch_size, FLAGS.config.eval_batch_size))
        parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
        absl_logging.set_verbosity(absl_logging.WARNING)
        if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # a resumed run skips compiling
            jax.config.update("jax_compilation_cache_dir", os.path.join(os.environ.get(
                "RESNET_JAX_CACHE", os.path.expanduser("~/.cache/resnet_jax")), "jax-compile"))
        log.setLevel(logging.INFO if parallel.is_main_process() else logging.WARNING)
        if not FLAGS.workdir:
            raise UserError("--workdir is required (checkpoints and metrics go there)")
        result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
        if parallel.is_main_process():
            print(json.dumps(result), flush=True)


def run():
    _define_flags()
    with exit_on_user_error():
        check_overrides(sys.argv[1:])
    app.run(main)


if __name__ == "__main__":  # delegate, so the config files' `import resnet_jax.train` is this module
    from resnet_jax import train
    train.run()
