"""The analysis figures: the paper's Figure 7 and the curves of one run over training.

Each function saves `<stem>.png` and `<stem>.pdf`. Figures are made without pyplot, so they draw
with the Agg backend on a machine without a display and leave a caller's backend alone.
"""
from typing import Dict, List, Sequence, Tuple

import numpy as np
from matplotlib import cm, colormaps, colors, ticker
from matplotlib.figure import Figure

DPI = 110


def _layer_ticks():
    return ticker.MaxNLocator(integer=True)  # layer indices are whole numbers


def _save(fig, stem: str):
    fig.savefig(stem + ".png", dpi=DPI)
    fig.savefig(stem + ".pdf")


def figure7(stem: str, curves: Sequence[Tuple[str, Sequence[float], bool]]):
    """curves: (label, std per layer in depth order, residual). Top: layer order; bottom: sorted
    descending. Plain nets dashed, ResNets solid, as in the paper."""
    fig = Figure(figsize=(6.4, 6.4))
    top, bottom = fig.subplots(2, 1)
    for label, stds, residual in curves:
        style = dict(linestyle="-" if residual else "--", linewidth=1.4, label=label)
        index = np.arange(1, len(stds) + 1)
        top.plot(index, stds, **style)
        bottom.plot(index, sorted(stds, reverse=True), **style)
    top.set_xlabel("layer index (original)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.set_ylabel("std")
        ax.set_xlim(left=0)
        ax.xaxis.set_major_locator(_layer_ticks())
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    _save(fig, stem)


def over_training(stem: str, label: str, curves: Dict[int, List[float]]):
    """curves: step -> std per layer. Left: one curve per saved step, coloured by step; right: the
    same as a heat map, steps up, layers across."""
    steps = sorted(curves)
    grid = np.asarray([curves[s] for s in steps])
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    norm = colors.Normalize(min(steps), max(steps) if len(steps) > 1 else min(steps) + 1)
    cmap = colormaps["viridis"]
    index = np.arange(1, grid.shape[1] + 1)
    for s, stds in zip(steps, grid):
        left.plot(index, stds, color=cmap(norm(s)), linewidth=1.2)
    left.set(xlabel="layer index (original)", ylabel="std", title=f"{label} over training")
    left.grid(alpha=0.3)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=left, label="step")
    image = right.imshow(grid, aspect="auto", origin="lower", cmap="magma",
                         extent=(0.5, grid.shape[1] + 0.5, -0.5, len(steps) - 0.5))
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 12)).round().astype(int))
    right.set_yticks(ticks, [str(steps[i]) for i in ticks])
    right.set(xlabel="layer index (original)", ylabel="step", title="std")
    fig.colorbar(image, ax=right, label="std")
    for ax in (left, right):
        ax.xaxis.set_major_locator(_layer_ticks())
    fig.tight_layout()
    _save(fig, stem)
