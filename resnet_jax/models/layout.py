"""The one place that knows how a stage's blocks are laid out in a variable tree.

A `Stage` holds `block0` (which may change the shape) and the stage's identical other blocks:
- at most `MAX_UNROLLED_BLOCKS` of them: separate modules `block1`, `block2`, ...;
- more (ResNet-1202's 199): `blocks`, one `nn.scan`, each variable stacked on a leading axis,
  block b at index b - 1 (`runs_scanned`).

Checkpoints store every stage's identical blocks stacked in `blocks`, whatever the model holds:
`to_checkpoint` gives that stored layout, `from_checkpoint` the model's. Code that reads or writes
per-block names (`stage2/block3/conv1`: responses, analysis, PyTorch conversion) goes through
`unstack_blocks`, which names every block separately whatever the model holds.

Every function here walks nested dicts, tuples and namedtuples (optax's states), so that it
reaches a parameter tree's copies inside an optimizer state, and takes arrays (NumPy or JAX,
traced too) or abstract values (`jax.ShapeDtypeStruct`, sharding included) as leaves.
"""
import re
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

SCANNED = "blocks"  # the scope name of a stage's stacked blocks

# The longest run of identical blocks that a `Stage` holds as separate modules (and so runs
# unrolled). Separate modules compile as fast as a textbook net, where stacked parameters cost
# a slice of every parameter per block and a concatenate of every gradient; unrolled, XLA
# schedules and rematerialises across blocks. 35 is ResNet-152's deepest stage (36 blocks:
# block0 and 35 identical ones); ResNet-1202's 199 run as one rolled scan, which compiles once
# per stage however deep (unrolled, it compiles for minutes).
MAX_UNROLLED_BLOCKS = 35

_BLOCK = re.compile(r"block(\d+)")


def block_name(b: int) -> str:
    return f"block{b}"


def runs_scanned(num_identical: int) -> bool:
    """Whether a stage's `num_identical` blocks after `block0` are one `nn.scan` (`blocks`)."""
    return num_identical > MAX_UNROLLED_BLOCKS


def _walk(tree, on_mapping: Callable[[Mapping], dict]):
    """`tree` with each of its outermost mappings replaced by `on_mapping(mapping)`, through
    tuples, namedtuples and lists; other values as they are."""
    if isinstance(tree, Mapping):
        return on_mapping(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_walk(v, on_mapping) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_walk(v, on_mapping) for v in tree)
    return tree


def _row_sharding(sharding):
    """The sharding of one row of a stacked array sharded as `sharding`."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    return sharding  # None, or a sharding without axes (one device, replicated)


def _stacked_sharding(sharding):
    """The sharding of rows sharded as `sharding` stacked on a new leading axis, unsplit."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
    return sharding


def _take(leaf, b: int):
    """Block b of a stacked leaf: an array's row, or an abstract value without its axis."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype,
                                    sharding=_row_sharding(leaf.sharding))
    return leaf[b]


def _stack(*rows):
    """Rows stacked on a new leading axis: NumPy arrays by NumPy, abstract values abstractly,
    anything else (JAX arrays, tracers) by jnp."""
    first = rows[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(rows),) + tuple(first.shape), first.dtype,
                                    sharding=_stacked_sharding(first.sharding))
    if all(isinstance(r, np.ndarray) for r in rows):
        return np.stack(rows)
    return jnp.stack(rows)


def _num_stacked(tree) -> int:
    return jax.tree.leaves(tree)[0].shape[0]


def unstack_blocks(tree, longest: Optional[int] = None):
    """`tree` with every `blocks` scope of at most `longest` blocks (any number by default)
    replaced, in place, by `block1`, `block2`, ... (block b is row b - 1 of the stacked leaves),
    so that the result lists those stages' blocks in depth order. Other subtrees are returned as
    they are; a tree without `blocks` comes back unchanged."""
    def on_mapping(scope):
        out = {}
        for key, value in scope.items():
            if (key == SCANNED and isinstance(value, Mapping)
                    and (longest is None or _num_stacked(value) <= longest)):
                for i in range(_num_stacked(value)):
                    out[block_name(i + 1)] = jax.tree.map(lambda a, i=i: _take(a, i), value)
            else:
                out[key] = _walk(value, on_mapping)
        return out
    return _walk(tree, on_mapping)


def stack_blocks(tree):
    """The inverse of `unstack_blocks`: in each scope that holds `block0`, the blocks after it
    stacked into `blocks`, where the first of them stood. A scope that already holds `blocks`
    (or no `block1`) is returned as it is."""
    def on_mapping(scope):
        later = ([k for k in scope if _BLOCK.fullmatch(k) and k != "block0"]
                 if "block0" in scope else [])
        out = {}
        for key, value in scope.items():
            if key not in later:
                out[key] = _walk(value, on_mapping)
            elif key == later[0]:
                rows = [scope[k] for k in sorted(later, key=lambda k: int(_BLOCK.fullmatch(k)[1]))]
                out[SCANNED] = jax.tree.map(_stack, *rows)
        return out
    return _walk(tree, on_mapping)


def to_checkpoint(tree):
    """A model's tree (variables, an optimizer state, or their abstract values) in the layout
    checkpoints store: every stage's identical blocks stacked in `blocks`."""
    return stack_blocks(tree)


def from_checkpoint(tree):
    """The inverse of `to_checkpoint`: a stored tree in the layout the model holds (stacks of
    at most `MAX_UNROLLED_BLOCKS` blocks as separate `block1`, ... ; longer ones stay stacked)."""
    return unstack_blocks(tree, longest=MAX_UNROLLED_BLOCKS)
