"""The train state: weights, BN statistics, optimizer and schedule state as one pytree, the
optimizer (PyTorch's SGD), and how a fresh or a restore-target state is made on a mesh."""
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

import resnet_jax
from resnet_jax import parallel
from resnet_jax import schedule as schedule_lib
from resnet_jax.models import XLA, Kernels


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32: steps taken
    params: Any
    batch_stats: Any
    opt_state: Any
    schedule: schedule_lib.ScheduleState  # what the learning rate depends on besides the step

    @property
    def variables(self):
        return {"params": self.params, "batch_stats": self.batch_stats}

    def train_item(self):
        """Everything but the weights: the checkpoint's `train` item (the schedule's fields
        flat beside the step and optimizer state, `schedule_lib.stored`)."""
        return dict(step=self.step, opt_state=self.opt_state,
                    **schedule_lib.stored(self.schedule))


def decay_mask(config, params):
    if config.weight_decay_on == "all":
        return jax.tree.map(lambda _: True, params)
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def optimizer(config) -> optax.GradientTransformation:
    """PyTorch's SGD: g + wd * w into a momentum buffer (no dampening); the step multiplies by -lr
    itself, so the learning rate can depend on state (warm-up, plateaus)."""
    return optax.chain(optax.add_decayed_weights(config.weight_decay, functools.partial(decay_mask, config)),
                       optax.trace(decay=config.momentum))


def create_model(config, num_classes: int, kernels: Kernels = XLA):
    """(the config's model computing with `kernels`, the options its checkpoints record)."""
    options = dict(config.model_options)
    options["num_classes"] = num_classes
    model_options = dict(options)  # what the checkpoint's metadata records (JSON-able)
    options["dtype"] = jnp.dtype(config.compute_dtype)  # one of config.DTYPES (validate)
    # Any image size: the trainer takes its data's, which the checkpoint records (image_size).
    return (resnet_jax.create_model(config.model, kernels=kernels, input_size=None, **options),
            model_options)


def _init_fn(config, model, image_size: int):
    def init():
        variables = model.init(jax.random.key(config.seed),
                               jnp.zeros((1, image_size, image_size, 3), jnp.float32))
        params = variables["params"]
        return TrainState(step=jnp.int32(0), params=params,
                          batch_stats=variables.get("batch_stats", {}),
                          opt_state=optimizer(config).init(params),
                          schedule=schedule_lib.init(config))
    return init


def init_state(config, model, mesh, image_size: int) -> TrainState:
    """Fresh state (the same on any mesh: initialisation is a function of the seed), replicated.
    The init runs whole on every device, where partitionable threefry buys nothing and compiles
    slower on XLA:CPU."""
    with jax.threefry_partitionable(False):
        return jax.jit(_init_fn(config, model, image_size), out_shardings=parallel.replicated(mesh))()


def abstract_state(config, model, mesh, image_size: int) -> TrainState:
    """Shapes, dtypes and the replicated sharding on *this* mesh: the restore target, so a
    checkpoint written on any number of devices lands on the current ones."""
    sharding = parallel.replicated(mesh)
    shapes = jax.eval_shape(_init_fn(config, model, image_size))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
