"""The paper's ImageNet recipe (Sec. 3.4) for the ImageNet nets of the zoo:

    python -m resnet_jax.train --config configs/imagenet.py:resnet50 --workdir gs://BUCKET/r50 \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Batch 256 (the paper: 32 on each of eight GPUs, each with its own BN statistics; here BN sees the
global batch unless --config.bn_group_size=32), SGD with momentum 0.9 and weight decay 1e-4,
lr 0.1 divided by 10 when the validation error plateaus, up to 600k iterations; scale
augmentation (shorter side uniform in [256, 480]), a random 224x224 crop or its flip, per-pixel
mean subtraction, AlexNet's PCA colour augmentation; option B shortcuts (projections where the
shape changes). Evaluation: the centre 224 crop of the image resized to shorter side 256, or the
standard 10 crops with --config.data.ten_crop=True.

`imagenet.py:<model>,steps` is the fixed-step alternative to the plateau rule: lr divided by 10
at 150k, 300k and 450k iterations (30/60/90 epochs at batch 256).

The data: tfds imagenet2012 prepared once in ArrayRecord format (tfds build imagenet2012
--file_format=array_record --data_dir=DIR, with the manually downloaded tars), or an ILSVRC-style
folder (--config.data.source=folder:PATH with PATH/train/<class>/*.JPEG and PATH/validation/...),
read on every host by random access; each process decodes only its own rows of a batch, in grain
worker processes (data/imagenet.py). The log's `input wait` says how long each step waited for
data: near 0, the input keeps up. bf16 for TPU and GPU:
--config.compute_dtype=bfloat16.
"""
from resnet_jax.config import default_config


def get_config(arg: str = "resnet50"):
    model, _, schedule = arg.partition(",")
    c = default_config()
    c.model = model
    c.model_options = ({} if model.startswith("vgg") else
                       dict(shortcut="B", stride_in_3x3=False, zero_init_last=False))
    with c.unlocked():
        c.data.update(dict(
            image_size=224, scale=(256, 480), pca_std=0.1, eval_resize=256, ten_crop=False,
            mean_images=5000,  # random training images whose centre crops give the mean image
            workers=-1,        # grain worker processes per host decoding training crops; -1: one
                               # per CPU core but one, 0: none (decode in the training process)
            prefetch=2,        # training batches kept ready on the devices ahead of the step
            threads=32))       # decoding threads per host for evaluation and the mean image
    c.data.update(dict(source="imagenet2012", pipeline="host", train_split="train",
                       test_split="validation", holdout=0, pad=0))
    c.batch_size = 256
    c.eval_batch_size = 256
    c.num_steps = 600_000
    c.lr = 0.1
    if schedule == "steps":
        c.lr_boundaries = (150_000, 300_000, 450_000)
    else:
        c.lr_boundaries = ()
        c.lr_plateau_patience = 3  # evaluations (every 5k iterations) without a 0.1 % gain
    c.checkpoint_every = 5000
    c.log_every = 100
    return c
