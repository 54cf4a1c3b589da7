"""The paper's figures: training curves (Figure 6), response std per layer (Figure 7) and the
curves of one run's responses over training.

Each function saves `<stem>.png` and `<stem>.pdf`. Figures are made without pyplot, so they draw
with the Agg backend on a machine without a display and leave a caller's backend alone.

    python -m resnet_jax.plots RUN[=LABEL] ... --out docs/figure6
    python -m resnet_jax.plots --panel "64k" RUN ... --panel "8k" RUN ... --out docs/figure6
    python -m resnet_jax.plots LABEL.csv[=LABEL] ... --out docs/figure7

draws Figure 6 from the `metrics.jsonl` of training workdirs (or those files themselves), in one
panel or side by side in several (runs of different schedules each on their own axis), or
Figure 7 from the per-layer CSVs `resnet_jax.analyze` wrote: nets analysed apart (whose
checkpoints may be gone) side by side; from its `--over_training` CSVs, the nets' response std
over training side by side.
"""
import csv
import io
import json
import os
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from matplotlib import cm, colormaps, colors, ticker
from matplotlib.figure import Figure

from resnet_jax import metrics_log, storage
from resnet_jax.runs import split_label
from resnet_jax.errors import UserError, exit_on_user_error

DPI = 110


def _layer_ticks():
    return ticker.MaxNLocator(integer=True)  # layer indices are whole numbers


def _save(fig, stem: str):
    """STEM.png and STEM.pdf, local or on gs:// (storage.write)."""
    for suffix, options in ((".png", dict(dpi=DPI)), (".pdf", {})):
        image = io.BytesIO()
        fig.savefig(image, format=suffix[1:], **options)
        storage.write(stem + suffix, image.getvalue())


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


def separation_over_training(stem: str, nets: Sequence[Tuple[str, Dict[int, List[float]]]]):
    """nets: (label, step -> std per layer). Left: each net's mean std over its layers against
    iterations; right: each net's std per layer at its first, middle and last saved steps (darker
    later). Plain nets (label starting 'plain') dashed, as in Figure 7."""
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    for i, (label, curves) in enumerate(nets):
        steps = sorted(curves)
        style = dict(color=f"C{i}", linestyle="--" if _plain(label) else "-")
        left.plot(steps, [np.mean(curves[s]) for s in steps], marker="o", markersize=3,
                  label=label, **style)
        shown = sorted({steps[0], steps[len(steps) // 2], steps[-1]})
        for k, s in enumerate(shown):
            right.plot(np.arange(1, len(curves[s]) + 1), curves[s], linewidth=1.2,
                       alpha=0.35 + 0.65 * (k + 1) / len(shown),
                       label=f"{label}, {s}", **style)
    left.set(xlabel="iterations", ylabel="mean std over layers",
             title="response std over training")
    right.set(xlabel="layer index (original)", ylabel="std", title="per layer, at three steps")
    right.xaxis.set_major_locator(_layer_ticks())
    for ax in (left, right):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, stem)


class Curves(NamedTuple):
    """One run's error curves: training error of each logged interval, test error of each
    evaluation, against iterations."""

    train_steps: np.ndarray
    train_error: np.ndarray
    test_steps: np.ndarray
    test_error: np.ndarray


def read_metrics(path: str) -> Tuple[str, List[Dict]]:
    """A training workdir's log (metrics_log.read_lines: local or gs://, one file or parts), or
    a JSONL file -> (what was read, its rows)."""
    metrics, lines = metrics_log.read_lines(path)
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{metrics}:{n} is not a JSON line; the file is damaged") from None
    return metrics, rows


def read_curves(path: str) -> Curves:
    """A training workdir's log (or a JSONL file) -> its `Curves`."""
    metrics, rows = read_metrics(path)
    train, test = {}, {}
    for row in rows:  # a resumed run logs a step again: the later row counts
        if "train_top1" in row:
            train[row["step"]] = 1.0 - row["train_top1"]
        if "val_top1" in row:
            test[row["step"]] = 1.0 - row["val_top1"]
    if not train and not test:
        raise UserError(f"{metrics} has no train_top1 or val_top1 rows")
    as_arrays = lambda d: (np.asarray(sorted(d), float), np.asarray([d[k] for k in sorted(d)]))
    return Curves(*as_arrays(train), *as_arrays(test))


def read_logged_responses(path: str, step: Optional[int] = None) -> Dict[int, List[float]]:
    """The response std per layer that the trainer logged (config `responses_images`) in a
    workdir's metrics.jsonl, keyed by step: every logged step, or `step` alone."""
    metrics, rows = read_metrics(path)
    logged = {r["step"]: [float(v) for v in r["response_std"]] for r in rows
              if "response_std" in r}
    if not logged:
        raise UserError(f"{metrics} holds no response statistics; train with "
                        "--config.responses_images=N (N > 0), or run resnet_jax.analyze on its "
                        "checkpoints")
    if step is None:
        return logged
    if step not in logged:
        raise UserError(f"{metrics} logged responses at steps {_steps(logged)}, not at {step}; "
                        "name one of those with --step")
    return {step: logged[step]}


def _steps(logged: Dict[int, List[float]]) -> str:
    steps = sorted(logged)
    return ", ".join(map(str, steps)) if len(steps) <= 8 else \
        f"{', '.join(map(str, steps[:3]))}, ..., {', '.join(map(str, steps[-3:]))}"


def read_responses(path: str) -> Dict[Optional[int], List[float]]:
    """An analysis CSV of `resnet_jax.analyze --out` -> std per layer in depth order, keyed by
    step: LABEL.csv has one curve (key None), LABEL_over_training.csv one per saved step."""
    try:
        rows = list(csv.DictReader(io.StringIO(storage.path(path).read_text(), newline="")))
    except OSError as e:
        raise UserError(f"cannot read {path!r}: {e.strerror or e}") from None
    if not rows or not {"layer_index", "std"} <= set(rows[0]):
        raise UserError(f"{path} is not a per-layer CSV of resnet_jax.analyze (columns "
                        "layer_index and std); name a LABEL.csv that analyze wrote")
    curves: Dict[Optional[int], Dict[int, float]] = {}
    try:
        for r in rows:
            step = int(r["step"]) if "step" in r else None
            by_index = curves.setdefault(step, {})
            index = int(r["layer_index"])
            by_index[index] = float(r["std"]) if index not in by_index else float("nan")
    except (TypeError, ValueError):
        raise UserError(f"{path} has a row without a number in step, layer_index or std") from None
    layers = max(len(by_index) for by_index in curves.values())
    for step, by_index in curves.items():
        values = list(by_index.values())
        if sorted(by_index) != list(range(1, layers + 1)) or np.isnan(values).any():
            where = f"step {step} of {path}" if step is not None else path
            raise UserError(f"{where} does not hold layer_index 1..{layers} once each; name a CSV "
                            "that analyze wrote")
    return {step: [by_index[i] for i in sorted(by_index)] for step, by_index in curves.items()}


def _plain(label: str) -> bool:
    return label.lower().startswith("plain")


def figure6(stem: str, panels: Sequence[Tuple[Optional[str], Sequence[Tuple[str, Curves]]]]):
    """Training error (thin) and test error (bold) against iterations, one colour per label, in
    percent; plain nets (label starting 'plain') dashed, as the paper draws them. panels: (title,
    runs), side by side with a shared error axis (schedules of different lengths each get their
    own iterations axis)."""
    fig = Figure(figsize=(7.2 if len(panels) == 1 else 5.2 * len(panels), 4.6))
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    colour = {}  # one per label, the same in every panel
    for ax, (title, runs) in zip(axes, panels):
        for label, c in runs:
            colour.setdefault(label, f"C{len(colour) % 10}")
            style = dict(color=colour[label], linestyle="--" if _plain(label) else "-")
            ax.plot(c.train_steps, 100 * c.train_error, linewidth=0.7, alpha=0.8, **style)
            ax.plot(c.test_steps, 100 * c.test_error, linewidth=2.0, label=label, **style)
        ax.set(xlabel="iterations", title=title or "training error (thin) and test error (bold)")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set(ylabel="error (%)", ylim=(0, None))
    if len(panels) > 1:
        fig.suptitle("training error (thin) and test error (bold)")
    fig.tight_layout()
    _save(fig, stem)


def figure1(stem: str, runs: Sequence[Tuple[str, Curves]]):
    """The paper's Figure 1: training error (left) and test error (right) against iterations, one
    colour per run, in percent."""
    fig = Figure(figsize=(10, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    for i, (label, c) in enumerate(runs):
        axes[0].plot(c.train_steps, 100 * c.train_error, color=f"C{i}", linewidth=1.0, label=label)
        axes[1].plot(c.test_steps, 100 * c.test_error, color=f"C{i}", linewidth=1.6, label=label)
    for ax, title in zip(axes, ("training error", "test error")):
        ax.set(xlabel="iterations", title=title)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set(ylabel="error (%)", ylim=(0, None))
    fig.tight_layout()
    _save(fig, stem)


def _labelled(spec: str) -> Tuple[str, str]:
    """RUN[=LABEL] -> (label, path); the label defaults to RUN's name."""
    path, label = split_label(spec)
    name = os.path.basename(os.path.normpath(path)).replace(".metrics.jsonl", "")
    return label or name.removesuffix(".csv").removesuffix("_over_training"), path


Panels = List[Tuple[Optional[str], List[Tuple[str, str]]]]  # [(title or None, [(label, path)])]
FIGURES = ("1", "6", "7", "responses")


class Command(NamedTuple):
    out: str
    panels: Panels
    figure: Optional[str]  # one of FIGURES; None: by the kind of input (runs: 6, CSVs: 7)
    step: Optional[int]


def _parse(args: List[str], usage: str) -> Command:
    """The command line -> Command; `--panel TITLE` starts a panel, RUNs before the first
    `--panel` make an untitled one."""
    values, panels = dict(), [(None, [])]
    while args:
        arg = args.pop(0)
        option, has_value, value = arg.partition("=")
        if option in ("--out", "--panel", "--figure", "--step"):
            if not has_value:
                if not args:
                    raise UserError(f"{option} needs a value; {usage}")
                value = args.pop(0)
            if option == "--panel":
                panels.append((value, []))
            else:
                values[option] = value
        elif arg.startswith("-"):
            raise UserError(f"unknown option {arg}; {usage}")
        else:
            panels[-1][1].append(arg)
    if not panels[0][1]:
        panels.pop(0)
    out = values.get("--out")
    if not panels or not out or not all(specs for _, specs in panels):
        raise UserError(("every --panel needs a RUN after it; " if panels and out else "") + usage)
    figure, step = values.get("--figure"), values.get("--step")
    if figure is not None and figure not in FIGURES:
        raise UserError(f"--figure must be one of {', '.join(FIGURES)}, not {figure!r}")
    if step is not None and not step.isdigit():
        raise UserError(f"--step must be a step number, not {step!r}")
    return Command(out, [(title, [_labelled(spec) for spec in specs]) for title, specs in panels],
                   figure, None if step is None else int(step))


def _from_csvs(c: Command, labelled) -> Callable[[], None]:
    """Figure 7 (or the std over training) from analyze's CSVs, every one read first."""
    if any(title for title, _ in c.panels):
        raise UserError("--panel is for training runs (Figure 6); analysis CSVs share one figure")
    if c.figure not in (None, "7", "responses") or c.step is not None:
        raise UserError("analysis CSVs draw Figure 7 or the std over training; --step and "
                        "--figure 1 or 6 are for training runs")
    curves = [(label, read_responses(path)) for label, path in labelled]
    if all(None in by_step for _, by_step in curves):
        return lambda: figure7(c.out, [(label, by_step[None], not _plain(label))
                                       for label, by_step in curves])
    if any(None in by_step for _, by_step in curves):
        raise UserError("give either LABEL.csv files (Figure 7 at one step) or "
                        "LABEL_over_training.csv files (over training), not both")
    return lambda: separation_over_training(c.out, curves)


def _from_runs(c: Command, labelled) -> Callable[[], None]:
    """Figures 1, 6, 7 or the std over training from training runs' metrics, every one read
    first."""
    figure = c.figure or "6"
    if len(c.panels) > 1 or c.panels[0][0]:
        if figure != "6":
            raise UserError(f"--panel is for Figure 6; --figure {figure} draws one figure")
    if c.step is not None and figure != "7":
        raise UserError("--step picks the logged step of Figure 7 (--figure 7)")
    if figure == "6":
        read = [(title, [(label, read_curves(path)) for label, path in runs])
                for title, runs in c.panels]
        return lambda: figure6(c.out, read)
    if figure == "1":
        runs = [(label, read_curves(path)) for label, path in labelled]
        return lambda: figure1(c.out, runs)
    logged = [(label, read_logged_responses(path, c.step)) for label, path in labelled]
    if figure == "responses":
        return lambda: separation_over_training(c.out, logged)
    at = lambda label, stds: label if c.step is not None else f"{label}, step {max(stds)}"
    return lambda: figure7(c.out, [(at(label, stds), stds[max(stds)], not _plain(label))
                                   for label, stds in logged])


def main(argv: Sequence[str]) -> None:
    """`RUN[=LABEL] ... --out STEM`: Figure 6 of those runs (in panels, each started by
    `--panel TITLE`), Figure 1, or Figure 7 from the runs' logged responses or analysis CSVs."""
    usage = ("usage: python -m resnet_jax.plots [--figure 1|6|7|responses] [--step N] "
             "[--panel TITLE] RUN[=LABEL] ... [--panel TITLE RUN[=LABEL] ...] --out STEM "
             "(writes STEM.png, .pdf)")
    with exit_on_user_error():
        args = list(argv)
        if "-h" in args or "--help" in args:
            print(usage + "\nRUN: a training workdir or its metrics.jsonl, or a per-layer CSV of "
                  "resnet_jax.analyze (an _over_training.csv: std over training); LABEL defaults "
                  "to RUN's name; labels starting 'plain' draw dashed.\n--figure 6 (runs' "
                  "default): training and test error, each --panel TITLE a panel (e.g. one per "
                  "schedule); 1: training error and test error side by side; 7 (CSVs' default): "
                  "response std per layer, from the runs' logged responses at --step (default: "
                  "the last logged); responses: each run's mean response std over training.")
            return
        c = _parse(args, usage)
        labelled = [run for _, runs in c.panels for run in runs]
        csvs = [path.endswith(".csv") for _, path in labelled]
        if any(csvs) and not all(csvs):
            raise UserError("give either analysis CSVs (Figure 7) or training runs (Figure 6), "
                            "not both")
        draw = _from_csvs(c, labelled) if all(csvs) else _from_runs(c, labelled)
        draw()
        print(f"wrote {c.out}.png and {c.out}.pdf")


if __name__ == "__main__":
    main(sys.argv[1:])
