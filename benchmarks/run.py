"""The project's benchmark: resnet-jax against the PyTorch reference, in one invocation.

    .venv/bin/python -m benchmarks.run [--models resnet20,resnet56] [--modes train,eval]
        [--repeats 12] [--json results.json]

Rows, each a median over `--repeats` timed calls after `--warmup` untimed rounds (and one untimed
call before each timed one, `interleaved_seconds` says why):
- train: images/s of the trainer's own jitted step (`train.make_train_step`: forward, loss,
  backward, SGD with momentum and weight decay, BN in training mode) on a fixed random batch;
- eval: images/s of the trainer's evaluation step (BN in inference mode);
- analyze: images/s of `analyze.batch_moments_fn` (Figure 7's per-layer response moments),
  timed in turns with eval, and the median of their ratios round by round;
- input: images/s of the training input pipeline (`pipeline.input_throughput`), with its ratio
  to the train step;
- responses: what logging Figure 7 while training (`periodic.ResponseProbe`, the config's
  `responses_images` validation images at every evaluation) adds to a run at the paper's CIFAR
  cadence, in percent: one probe call against `checkpoint_every` train steps, timed in turns;
- compile: seconds to trace, lower and compile the train step (`--compile_models`);
- memory: the compiled train step's XLA buffers (arguments, outputs and temporaries), MiB;
- and `benchmarks/analysis_memory.py`'s rows (analysis peak memory and streaming).
Where the PyTorch reference (`--pytorch`, ../shared/bench/torch_cifar.py by default) has the same
net, its own step runs in a child process with the same thread count (and the allocator the user
started with), timed in turns with resnet-jax's, and the row carries `pytorch_value` and `ratio`:
resnet-jax / PyTorch, the median of the per-round ratios (above 1 is faster). A shared machine's
slow spells then slow both alike: timed in separate spells, the same code's ratio moved by 0.1-0.3.
"""

if __name__ == "__main__":  # before the imports below, while a restart costs nothing (preload)
    from resnet_jax import preload
    preload.use_tcmalloc()

import contextlib
import importlib.metadata
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from absl import app, flags

from resnet_jax.preload import PRELOADED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("RESNET_JAX_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
MODES = ("train", "eval", "analyze", "responses", "input", "compile", "memory", "analysis_memory")
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
    flags.DEFINE_bool("pytorch_tcmalloc", False,
                      "preload into PyTorch the tcmalloc resnet-jax preloads for itself (by "
                      "default PyTorch runs as users start it, with the allocator they started)")
    flags.DEFINE_string("json", "", "also write the rows to this JSON file")


# ---------------------------------------------------------------------------------------------
# Timing


def interleaved_seconds(calls: Sequence[Callable[[], object]], warmup: int,
                        repeats: int) -> List[List[float]]:
    """Wall times of each `call()` (its result waited for), `repeats` of each after `warmup`
    untimed rounds, the calls taking turns within every round: on a shared machine a slow spell
    then slows all of them alike, and their ratio, taken round by round, keeps steady.

    Each turn runs its call once untimed before the timed one: the first call after another
    program (PyTorch's process, or the other jitted function) finds the caches and threads that
    one left, and took 1-10 % longer for it here than the call after it, unevenly across nets."""
    import jax
    for _ in range(warmup):
        for call in calls:
            jax.block_until_ready(call())
    times = [[] for _ in calls]
    for _ in range(repeats):
        for call, mine in zip(calls, times):
            jax.block_until_ready(call())
            start = time.perf_counter()
            jax.block_until_ready(call())
            mine.append(time.perf_counter() - start)
    return times


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
        from resnet_jax import checkpoint, kernels, parallel
        from resnet_jax import state as state_lib
        from resnet_jax.config import default_config

        self.name = name
        self.config = default_config()
        self.config.model = name
        self.mesh = parallel.make_mesh()
        self.model, _ = state_lib.create_model(self.config, num_classes=10,
                                           kernels=kernels.for_devices(self.mesh.devices.flat))
        self.normalization = checkpoint.Normalization(**NORMALIZATION)
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        self.labels = rng.integers(0, 10, batch).astype(np.int32)
        self.batch = parallel.global_batch((self.images, self.labels),
                                           parallel.batch_sharding(self.mesh), batch)
        self.state = state_lib.init_state(self.config, self.model, self.mesh, 32)
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

    def train_call(self) -> Callable[[], object]:
        """One train step on the batch, as the trainer runs it (the state is donated)."""
        step = self.train_step()

        def call():
            self.state, metrics = step(self.state, *self.batch)
            return metrics
        return call

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
        moments_of, mask = fn(self.state.variables), np.ones(len(self.labels), bool)
        return lambda: moments_of(self.images, mask)

    def responses_call(self) -> Callable[[], object]:
        """The trainer's response probe over `responses_images` random images, as the loop calls
        it at an evaluation (from the state's variables, host merge included)."""
        import numpy as np
        from resnet_jax import periodic
        images = np.random.default_rng(1).integers(
            0, 256, (self.config.responses_images, 32, 32, 3), dtype=np.uint8)
        probe = periodic.ResponseProbe(self.model, self.normalization, images)
        return lambda: probe(self.state.variables)

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


class PyTorchStep:
    """One step of the PyTorch reference on the same net per call, run by a child process that
    stays up between calls (`benchmarks/torch_steps.py`), so that it can take turns with
    resnet-jax's steps in `interleaved_seconds`. Same thread count; the allocator the user
    started with (PyTorch as users run it: without the tcmalloc resnet-jax preloaded for itself),
    or with that tcmalloc too (`tcmalloc`)."""

    def __init__(self, script: str, mode: str, name: str, batch: int, threads: int,
                 tcmalloc: bool = False):
        depth = name[len(name.rstrip("0123456789")):]
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                            "torch_steps.py"), script, mode, depth, str(batch)]
        cmd += ["--plain"] if name.startswith("plain") else []
        env = dict(os.environ, TORCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        if not tcmalloc:
            env["LD_PRELOAD"] = " ".join(lib for lib in env.get("LD_PRELOAD", "").split()
                                         if lib != env.get(PRELOADED))
        self._cmd = " ".join(cmd)
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, text=True, env=env)
        self._expect("ready")

    def _expect(self, word: str) -> None:
        line = self._proc.stdout.readline().strip()
        if line != word:
            self._proc.kill()
            self._proc.wait()
            self._stderr.seek(0)
            raise RuntimeError(f"PyTorch reference failed ({self._cmd}):\n"
                               f"{self._stderr.read()[-2000:]}")

    def __call__(self) -> None:
        self._proc.stdin.write("step\n")
        self._proc.stdin.flush()
        self._expect("done")

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait()
        self._stderr.close()


@contextlib.contextmanager
def pytorch_step(script: str, mode: str, name: str, batch: int,
                 threads: int, tcmalloc: bool = False) -> Iterator[Optional[PyTorchStep]]:
    """The reference's step on `name` while the block runs, or None where it has no such net (or
    no script)."""
    if not script or name.rstrip("0123456789") not in TORCH_NETS:
        yield None
        return
    step = PyTorchStep(script, mode, name, batch, threads, tcmalloc)
    try:
        yield step
    finally:
        step.close()


def timed_with_pytorch(calls: List[Callable[[], object]], step: Optional[Callable[[], object]],
                       warmup: int, repeats: int) -> Tuple[List[List[float]], Optional[List[float]]]:
    """`interleaved_seconds` of `calls`, with the PyTorch step (if any) taking its turn last in
    each round: (the calls' times, PyTorch's times or None)."""
    if step is None:
        return interleaved_seconds(calls, warmup, repeats), None
    times = interleaved_seconds(list(calls) + [step], warmup, repeats)
    return times[:-1], times[-1]


# ---------------------------------------------------------------------------------------------
# Rows


def make_row(model: str, mode: str, metric: str, value: float, unit: str,
             pytorch_value: Optional[float] = None, ratio: Optional[float] = None,
             **extra) -> Dict:
    """A row; `ratio` (resnet-jax / PyTorch) defaults to value / pytorch_value, and is given where
    the two were timed in turns (the median of the per-round ratios)."""
    row = dict(model=model, mode=mode, metric=metric, value=round(value, 3), unit=unit)
    if pytorch_value is not None:
        ratio = value / pytorch_value if ratio is None else ratio
        row.update(pytorch_value=round(pytorch_value, 3), ratio=round(ratio, 3))
    row.update(extra)
    return row


def run(models: List[str], modes: List[str], compile_models: List[str], *, batch: int = 128,
        warmup: int = 3, repeats: int = 12, pytorch: str = "", threads: int = 2,
        pytorch_tcmalloc: bool = False,
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
        if not {"train", "eval", "analyze", "responses", "input", "memory"} & set(modes):
            break
        net = Net(name, batch)
        train_speed = None
        if "train" in modes:
            with pytorch_step(pytorch, "train", name, batch, threads,
                              pytorch_tcmalloc) as torch_step:
                (times,), torch_times = timed_with_pytorch([net.train_call()], torch_step,
                                                           warmup, repeats)
            train_speed = batch / statistics.median(times)
            add(make_row(name, "train", "train step", train_speed, "images/s",
                         *_against(batch, times, torch_times)))
        if "eval" in modes or "analyze" in modes:
            # Analysis is timed against evaluation in turns, and both against PyTorch, so each
            # ratio is the median of ratios from the same moments, not of separate spells.
            calls = [net.eval_call()] + ([net.analyze_call()] if "analyze" in modes else [])
            with pytorch_step(pytorch, "eval", name, batch, threads,
                              pytorch_tcmalloc) as torch_step:
                times, torch_times = timed_with_pytorch(calls, torch_step, warmup, repeats)
            add(make_row(name, "eval", "eval step (BN inference)",
                         batch / statistics.median(times[0]), "images/s",
                         *_against(batch, times[0], torch_times)))
            if "analyze" in modes:
                add(make_row(name, "analyze", "response moments",
                             batch / statistics.median(times[1]), "images/s",
                             of_eval=round(_median_ratio(times[0], times[1]), 3)))
        if "responses" in modes:
            (steps, probes), _ = timed_with_pytorch([net.train_call(), net.responses_call()],
                                                    None, 1, max(3, repeats // 3))
            cadence, images = net.config.checkpoint_every, net.config.responses_images
            share = statistics.median(probes) / (cadence * statistics.median(steps))
            add(make_row(name, "responses", f"{images} images' responses / {cadence} steps",
                         100 * share, "% of train"))
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


def _median_ratio(slow: Sequence[float], fast: Sequence[float]) -> float:
    """Median over rounds of slow / fast seconds: how many times faster `fast` ran."""
    return statistics.median(s / f for s, f in zip(slow, fast))


def _against(batch: int, times: Sequence[float], torch_times: Optional[Sequence[float]]):
    """(pytorch_value, ratio) for `make_row` from times taken in turns, or (None, None)."""
    if torch_times is None:
        return None, None
    return batch / statistics.median(torch_times), _median_ratio(torch_times, times)


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
        from resnet_jax import lines
        from resnet_jax.kernels import cpu
        from resnet_jax.models import registry
        cpu.use_cpu_cores((FLAGS.batch,))
        unknown = [m for m in FLAGS.modes if m not in MODES]
        if unknown:
            raise UserError(f"unknown mode {unknown[0]!r}; --modes takes any of {', '.join(MODES)}")
        for name in FLAGS.models + FLAGS.compile_models:
            registry.check_options(name, {})  # an unknown name fails here, in one line
        if FLAGS.batch < 1 or FLAGS.repeats < 1 or FLAGS.warmup < 0:
            raise UserError("--batch and --repeats must be positive and --warmup not negative")
        pytorch = FLAGS.pytorch
        if pytorch and not os.path.isfile(pytorch):
            if FLAGS["pytorch"].present:
                raise UserError(f"--pytorch {pytorch!r} is not a file; point it at "
                                "shared/bench/torch_cifar.py, or pass --pytorch= to skip PyTorch")
            print(f"# {pytorch} absent: PyTorch not run", file=sys.stderr)
            pytorch = ""
        from resnet_jax import kernels
        conv = kernels.for_devices(jax.devices()).name
        print(f"# {machine()}; jax {jax.__version__} ({jax.default_backend()}, "
              f"{jax.device_count()} devices, {conv} convolutions, malloc "
              f"{os.environ.get(PRELOADED) or 'as started'}), "
              f"torch {_version('torch')} with {FLAGS.threads} threads"
              f"{' and the same tcmalloc' if FLAGS.pytorch_tcmalloc else ''}; batch {FLAGS.batch}, "
              f"median of {FLAGS.repeats} after {FLAGS.warmup} warm-up; load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        print(HEADER, flush=True)
        rows = run(FLAGS.models, FLAGS.modes, FLAGS.compile_models, batch=FLAGS.batch,
                   warmup=FLAGS.warmup, repeats=FLAGS.repeats, pytorch=pytorch,
                   threads=FLAGS.threads, pytorch_tcmalloc=FLAGS.pytorch_tcmalloc, report=lambda row: print(format_row(row), flush=True))
        # Other processes on the cores slow PyTorch's threads far more than XLA's: compare
        # ratios only from runs on an otherwise idle machine (load average well below 1).
        print(f"# load average at the end: {os.getloadavg()[0]:.1f}")
        if FLAGS.json:
            meta = dict(machine=machine(), jax=jax.__version__, backend=jax.default_backend(),
                        convolutions=conv, devices=jax.device_count(),
                        load_average_end=round(os.getloadavg()[0], 2))
            lines.write_json(FLAGS.json, [dict(row, **meta) for row in rows])


if __name__ == "__main__":
    define_flags()
    app.run(main)
