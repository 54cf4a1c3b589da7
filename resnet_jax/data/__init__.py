"""Data sources (tfds, an image folder, synthetic) and CIFAR-style augmentation on device."""
from resnet_jax.data.sources import Dataset, load, parse_source, CIFAR10_CLASSES
