"""Names -> constructors: the one place that lists the networks of the zoo."""
import dataclasses
import difflib
import functools
from typing import Callable, Dict, List

import flax.linen as nn

from resnet_jax.models import cifar, imagenet, vgg
from resnet_jax.models.compute import XLA, Kernels

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
# (`kernels`, create_model's own argument: it never goes into a config or a checkpoint).
_DERIVED = {"depth", "stage_sizes", "bottleneck", "residual", "parent", "name", "kernels"}


class UnknownModelError(ValueError):
    pass


def list_models() -> List[str]:
    return sorted(_MODELS, key=lambda n: (n.rstrip("0123456789"), int(n[len(n.rstrip("0123456789")):])))


def model_options(name: str) -> List[str]:
    """The keyword options `create_model(name, ...)` accepts."""
    ctor = _lookup(name)
    return sorted(f.name for f in dataclasses.fields(ctor.func if isinstance(ctor, functools.partial) else ctor)
                  if f.name not in _DERIVED)


def _lookup(name: str):
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=4, cutoff=0.5) or list_models()
        raise UnknownModelError(f"unknown model {name!r}; did you mean one of: {', '.join(close)}")
    return _MODELS[name]


def create_model(name: str, *, kernels: Kernels = XLA, **options) -> nn.Module:
    """`create_model('resnet56', shortcut='B')` -> an unbound flax.linen.Module.

    Call it as `model.apply(variables, images, train=...)` on NHWC images. `kernels` says how its
    layers are computed (models/compute.py): XLA's by default, on any device; the parameters and
    outputs do not depend on it."""
    ctor = _lookup(name)
    valid = model_options(name)
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5) or valid
            raise UnknownModelError(
                f"unknown option {key!r} for model {name!r}; valid options: {', '.join(close)}")
    if "shortcut" in options and options["shortcut"] not in ("A", "B", "C"):
        raise UnknownModelError(f"shortcut must be 'A', 'B' or 'C', not {options['shortcut']!r}")
    if "widths" in options:
        _check_widths(options["widths"], len(ctor(kernels=kernels).widths))
    return ctor(kernels=kernels, **options)


def _check_widths(widths, stages: int) -> None:
    """One channel count per stage, each a positive integer: anything else failed deep inside
    the net (IndexError, ZeroDivisionError) or trained another net under the same name."""
    ok = isinstance(widths, (tuple, list)) and len(widths) == stages and all(
        isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)
    if not ok:
        raise UnknownModelError(f"widths must be {stages} positive integers, one per stage, not "
                                f"{widths!r}")
