"""The networks of "Deep Residual Learning for Image Recognition" as Flax linen modules."""
from resnet_jax.models.cifar import CifarResNet
from resnet_jax.models.compute import XLA, Kernels
from resnet_jax.models.imagenet import ImageNetResNet
from resnet_jax.models.layers import (BasicBlock, Bottleneck, ModelUsageError, Response, Shortcut,
                                      Stage)
from resnet_jax.models.inputs import Preprocessing
from resnet_jax.models.registry import (UnknownModelError, create_model, list_models, model_options,
                                        preprocessing)
from resnet_jax.models.vgg import VGG
