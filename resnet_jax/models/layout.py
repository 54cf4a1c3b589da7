"""The one place that knows how a stage's blocks are laid out in a variable tree.

A `Stage` holds `block0` (which may change the shape) and `blocks`: the stage's identical other
blocks, run as one `nn.scan`, each of their variables stacked on a leading axis, block b at index
b - 1. Code that reads or writes per-block names (`stage2/block3/conv1`: responses, analysis,
PyTorch conversion) goes through `unstack_blocks` / `stack_blocks` instead of re-deriving it.
"""
import re
from typing import Any, Dict, Mapping

import jax
import numpy as np

SCANNED = "blocks"  # the scope name of a stage's stacked blocks
_BLOCK = re.compile(r"block(\d+)")


def block_name(b: int) -> str:
    return f"block{b}"


def _take(leaf, b: int):
    """Block b of a stacked leaf: an array's row, or an abstract value's shape without its axis."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[b]


def _num_stacked(tree) -> int:
    return jax.tree.leaves(tree)[0].shape[0]


def unstack_blocks(tree: Mapping[str, Any]) -> Dict[str, Any]:
    """A variable (or sown) tree with every `blocks` scope replaced, in place, by `block1`,
    `block2`, ... (block b is row b - 1 of the stacked leaves), so that the result lists each
    stage's blocks in depth order. Other subtrees are returned as they are."""
    out = {}
    for key, value in tree.items():
        if key == SCANNED and isinstance(value, Mapping):
            for i in range(_num_stacked(value)):
                out[block_name(i + 1)] = jax.tree.map(lambda a, i=i: _take(a, i), value)
        elif isinstance(value, Mapping):
            out[key] = unstack_blocks(value)
        else:
            out[key] = value
    return out


def stack_blocks(tree: Mapping[str, Any]) -> Dict[str, Any]:
    """The inverse of `unstack_blocks` for arrays: in each scope that holds `block0`, the blocks
    after it stacked into `blocks`, where the first of them stood."""
    if not isinstance(tree, Mapping):
        return tree
    later = [k for k in tree if _BLOCK.fullmatch(k) and k != "block0"] if "block0" in tree else []
    out = {}
    for key, value in tree.items():
        if key not in later:
            out[key] = stack_blocks(value)
        elif key == later[0]:
            rows = [tree[k] for k in sorted(later, key=lambda k: int(_BLOCK.fullmatch(k)[1]))]
            out[SCANNED] = jax.tree.map(lambda *a: np.stack(a), *rows)
    return out
