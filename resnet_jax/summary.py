"""Per-stage output size, weighted layers, parameters and multiply-adds of any network of the zoo:
the paper's Table 1 and Fig. 3, computed from the modules rather than typed in.

    python -m resnet_jax.summary vgg19 plain34 resnet34       # at 224x224, their input size
    python -m resnet_jax.summary resnet20 resnet56 --json     # at 32x32, theirs
    python -m resnet_jax.summary resnet50 --image_size 448
"""

if __name__ == "__main__":  # the console script's start-up (resnet_jax.cli), before any import
    from resnet_jax import cli
    cli.start("summary")

import collections
import dataclasses
import json
from typing import Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import resnet_jax
from resnet_jax import cli
from resnet_jax.errors import exit_on_user_error
from resnet_jax.models import layout
from resnet_jax.models.layers import Stage


@dataclasses.dataclass
class StageSummary:
    stage: str
    output_size: str = ""
    layers: int = 0
    params: int = 0
    mult_adds: int = 0


def _stage_of(module: nn.Module) -> str:
    top = module.path[0] if module.path else ""
    if top.startswith("stage"):
        return top
    return "head" if top.startswith("fc") else "stem"


def summarize(name: str, image_size: Optional[int] = None, **options) -> Dict:
    """{'name', 'image_size', 'params', 'mult_adds', 'layers', 'stages': [...]} for one network,
    at `image_size` (default: the net's own input size, `resnet_jax.preprocessing(name)`).

    Multiply-adds count conv and dense layers for one image (the paper's "FLOPs"); layers count
    the weighted layers on the main path (not shortcut projections), as the paper's depths do."""
    image_size = image_size or resnet_jax.preprocessing(name).input_size
    model = resnet_jax.create_model(name, input_size=None, **options)  # any size it is asked
    stages: Dict[str, StageSummary] = collections.OrderedDict()
    x = jnp.zeros((1, image_size, image_size, 3))

    scan_length = {}  # stage path -> how many blocks its scanned `blocks` body stands for
    seen = set()  # nn.scan traces its body more than once; count each layer once

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(module, Stage):
            scan_length[module.path] = module.num_blocks - 1
        out = next_fun(*args, **kwargs)
        if len(module.path) == 1 and module.path[0].startswith(("stage", "conv1")):
            s = stages.setdefault(_stage_of(module), StageSummary(_stage_of(module)))
            s.output_size = "x".join(str(d) for d in out.shape[1:3])
        if isinstance(module, (nn.Conv, nn.Dense)) and module.path not in seen:
            seen.add(module.path)
            path = module.path
            n = scan_length[path[: path.index(layout.SCANNED)]] if layout.SCANNED in path else 1
            s = stages.setdefault(_stage_of(module), StageSummary(_stage_of(module)))
            kernel = module.variables["params"]["kernel"]
            s.mult_adds += n * int(np.prod(out.shape[1:])) * int(np.prod(kernel.shape[:-1]))
            if "shortcut" not in path:
                s.layers += n
        return out

    def trace():
        variables = model.init(jax.random.key(0), x)
        with nn.intercept_methods(interceptor):
            model.apply(variables, x)
        return variables

    variables = jax.eval_shape(trace)
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
        top = path[0].key
        key = top if top.startswith("stage") else ("head" if top.startswith("fc") else "stem")
        stages.setdefault(key, StageSummary(key)).params += int(leaf.size)
    rows = [dataclasses.asdict(s) for s in stages.values()]
    return dict(name=name, image_size=image_size, options=options,
                params=sum(r["params"] for r in rows), mult_adds=sum(r["mult_adds"] for r in rows),
                layers=sum(r["layers"] for r in rows), stages=rows)


def format_table(summaries: List[Dict]) -> str:
    """Stages down, networks across, as the paper's Table 1."""
    order = lambda st: 0 if st == "stem" else (1000 if st == "head" else int(st[len("stage"):]))
    stage_names = sorted({s["stage"] for m in summaries for s in m["stages"]}, key=order)
    col = 30
    lines = ["stage".ljust(10) + "".join(m["name"].ljust(col) for m in summaries)]
    lines.append(" " * 10 + "".join("size  layers  params  MACs".ljust(col) for _ in summaries))
    for st in stage_names:
        cells = []
        for m in summaries:
            s = next((r for r in m["stages"] if r["stage"] == st), None)
            cells.append("" if s is None else
                         f"{s['output_size']:>7} {s['layers']:>3} {s['params'] / 1e6:7.3f}M "
                         f"{s['mult_adds'] / 1e9:7.4f}G")
        lines.append(st.ljust(10) + "".join(c.ljust(col) for c in cells))
    lines.append("total".ljust(10) + "".join(
        f"{'':>7} {m['layers']:>3} {m['params']:>9,d} {m['mult_adds'] / 1e9:.4f}G".ljust(col)
        for m in summaries))
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags():
    # Defined when the CLI runs, not at import, so modules with same-named flags import together.
    flags.DEFINE_integer("image_size", None, "input height and width (default: each net's own, "
                         "32 for the CIFAR nets, 224 for the ImageNet ones)", lower_bound=1)
    flags.DEFINE_bool("json", False, "print a JSON list instead of the table")
    flags.DEFINE_string("shortcut", None, "shortcut option A, B or C (default: each net's own)")


def main(argv):
    names = argv[1:]
    options = {"shortcut": FLAGS.shortcut} if FLAGS.shortcut else {}
    with exit_on_user_error():
        summaries = [summarize(n, FLAGS.image_size, **options) for n in names]
    print(json.dumps(summaries, indent=1) if FLAGS.json else format_table(summaries))


def run():
    define_flags()
    cli.absl_run(main, __name__, positional=(1, None), usage="name at least one model, e.g. "
                 f"`vgg19 plain34 resnet34`; known: {', '.join(resnet_jax.list_models())}")

