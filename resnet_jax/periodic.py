"""What the training loop does every so often besides training: Figure 7's response statistics of
a fixed set of validation images, and a profiler trace of chosen steps.

Each is a small object the loop creates once and calls at its steps; neither changes the training
state, so a run's weights are the same with or without them.
"""
import contextlib
from typing import Callable, ContextManager, Dict, Sequence

import jax
import numpy as np

from resnet_jax import analyze

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
