"""Per-step work and communication of data-parallel training, and the step time it implies on a
TPU slice or on 8 GPUs from public peak figures: the tables of docs/scaling.md.

    python -m benchmarks.scaling                          # print the tables (markdown)
    python -m benchmarks.scaling --write docs/scaling.md  # regenerate them inside the doc

Parameters and multiply-adds come from `resnet_jax.summary.summarize` (the modules themselves);
BatchNorm layers and channels from the networks' parameter trees. Nothing here is measured: the
step time is a model, compute at an assumed fraction of peak plus the gradient all-reduce at the
interconnect's bandwidth plus one latency per cross-device BatchNorm reduction, with every
figure and assumption listed next to the tables.
"""
import dataclasses
import re
import sys
from typing import Dict, List, Sequence

import jax
import jax.numpy as jnp
from absl import flags

import resnet_jax
from resnet_jax import cli
from resnet_jax.errors import UserError, exit_on_user_error
from resnet_jax.models import layout
from resnet_jax.summary import summarize


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    image_size: int
    batch: int          # global batch of the paper's recipe
    steps: int          # the paper's iterations
    utilization: float  # assumed fraction of bf16 peak the convolutions reach (see ASSUMPTIONS)


# The paper's recipes: CIFAR batch 128 for 64k iterations (Sec. 4.2), ImageNet batch 256 for 600k
# (Sec. 3.4). Plain nets cost what the ResNets of the same depth cost (shortcuts are free or 1x1).
WORKLOADS = [Workload(n, 32, 128, 64_000, 0.05) for n in ("resnet20", "resnet56", "resnet110", "resnet1202")] + \
            [Workload(n, 224, 256, 600_000, 0.30) for n in ("resnet18", "resnet34", "resnet50", "resnet101",
                                                         "resnet152", "vgg19")]


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    devices: int
    peak_flops: float        # bf16 dense, per device
    allreduce_bw: float      # bytes/s per device that a ring all-reduce moves in each direction
    source: str


def _tpu(name, chips, tflops, pod_allreduce_tbps, pod_chips, url):
    # Google states all-reduce bandwidth per Pod; per chip is that over the Pod's chips.
    return Hardware(name, chips, tflops * 1e12, pod_allreduce_tbps * 1e12 / pod_chips,
                    f"{url}: {tflops:g} TFLOP/s bf16 per chip; all-reduce bandwidth "
                    f"{pod_allreduce_tbps:g} TB/s per {pod_chips}-chip Pod")


def _gpu(name, tflops, nvlink_gbps, url):
    # NVIDIA quotes NVLink bandwidth both ways added; a ring moves half of it each way.
    return Hardware(name, 8, tflops * 1e12, nvlink_gbps * 1e9 / 2,
                    f"{url}: {tflops:g} TFLOP/s bf16 dense per GPU; NVLink {nvlink_gbps:g} GB/s "
                    "(both directions)")


V4 = "https://cloud.google.com/tpu/docs/v4"
V5E = "https://cloud.google.com/tpu/docs/v5e"
HARDWARE = [
    _tpu("v4-8 (4 chips)", 4, 275, 1100, 4096, V4),
    _tpu("v4-32 (16 chips)", 16, 275, 1100, 4096, V4),
    _tpu("v5e-8 (8 chips)", 8, 197, 51.2, 256, V5E),
    _tpu("v5e-32 (32 chips)", 32, 197, 51.2, 256, V5E),
    _gpu("8x A100 SXM", 312, 600, "https://www.nvidia.com/en-us/data-center/a100/"),
    _gpu("8x H100 SXM", 989, 900, "https://www.nvidia.com/en-us/data-center/h100/"),
]

COLLECTIVE_LATENCY = 10e-6  # seconds per small all-reduce within a slice or over NVLink (assumed)
GRAD_BYTES = 4              # gradients are float32 (parameters stay float32 under bf16 compute)
IMAGENET_INPUT_BYTES = 224 * 224 * 3  # one uint8 crop crossing host -> device

ASSUMPTIONS = f"""\
- Training FLOPs per image = 3 x 2 x multiply-adds (forward, then a backward pass of twice its
  cost: gradients for inputs and for weights); `compute_dtype=bfloat16`, peak = bf16 dense peak.
- Utilisation (fraction of peak the step reaches) is assumed, not measured: 5 % for the CIFAR nets
  (16-64 channels fill a small part of a 128x128 MXU or of a tensor-core tile, and 8x8-32x32
  maps give little work per layer), 30 % for the ImageNet nets (what well-tuned ResNet-50 data
  parallelism reaches on current accelerators, roughly). Change them with --cifar_utilization and
  --imagenet_utilization.
- Gradient all-reduce: a ring moves 2 (n-1)/n x {GRAD_BYTES} x params bytes in and out of every
  device, at the per-device bandwidth in the hardware table; not overlapped with compute (XLA
  overlaps part of it, so this is the pessimistic end).
- BatchNorm over the global batch (the trainer's default) needs one small all-reduce per BN layer
  in the forward pass and one in the backward pass; each is latency-bound at an assumed
  {COLLECTIVE_LATENCY * 1e6:g} us. With `bn_group_size` equal to the per-device batch these vanish.
- One data-parallel replica per device, parameters replicated (the trainer's layout)."""


def bn_layers(name: str, image_size: int):
    """(BatchNorm layers, their channels summed) from the parameter tree, block by block."""
    model = resnet_jax.create_model(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    scales = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(
        layout.unstack_blocks(shapes["params"]))
        if path[-1].key == "scale"]  # BN's scale; the networks have no other `scale`
    return len(scales), sum(leaf.shape[-1] for leaf in scales)


def work(w: Workload) -> Dict:
    s = summarize(w.name, w.image_size)
    layers, channels = bn_layers(w.name, w.image_size)
    return dict(workload=w, params=s["params"], mult_adds=s["mult_adds"],
                train_flops=3 * 2 * s["mult_adds"] * w.batch, grad_bytes=GRAD_BYTES * s["params"],
                bn_layers=layers, bn_channels=channels)


def step_time(row: Dict, hw: Hardware) -> Dict:
    n = hw.devices
    compute = row["train_flops"] / (n * hw.peak_flops * row["workload"].utilization)
    allreduce = 2 * (n - 1) / n * row["grad_bytes"] / hw.allreduce_bw if n > 1 else 0.0
    bn = 2 * row["bn_layers"] * COLLECTIVE_LATENCY if n > 1 else 0.0
    total = compute + allreduce + bn
    return dict(compute=compute, allreduce=allreduce, bn=bn, total=total,
                images_per_s=row["workload"].batch / total)


def _si(x: float, unit: str = "") -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".strip()


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.3g} h" if seconds >= 3600 else f"{seconds / 60:.3g} min"


def tables(workloads: Sequence[Workload] = WORKLOADS, hardware: Sequence[Hardware] = HARDWARE) -> str:
    rows = [work(w) for w in workloads]
    out: List[str] = []
    out.append("Per step, at the paper's global batch:\n")
    out.append("| network | batch | params | multiply-adds / image | train FLOPs / step | "
               "gradient all-reduce / step | BN layers (channels) | BN all-reduces / step |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        w = r["workload"]
        out.append(f"| {w.name} ({w.image_size}x{w.image_size}) | {w.batch} | {r['params']:,} | "
                   f"{_si(r['mult_adds'])} | {_si(r['train_flops'])} | {_si(r['grad_bytes'], 'B')} | "
                   f"{r['bn_layers']} ({r['bn_channels']:,}) | {2 * r['bn_layers']} |")
    out.append("\nExpected step time in ms (images/s), compute + gradient all-reduce + BN "
               "latency; in brackets below, the per-device batch:\n")
    out.append("| network | " + " | ".join(h.name for h in hardware) + " |")
    out.append("|---|" + "---:|" * len(hardware))
    for r in rows:
        w = r["workload"]
        cells = []
        for h in hardware:
            t = step_time(r, h)
            per_device = w.batch / h.devices
            cells.append(f"{_ms(t['total'])} ({t['images_per_s']:,.0f}) [{per_device:g}]")
        out.append(f"| {w.name} | " + " | ".join(cells) + " |")
    out.append("\nWhere the time goes on the largest configuration of each kind, and the paper's "
               "schedule end to end:\n")
    out.append("| network | hardware | compute ms | all-reduce ms | BN latency ms | "
               "communication share | paper schedule |")
    out.append("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        for h in (hardware[3], hardware[5]):
            t = step_time(r, h)
            share = (t["allreduce"] + t["bn"]) / t["total"]
            out.append(f"| {r['workload'].name} | {h.name} | {_ms(t['compute'])} | "
                       f"{_ms(t['allreduce'])} | {_ms(t['bn'])} | {share:.0%} | "
                       f"{_hours(t['total'] * r['workload'].steps)} |")
    out.append("\nImageNet input per host (8 accelerators) at the modelled rate: uint8 "
               f"{224}x{224} crops cross host -> device; every image is a JPEG decode and resize "
               "on the host CPUs:\n")
    out.append("| network | hardware | images/s per host | host -> device |")
    out.append("|---|---|---:|---:|")
    for r in rows:
        if r["workload"].image_size != 224:
            continue
        for h in (hardware[2], hardware[5]):
            per_host = step_time(r, h)["images_per_s"] * min(8, h.devices) / h.devices
            out.append(f"| {r['workload'].name} | {h.name} | {per_host:,.0f} | "
                       f"{_si(per_host * IMAGENET_INPUT_BYTES, 'B/s')} |")
    out.append("\nFigures used:\n")
    out.append("| hardware | devices | bf16 peak / device | all-reduce bandwidth / device | source |")
    out.append("|---|---:|---:|---:|---|")
    for h in hardware:
        out.append(f"| {h.name} | {h.devices} | {_si(h.peak_flops, 'FLOP/s')} | "
                   f"{_si(h.allreduce_bw, 'B/s')} | {h.source} |")
    out.append("\nAssumptions:\n")
    out.append(ASSUMPTIONS)
    return "\n".join(out) + "\n"


BEGIN = "<!-- begin: python -m benchmarks.scaling -->"
END = "<!-- end: python -m benchmarks.scaling -->"


def replace_tables(document: str, generated: str) -> str:
    """The document with the text between the BEGIN and END markers replaced."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(document):
        raise UserError(f"the document has no '{BEGIN}' ... '{END}' section to fill")
    return pattern.sub(lambda _: f"{BEGIN}\n{generated}{END}", document)


FLAGS = flags.FLAGS


def _define_flags():
    flags.DEFINE_string("write", None, "fill the tables section of this markdown file instead of "
                        "printing (e.g. docs/scaling.md)")
    flags.DEFINE_float("cifar_utilization", 0.05, "assumed fraction of bf16 peak for the CIFAR nets")
    flags.DEFINE_float("imagenet_utilization", 0.30, "assumed fraction of bf16 peak for the "
                       "ImageNet nets")


def main(argv):
    del argv  # absl_run refuses arguments besides the flags
    with exit_on_user_error():
        for flag in ("cifar_utilization", "imagenet_utilization"):
            if not 0 < FLAGS[flag].value <= 1:
                raise UserError(f"--{flag} must be in (0, 1], not {FLAGS[flag].value}")
        document = None
        if FLAGS.write:  # check the target before spending time on the tables
            try:
                with open(FLAGS.write) as f:
                    document = f.read()
            except OSError as e:
                raise UserError(f"cannot read {FLAGS.write!r}: {e.strerror}") from None
            replace_tables(document, "")
        workloads = [dataclasses.replace(w, utilization=FLAGS.cifar_utilization if w.image_size == 32
                                         else FLAGS.imagenet_utilization) for w in WORKLOADS]
        generated = tables(workloads)
        if document is None:
            sys.stdout.write(generated)
            return
        updated = replace_tables(document, generated)
        with open(FLAGS.write, "w") as f:
            f.write(updated)


if __name__ == "__main__":
    _define_flags()
    cli.absl_run(main, __name__, positional=0)
