"""Training: the paper's recipes as one jitted, sharded step and a loop around it (the state and
its optimizer: resnet_jax.state; the command line: resnet_jax.train_cli).

The step runs on a 1-D `data` mesh over every device of every process: the global batch is split
along `data`, the state replicated and donated, so BatchNorm normalises over the global batch;
`bn_group_size` gives each group of that many images its own statistics, as the paper's GPUs had.
The loop resumes from the workdir (resnet_jax.workdir), feeds batches that depend only on (seed,
step), syncs with the host only to log and evaluate, and saves asynchronously. Its state is one
value (`Loop`) that each of its parts takes and returns.
"""

if __name__ == "__main__":  # the console script's start-up (resnet_jax.cli), before any import
    from resnet_jax import cli
    cli.start("train")

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import resnet_jax
import resnet_jax.kernels
from resnet_jax import checkpoint, errors, parallel, periodic
from resnet_jax import schedule as schedule_lib
from resnet_jax import state as state_lib
from resnet_jax import workdir as workdir_lib
from resnet_jax import config as config_lib
from resnet_jax.data import splits
from resnet_jax.evaluate import NonFiniteOutput, evaluate_batches, make_eval_step
from resnet_jax.errors import UserError

BEST_METRIC = "val_top1"
# The console: the trainer's own lines at INFO; orbax and jax (absl logging) only warnings.
log = logging.getLogger("resnet_jax.train")


# ---------------------------------------------------------------------------------------------
# The step


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
    tx = state_lib.optimizer(config)
    dropout_key = jax.random.fold_in(jax.random.key(config.seed), 1)

    def step_fn(state: state_lib.TrainState, images, labels):
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
# The loop


class TrainingDiverged(UserError):
    pass


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh: Optional[jax.sharding.Mesh] = None,
                       allow_config_change: bool = False) -> Dict[str, Any]:
    """Train `config` in `workdir` (resuming if it holds a checkpoint); returns the last metrics,
    with 'preempted': True if SIGTERM or Ctrl-C stopped it. A workdir written with another
    config is refused unless `allow_config_change`."""
    mesh = mesh or parallel.make_mesh()
    config_lib.check(config, mesh.devices.size)
    with workdir_lib.open_workdir(workdir, config, allow_config_change, BEST_METRIC) as wd, \
            errors.stop_on_sigterm(enabled=jax.process_count() == 1):  # else JAX's sync point
        return _train(config, wd, mesh)


@dataclasses.dataclass(frozen=True)
class Run:
    """What the loop's parts read and never change."""
    config: ml_collections.ConfigDict
    wd: workdir_lib.Workdir
    data: splits.Data
    train_step: Callable
    eval_step: Callable
    writer: periodic.MetricWriter
    preemption: periodic.Preemption
    profiler: periodic.Profiler
    probe: Optional[periodic.ResponseProbe]
    mesh: Any
    main: bool  # process 0: it logs


@dataclasses.dataclass(frozen=True)
class Loop:
    """The loop's state between steps: each part of the loop takes it and returns the next."""
    state: state_lib.TrainState
    step: int  # steps taken (the state's step, on the host)
    last_saved: Optional[int]  # the last good checkpoint's step
    clock: Tuple[float, int]  # (time, step) that the images/s of the next log count from
    pending: Tuple = ()  # the metrics of the steps since the last log, on device
    input_wait: float = 0.0  # seconds waited for batches since the last log: input-bound if ~all
    warmup_logged: bool = False
    result: Dict = dataclasses.field(default_factory=dict)  # the latest metrics


def _train(config, wd: workdir_lib.Workdir, mesh) -> Dict[str, Any]:
    """train_and_evaluate's work, in an open workdir."""
    main = parallel.is_main_process()
    data = splits.make_data(config, mesh)
    model, model_options = state_lib.create_model(config, len(data.classes),
                                                  resnet_jax.kernels.for_devices(mesh.devices.flat))
    workdir_lib.check_free_space(wd.path, checkpoint.abstract_variables(model, data.image_size))
    if main:
        log.info("%s on %d devices (%d processes); %s", config.model, mesh.devices.size,
                 jax.process_count(), data.description)
    writer = preemption = profiler = None
    try:
        wd.check_data(workdir_lib.run_metadata(config, model_options, data))
        writer = periodic.MetricWriter(wd.path, main)
        preemption = periodic.Preemption()
        profiler = periodic.Profiler(config.profile_steps, os.path.join(wd.path, "tensorboard"),
                                     config.profile_every_process)
        state = wd.resume(state_lib.abstract_state(config, model, mesh, data.image_size))
        last_saved = None if state is None else int(jax.device_get(state.step))
        state = state if state is not None else state_lib.init_state(config, model, mesh, data.image_size)
        probe = periodic.ResponseProbe(model, data.normalization,
                                       data.val_images(config.responses_images)) \
            if config.responses_images else None
        run = Run(config, wd, data, make_train_step(config, model, mesh, data.normalization),
                  make_eval_step(model, mesh, data.normalization), writer, preemption, profiler,
                  probe, mesh, main)
        step = int(jax.device_get(state.step))
        result = _loop(run, Loop(state, step, last_saved, clock=(time.perf_counter(), step),
                                 warmup_logged=bool(jax.device_get(state.schedule.warmup_end) >= 0),
                                 result=dict(step=step)))
    except BaseException:
        # quietly: a second error would hide the first
        periodic.close_all(data.train, profiler, preemption, writer, quietly=True)
        raise
    periodic.close_all(data.train, profiler, preemption, writer)
    return result


def _loop(run: Run, loop: Loop) -> Dict[str, Any]:
    """Train from `loop` to config.num_steps; returns the last metrics."""
    config, in_flight = run.config, parallel.InFlight()
    while loop.step < config.num_steps:
        asked = time.perf_counter()
        images, labels = run.data.train.batch(loop.step)
        waited = time.perf_counter() - asked
        with run.profiler.step(loop.step):
            state, metrics = run.train_step(loop.state, images, labels)
        in_flight.add(metrics)
        loop = dataclasses.replace(loop, state=state, step=loop.step + 1,
                                   pending=loop.pending + (metrics,),
                                   input_wait=loop.input_wait + waited)
        step = loop.step
        run.profiler.after(step, loop.state)
        if periodic.itstime(step, config.checkpoint_every, config.num_steps):
            loop, val = _validate(run, _flush(run, loop))
            loop = _plateau(run, loop, val)
            loop = _checkpoint(run, loop, val)
        elif periodic.itstime(step, config.log_every, config.num_steps):
            loop = _flush(run, loop)
        if run.probe and periodic.itstime(step, config.responses_every or config.checkpoint_every,
                                          config.num_steps):
            run.writer.write(step, run.probe(loop.state.variables))
            loop = _restart_clock(loop)
        if step < config.num_steps and run.preemption.reached(step):
            return _preempted(run, _flush(run, loop))

    if "val_top1" not in loop.result:  # a finished workdir run again: report, do not retrain
        loop, _ = _validate(run, loop)  # its step is the checkpoint resumed: nothing to save
    if run.data.test is not None:
        test = {f"test_{k}": v for k, v in _evaluate(run, loop, run.data.test, "test").items()}
        run.writer.write(loop.step, test)
        loop = dataclasses.replace(loop, result={**loop.result, **test})
        if run.main:
            log.info("test top-1 %.2f%%", 100 * test["test_top1"])
    run.wd.wait(loop.step)
    return dict(loop.result, step=loop.step)


def _restart_clock(loop: Loop) -> Loop:
    """Time spent outside training steps (evaluating, saving, probing) leaves images/s out."""
    return dataclasses.replace(loop, clock=(time.perf_counter(), loop.step))


def _diverged(run: Run, loop: Loop, what: str, advice: str = "") -> TrainingDiverged:
    """The error that stops a run whose numbers are no longer finite, once its saves are done."""
    run.wd.wait(loop.step)
    kept = f"the last good checkpoint (step {loop.last_saved}) is kept" \
        if loop.last_saved is not None else "no checkpoint had been saved"
    return TrainingDiverged(f"{what}; training stopped and {kept} in {run.wd.path!r}"
                            + (f"; {advice}" if advice else ""))


def _flush(run: Run, loop: Loop) -> Loop:
    """The host sync: check the loss, log, write metrics."""
    if not loop.pending:
        return loop
    config, step = run.config, loop.step
    got = jax.device_get(list(loop.pending))
    for i, m in enumerate(got):
        if not np.isfinite(m["loss"]):
            raise _diverged(run, loop, f"loss became {m['loss']} at step {step - len(got) + 1 + i}",
                            "lower --config.lr or check the data")
    scalars = periodic.train_scalars(got, config.batch_size, step - loop.clock[1],
                                     time.perf_counter() - loop.clock[0], loop.input_wait)
    warmup_logged = loop.warmup_logged
    if run.main:
        periodic.log_train_line(step, config.num_steps, config.batch_size, scalars)
        if not warmup_logged and config.warmup_lr:
            warmup_logged = schedule_lib.log_warmup_end(config, loop.state.schedule, run.writer)
    run.writer.write(step, scalars)
    return _restart_clock(dataclasses.replace(loop, pending=(), input_wait=0.0,
                                              warmup_logged=warmup_logged,
                                              result={**loop.result, **scalars}))


def _evaluate(run: Run, loop: Loop, batches: Callable[[], Iterator], split: str) -> Dict:
    try:
        return evaluate_batches(run.eval_step, loop.state.variables, batches())
    except NonFiniteOutput as e:
        raise _diverged(run, loop, f"{split} at step {loop.step}: {e}") from None


def _validate(run: Run, loop: Loop) -> Tuple[Loop, Dict]:
    """(loop with the validation metrics in its result, those metrics)."""
    val = _evaluate(run, loop, run.data.val, "validation")
    result = {**loop.result, **{f"val_{k}": v for k, v in val.items()}}
    return dataclasses.replace(loop, result=dict(result, val_step=loop.step)), val


def _plateau(run: Run, loop: Loop, val: Dict) -> Loop:
    """The schedule's plateau rule, at each evaluation, before the state is saved."""
    schedule = schedule_lib.plateau(run.config, loop.state.schedule, 1.0 - val["top1"], run.mesh)
    return dataclasses.replace(loop, state=loop.state.replace(schedule=schedule))


def _checkpoint(run: Run, loop: Loop, val: Dict) -> Loop:
    """Write and log the validation metrics `val` and save the state, ranked by them."""
    run.writer.write(loop.step, {f"val_{k}": v for k, v in val.items()})
    if run.main:
        log.info("step %d  val top-1 %.2f%%  top-5 %.2f%%  loss %.4f", loop.step,
                 100 * val["top1"], 100 * val["top5"], val["loss"])
    loop = _save(run, loop, val["top1"])
    run.writer.flush()
    return _restart_clock(loop)


def _save(run: Run, loop: Loop, score: float) -> Loop:
    """Starts saving the state, ranked `score` for keep-best."""
    saved = run.wd.save(loop.state, {BEST_METRIC: score})
    return dataclasses.replace(loop, last_saved=loop.last_saved if saved is None else saved)


def _preempted(run: Run, loop: Loop) -> Dict[str, Any]:
    """Save (not evaluated, as preemption leaves seconds: ranks last for keep-best, kept as
    latest) and stop; the result says 'preempted'."""
    loop = _save(run, loop, -1.0)
    run.wd.wait(loop.step)
    if run.main:
        log.info("%s: saved step %d in %s; rerun the same command to resume",
                 run.preemption.requested, loop.step, run.wd.path)
    return dict(loop.result, step=loop.step, preempted=True)


def run():
    """The command line (resnet_jax.train_cli): `python -m resnet_jax.train` and
    resnet-jax-train."""
    from resnet_jax import train_cli
    return train_cli.run()
