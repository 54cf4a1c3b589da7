"""The paper's CIFAR-10 recipe (Sec. 4.2) for any CIFAR net of the zoo:

    python -m resnet_jax.train --config configs/cifar10.py:resnet110 --workdir runs/resnet110

Batch 128 (the paper: 64 on each of two GPUs; here BN sees the whole batch unless
--config.bn_group_size=64), SGD with momentum 0.9 and weight decay 1e-4 on every parameter
(--config.weight_decay_on=kernels for conv/dense kernels only), lr 0.1 divided by 10 at 32k and
48k iterations, 64k iterations, per-pixel mean subtraction, pad-4 random crop and flip, option A
shortcuts. The paper fixed that schedule on a 45k/5k train/val split (--config.data.holdout=5000)
and then trained on all 50k and reported the test set (the default: holdout 0, val = test).
ResNet-110 and ResNet-1202 warm up at lr 0.01 until the running training error is below 80 %.

The paper's schedule compressed 8x (the recorded CPU experiment):
    --config.num_steps=8000 --config.lr_boundaries='(4000, 6000)'
Real CIFAR-10 without internet: --config.data.source=folder:PATH (PATH/{train,test}/<class>/*.jpg).
"""
from resnet_jax.config import default_config

WARMUP = ("resnet110", "resnet1202")


def get_config(model: str = "resnet56"):
    c = default_config()
    c.model = model
    if model in WARMUP:
        c.warmup_lr = 0.01
    return c
