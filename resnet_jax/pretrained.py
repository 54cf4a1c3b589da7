"""A trained net in Python: `resnet_jax.load(path)` -> model, variables and preprocessing.

    trained = resnet_jax.load("runs/resnet20")          # a training workdir or a converted one
    trained = resnet_jax.load("resnet20.th")            # a PyTorch state dict, converted in memory
    logits = trained.model.apply(trained.variables, trained.normalization(uint8_images))

Quiet: orbax's notes about directories opened read-only are dropped while it reads.
"""
import dataclasses
import os
from typing import Optional

from resnet_jax import checkpoint
from resnet_jax.models import XLA, Kernels


def load(path: str, *, step: Optional[int] = None, model: Optional[str] = None,
         kernels: Kernels = XLA) -> checkpoint.LoadedModel:
    """The net at `path` as `LoadedModel(model, variables, normalization, metadata, step)`:
    `normalization` is its `Preprocessing` (mean, std and the image size it was trained on).

    `path`: a checkpoint directory (a training workdir, or `python -m resnet_jax.convert`'s
    --out; its latest step unless `step`), or a PyTorch state dict file (.pt/.pth/.th/.npz of the
    CIFAR reproduction or torchvision), whose net is inferred from its keys unless `model` names
    it. Bad input raises `UserError` with a one-line message."""
    if os.path.isfile(path):
        from resnet_jax import convert
        name, variables, options, fmt = convert.read_converted(path, model)
        size = convert.FORMATS[fmt]["image_size"]
        net = checkpoint.model_for(name, options, size, kernels)
        normalization = dataclasses.replace(convert.IMAGENET_NORMALIZATION, input_size=size)
        classes = convert.default_classes(fmt, options["num_classes"])
        meta = checkpoint.metadata(name, options, normalization,
                                   convert.converted_extra(path, fmt, classes))
        return checkpoint.LoadedModel(net, variables, normalization, meta, 0, path)
    with checkpoint.orbax_quieted():
        return checkpoint.load_model(path, step, kernels)
