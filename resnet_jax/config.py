"""The trainer's configuration as data: every key with its default and meaning, and one check.

This module imports only ml_collections, so the files in configs/ (which start from
`default_config()`) load without JAX, as flax's and big_vision's configs do. A config is named
`NAME:ARG` (a file the package ships, configs/NAME.py) or `PATH.py:ARG` (any file); every tool
that takes --config reads it through `load_config` and `command_line`.

    from resnet_jax.config import default_config, validate
    c = default_config(); c.lr = -1
    validate(c)  # -> ["lr must be > 0, not -1"], every problem at once, before any data loads
"""
import importlib.util
import math
import numbers
import os
from typing import Any, List, Sequence, Tuple

import ml_collections

from resnet_jax.errors import UserError

# (key, default, meaning): the defaults are the paper's CIFAR-10 values (Sec. 4.2). `None` as a
# default marks a key that only some configs add (the host pipeline's, configs/imagenet.py).
KEYS: Tuple[Tuple[str, Any, str], ...] = (
    ("model", "resnet56", "a net of the zoo (python -m resnet_jax.summary lists their shapes)"),
    ("model_options", dict(shortcut="A", widths=(16, 32, 64), zero_init_last=False),
     "keyword options of resnet_jax.create_model; listed so that overrides are checked"),
    ("model_options.shortcut", None, "A: zero-padded identity, B: projections where the shape "
     "changes, C: projections everywhere"),
    ("model_options.widths", None, "channels of each stage"),
    ("model_options.zero_init_last", None, "start each block's last BN scale at 0"),
    ("model_options.stride_in_3x3", None, "downsample in the 3x3 conv of a bottleneck (else 1x1)"),
    ("data.source", "cifar10", "tfds name (needs internet once), folder:PATH "
     "(PATH/<split>/<class>/*.jpg) or synthetic[:N]"),
    ("data.data_dir", "", "tfds data directory ('' = tfds's default)"),
    ("data.train_split", "train", "split trained on; its classes are the model's"),
    ("data.test_split", "test", "split validated on (or tested on once at the end, with holdout)"),
    ("data.holdout", 0, "N > 0: validate on N random training images, train on the rest (the "
     "paper's 45k/5k); 0: validate on the test split"),
    ("data.pad", 4, "pad-and-crop augmentation in pixels, with random flips; 0 turns it off"),
    ("data.pipeline", "device", "'device': the split in device memory, augmented there; "
     "'host': images of any size (tfds ArrayRecord or a folder) decoded and cropped on each "
     "host's worker processes (ImageNet)"),
    ("data.image_size", None, "host pipeline: training crop size"),
    ("data.scale", None, "host pipeline: (min, max) shorter side of scale augmentation"),
    ("data.pca_std", None, "host pipeline: std of AlexNet's PCA colour augmentation"),
    ("data.eval_resize", None, "host pipeline: shorter side before the evaluation crop"),
    ("data.ten_crop", None, "host pipeline: evaluate the 10 standard crops"),
    ("data.mean_images", None, "host pipeline: training images averaged for the mean image"),
    ("data.workers", None, "host pipeline: grain worker processes per host decoding training "
     "crops; -1: one per CPU core but one; 0: in the training process"),
    ("data.prefetch", None, "host pipeline: training batches kept ready on the devices"),
    ("data.threads", None, "host pipeline: decoding threads per host for evaluation and the "
     "mean image"),
    ("seed", 0, "initialisation, data order and augmentation"),
    ("batch_size", 128, "global training batch over all devices and processes"),
    ("eval_batch_size", 512, "global evaluation batch (the last one is padded)"),
    ("num_steps", 64_000, "training iterations"),
    ("lr", 0.1, "learning rate, times lr_decay per boundary passed and the plateau factor"),
    ("lr_boundaries", (32_000, 48_000), "steps at which the learning rate is multiplied by "
     "lr_decay; increasing"),
    ("lr_decay", 0.1, "factor at each boundary and plateau"),
    ("lr_plateau_patience", 0, "> 0: also decay when val top-1 error has not improved by "
     "lr_plateau_min_delta for this many evaluations (ImageNet, Sec. 3.4)"),
    ("lr_plateau_min_delta", 0.001, "improvement that resets the plateau count"),
    ("warmup_lr", 0.0, "> 0: train at this rate until the running training error is below "
     "warmup_until_error (ResNet-110/1202, Sec. 4.2)"),
    ("warmup_until_error", 0.8, "training error that ends the warm-up"),
    ("warmup_smoothing", 0.95, "weight of the past in the running training error (~20 batches)"),
    ("momentum", 0.9, "SGD momentum"),
    ("weight_decay", 1e-4, "L2 weight decay"),
    ("weight_decay_on", "all", "'all' parameters (the paper's code) or conv/dense 'kernels' only"),
    ("bn_group_size", 0, "0: BatchNorm over the global batch; G: over groups of G images (the "
     "paper's per-GPU statistics)"),
    ("compute_dtype", "float32", "'bfloat16' for TPU/GPU: activations in bf16, params in f32"),
    ("log_every", 100, "steps between log lines (the only host syncs besides evaluation)"),
    ("checkpoint_every", 2000, "steps between evaluations and checkpoints"),
    ("keep_checkpoints", 3, "latest checkpoints kept"),
    ("keep_best", 1, "checkpoints with the best val top-1 also kept"),
    ("responses_images", 1000, "Figure 7 while training: the per-layer response std and mean of "
     "the first N validation images go to metrics.jsonl and TensorBoard (0: off)"),
    ("responses_every", 0, "steps between those response statistics (0: at every evaluation)"),
    ("profile_steps", (), "(first, last): a jax.profiler trace of the steps first..last-1 into "
     "WORKDIR/tensorboard (() : none)"),
    ("profile_every_process", False, "trace on every process, not only on process 0"),
)
MEANING = {key: meaning for key, _, meaning in KEYS}
DTYPES = ("float32", "bfloat16")


def default_config() -> ml_collections.ConfigDict:
    """Every knob of the trainer with its default (KEYS); the files in configs/ start from this
    and change what their recipe changes."""
    c = ml_collections.ConfigDict()
    for key, default, _ in KEYS:
        if default is None:
            continue
        parent, _, leaf = key.rpartition(".")
        node = c
        if parent:
            if parent not in node:
                node[parent] = ml_collections.ConfigDict()
            node = node[parent]
        node[leaf] = ml_collections.ConfigDict(default) if isinstance(default, dict) else default
    c.lock()
    return c


def describe(config: ml_collections.ConfigDict) -> str:
    """One line per key of `config`: `key = value  (default ...)  meaning`."""
    defaults = default_config()
    lines = []

    def walk(node, prefix):
        for key in node.keys():
            value, name = node[key], prefix + key
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, name + ".")
                continue
            default = _get(defaults, name)
            note = "" if default is _MISSING or default == value else f"  (default {default!r})"
            lines.append(f"{name} = {value!r}{note}\n    {MEANING.get(name, '')}".rstrip())

    walk(config, "")
    return "\n".join(lines)


_MISSING = object()


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    """A finite real: inf and nan pass every comparison that could tell, and diverge at once."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def define_config_flag(example: str, module: str) -> None:
    """--config, defined alike by every tool that takes one: a shipped config or a file and its
    argument (`example`, as 'cifar10:resnet56'), its keys overridden by --config.KEY=VALUE; a
    key flag of the tool's `module`, so that its --help lists it."""
    from absl import flags
    from ml_collections import config_flags
    name, model = example.split(":")
    holder = config_flags.DEFINE_config_file(
        "config", None, f"a shipped config or a file and its argument, e.g. {example} or "
        f"configs/{name}.py:{model}; override any key with --config.KEY=VALUE", lock_config=True)
    flags.FLAGS.register_key_flag_for_module(module, flags.FLAGS[holder.name])


def check(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Every problem of the config (`validate`, then its model's name and options, which the
    model registry knows) as one UserError, a line each, before any data loads."""
    problems = validate(config, num_devices)
    from resnet_jax.models import registry
    try:
        registry.check_options(config.model, dict(config.model_options))
    except registry.UnknownModelError as e:
        problems.append(str(e))
    if problems:
        raise UserError("\n".join(problems))


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> List[str]:
    """Every problem of `config` as one line each (empty: fine), without touching data, devices
    or JAX: the trainer runs it first. `num_devices` is the number the global batches split over."""
    problems: List[str] = []

    def need(ok: bool, message: str):
        if not ok:
            problems.append(message)

    def integer(key: str, low: int):
        value = _get(config, key)
        need(_is_int(value) and value >= low, f"{key} must be an integer >= {low}, not {value!r}")
        return value if _is_int(value) and value >= low else None

    def number(key: str, low: float, high: float = float("inf"), *, open_low=False,
               open_high=False, text=""):
        value = _get(config, key)
        ok = _is_number(value) and (value > low if open_low else value >= low) and (
            value < high if open_high else value <= high)
        need(ok, f"{key} must be {text}, not {value!r}")

    for key in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        integer(key, 1)
    batch_size = integer("batch_size", 1)
    eval_batch_size = integer("eval_batch_size", 1)
    for key in ("seed", "keep_best", "bn_group_size", "lr_plateau_patience", "data.holdout",
                "data.pad", "responses_images", "responses_every"):
        integer(key, 0)
    number("lr", 0, open_low=True, text="> 0")
    number("lr_decay", 0, 1, open_low=True, text="in (0, 1]")
    number("lr_plateau_min_delta", 0, text=">= 0")
    number("warmup_lr", 0, text=">= 0 (0: no warm-up)")
    number("warmup_until_error", 0, 1, open_low=True, text="in (0, 1]")
    number("warmup_smoothing", 0, 1, open_high=True, text="in [0, 1)")
    number("momentum", 0, 1, open_high=True, text="in [0, 1)")
    number("weight_decay", 0, text=">= 0")

    boundaries = _get(config, "lr_boundaries")
    if boundaries is None:
        boundaries = ()
    if not isinstance(boundaries, Sequence) or not all(_is_int(b) for b in boundaries):
        problems.append(f"lr_boundaries must be a tuple of step numbers, not {boundaries!r}")
    elif any(b < 1 for b in boundaries) or list(boundaries) != sorted(set(boundaries)):
        problems.append(f"lr_boundaries must be increasing steps >= 1, not {tuple(boundaries)}")

    profile = _get(config, "profile_steps")
    need(isinstance(profile, Sequence) and (len(profile) == 0 or (
        len(profile) == 2 and all(_is_int(s) and s >= 0 for s in profile)
        and profile[0] < profile[1])),
        f"profile_steps must be () or (first, last) with 0 <= first < last, not {profile!r}")
    need(config.weight_decay_on in ("all", "kernels"),
         f"weight_decay_on must be 'all' or 'kernels', not {config.weight_decay_on!r}")
    need(config.compute_dtype in DTYPES,
         f"compute_dtype must be {' or '.join(map(repr, DTYPES))}, not {config.compute_dtype!r}")
    need(config.data.pipeline in ("device", "host"),
         f"data.pipeline must be 'device' or 'host', not {config.data.pipeline!r}")
    from resnet_jax.data import sources  # numpy's, not JAX's: configs still load without JAX
    try:
        kind, _ = sources.parse_source(config.data.source)
        need(config.data.pipeline != "host" or kind in ("tfds", "folder"),
             f"data.pipeline='host' reads a tfds data set or folder:PATH, not "
             f"{config.data.source!r}")
    except UserError as e:
        problems.append(f"data.source: {e}")

    for key, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        need(size is None or size % num_devices == 0,
             f"{key} {size} does not split over {num_devices} devices; use a multiple of "
             f"{num_devices}")
    group = _get(config, "bn_group_size")
    if batch_size and _is_int(group) and group > 0:
        need(batch_size % group == 0,
             f"bn_group_size {group} does not divide batch_size {batch_size}")
    return problems


# ---------------------------------------------------------------------------------------------
# Finding a config: a name the package ships, or a file

EXAMPLE = "cifar10:resnet56"


def configs_dir() -> str:
    """The configs the package ships: resnet_jax/configs in an installed wheel (pyproject maps the
    repository's configs/ there), the repository's configs/ beside the package in a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    packaged = os.path.join(here, "configs")
    return packaged if os.path.isdir(packaged) else os.path.join(os.path.dirname(here), "configs")


def available_configs() -> List[str]:
    """The names of the shipped configs (`cifar10`, `cpu`, `imagenet`)."""
    folder = configs_dir()
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(n[:-3] for n in names if n.endswith(".py") and not n.startswith("_"))


def _choices() -> str:
    return (f"a shipped config NAME:ARG ({', '.join(available_configs())}; e.g. {EXAMPLE}) or a "
            "file PATH.py:ARG")


def config_file(spec: str) -> Tuple[str, str]:
    """'cifar10:resnet56' or 'configs/cifar10.py:resnet56' -> (the file, 'resnet56'). A name is
    a shipped config; so is a path `configs/NAME.py` that does not exist where the tool runs (the
    repository's own commands, run where the package is installed)."""
    name, _, arg = spec.partition(":")
    if not name.endswith(".py") and "/" not in name and os.sep not in name:
        path = os.path.join(configs_dir(), name + ".py")
        if not os.path.isfile(path):
            raise UserError(f"unknown config {name!r}; use {_choices()}")
        return path, arg
    if not os.path.isfile(name):
        head, base = os.path.split(os.path.normpath(name))
        shipped = os.path.join(configs_dir(), base)
        if head != "configs" or not os.path.isfile(shipped):
            raise UserError(f"config file {name!r} not found; use {_choices()}")
        name = shipped
    return name, arg


def load_config(spec: str) -> ml_collections.ConfigDict:
    """'cifar10:resnet56' (or 'configs/cifar10.py:resnet56') -> that file's
    get_config('resnet56'), without overrides (tests, benchmarks, `command_line`'s check)."""
    path, arg = config_file(spec)
    module_spec = importlib.util.spec_from_file_location("_resnet_jax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path!r} has no get_config()")
    return module.get_config(arg) if arg else module.get_config()


_HELP = {"--help", "-help", "-h", "--helpfull", "-helpfull", "--helpshort", "-helpshort", "-?"}
_DESCRIBE = {"--describe", "-describe"}


def command_line(argv: Sequence[str]) -> List[str]:
    """A tool's arguments with --config's name replaced by its file, for ml_collections'
    config_flags (which reads files only), after checking what config_flags meets with a
    traceback: a missing or unknown config, an unknown --config.KEY (one line each)."""
    argv, spec, overrides = list(argv), None, []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            spec, at = argv[i + 1], (i + 1, "")
        elif arg.startswith(("--config=", "-config=")):
            flag, spec = arg.split("=", 1)
            at = (i, flag + "=")
        elif arg.startswith(("--config.", "-config.")):
            overrides.append(arg.split(".", 1)[1].split("=", 1)[0])
    if spec is None:
        if _HELP.intersection(argv) or any(a.split("=")[0] in _DESCRIBE for a in argv):
            return argv
        raise UserError(f"--config is required: {_choices()} (--help lists the flags, "
                        "--describe the config keys)")
    config = load_config(spec)
    for key in overrides:
        node = config
        for i, part in enumerate(key.split(".")):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                where = ".".join(key.split(".")[:i]) or "the config"
                raise UserError(f"unknown config key {key!r} ({part!r} is not in {where}; it has: "
                                f"{', '.join(known)})")
            node = node[part]
    path, arg = config_file(spec)
    argv[at[0]] = at[1] + (f"{path}:{arg}" if arg else path)
    return argv
