"""A textbook Flax linen ResNet-50 and its train step: the reference the TPU program is held to.

Written as flax's examples/imagenet writes it, and nothing more: every block its own module
(unrolled), `nn.BatchNorm` and `nn.Conv` in the compute dtype, softmax cross-entropy, SGD with
momentum (optax), a jit over a 1-D `data` mesh with the batch split and the state replicated and
donated. `benchmarks/tpu_memory.py` compiles it beside resnet-jax's own step for the same TPU
slice and compares what each needs per chip.
"""
import functools
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

ModuleDef = Any


class BottleneckBlock(nn.Module):
    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        residual = x
        y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), (self.strides,) * 2)(y)))
        y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.filters * 4, (1, 1))(y))
        if residual.shape != y.shape:
            residual = self.norm()(self.conv(self.filters * 4, (1, 1), (self.strides,) * 2)(residual))
        return nn.relu(residual + y)


class ResNet(nn.Module):
    stage_sizes: Sequence[int]
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                                 epsilon=1e-5, dtype=self.dtype)
        x = nn.relu(norm()(conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)])(x)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                x = BottleneckBlock(64 * 2 ** i, conv, norm, strides=2 if i > 0 and j == 0 else 1)(x)
        x = jnp.mean(x, axis=(1, 2))
        return jnp.asarray(nn.Dense(self.num_classes, dtype=self.dtype)(x), jnp.float32)


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))


class State(flax.struct.PyTreeNode):
    params: Any
    batch_stats: Any
    opt_state: Any


def make(mesh, image_size: int = 224, dtype=jnp.bfloat16, lr: float = 0.1):
    """(abstract state, jitted step(state, uint8 images, int32 labels) -> (state, loss))."""
    model = ResNet50(dtype=dtype)
    tx = optax.sgd(lr, momentum=0.9)

    def init():
        variables = model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
        return State(variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    def step(state, images, labels):
        x = images.astype(jnp.float32) / 255.0

        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, x,
                                          mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return State(optax.apply_updates(state.params, updates), stats, opt_state), loss

    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(mesh.axis_names[0]))
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                            jax.eval_shape(init))
    jitted = jax.jit(step, in_shardings=(rep, batch, batch), out_shardings=(rep, rep),
                     donate_argnums=0)
    return abstract, jitted
