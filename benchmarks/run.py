"""The project's benchmark: resnet-jax against the PyTorch reference, in one invocation.

    .venv/bin/python -m benchmarks.run [--models resnet20,resnet56] [--modes train,eval]
        [--repeats 12] [--json results.json]

Rows, each a median over `--repeats` timed calls after `--warmup` untimed ones:
- train: images/s of the trainer's own jitted step (`train.make_train_step`: forward, loss,
  backward, SGD with momentum and weight decay, BN in training mode) on a fixed random batch;
- eval: images/s of the trainer's evaluation step (BN in inference mode);
- analyze: images/s of `analyze.batch_moments_fn` (Figure 7's per-layer response moments),
  timed in turns with eval, and the median of their ratios round by round;
- input: images/s of the training input pipeline (`pipeline.input_throughput`), with its ratio
  to the train step;
- compile: seconds to trace, lower and compile the train step (`--compile_models`);
- memory: the compiled train step's XLA buffers (arguments, outputs and temporaries), MiB;
- and `benchmarks/analysis_memory.py`'s rows (analysis peak memory and streaming).
Where the PyTorch reference (`--pytorch`, ../shared/bench/torch_cifar.py by default) runs the same
net, it runs just before in a subprocess with the same thread count (and the allocator the user
started with), and the row carries
`pytorch_value` and `ratio` (resnet-jax / PyTorch; above 1 is faster).
"""

if __name__ == "__main__":  # before the imports below, while a restart costs nothing (preload)
    from resnet_jax import preload
    preload.use_tcmalloc()

import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

from absl import app, flags

from resnet_jax.preload import PRELOADED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("RESNET_JAX_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
MODES = ("train", "eval", "analyze", "input", "compile", "memory", "analysis_memory")
# The PyTorch reference's nets (torch_cifar.py): the paper's CIFAR ResNets and plain nets.
TORCH_NETS = ("resnet", "plain")
NORMALIZATION = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_list("models", ["resnet20", "resnet56", "resnet110", "plain20", "plain56"],
                      "CIFAR nets for the train/eval/analyze/memory rows")
    flags.DEFINE_list("modes", list(MODES), f"which rows: any of {', '.join(MODES)}")
    flags.DEFINE_list("compile_models", ["resnet20", "resnet110", "resnet1202"],
                      "nets whose train-step compile time is measured")
    flags.DEFINE_integer("batch", 128, "images per step")
    flags.DEFINE_integer("warmup", 3, "untimed calls before timing")
    flags.DEFINE_integer("repeats", 12, "timed calls; each figure is their median")
    flags.DEFINE_string("pytorch", os.path.join(SHARED, "bench", "torch_cifar.py"),
                        "the PyTorch reference script; '' skips PyTorch")
    flags.DEFINE_integer("threads", os.cpu_count() or 1,
                         "PyTorch's thread count (XLA uses every core of the machine)")
    flags.DEFINE_string("json", "", "also write the rows to this JSON file")


# ---------------------------------------------------------------------------------------------
# Timing


def interleaved_seconds(calls: Sequence[Callable[[], object]], warmup: int,
                        repeats: int) -> List[List[float]]:
    """Wall times of each `call()` (its result waited for), `repeats` of each after `warmup`
    untimed rounds, the calls taking turns within every round: on a shared machine a slow spell
    then slows all of them alike, and their ratio, taken round by round, keeps steady."""
    import jax
    for _ in range(warmup):
        for call in calls:
            jax.block_until_ready(call())
    times = [[] for _ in calls]
    for _ in range(repeats):
        for call, mine in zip(calls, times):
            start = time.perf_counter()
            jax.block_until_ready(call())
            mine.append(time.perf_counter() - start)
    return times


def median_seconds(call: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time of `call()` (its result waited for) after `warmup` untimed calls."""
    return statistics.median(interleaved_seconds([call], warmup, repeats)[0])


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


# ---------------------------------------------------------------------------------------------
# resnet-jax


class Net:
    """One zoo net with the trainer's steps, on random weights and a fixed random batch."""

    def __init__(self, name: str, batch: int):
        import jax
        import numpy as np
        from resnet_jax import checkpoint, parallel, train

        self.name = name
        self.config = train.default_config()
        self.config.model = name
        self.model, _ = train.create_model(self.config, num_classes=10)
        self.mesh = parallel.make_mesh()
        self.normalization = checkpoint.Normalization(**NORMALIZATION)
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        self.labels = rng.integers(0, 10, batch).astype(np.int32)
        self.batch = parallel.global_batch((self.images, self.labels),
                                           parallel.batch_sharding(self.mesh), batch)
        self.state = train.init_state(self.config, self.model, self.mesh, 32)
        self._train = None
        self.compile_seconds = None
        self.jax = jax

    def train_step(self):
        """The compiled train step (compiled once; its time kept in `compile_seconds`)."""
        from resnet_jax import train
        if self._train is None:
            start = time.perf_counter()
            step = train.make_train_step(self.config, self.model, self.mesh, self.normalization)
            self._train = step.lower(self.state, *self.batch).compile()
            self.compile_seconds = time.perf_counter() - start
        return self._train

    def train_images_per_s(self, warmup: int, repeats: int) -> float:
        step = self.train_step()

        def call():
            self.state, metrics = step(self.state, *self.batch)  # the state is donated
            return metrics
        return len(self.labels) / median_seconds(call, warmup, repeats)

    def eval_call(self) -> Callable[[], object]:
        """One evaluation step (BN inference) on the batch, as `evaluate` runs it."""
        import numpy as np
        from resnet_jax import evaluate, parallel
        step = evaluate.make_eval_step(self.model, self.mesh, self.normalization)
        mask = parallel.global_batch(np.ones(len(self.labels), bool),
                                     parallel.batch_sharding(self.mesh), len(self.labels))
        variables = self.state.variables
        return lambda: step(variables, *self.batch, mask)

    def analyze_call(self) -> Callable[[], object]:
        """One batch of `analyze`'s response moments, from host images as `analyze` feeds it."""
        import numpy as np
        from resnet_jax import analyze
        fn = analyze.batch_moments_fn(self.model, self.normalization,
                                      analyze.Settings(batch_size=len(self.labels)))
        mask = np.ones(len(self.labels), bool)
        variables = self.state.variables
        return lambda: fn(variables, self.images, mask)

    def train_memory_mib(self) -> float:
        stats = self.train_step().memory_analysis()
        total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                 + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
        return total / 2 ** 20


def input_images_per_s(batch: int) -> float:
    from resnet_jax.data import pipeline, sources
    return pipeline.input_throughput(sources.load("synthetic:50000", "train"), batch)


def compile_seconds(name: str, batch: int) -> float:
    net = Net(name, batch)
    net.train_step()
    return net.compile_seconds


# ---------------------------------------------------------------------------------------------
# PyTorch


def torch_images_per_s(script: str, mode: str, name: str, batch: int, repeats: int,
                       threads: int) -> Optional[float]:
    """images/s of torch_cifar.py on the same net, or None where it has no such net."""
    kind, depth = name.rstrip("0123456789"), name[len(name.rstrip("0123456789")):]
    if not script or kind not in TORCH_NETS:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, script, mode, "--depths", depth, "--batch", str(batch),
               "--steps", str(repeats), "--json", out] + (["--plain"] if kind == "plain" else [])
        env = dict(os.environ, TORCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        # PyTorch as users run it: without the tcmalloc resnet-jax preloaded for itself.
        env["LD_PRELOAD"] = " ".join(lib for lib in env.get("LD_PRELOAD", "").split()
                                     if lib != env.get(PRELOADED))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            raise RuntimeError(f"PyTorch reference failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f)[0]["images_per_s"]


# ---------------------------------------------------------------------------------------------
# Rows


def make_row(model: str, mode: str, metric: str, value: float, unit: str,
             pytorch_value: Optional[float] = None, **extra) -> Dict:
    row = dict(model=model, mode=mode, metric=metric, value=round(value, 3), unit=unit)
    if pytorch_value is not None:
        row.update(pytorch_value=round(pytorch_value, 3), ratio=round(value / pytorch_value, 3))
    row.update(extra)
    return row


def run(models: List[str], modes: List[str], compile_models: List[str], *, batch: int = 128,
        warmup: int = 3, repeats: int = 12, pytorch: str = "", threads: int = 2,
        report: Callable[[Dict], None] = lambda row: None) -> List[Dict]:
    """Measure and return the rows (`report` sees each as it is made)."""
    rows = []

    def add(row):
        rows.append(row)
        report(row)

    if "analysis_memory" in modes:
        # First, while this process is small: a child's ru_maxrss starts from its parent's.
        from benchmarks import analysis_memory
        for row in analysis_memory.run():
            add(row)
    for name in models:
        if not {"train", "eval", "analyze", "input", "memory"} & set(modes):
            break
        net = Net(name, batch)
        train_speed = None
        if "train" in modes:
            torch_speed = torch_images_per_s(pytorch, "train", name, batch, repeats, threads)
            train_speed = net.train_images_per_s(warmup, repeats)
            add(make_row(name, "train", "train step", train_speed, "images/s", torch_speed))
        if "eval" in modes or "analyze" in modes:
            torch_speed = torch_images_per_s(pytorch, "eval", name, batch, repeats, threads)
            # Analysis is timed against evaluation in turns (interleaved_seconds), so its
            # ratio is the median of ratios from the same moments, not of two separate spells.
            calls = [net.eval_call()] + ([net.analyze_call()] if "analyze" in modes else [])
            times = interleaved_seconds(calls, warmup, repeats)
            add(make_row(name, "eval", "eval step (BN inference)",
                         batch / statistics.median(times[0]), "images/s", torch_speed))
            if "analyze" in modes:
                of_eval = statistics.median(e / a for e, a in zip(*times))
                add(make_row(name, "analyze", "response moments",
                             batch / statistics.median(times[1]), "images/s",
                             of_eval=round(of_eval, 3)))
        if "input" in modes and name == models[0]:
            speed = input_images_per_s(batch)
            add(make_row("-", "input", "input pipeline (device-side augmentation)", speed,
                         "images/s", **({"of_train": round(speed / train_speed, 3)}
                                        if train_speed else {})))
        if "memory" in modes:
            add(make_row(name, "memory", "train step XLA buffers", net.train_memory_mib(), "MiB"))
    if "compile" in modes:
        for name in compile_models:
            add(make_row(name, "compile", "train step trace+compile",
                         compile_seconds(name, batch), "s"))
    if "memory" in modes:
        add(make_row("-", "memory", "peak RSS of this benchmark process",
                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MiB"))
    return rows


def format_row(row: Dict) -> str:
    extra = ""
    if "ratio" in row:
        extra = f"{row['pytorch_value']:>10.1f}{row['ratio']:>8.2f}x"
    for key, label in (("of_eval", "of eval"), ("of_train", "of train")):
        if key in row:
            extra += f"   {row[key]:.2f}x {label}"
    images = f" ({row['images']} images)" if "images" in row else ""
    return (f"{row['model']:<11}{row['mode']:<9}{(row['metric'] + images):<44}"
            f"{row['value']:>10.1f} {row['unit']:<9}{extra}")


HEADER = f"{'model':<11}{'mode':<9}{'metric':<44}{'value':>10} {'unit':<9}{'pytorch':>10}{'ratio':>9}"


def main(argv):
    del argv
    from resnet_jax.errors import UserError, exit_on_user_error
    with exit_on_user_error():
        import jax
        import resnet_jax
        from resnet_jax import parallel
        parallel.use_cpu_cores((FLAGS.batch,))
        unknown = [m for m in FLAGS.modes if m not in MODES]
        if unknown:
            raise UserError(f"unknown mode {unknown[0]!r}; --modes takes any of {', '.join(MODES)}")
        for name in FLAGS.models + FLAGS.compile_models:
            resnet_jax.create_model(name)  # an unknown name fails here, in one line
        if FLAGS.batch < 1 or FLAGS.repeats < 1 or FLAGS.warmup < 0:
            raise UserError("--batch and --repeats must be positive and --warmup not negative")
        pytorch = FLAGS.pytorch
        if pytorch and not os.path.isfile(pytorch):
            if FLAGS["pytorch"].present:
                raise UserError(f"--pytorch {pytorch!r} is not a file; point it at "
                                "shared/bench/torch_cifar.py, or pass --pytorch= to skip PyTorch")
            print(f"# {pytorch} absent: PyTorch not run", file=sys.stderr)
            pytorch = ""
        from resnet_jax.models import onednn_conv
        conv = "oneDNN" if jax.default_backend() == "cpu" and onednn_conv.available() else "XLA"
        print(f"# {machine()}; jax {jax.__version__} ({jax.default_backend()}, "
              f"{jax.device_count()} devices, {conv} convolutions, malloc "
              f"{os.environ.get(PRELOADED) or 'as started'}), "
              f"torch {_version('torch')} with {FLAGS.threads} threads; batch {FLAGS.batch}, "
              f"median of {FLAGS.repeats} after {FLAGS.warmup} warm-up; load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        print(HEADER, flush=True)
        rows = run(FLAGS.models, FLAGS.modes, FLAGS.compile_models, batch=FLAGS.batch,
                   warmup=FLAGS.warmup, repeats=FLAGS.repeats, pytorch=pytorch,
                   threads=FLAGS.threads, report=lambda row: print(format_row(row), flush=True))
        # Other processes on the cores slow PyTorch's threads far more than XLA's: compare
        # ratios only from runs on an otherwise idle machine (load average well below 1).
        print(f"# load average at the end: {os.getloadavg()[0]:.1f}")
        if FLAGS.json:
            meta = dict(machine=machine(), jax=jax.__version__, backend=jax.default_backend(),
                        convolutions=conv, devices=jax.device_count(),
                        load_average_end=round(os.getloadavg()[0], 2))
            with open(FLAGS.json, "w") as f:
                json.dump([dict(row, **meta) for row in rows], f, indent=1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
