"""A run's metrics log on object storage, and the reader of every run's log.

A local workdir's log is one `metrics.jsonl`, appended line by line (periodic.MetricWriter). Object
storage (gs://) has no append, and rewriting a growing file at every log step costs a run of
6,000 log steps quadratic time; so a remote log keeps its rows in memory and writes them as one
new part per flush, `metrics/NNNNN.jsonl`, with a TensorBoard event file of the same rows. The
trainer flushes after each checkpoint and when it stops: a flush costs one object of each kind,
whatever the run's length, and the rows a kill loses are those of steps the resumed run repeats.

`read_lines` gives a workdir's log as one: `metrics.jsonl`, then the parts in order.
"""
import os
import tempfile
from typing import Dict, List, Tuple

import numpy as np

from resnet_jax import lines, storage
from resnet_jax.errors import UserError

PARTS = "metrics"  # the folder of a remote log's parts, beside the checkpoints
SINGLE = "metrics.jsonl"


def _part_names(folder) -> List[str]:
    return sorted(p.name for p in folder.glob("*.jsonl")) if folder.exists() else []


class RemoteLog:
    """Rows kept in memory until `flush` writes them as the next part."""

    def __init__(self, workdir: str):
        self.workdir = str(workdir)
        self.next = len(_part_names(storage.path(workdir) / PARTS))
        self.rows: List[Tuple[int, Dict[str, float]]] = []

    def add(self, step: int, scalars: Dict[str, float]) -> None:
        self.rows.append((step, dict(scalars)))

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"{self.next:05d}"
        text = "".join(lines.dumps(dict(step=step, **scalars)) + "\n" for step, scalars in self.rows)
        storage.write(f"{self.workdir}/{PARTS}/{name}.jsonl", text)
        events, data = _event_file(self.rows, name)
        storage.write(f"{self.workdir}/tensorboard/{events}", data)
        self.next += 1
        self.rows = []


def to_tensorboard(tb, step: int, fields: Dict) -> None:
    """A metrics row into a tensorboardX writer: each number a scalar; a ResponseProbe's std and
    mean a scalar per layer (`response_std/stage1/block0/conv1`) and a histogram across layers."""
    layers = fields.get("response_layers", ())
    for name, value in fields.items():
        if name == "response_layers":
            continue
        if isinstance(value, (list, tuple)):
            for layer, v in zip(layers, value):
                tb.add_scalar(f"{name}/{layer}", v, step)
            tb.add_histogram(name, np.asarray(value), step)
        else:
            tb.add_scalar(name, value, step)


def _event_file(rows, suffix: str) -> Tuple[str, bytes]:
    """(file name, bytes) of a TensorBoard event file holding `rows`, written on local disk by
    tensorboardX (its own gs:// writer uploads the whole file again at every flush)."""
    from tensorboardX import SummaryWriter
    with tempfile.TemporaryDirectory() as tmp:
        tb = SummaryWriter(tmp, filename_suffix=f".{suffix}")
        for step, scalars in rows:
            to_tensorboard(tb, step, scalars)
        tb.close()
        (name,) = os.listdir(tmp)
        with open(os.path.join(tmp, name), "rb") as f:
            return name, f.read()


def read_lines(path: str) -> Tuple[str, List[str]]:
    """(what was read, its lines): a training workdir's log as one, `metrics.jsonl` then the
    parts of a remote log in order; or one JSONL file named directly."""
    p = storage.path(path)
    if p.is_dir():
        files = ([p / SINGLE] if (p / SINGLE).exists() else []) + \
            [p / PARTS / name for name in _part_names(p / PARTS)]
    else:
        files = [p] if p.exists() else []
    if not files:
        raise UserError(f"{path!r} holds no metrics.jsonl; name a training workdir or its "
                        "metrics.jsonl")
    lines = [line for f in files for line in f.read_text().splitlines()]
    return str(files[0] if len(files) == 1 else p), lines
