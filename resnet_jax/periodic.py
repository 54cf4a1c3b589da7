"""What the training loop does every so often besides training, and when (`itstime`): its metrics
(`MetricWriter`), Figure 7's response statistics of a fixed set of validation images
(`ResponseProbe`), a profiler trace of chosen steps (`Profiler`), and the stop a preemption asks
for (`Preemption`).

Each is a small object the loop creates once and calls at its steps; none changes the training
state, so a run's weights are the same with or without them.
"""
import contextlib
import logging
import os
import signal
from typing import Callable, ContextManager, Dict, Optional, Sequence

import jax
import numpy as np

from resnet_jax import analyze, lines, metrics_log, progress, storage
from resnet_jax.workdir import WriteFailed

log = logging.getLogger("resnet_jax.train")


def train_scalars(got: Sequence[Dict], batch_size: int, steps: int, seconds: float,
                  input_wait: float) -> Dict[str, float]:
    """The log's numbers from `got`, the host copies of the train step's metrics since the last
    log: mean loss, training top-1, the last lr, the images/s of the `steps` steps that took
    `seconds` (time outside training steps left out), seconds waited for input per step."""
    return dict(loss=float(np.mean([m["loss"] for m in got])),
                train_top1=float(sum(m["correct"] for m in got)) / (len(got) * batch_size),
                lr=float(got[-1]["lr"]), images_per_s=steps * batch_size / max(seconds, 1e-9),
                input_wait=input_wait / len(got))


def log_train_line(step: int, num_steps: int, batch_size: int, scalars: Dict[str, float]) -> None:
    """The trainer's progress line, with the ETA at the current rate."""
    rate = scalars["images_per_s"]
    eta = (num_steps - step) * batch_size / rate if rate > 0 else float("inf")
    log.info("step %d/%d  loss %.4f  acc %.2f%%  lr %.4g  %.0f img/s  input wait %.0f ms/step  "
             "ETA %s", step, num_steps, scalars["loss"], 100 * scalars["train_top1"],
             scalars["lr"], rate, 1000 * scalars["input_wait"], progress.hms(eta))


def itstime(step: int, every: int, last: int) -> bool:
    """Whether a periodic action of period `every` (validated >= 1) falls after `step` steps;
    the last step always (big_vision's utils.itstime)."""
    return step == last or step % every == 0


class ResponseProbe:
    """Per-layer response std and mean (Figure 7) of `images` for the variables it is given,
    computed by analyze's own functions with its default settings: `python -m
    resnet_jax.analyze` on the same checkpoint and images gives the same numbers."""

    def __init__(self, model, normalization: Callable, images: np.ndarray,
                 settings: analyze.Settings = analyze.Settings()):
        self.images, self.settings = images, settings
        self.fn = analyze.batch_moments_fn(model, normalization, settings)

    def __call__(self, variables) -> Dict[str, list]:
        """The metrics row's fields: `response_layers` (names in depth order), `response_std`
        and `response_mean` per layer; resnet_jax.plots draws Figure 7 from them."""
        local = jax.tree.map(_local_copy, variables)
        moments = analyze.stream_moments(self.fn, local, self.images, self.settings)
        rows = analyze.layer_rows(moments, local["params"], self.settings)
        return dict(response_layers=[r["layer"] for r in rows],
                    response_std=[r["std"] for r in rows],
                    response_mean=[r["mean"] for r in rows])


def _local_copy(x):
    """This process's copy of a replicated array, as numpy: the probe runs on local devices."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


class Profiler:
    """A `jax.profiler` trace of the steps first <= step < last (`profile_steps=(first, last)`)
    into `logdir`, which TensorBoard's profile plugin and xprof open; each step is annotated with
    its number. Traces on process 0 only, or on every process with `every_process`."""

    def __init__(self, steps: Sequence[int], logdir: str, every_process: bool = False):
        self.first, self.last = (tuple(steps) or (0, 0))
        self.logdir = logdir
        self.enabled = self.first < self.last and (every_process or jax.process_index() == 0)
        self.active = False

    def step(self, step: int) -> ContextManager:
        """Around the dispatch of the step that `step` steps precede: starts the trace at
        `first`, annotates the steps being traced."""
        if self.enabled and not self.active and self.first <= step < self.last:
            jax.profiler.start_trace(self.logdir)
            self.active = True
        if self.active:
            return jax.profiler.StepTraceAnnotation("train", step_num=step)
        return contextlib.nullcontext()

    def after(self, step: int, state) -> None:
        """After `step` steps: stops the trace, once that step's work has finished, at `last`."""
        if self.active and step >= self.last:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()

    close = stop  # the loop closes it on every exit, a trace in progress included


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
        self.remote = metrics_log.RemoteLog(workdir) if storage.is_remote(workdir) else None
        # what a failed write names: the log, or the folder of a remote log's parts
        self.path = storage.path(workdir) / (metrics_log.PARTS if self.remote else
                                             metrics_log.SINGLE)
        if self.remote is None:  # workdir.prepare made the folder
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


def close_all(*things, quietly: bool = False):
    """Close each of `things` that can be (the host input pipeline's workers among them)."""
    for thing in things:
        if not hasattr(thing, "close"):
            continue
        if quietly:
            with contextlib.suppress(Exception):
                thing.close()
        else:
            thing.close()
