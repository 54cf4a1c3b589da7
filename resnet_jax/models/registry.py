"""Names -> constructors: the one place that lists the networks of the zoo."""
import dataclasses
import difflib
import fnmatch
import functools
from typing import Callable, Dict, List, Optional

import flax.linen as nn

from resnet_jax.models import cifar, imagenet, vgg
from resnet_jax.models.compute import XLA, Kernels
from resnet_jax.models.inputs import CIFAR10_MEAN, IMAGENET_MEAN, Preprocessing

CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)


def _registry() -> Dict[str, Callable[..., nn.Module]]:
    models = {}
    for depth in CIFAR_DEPTHS:
        models[f"resnet{depth}"] = functools.partial(cifar.CifarResNet, depth=depth)
        models[f"plain{depth}"] = functools.partial(cifar.CifarResNet, depth=depth, residual=False)
    for depth, sizes in imagenet.STAGE_SIZES.items():
        models[f"resnet{depth}"] = functools.partial(
            imagenet.ImageNetResNet, stage_sizes=sizes, bottleneck=depth >= 50)
    for depth in (18, 34):
        models[f"plain{depth}"] = functools.partial(
            imagenet.ImageNetResNet, stage_sizes=imagenet.STAGE_SIZES[depth], residual=False)
    models["vgg19"] = vgg.VGG
    return models


_MODELS = _registry()
# Fields that are not options: fixed by the name, flax's own, or how rather than what to compute
# (`kernels`, `input_size`: create_model's own arguments, never in a config or a checkpoint's
# model options).
_DERIVED = {"depth", "stage_sizes", "bottleneck", "residual", "parent", "name", "kernels",
            "input_size"}
# The paper's input for each family: mean subtraction (Sec. 4.2 and 3.4) at the training size.
_CIFAR = Preprocessing(mean=CIFAR10_MEAN, input_size=32)
_IMAGENET = Preprocessing(mean=IMAGENET_MEAN, input_size=224)
_DEFAULT = object()


class UnknownModelError(ValueError):
    pass


def _depth_order(name: str):
    stem = name.rstrip("0123456789")
    return stem, int(name[len(stem):])


def list_models(pattern: str = "*") -> List[str]:
    """The zoo's names matching the shell-style `pattern` ('resnet*', 'plain?0'), in order of
    family and depth: CIFAR and ImageNet ResNets (`resnet20` ... `resnet1202`, `resnet18` ...
    `resnet152`), their plain counterparts, and `vgg19`."""
    return sorted(fnmatch.filter(_MODELS, pattern), key=_depth_order)


def preprocessing(name: str) -> Preprocessing:
    """The input `create_model(name)` expects by default: its image size, and the mean and std
    of the paper's recipe (a trained net's own come with it from `resnet_jax.load`)."""
    return _CIFAR if _family(name) is cifar.CifarResNet else _IMAGENET


def model_options(name: str) -> List[str]:
    """The keyword options `create_model(name, ...)` accepts."""
    return sorted(f.name for f in dataclasses.fields(_family(name)) if f.name not in _DERIVED)


def _family(name: str) -> type:
    """The module class of a zoo name (CifarResNet, ImageNetResNet, VGG)."""
    ctor = _lookup(name)
    return ctor.func if isinstance(ctor, functools.partial) else ctor


def _lookup(name: str):
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=4, cutoff=0.5) or list_models()
        raise UnknownModelError(f"unknown model {name!r}; did you mean one of: {', '.join(close)}")
    return _MODELS[name]


def create_model(model_name: str, /, *, kernels: Kernels = XLA, input_size=_DEFAULT,
                 name: Optional[str] = None, **options) -> nn.Module:
    """`create_model('resnet56', shortcut='B')` -> an unbound flax.linen.Module.

    Call it as `model.apply(variables, images, train=...)` on float NHWC images normalised by
    `preprocessing(model_name)`; `train=True` with `mutable=['batch_stats']` (and VGG's
    `rngs={'dropout': key}`) trains, `features=True` returns each stage's output and the pooled
    features instead of logits. Images of another size than the net's (32x32 for the CIFAR
    nets, 224x224 for VGG) are refused unless `input_size` says otherwise (None: any size; the
    ImageNet ResNets take any size by default). `kernels` says how its layers are computed
    (models/compute.py): XLA's by default, on any device; the parameters and outputs do not
    depend on it. `name` is flax's module name, for a net inside another module."""
    check_options(model_name, options)
    if input_size is _DEFAULT:  # the ImageNet ResNets are fully convolutional
        fully_convolutional = _family(model_name) is imagenet.ImageNetResNet
        input_size = None if fully_convolutional else preprocessing(model_name).input_size
    return _lookup(model_name)(kernels=kernels, input_size=input_size, name=name, **options)


def check_options(model_name: str, options: Dict) -> None:
    """UnknownModelError naming the first problem of `create_model(model_name, **options)`'s name
    or options (nothing is built): an unknown name, option, shortcut or widths."""
    valid = model_options(model_name)
    for key in options:
        if key in _DERIVED:
            raise UnknownModelError(f"{key!r} is fixed by the model's name, not an option of "
                                    f"{model_name!r}: pick the net by name (list_models()); "
                                    f"valid options: {', '.join(valid)}")
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownModelError(f"unknown option {key!r} for model {model_name!r}{hint}; "
                                    f"valid options: {', '.join(valid)}")
    if "shortcut" in options and options["shortcut"] not in ("A", "B", "C"):
        raise UnknownModelError(f"shortcut must be 'A', 'B' or 'C', not {options['shortcut']!r}")
    if "widths" in options:
        fields = {f.name: f for f in dataclasses.fields(_family(model_name))}
        _check_widths(options["widths"], len(fields["widths"].default))


def _check_widths(widths, stages: int) -> None:
    """One channel count per stage, each a positive integer: anything else failed deep inside
    the net (IndexError, ZeroDivisionError) or trained another net under the same name."""
    ok = isinstance(widths, (tuple, list)) and len(widths) == stages and all(
        isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)
    if not ok:
        raise UnknownModelError(f"widths must be {stages} positive integers, one per stage, not "
                                f"{widths!r}")
