"""Does `resnet_jax.analyze` stream? Peak memory over 1,000 and 10,000 images, and its speed next
to a plain forward pass over the same batches.

    .venv/bin/python benchmarks/analysis_memory.py [--model resnet56] [--batch_size 250]

Each measurement runs in its own process (peak RSS, VmHWM: it only grows), on random weights
and random images: the statistics' values do not matter here, only what computing them costs.
The peak includes the images themselves (3 KB each), as the command holds the split in memory.
`run()` returns the rows for the project's benchmark entry point.
"""
import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List, Sequence

COUNTS = (1000, 10000)


def _measure(model_name: str, count: int, batch_size: int, what: str) -> Dict:
    """In the child: analyse (or only run forward over) `count` images; wall and CPU seconds
    after compiling, and the process's peak RSS."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import resnet_jax
    from resnet_jax import analyze, checkpoint, kernels
    from resnet_jax.data.batching import padded_batches

    model = resnet_jax.create_model(model_name, kernels=kernels.for_devices(jax.devices()))
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    normalize = checkpoint.Normalization(mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    images = np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    settings = analyze.Settings(batch_size=batch_size)
    if what == "analyze":
        fn = analyze.batch_moments_fn(model, normalize, settings)
        jax.block_until_ready(fn(variables)(images[:batch_size], np.ones(batch_size, bool)))
        start, cpu = time.perf_counter(), time.process_time()
        analyze.stream_moments(fn, variables, images, settings)
    else:
        forward = jax.jit(lambda v, x: jnp.sum(model.apply(v, normalize(x), train=False)))
        jax.block_until_ready(forward(variables, images[:batch_size]))
        start, cpu = time.perf_counter(), time.process_time()
        total = 0.0
        for batch, _, _ in padded_batches(images, np.zeros(count, np.int32), batch_size):
            total = total + forward(variables, batch)  # stays on device: no sync per batch
        jax.block_until_ready(total)
    return dict(seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu,
                peak_mib=own_peak_rss_mib())


def own_peak_rss_mib() -> float:
    """This process's own peak RSS. Not ru_maxrss: a child started from a large parent reports
    the parent's peak there, so every count would read the same."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def _child(model_name: str, count: int, batch_size: int, what: str) -> Dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", model_name,
                           str(count), str(batch_size), what],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(model: str = "resnet56", counts: Sequence[int] = COUNTS, batch_size: int = 250
        ) -> List[Dict]:
    """Rows {model, mode: 'analyze', metric, images, value, unit}."""
    rows = []
    row = lambda metric, images, value, unit: rows.append(dict(
        model=model, mode="analyze", metric=metric, images=images, value=round(value, 3), unit=unit))
    peaks = {}
    for count in counts:
        result = _child(model, count, batch_size, "analyze")
        peaks[count] = result["peak_mib"]
        row("peak RSS", count, result["peak_mib"], "MiB")
    small, large = min(counts), max(counts)
    row(f"peak RSS growth {small} -> {large} images", large,
        100 * (peaks[large] / peaks[small] - 1), "%")
    analysis = result  # the largest count, measured last
    forward = _child(model, large, batch_size, "forward")
    row("analysis throughput", large, large / analysis["seconds"], "images/s")
    row("forward-only throughput (BN inference)", large, large / forward["seconds"], "images/s")
    # CPU time (all threads) moves less than wall time on a shared machine.
    row("analysis CPU time over forward-only", large,
        100 * (analysis["cpu_seconds"] / forward["cpu_seconds"] - 1), "%")
    return rows


def format_rows(rows: List[Dict]) -> str:
    lines = [f"{'model':<10}{'metric':<42}{'images':>8}{'value':>12}  unit"]
    lines += [f"{r['model']:<10}{r['metric']:<42}{r['images']:>8}{r['value']:>12.1f}  {r['unit']}"
              for r in rows]
    return "\n".join(lines)


def main(argv):
    from absl import flags
    rows = run(flags.FLAGS.model, COUNTS, flags.FLAGS.batch_size)
    print(format_rows(rows))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        name, count, batch, what = sys.argv[2:6]
        print(json.dumps(_measure(name, int(count), int(batch), what)))
    else:
        from absl import app, flags
        flags.DEFINE_string("model", "resnet56", "the zoo's name of a CIFAR net")
        flags.DEFINE_integer("batch_size", 250, "images per jitted step, as analyze's default")
        app.run(main)
