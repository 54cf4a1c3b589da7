"""The "Before you book a TPU" table: per-chip HBM at the paper's batch and the largest batch that
fits, for each net of the zoo on each kind of chip, compiled deviceless (resnet_jax.compile).

    PYTHONPATH=. python -m benchmarks.tpu_table [--models resnet18,resnet50] \
        [--topologies v4:2x2x1,v5e:2x2,v5p:2x2x1,v6e:2x2] [--effort -1] [--json table.json]

Each cell is one `run_compile(..., search_max_batch=True)` of the train step in bfloat16 at the
config's global batch (256 for the ImageNet nets): a few compiles of minutes each for the large
nets, so the whole table takes hours on a small machine; --effort -1 compiles about 4x faster.
With --json, each cell is written there as it finishes, and a rerun with the same --json skips
the cells it holds: a stopped run resumes.
"""
import json
import os

from absl import app, flags

from resnet_jax import compile as tpu_compile
from resnet_jax import config as config_lib

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_list("models", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                 "vgg19"], "nets of configs/imagenet.py")
    flags.DEFINE_list("topologies", ["v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2"],
                      "one slice per chip")
    flags.DEFINE_float("effort", -1.0, "XLA's exec_time_optimization_effort")
    flags.DEFINE_string("json", None, "also write the cells here, and resume from them")

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "imagenet.py")


def cell(model: str, topology: str, effort: float) -> dict:
    config = config_lib.load_config(f"{CONFIG}:{model}")
    with config.unlocked():
        config.compute_dtype = "bfloat16"
    result = tpu_compile.run_compile(config, topology, programs=("train",), search_max_batch=True,
                                     effort=effort, log=lambda *a: None)
    (r,) = result["reports"]
    return dict(model=model, topology=topology, per_chip=r["per_chip_batch"],
                gib=r.get("total_bytes", float("nan")) / tpu_compile.GiB, fits=r["fits"],
                max_batch=result["max_batch"])


def table(cells) -> str:
    """Markdown: a row per net, its HBM a chip at the paper's batch (the largest over the chips,
    whose compilers differ a little), then the largest batch each chip fits."""
    topologies = list(dict.fromkeys(c["topology"] for c in cells))
    per_chip = "/".join(str(b) for b in sorted({c["per_chip"] for c in cells}))
    lines = [f"| net, bf16 | HBM a chip at {per_chip} images | " + " | ".join(
        f"largest batch a chip, {_chip(t)}" if i == 0 else _chip(t)
        for i, t in enumerate(topologies)) + " |",
        "|---|---:|" + "---:|" * len(topologies)]
    for model in dict.fromkeys(c["model"] for c in cells):
        row = {c["topology"]: c for c in cells if c["model"] == model}
        gib = max((c["gib"] for c in row.values() if c["fits"]), default=None)
        lines.append(f"| {model} | " + (f"{gib:.2f} GiB" if gib else "does not fit") + " | "
                     + " | ".join(_largest(row[t]) if t in row else "" for t in topologies) + " |")
    return "\n".join(lines)


def _chip(topology: str) -> str:
    chip = tpu_compile.chip_of(topology)
    return f"{chip.name} ({chip.hbm_bytes // tpu_compile.GiB} GiB)"


def _largest(cell: dict) -> str:
    if cell["fits"]:
        return str(cell["max_batch"])
    return f"{cell['max_batch']} ({cell['per_chip']} does not fit)"


def run(models, topologies, effort: float, path=None) -> list:
    """The cells of the table, resuming from and writing to `path` (JSON) when given."""
    cells = []
    if path and os.path.exists(path):
        with open(path) as f:
            cells = json.load(f)
    done = {(c["model"], c["topology"]) for c in cells}
    for model in models:
        for topology in topologies:
            if (model, topology) in done:
                continue
            cells.append(cell(model, topology, effort))
            print(cells[-1], flush=True)
            if path:
                _write(path, cells)
    return [c for c in cells if c["model"] in models and c["topology"] in topologies]


def main(argv):
    del argv
    print(table(run(FLAGS.models, FLAGS.topologies, FLAGS.effort, FLAGS.json)))


def _write(path: str, cells) -> None:
    """Atomically: a run stopped while writing leaves the previous cells."""
    with open(path + ".tmp", "w") as f:
        json.dump(cells, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    tpu_compile.compile_only()
    define_flags()
    app.run(main)
