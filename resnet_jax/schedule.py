"""The learning rate: one function of the step and a small schedule state.

    lr = config.lr * lr_decay ** (boundaries passed) * lr_scale,  or warmup_lr during warm-up

Three rules feed it, each a pure function of the state that the loop calls at its own time:
the step boundaries (CIFAR, Sec. 4.2), ResNet-110's warm-up (lr 0.01 until the running training
error is below 80 %, `warmup`, inside the jitted step) and ImageNet's plateau rule (divide by 10
when the validation error stops improving, `plateau`, host-side at evaluations). A new rule (a
cosine, say) changes this module only.

The checkpoint's `train` item stores the state flat beside `step` and `opt_state` (`stored`), as
it always has: the running training error is not stored (`restored` resets it), so a run resumed
during warm-up measures it afresh (some 20 batches more at warmup_lr).
"""
import logging
from typing import Dict

import flax
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import parallel

log = logging.getLogger("resnet_jax.train")

STORED = ("lr_scale", "warmup_done", "warmup_end", "best_error", "stale_evals")


class ScheduleState(flax.struct.PyTreeNode):
    lr_scale: jax.Array  # float32: 1, then * lr_decay per plateau
    warmup_done: jax.Array  # bool
    warmup_end: jax.Array  # int32: the step at which warm-up ended, -1 before
    warmup_error: jax.Array  # float32: running training error (warm-up rule; not checkpointed)
    best_error: jax.Array  # float32: best val top-1 error so far (plateau rule)
    stale_evals: jax.Array  # int32: evaluations since it last improved


def init(config) -> ScheduleState:
    return ScheduleState(lr_scale=jnp.float32(1.0), warmup_done=jnp.asarray(not config.warmup_lr),
                         warmup_end=jnp.int32(-1), warmup_error=jnp.float32(1.0),
                         best_error=jnp.float32(1.0), stale_evals=jnp.int32(0))


def learning_rate(config, step, state: ScheduleState) -> jax.Array:
    """The learning rate of the step that `step` steps precede (traceable)."""
    passed = jnp.sum(step >= jnp.asarray(config.lr_boundaries or (), jnp.int32))
    lr = config.lr * config.lr_decay ** passed * state.lr_scale
    if config.warmup_lr:
        lr = jnp.where(state.warmup_done, lr, config.warmup_lr)
    return lr.astype(jnp.float32)


def warmup(config, state: ScheduleState, step, train_error) -> ScheduleState:
    """Sec. 4.2's warm-up ends for good at the first step where the running training error
    (`warmup_smoothing`) is below `warmup_until_error`, not at one lucky batch; `warmup_end`
    records that step (counted from 1, as the log counts). Traceable; `step` steps precede."""
    smoothing = config.warmup_smoothing
    error = smoothing * state.warmup_error + (1.0 - smoothing) * train_error
    done = state.warmup_done | (error < config.warmup_until_error)
    end = jnp.where(done & ~state.warmup_done, step + 1, state.warmup_end)
    return state.replace(warmup_done=done, warmup_end=end, warmup_error=error.astype(jnp.float32))


def plateau(config, state: ScheduleState, val_error: float, mesh) -> ScheduleState:
    """ImageNet's rule (Sec. 3.4): multiply the learning rate by `lr_decay` when the validation
    error has not improved by `lr_plateau_min_delta` for `lr_plateau_patience` evaluations.
    Host-side, at evaluations; the result is replicated on `mesh`. Off: `state` itself."""
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


def log_warmup_end(config, state: ScheduleState, writer) -> bool:
    """Logs, and writes to `writer` (periodic.MetricWriter), the step at which warm-up ended, if
    it has; whether it has."""
    end = int(jax.device_get(state.warmup_end))
    if end < 0:
        return False
    log.info("warm-up over: training error fell below %.0f%% at step %d; lr %g -> schedule",
             100 * config.warmup_until_error, end, config.warmup_lr)
    writer.write(end, dict(warmup_end=end))
    return True


def stored(state: ScheduleState) -> Dict[str, jax.Array]:
    """The fields a checkpoint keeps, by their stored names."""
    return {k: getattr(state, k) for k in STORED}


def restored(fields: Dict[str, jax.Array], target: ScheduleState) -> ScheduleState:
    """A state from its `stored` fields; the running training error starts afresh at 1,
    placed as `target`'s."""
    fresh = jax.device_put(np.float32(1.0), target.warmup_error.sharding)
    return ScheduleState(**fields, warmup_error=fresh)
