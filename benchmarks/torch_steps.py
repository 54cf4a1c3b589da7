"""The PyTorch reference's step, one per request, so that `benchmarks.run` can time it in turns
with resnet-jax's own (`interleaved_seconds`): on a shared machine both then see the same
moments, and their ratio holds still where two separate timing spells drift apart.

    python benchmarks/torch_steps.py SCRIPT MODE DEPTH BATCH [--plain]

Loads SCRIPT (../shared/bench/torch_cifar.py) and runs its own `bench` with its `timed` replaced:
after the reference's warm-up steps this prints "ready", then runs one step for each line read
from stdin and answers "done", until stdin closes. So the step timed is the reference's own: the
same net, optimizer, memory layout and threads.
"""
import importlib.util
import os
import sys

# The protocol's lines go to the real stdout; what the reference prints goes to stderr.
_PROTOCOL = os.fdopen(os.dup(sys.stdout.fileno()), "w")


def _serve(step, warmup, steps):
    del steps
    for _ in range(warmup):
        step()
    print("ready", file=_PROTOCOL, flush=True)
    for _ in sys.stdin:
        step()
        print("done", file=_PROTOCOL, flush=True)
    return 1.0, 1.0, 1.0  # (median, min, max) for the reference's own report, which nobody reads


def main(argv):
    script, mode, depth, batch = argv[:4]
    spec = importlib.util.spec_from_file_location("torch_cifar", script)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    reference.timed = _serve
    sys.stdout = sys.stderr
    reference.bench(mode, [int(depth)], "--plain" in argv[4:], int(batch), 1)


if __name__ == "__main__":
    main(sys.argv[1:])
