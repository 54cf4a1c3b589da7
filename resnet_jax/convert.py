"""PyTorch ResNet state dicts -> checkpoints of this package.

    python -m resnet_jax.convert ../shared/data/pretrained/akamaster-cifar10/resnet20.npz \
        --model resnet20 --out /tmp/resnet20 --data folder:../shared/data/cifar10-jpeg
    python -m resnet_jax.convert resnet50.pth --model resnet50 --out /tmp/resnet50

Two key namings are recognised from the keys themselves:
  cifar        the public CIFAR reproduction (akamaster/pytorch_resnet_cifar10): `layer{s}.{i}.conv1`,
               option-A shortcuts (no weights) or option B as `shortcut.{0,1}`, head `linear`;
  torchvision  torchvision.models.resnet*: `layer{s}.{i}.downsample.{0,1}`, head `fc`; bottleneck
               nets in its "v1.5" layout (stride in the 3x3 conv), which is set on the model.
Names are matched block by block (`layout.unstack_blocks`), then laid out as the model holds them.

`.npz` is read with numpy (never pickle); `.pt/.pth/.th` only through torch with
`weights_only=True`, so an untrusted file cannot run code either way.
"""

if __name__ == "__main__":  # the console script's start-up (resnet_jax.cli), before any import
    from resnet_jax import cli
    cli.start("convert")

import ast
import os
import re
import zipfile
import zlib
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from absl import flags
from flax import traverse_util

import resnet_jax
from resnet_jax import checkpoint, cli
from resnet_jax.data import sources
from resnet_jax.errors import UserError, exit_on_user_error
from resnet_jax.models import layout
from resnet_jax.models.cifar import CifarResNet
from resnet_jax.models.imagenet import ImageNetResNet, STAGE_SIZES
from resnet_jax.models.inputs import IMAGENET_MEAN

# Both families were trained on RGB in [0, 1] normalised with ImageNet's statistics (the CIFAR
# reproduction too, see its README).
IMAGENET_NORMALIZATION = checkpoint.Normalization(mean=IMAGENET_MEAN, std=(0.229, 0.224, 0.225))
FORMATS = {"cifar": dict(head="linear", shortcut="shortcut", image_size=32),
           "torchvision": dict(head="fc", shortcut="downsample", image_size=224)}
TORCH_SUFFIXES = (".pt", ".pth", ".th", ".bin")
_SHOWN = 3  # keys named per kind of problem; the rest are counted


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
    """{key: float array} from a `.npz`, or through torch from a `.pt/.pth/.th`; a `module.`
    prefix (DataParallel) is dropped and a {'state_dict': ...} wrapper opened."""
    if not os.path.isfile(path):
        raise UserError(f"state dict file {path!r} does not exist")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                state = {k: z[k] for k in z.files}
        except ValueError as e:  # object arrays need pickle, which we refuse
            raise UserError(f"cannot read {path!r} without pickle ({e}); save plain arrays with "
                            "numpy.savez") from None
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # truncated or damaged
            raise UserError(f"{path!r} is not a readable .npz ({e.__class__.__name__}: {e}); "
                            "write it again with numpy.savez") from None
    elif path.endswith(TORCH_SUFFIXES):
        state = _read_torch(path)
    else:
        raise UserError(f"unknown state dict file type {path!r}; use .npz, or "
                        f"{'/'.join(TORCH_SUFFIXES)} with torch installed")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    # PyTorch's BN step counter carries no weights.
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _read_torch(path: str) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError(f"reading {path!r} needs PyTorch: pip install torch, or convert it to "
                        ".npz (numpy.savez(out, **{k: v.numpy() for k, v in sd.items()}))") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a bad or unsafe file
        raise UserError(f"torch cannot read {path!r} with weights_only=True "
                        f"({e.__class__.__name__}: {str(e).splitlines()[0][:150]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path!r} holds no state dict (a dict of tensors, or "
                        "{'state_dict': ...})")
    return {k: v.detach().cpu().float().numpy() for k, v in obj.items()}


def detect_format(state: Dict[str, np.ndarray]) -> str:
    """'cifar' or 'torchvision', from the head's name."""
    for fmt, spec in FORMATS.items():
        if f"{spec['head']}.weight" in state and "conv1.weight" in state:
            return fmt
    raise UserError("unrecognised state dict: expected conv1.weight and linear.weight (CIFAR "
                    "reproduction) or fc.weight (torchvision); it has "
                    f"{', '.join(sorted(state)[:_SHOWN])}{'...' if len(state) > _SHOWN else ''}")


def guess_models(state: Dict[str, np.ndarray], fmt: str) -> List[str]:
    """The zoo's nets (with the options the keys need) whose layout the keys describe, as
    `--model` arguments, for error messages: 'resnet20 --option shortcut=B', 'resnet20', ..."""
    blocks = {}
    for key in state:
        m = re.match(r"layer(\d+)\.(\d+)\.", key)
        if m:
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    sizes = tuple(blocks[s] for s in sorted(blocks))
    if fmt == "cifar":
        if len(sizes) != 3 or len(set(sizes)) != 1:
            return []
        depth = 6 * sizes[0] + 2
        projected = {k.split(".shortcut.")[0] for k in state if ".shortcut." in k}
        if projected:  # plain nets have no shortcut; B projects where the shape changes, C always
            shortcut = "C" if len(projected) == 3 * sizes[0] else "B"
            return [f"resnet{depth} --option shortcut={shortcut}"]
        return [f"resnet{depth}", f"plain{depth}"]  # option A has no weights: the keys cannot tell
    bottleneck = any(".conv3." in k for k in state)
    return [f"resnet{d}" for d, s in STAGE_SIZES.items() if s == sizes and (d >= 50) == bottleneck]


def infer_model(state: Dict[str, np.ndarray]) -> str:
    """The zoo's net a state dict holds: the ResNet its keys describe (a plain CIFAR net has the
    same weights as its ResNet under option A: name it with --model to get the plain one)."""
    guess = guess_models(state, detect_format(state))
    if not guess:
        raise UserError("cannot tell which net this state dict holds; pass --model NAME (models: "
                        f"{', '.join(resnet_jax.list_models())})")
    return guess[0]


def _torch_name(path: Tuple[str, ...], fmt: str) -> str:
    """('params', 'stage2', 'block4', 'shortcut', 'bn', 'scale') -> 'layer2.4.shortcut.1.weight'."""
    collection, *modules, leaf = path
    spec = FORMATS[fmt]
    out = []
    for i, name in enumerate(modules):
        if name.startswith("stage"):
            out.append("layer" + name[len("stage"):])
        elif re.fullmatch(r"block\d+", name):
            out.append(name[len("block"):])
        elif name == "shortcut":
            out.append(spec["shortcut"])
        elif i > 0 and modules[i - 1] == "shortcut":
            out.append({"conv": "0", "bn": "1"}[name])
        elif name == "fc":
            out.append(spec["head"])
        else:
            out.append(name)
    out.append({("params", "kernel"): "weight", ("params", "scale"): "weight",
                ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
                ("batch_stats", "var"): "running_var"}[(collection, leaf)])
    return ".".join(out)


def _to_flax(array: np.ndarray) -> np.ndarray:
    """PyTorch layout -> Flax layout: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def _torch_shape(flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    if len(flax_shape) == 4:
        return tuple(flax_shape[i] for i in (3, 2, 0, 1))
    return tuple(reversed(flax_shape))


def _listing(items: List[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def convert_state_dict(state: Dict[str, np.ndarray], model_name: str, options: Optional[Dict] = None,
                       source: str = "state dict"):
    """-> (variables {'params', 'batch_stats'}, model options, format) for `model_name`.

    Every variable of the model must come from exactly one key of the right shape and every key
    must be used; otherwise a UserError names the missing, mismatched and unexpected keys."""
    fmt = detect_format(state)
    options = dict(options or {})
    options.setdefault("num_classes", int(state[f"{FORMATS[fmt]['head']}.weight"].shape[0]))
    model = resnet_jax.create_model(model_name, **options)
    if not isinstance(model, (CifarResNet, ImageNetResNet)):
        raise UserError(f"convert reads ResNets and plain nets, not {model_name!r}")
    if fmt == "torchvision" and isinstance(model, ImageNetResNet) and model.bottleneck:
        if "stride_in_3x3" not in options:  # torchvision's layout, unless the user says otherwise
            options["stride_in_3x3"] = True
            model = resnet_jax.create_model(model_name, **options)
    target = traverse_util.flatten_dict(layout.unstack_blocks(
        checkpoint.abstract_variables(model, FORMATS[fmt]["image_size"])))

    flat, missing, mismatched = {}, [], []
    for path, leaf in target.items():
        key = _torch_name(path, fmt)
        if key not in state:
            missing.append(key)
        elif tuple(state[key].shape) != _torch_shape(leaf.shape):
            mismatched.append(f"{key} {tuple(state[key].shape)} where {model_name} needs "
                              f"{_torch_shape(leaf.shape)}")
        else:
            flat[path] = _to_flax(np.asarray(state[key])).astype(leaf.dtype)
    used = {_torch_name(path, fmt) for path in target}
    unexpected = sorted(set(state) - used)
    if missing or mismatched or unexpected:
        shortcut = options.get("shortcut", "A")
        asked = model_name + (f" --option shortcut={shortcut}" if shortcut != "A" else "")
        guess = [g for g in guess_models(state, fmt) if g != asked]
        problems = [f"{n} {what} ({_listing(keys)})" for n, what, keys in (
            (len(missing), "missing keys", sorted(missing)), (len(mismatched), "keys of another shape", mismatched),
            (len(unexpected), "unexpected keys", unexpected)) if n]
        hint = f"; the keys look like {' or '.join(guess)}: pass --model {guess[0]}" if guess else ""
        if len(guess) > 1:
            hint += " (residual and plain nets have the same keys; --data tells them apart)"
        raise UserError(f"{source} ({fmt} naming) does not fit {model_name}: "
                        f"{'; '.join(problems)}{hint}")
    # Per-block names -> the model's layout: stacked where the model scans (ResNet-1202).
    variables = layout.from_checkpoint(layout.to_checkpoint(traverse_util.unflatten_dict(flat)))
    variables.setdefault("batch_stats", {})
    return variables, options, fmt


def read_converted(source: str, model_name: Optional[str] = None, options: Optional[Dict] = None):
    """-> (model name, variables, model options, format) of a state dict file, converted in
    memory; the net inferred from its keys unless `model_name` says."""
    state = read_state_dict(source)
    model_name = model_name or infer_model(state)
    variables, options, fmt = convert_state_dict(state, model_name, options, source)
    return model_name, variables, options, fmt


def default_classes(fmt: str, num_classes: int) -> Optional[Tuple[str, ...]]:
    """The class list a converted net's labels mean, by name: the CIFAR reproduction's 10-way
    nets were trained on CIFAR-10 in its label order. Stored in the checkpoint, so evaluate
    numbers a folder's classes by name instead of by sorted folder order."""
    if fmt == "cifar" and num_classes == len(sources.CIFAR10_CLASSES):
        return sources.CIFAR10_CLASSES
    return None


def converted_extra(source: str, fmt: str, classes: Optional[Sequence[str]]) -> Dict:
    """A converted net's metadata beyond `checkpoint.metadata`'s: the file it came from, its key
    format, the image size it was made for and its class list (`classes`, absent if None); its
    checkpoint stores them, and resnet_jax.load of the file reports them alike."""
    extra = dict(source=os.path.abspath(source), format=fmt, image_size=FORMATS[fmt]["image_size"])
    return extra if classes is None else dict(extra, classes=list(classes))


CHECK_IMAGES = 500  # enough to tell a working net (tens of %) from chance (1 / classes)


def check_on_data(variables, model_name: str, options: Dict, classes, data: str,
                  split: str = "test", source: str = "state dict",
                  count: int = CHECK_IMAGES) -> Dict:
    """evaluate's result for the converted net on `count` images drawn at random from `data`'s
    `split`. Shapes cannot tell a residual net from a plain one, nor a transposed kernel: a
    net at chance level (under twice 1 / classes) is a UserError, so nothing is written."""
    from resnet_jax import evaluate
    dataset = sources.load(data, split, classes=classes, num_classes=options["num_classes"])
    pick = np.sort(np.random.default_rng(0).permutation(len(dataset))[:count])
    subset = sources.Dataset(dataset.images[pick], dataset.labels[pick], dataset.classes,
                             f"{len(pick)} images of {dataset.name}")
    model = resnet_jax.create_model(model_name, **options)
    loaded = checkpoint.LoadedModel(model, variables, IMAGENET_NORMALIZATION,
                                    dict(classes=list(classes) if classes else None), 0, source)
    result = evaluate.evaluate(loaded, subset, batch_size=100, progress=None)
    chance = 1 / options["num_classes"]
    if result["top1"] < 2 * chance:
        raise UserError(f"{source} converted as {model_name} scores {100 * result['top1']:.1f} % "
                        f"top-1 on {subset.name}, chance level ({100 * chance:.0f} %): the weights "
                        "are not this net's (plain vs residual, another layout?); nothing written")
    return dict(result, name=subset.name)


class Converted(NamedTuple):
    out: str
    model: str  # the net's name, given or inferred from the keys
    checked: Optional[Dict]  # evaluate's result on a few hundred images of --data; None: unchecked


def convert(source: str, model_name: Optional[str], out: str, options: Optional[Dict] = None,
            classes: Optional[List[str]] = None, data: Optional[str] = None,
            split: str = "test") -> Converted:
    """Read `source`, convert it for `model_name` (inferred from its keys if None), save it as a
    checkpoint at `out` with its class list (`classes`, else `default_classes`). With `data` (a
    32x32 source), the net is first scored on a few hundred of its images (`check_on_data`:
    refused at chance level)."""
    checkpoint.check_new_directory(out)
    model_name, variables, options, fmt = read_converted(source, model_name, options)
    classes = tuple(classes) if classes else default_classes(fmt, options["num_classes"])
    if classes is not None and len(classes) != options["num_classes"]:
        raise UserError(f"--classes names {len(classes)} classes but {source!r} has "
                        f"{options['num_classes']} outputs; name one class per output, in order")
    checked = None
    if data is not None:
        if FORMATS[fmt]["image_size"] != 32:
            raise UserError("--data scores the 32x32 CIFAR nets; check an ImageNet net with "
                            "resnet_jax.evaluate after converting it")
        checked = check_on_data(variables, model_name, options, classes, data, split, source)
    checkpoint.save_model(out, variables, model_name=model_name, model_options=options,
                          normalization=IMAGENET_NORMALIZATION,
                          extra=converted_extra(source, fmt, classes))
    return Converted(out, model_name, checked)


def parse_options(pairs: List[str]) -> Dict:
    """['shortcut=B', 'num_classes=100'] -> {'shortcut': 'B', 'num_classes': 100}."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--option {pair!r} is not key=value, e.g. --option shortcut=B")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value  # a bare word such as B
    return options


FLAGS = flags.FLAGS


def define_flags():
    """Defined when the CLI runs, not on import: other modules' CLIs use some of the same names."""
    flags.DEFINE_string("model", None, "the zoo's name of the net, e.g. resnet20 or resnet50 "
                        "(default: the ResNet the keys describe)")
    flags.DEFINE_string("out", None, "checkpoint directory to create (must be new or empty)")
    flags.DEFINE_multi_string("option", [], "model option key=value (repeatable), e.g. shortcut=B")
    flags.DEFINE_list("classes", None, "the class names of the net's outputs, in order (default: "
                      "CIFAR-10's for the 10-way CIFAR nets); evaluate matches folders by them")
    flags.DEFINE_string("data", None, "score the converted net on a few hundred images of this "
                        "source (folder:PATH, cifar10) before writing it; refused at chance level")
    flags.DEFINE_string("split", "test", "the split of --data to score on")


def main(argv):
    with exit_on_user_error():
        if not FLAGS.out:
            raise UserError("--out is required: the checkpoint directory to create")
        checkpoint.quiet_orbax()
        done = convert(argv[1], FLAGS.model, FLAGS.out, parse_options(FLAGS.option),
                       FLAGS.classes, FLAGS.data, FLAGS.split)
        inferred = "" if FLAGS.model else " (inferred from its keys; --model NAME for another)"
        print(f"wrote {done.model}{inferred} to {done.out}")
        if done.checked is None:
            print("unchecked: the shapes fit, which a net of other weights can too; pass --data "
                  f"folder:PATH to score it on {CHECK_IMAGES} images first")
        else:
            print(f"checked: top-1 {100 * done.checked['top1']:.1f} % on {done.checked['name']}")


def run():
    define_flags()
    cli.absl_run(main, __name__, positional=1, usage="name one state dict file: python -m "
                 "resnet_jax.convert SOURCE --out CKPT_DIR [--model NAME]")

