"""Small CPU configs for trying things on a laptop (minutes, not hours):

    python -m resnet_jax.train --config configs/cpu.py:resnet20 --workdir /tmp/r20 \
        --config.data.source=folder:../shared/data/cifar10-jpeg

`cpu.py:<model>` is the CIFAR-10 recipe (configs/cifar10.py) cut to 1,000 iterations, lr 0.1
divided by 10 at 500 and 750: ResNet-20 reached 63.98 % on the JPEG copy's test split in 24
minutes on a busy 2-core machine (the command above). `cpu.py:tiny` is a 4/8/16-wide ResNet-20 on 512 synthetic images
for 20 steps of 32: the smoke test, and what the tests start from.
"""
from resnet_jax.config import default_config


def get_config(arg: str = "resnet20"):
    c = default_config()
    if arg == "tiny":
        c.model = "resnet20"
        c.model_options.widths = (4, 8, 16)
        c.data.source = "synthetic:512"
        c.batch_size = 32
        c.eval_batch_size = 64
        c.num_steps = 20
        c.lr_boundaries = (10, 15)
        c.log_every = 5
        c.checkpoint_every = 10
        return c
    c.model = arg
    c.num_steps = 1000
    c.lr_boundaries = (500, 750)
    c.log_every = 50
    c.checkpoint_every = 250
    return c
