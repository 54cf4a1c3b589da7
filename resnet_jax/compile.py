"""Size a TPU job before booking it: compile the trainer's programs for a TPU slice, deviceless.

    python -m resnet_jax.compile --config configs/imagenet.py:resnet50 --topology v5e:2x4 \
        --config.compute_dtype=bfloat16 [--batch_size 1024] [--max_batch] [--json out.json]

With `libtpu` installed (`pip install 'resnet-jax[tpu]'`), a CPU machine describes a TPU slice it
does not own (`jax.experimental.topologies`) and XLA's TPU compiler builds the very executables
that slice would run: the trainer's train step (`train.make_train_step`), its evaluation step
(`evaluate.make_eval_step`) and the Figure 7 analysis step (`analyze.batch_moments_fn`), over a
mesh of every chip of every host, with abstract state (nothing is initialised). Printed per chip:
HBM for arguments, temporaries and outputs and whether their sum fits the chip (`CHIPS`); flops
and bytes accessed per step (XLA's cost analysis, which counts a rolled stage's loop body once:
`rolled` says where that applies); the collectives (kind, count, bytes); and the compile time.
`--max_batch` searches the largest per-chip batch whose train step fits.

The same for NVIDIA GPUs, with the CUDA plugin (`jax-cuda12-plugin`, no GPU or CUDA libraries
needed): `--topology h100:8` is one host of eight H100s (XLA's GPU compiler gives memory and
collectives, not a cost analysis).

Programs are built exactly as on a TPU host: models compute with the kernels of the target
devices (`resnet_jax.kernels.for_devices`), never of the host. Multi-host slices (v4:2x2x2: two
hosts) compile to the one SPMD program that every host runs its part of.
"""
if __name__ == "__main__":  # the console script's start-up (resnet_jax.cli), before any import
    from resnet_jax import cli
    cli.start("compile")

import dataclasses
import importlib.util
import os
import re
import time
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import resnet_jax.kernels
from resnet_jax import analyze, checkpoint, cli, lines, parallel, storage, train
from resnet_jax import state as state_lib
from resnet_jax import config as config_lib
from resnet_jax.data import sources
from resnet_jax.evaluate import make_eval_step
from resnet_jax.errors import UserError, exit_on_user_error

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str           # the topology prefix: v5e in v5e:2x2
    device_kind: str    # what jax's devices call it
    hbm_bytes: int      # per chip
    chip_config: str    # libtpu's chip configuration: megacore chips are one device of 2 cores
    peak_flops: float   # bf16 dense, per chip
    hbm_bandwidth: float  # bytes/s, per chip
    platform: str = "tpu"
    target_config: str = ""  # a GPU's: XLA's GpuTargetConfigProto, as text


# XLA's description of an H100 SXM (xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb), what the CUDA
# plugin compiles for when no GPU is attached.
H100_SXM = """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84978434048 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

# Cloud TPU's published figures (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e), NVIDIA's for H100.
CHIPS = {c.name: c for c in (
    Chip("v4", "TPU v4", 32 * GiB, "megacore", 275e12, 1228e9),
    Chip("v5e", "TPU v5 lite", 16 * GiB, "default", 197e12, 819e9),
    Chip("v5p", "TPU v5", 95 * GiB, "megacore", 459e12, 2765e9),
    Chip("v6e", "TPU v6 lite", 32 * GiB, "default", 918e12, 1640e9),
    Chip("h100", "NVIDIA H100 80GB HBM3", 80 * GiB, "", 989e12, 3.35e12, "cuda", H100_SXM),
)}
PROGRAMS = ("train", "eval", "analyze")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_TOPOLOGY = re.compile(r"^(\w+):(\d+(?:x\d+){0,2})$")
_FORMS = ("CHIP:AxB[xC] for a TPU slice, v5e:2x2 (4 chips) or v4:2x2x2 (8 chips, 2 hosts), or "
          "h100:GPUS or h100:HOSTSxGPUS for GPUs, h100:8 (one host of 8)")
_MISSING = {
    "tpu": ("libtpu is not installed, and it compiles for TPUs; pip install 'resnet-jax[tpu]' "
            "(or 'libtpu==0.0.42.*', the version jax 0.10.2 pins)"),
    "cuda": ("the CUDA plugin is not installed, and it compiles for NVIDIA GPUs (no GPU needed); "
             "pip install 'jax-cuda12-plugin==0.10.2' 'jax-cuda12-pjrt==0.10.2'"),
}
_COMPILER = {"tpu": "libtpu", "cuda": "jax_cuda12_plugin"}


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def _installed(platform: str) -> bool:
    return libtpu_installed() if platform == "tpu" else \
        importlib.util.find_spec(_COMPILER[platform]) is not None


def chip_of(topology: str) -> Chip:
    match = _TOPOLOGY.match(topology)
    chip = CHIPS.get(match.group(1)) if match else None
    dims = match.group(2).count("x") + 1 if match else 0
    if chip is None or not (dims in (2, 3) if chip.platform == "tpu" else dims in (1, 2)):
        raise UserError(f"--topology {topology!r} is not {_FORMS}; chips: {', '.join(CHIPS)}")
    return chip


def target_devices(topology: str) -> List[jax.Device]:
    """The chips of a TPU slice or of GPU hosts, for compiling only: nothing here needs (or
    touches) a TPU or a GPU."""
    chip = chip_of(topology)
    if not _installed(chip.platform):
        raise UserError(_MISSING[chip.platform])
    from jax.experimental import topologies
    # libtpu's one-process lock guards chips that a compile-only topology never opens; without
    # this a second process (a test run beside a training job) would be refused.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    shape = topology.split(":", 1)[1]
    try:
        if chip.platform == "tpu":
            devices = topologies.get_topology_desc(
                platform="tpu", topology_name=topology, chip_config_name=chip.chip_config).devices
        else:  # slices x hosts x GPUs per host
            hosts, _, gpus = shape.rpartition("x")
            devices = topologies.get_topology_desc(
                platform=chip.platform, target_config=chip.target_config,
                topology=f"1x{hosts or 1}x{gpus}").devices
    except Exception as e:  # noqa: BLE001 - the plugins' errors are RuntimeErrors of many texts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "lockfile" in first:
            raise UserError(f"libtpu is in use by another process ({first}); run this with "
                            "ALLOW_MULTIPLE_LIBTPU_LOAD=1 or when that process has ended") from None
        raise UserError(f"{_COMPILER[chip.platform]} cannot describe topology {topology!r}: "
                        f"{first}") from None
    return list(devices)


# ---------------------------------------------------------------------------------------------
# What one compiled program needs per chip


@dataclasses.dataclass
class Report:
    program: str
    per_chip_batch: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int     # outputs that reuse donated arguments' buffers
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int       # the chip's
    peak_flops: float    # the chip's
    hbm_bandwidth: float  # the chip's
    flops: float         # per chip, per step, loop bodies once
    bytes_accessed: float
    collectives: Dict[str, Dict[str, int]]  # kind -> {count, bytes}
    custom_calls: List[str]
    rolled: bool         # the program has a while loop (a rolled stage): cost counts its body once
    compile_seconds: float
    compile_cpu_seconds: float  # all this process's threads: comparable on a busy machine

    @property
    def total_bytes(self) -> int:
        """Live HBM at the peak: arguments, temporaries, outputs not aliased to arguments, code."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes + \
            self.code_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes

    @property
    def roofline_seconds(self) -> float:
        """A floor on the step time: the flops at the chip's peak or the bytes at its HBM
        bandwidth, whichever takes longer (collectives and loop trips not counted)."""
        return max(self.flops / self.peak_flops, self.bytes_accessed / self.hbm_bandwidth)

    def to_json(self) -> Dict:
        return dict(dataclasses.asdict(self), total_bytes=self.total_bytes, fits=self.fits,
                    roofline_seconds=self.roofline_seconds)


_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|f8\w*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.-]+ = (.*?) ([a-z-]+)\(", re.M)
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def _bits(dtype: str) -> int:
    return 1 if dtype == "pred" else int(re.sub(r"\D", "", dtype) or 8)


def _shape_bytes(dtype: str, dims: str) -> int:
    """Bytes of one HLO array type: ('f32', '128,64') -> 32768."""
    return int(np.prod([int(d) for d in dims.split(",") if d] or [1])) * max(_bits(dtype) // 8, 1)


def collectives(hlo: str) -> Dict[str, Dict[str, int]]:
    """Each collective of an optimised HLO module: kind -> {count, bytes of its results}. An
    asynchronous pair (all-reduce-start / -done) counts once, by its start; of an async start
    only the last element of its tuple is the result."""
    found: Dict[str, Dict[str, int]] = {}
    for result, opcode in _INSTRUCTION.findall(hlo):
        kind = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
        if kind not in COLLECTIVES:
            continue
        shapes = _SHAPE.findall(result)
        if opcode.endswith("-start") and kind != "all-reduce" and result.startswith("("):
            shapes = shapes[-1:]
        size = sum(_shape_bytes(dtype, dims) for dtype, dims in shapes)
        entry = found.setdefault(kind, dict(count=0, bytes=0))
        entry["count"] += 1
        entry["bytes"] += size
    return found


def report(program: str, compiled, per_chip_batch: int, chip: Chip, seconds: float,
           cpu_seconds: float) -> Report:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    hlo = compiled.as_text()
    return Report(program=program, per_chip_batch=per_chip_batch,
                  argument_bytes=memory.argument_size_in_bytes,
                  output_bytes=memory.output_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
                  temp_bytes=memory.temp_size_in_bytes,
                  code_bytes=memory.generated_code_size_in_bytes, hbm_bytes=chip.hbm_bytes,
                  peak_flops=chip.peak_flops, hbm_bandwidth=chip.hbm_bandwidth,
                  flops=float(cost.get("flops", 0.0)),
                  bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                  collectives=collectives(hlo), custom_calls=sorted(set(_CUSTOM_CALL.findall(hlo))),
                  rolled=bool(re.search(r"\swhile\(", hlo)), compile_seconds=round(seconds, 1),
                  compile_cpu_seconds=round(cpu_seconds, 1))


class DoesNotFit(Exception):
    """XLA's TPU compiler refused the program: it needs more HBM than the chip has."""


def compile_lowered(lowered, effort: float = 0.0):
    """lowered -> (compiled, seconds, CPU seconds); DoesNotFit where the chip's HBM cannot hold it. `effort`
    is XLA's exec_time_optimization_effort in [-1, 1]: 0 (the default) is the program a TPU job
    runs; -1 compiles some 4x faster, a little less optimised (the tests use it)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        compiled = lowered.compile({"exec_time_optimization_effort": effort} if effort else None)
    except Exception as e:  # noqa: BLE001 - XlaRuntimeError, whose text says what ran out
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            raise DoesNotFit(str(e).strip().splitlines()[0]) from None
        raise
    return compiled, time.perf_counter() - start, time.process_time() - cpu_start


# ---------------------------------------------------------------------------------------------
# The trainer's programs, abstract


@dataclasses.dataclass
class Programs:
    """The trainer's jitted steps for one config on one mesh, and abstract arguments for them."""
    config: object
    mesh: jax.sharding.Mesh
    model: object
    image_size: int
    normalization: checkpoint.Normalization

    @classmethod
    def build(cls, config, devices: Sequence[jax.Device], image_size: Optional[int] = None):
        mesh = parallel.make_mesh(devices)
        image_size = image_size or config.data.get("image_size", 32)
        model, _ = state_lib.create_model(config, sources.num_classes(config.data.source),
                                      resnet_jax.kernels.for_devices(mesh.devices.flat))
        # the paper's per-pixel mean: its value does not change the program
        normalization = checkpoint.Normalization(np.zeros((image_size, image_size, 3), np.float32))
        return cls(config, mesh, model, image_size, normalization)

    def batch(self, per_chip: int, *extra_dims, dtype=jnp.uint8):
        global_size = per_chip * self.mesh.devices.size
        return jax.ShapeDtypeStruct((global_size,) + extra_dims, dtype,
                                    sharding=parallel.batch_sharding(self.mesh))

    def images(self, per_chip: int):
        return self.batch(per_chip, self.image_size, self.image_size, 3)

    def lower(self, program: str, per_chip: int):
        """The program traced and lowered for `per_chip` images on every chip."""
        if program not in PROGRAMS:
            raise UserError(f"unknown program {program!r}; one of {', '.join(PROGRAMS)}")
        state = state_lib.abstract_state(self.config, self.model, self.mesh, self.image_size)
        images, labels = self.images(per_chip), self.batch(per_chip, dtype=jnp.int32)
        if program == "train":
            step = train.make_train_step(self.config, self.model, self.mesh, self.normalization)
            return step.lower(state, images, labels)
        mask = self.batch(per_chip, dtype=jnp.bool_)
        if program == "eval":
            step = make_eval_step(self.model, self.mesh, self.normalization)
            return step.lower(state.variables, images, labels, mask)
        moments = analyze.batch_moments_fn(self.model, self.normalization, analyze.Settings())
        return moments.step.lower(state.variables, images, mask, groups=self.mesh.devices.size)


def compile_program(programs: Programs, program: str, per_chip: int, chip: Chip,
                    effort: float = 0.0) -> Report:
    compiled, seconds, cpu_seconds = compile_lowered(programs.lower(program, per_chip), effort)
    return report(program, compiled, per_chip, chip, seconds, cpu_seconds)


def max_batch(programs: Programs, chip: Chip, start: int, effort: float = 0.0,
              log=lambda *a: None, known: Optional[Report] = None) -> int:
    """The largest per-chip batch whose train step the compiler fits into the chip's HBM (exact
    to 8 images past 16, else to 1; 0 if not even one image fits). Memory grows about linearly
    with the batch until HBM is nearly full, so each fitting compile predicts where HBM runs out
    (its fixed part: arguments and code) and compiles there, jumping at least twice as far as the
    last jump; after the first batch that does not fit, it bisects. Near the limit XLA's TPU compiler recomputes activations
    rather than store them (the memory stays flat and the flops per image rise: the log shows
    both), so the largest batch that fits can cost extra compute. `known`: the train step's
    report at some batch already."""
    fits: Dict[int, Report] = {known.per_chip_batch: known} if known and known.fits else {}
    fails = {known.per_chip_batch} if known and not known.fits else set()

    def probe(b):
        try:
            r = compile_program(programs, "train", b, chip, effort)
        except DoesNotFit:
            log(f"  {b} images a chip: does not fit (the compiler ran out of HBM)")
            fails.add(b)
            return False
        base = known or (fits[min(fits)] if fits else r)
        extra = r.flops / b / (base.flops / base.per_chip_batch) - 1 if base.flops else 0.0
        log(f"  {b} images a chip: {_size(r.total_bytes)} of {_size(chip.hbm_bytes)}"
            + (f", flops per image {100 * extra:+.0f} %" if base.flops else "")
            + f" ({r.compile_seconds:.0f} s)")
        if r.fits:
            fits[b] = r
        else:
            fails.add(b)
        return r.fits

    if not known:
        probe(max(start, 1))
    previous = 0  # the fitting batch before `low`
    while True:
        low, high = max(fits, default=0), min(fails, default=None)
        step = 8 if low >= 16 else 1
        if high is not None and high - low <= step:
            return low
        if not low:
            candidate = high // 2
        elif high is not None:  # memory need not be linear near the limit: bisect
            candidate = (low + high) // 2 // step * step
        else:
            r = fits[low]
            fixed = r.argument_bytes + r.code_bytes
            per_image = max((r.total_bytes - fixed) / low, 1.0)
            candidate = int((chip.hbm_bytes - fixed) / per_image) // step * step
            candidate = max(candidate, (3 * low - 2 * previous) // step * step)
        candidate = max(candidate, low + step) if low else max(candidate, 1)
        if probe(candidate):
            previous = low


# ---------------------------------------------------------------------------------------------
# Printing


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / (1 << 20):.1f} MiB"


def format_report(r: Report) -> str:
    comm = ", ".join(f"{k} x{v['count']} ({_size(v['bytes'])})" for k, v in r.collectives.items())
    fit = "fits" if r.fits else "DOES NOT FIT"
    lines = [
        f"{r.program}: {r.per_chip_batch} images a chip, compiled in {r.compile_seconds:.1f} s "
        f"({r.compile_cpu_seconds:.1f} s of CPU)",
        f"  HBM per chip: arguments {_size(r.argument_bytes)}, temporaries {_size(r.temp_bytes)}, "
        f"outputs {_size(r.output_bytes)} ({_size(r.alias_bytes)} of them in donated arguments), "
        f"code {_size(r.code_bytes)}: {_size(r.total_bytes)} of {_size(r.hbm_bytes)}, {fit} "
        f"({100 * r.total_bytes / r.hbm_bytes:.0f} %)",
        (f"  per chip and step: {r.flops / 1e12:.3g} TFLOP, {r.bytes_accessed / GiB:.3g} GiB accessed"
         + (" (a rolled stage's loop body counted once)" if r.rolled else "")
         + f"; at peak and full HBM bandwidth no less than {1e3 * r.roofline_seconds:.3g} ms "
         f"({'memory' if r.bytes_accessed / r.hbm_bandwidth > r.flops / r.peak_flops else 'compute'}"
         "-bound)") if r.flops else "  per chip and step: this compiler gives no cost analysis",
        f"  collectives: {comm or 'none'}"]
    if r.custom_calls:
        lines.append(f"  custom calls: {', '.join(r.custom_calls)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line

FLAGS = flags.FLAGS


def define_flags():
    config_lib.define_config_flag("imagenet:resnet50", __name__)
    flags.DEFINE_string("topology", "v5e:2x2", f"{_FORMS}; chips: " + ", ".join(
        f"{c.name} ({c.hbm_bytes // GiB} GiB HBM)" for c in CHIPS.values()))
    flags.DEFINE_integer("batch_size", None, "global batch (default: the config's batch_size)",
                         lower_bound=1)
    flags.DEFINE_list("programs", list(PROGRAMS), f"which steps: any of {', '.join(PROGRAMS)}")
    flags.DEFINE_bool("max_batch", False, "also search the largest per-chip train batch that fits")
    flags.DEFINE_integer("image_size", None, "image side (default: the config's, 32 for CIFAR)")
    flags.DEFINE_float("effort", 0.0, "XLA's exec_time_optimization_effort, -1..1: 0 compiles "
                       "the program a TPU job runs; -1 some 4x faster, a little less optimised")
    flags.DEFINE_string("json", None, "also write the figures to this JSON file")


def run_compile(config, topology: str, batch_size: Optional[int] = None,
                programs: Sequence[str] = PROGRAMS, search_max_batch: bool = False,
                image_size: Optional[int] = None, effort: float = 0.0, log=print) -> Dict:
    """The command's work, importable: {'topology', 'chips', 'hosts', 'reports', 'max_batch'}."""
    chip = chip_of(topology)
    devices = target_devices(topology)
    chips, hosts = len(devices), len({d.process_index for d in devices})
    config = config.copy_and_resolve_references()
    config.batch_size = batch_size or config.batch_size
    config_lib.check(config, num_devices=chips)  # as the trainer would on this slice
    batch_size = config.batch_size
    per_chip = batch_size // chips
    built = Programs.build(config, devices, image_size)
    log(f"{config.model} ({config.compute_dtype}) on {topology}: {chips} {chip.device_kind} chips, "
        f"{hosts} host{'s' * (hosts > 1)}; global batch {batch_size}")
    reports, train_report = [], None
    for program in programs:
        try:
            r = compile_program(built, program, per_chip, chip, effort)
        except DoesNotFit as e:
            log(f"{program}: {per_chip} images a chip DO NOT FIT {chip.device_kind}'s "
                f"{chip.hbm_bytes // GiB} GiB: {e}")
            reports.append(dict(program=program, per_chip_batch=per_chip, fits=False))
            continue
        log(format_report(r))
        reports.append(r.to_json())
        train_report = r if program == "train" else train_report
    result = dict(model=config.model, compute_dtype=config.compute_dtype, topology=topology,
                  effort=effort, chips=chips, hosts=hosts, device_kind=chip.device_kind,
                  reports=reports)
    if search_max_batch:
        log("largest per-chip train batch:")
        result["max_batch"] = max_batch(built, chip, per_chip, effort, log, train_report)
        log(f"max batch: {result['max_batch']} images a chip "
            f"({result['max_batch'] * chips} global) on {topology}")
    return result


def main(argv):
    del argv  # absl_run refuses arguments besides the flags
    with exit_on_user_error():
        unknown = set(FLAGS.programs) - set(PROGRAMS)
        if unknown:
            raise UserError(f"--programs {', '.join(sorted(unknown))}: not any of {', '.join(PROGRAMS)}")
        if FLAGS.json:
            storage.check_writable(FLAGS.json.rpartition("/")[0], "--json")
        result = run_compile(FLAGS.config, FLAGS.topology, FLAGS.batch_size, FLAGS.programs,
                             FLAGS.max_batch, FLAGS.image_size, FLAGS.effort)
        if FLAGS.json:
            lines.write_json(FLAGS.json, result)


def compile_only():
    """For a process that only compiles (this CLI, the TPU benchmarks): the host's CPU is the only
    backend it starts, so it can run beside a training job that holds the TPU chips."""
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")


def run():
    compile_only()
    define_flags()
    cli.absl_run(main, __name__, positional=0, config=True)
