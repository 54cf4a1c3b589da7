"""One start-up for every command line tool: the console scripts of pyproject.toml call the
functions below, and `python -m resnet_jax.X` calls `start("X")` at the top of X, so both load
tcmalloc (`preload`) before JAX is imported, then run the module's `run()`.

This module imports nothing heavy: the restart happens before JAX is imported and costs next to
nothing.
"""
import importlib
import sys

from resnet_jax import preload

TOOLS = ("train", "evaluate", "analyze", "summary", "convert")


def start(tool: str) -> None:
    """Restart with tcmalloc where it is missing, then run resnet_jax.<tool>.run() and exit."""
    preload.use_tcmalloc()
    sys.exit(importlib.import_module(f"resnet_jax.{tool}").run())


def train():
    start("train")


def evaluate():
    start("evaluate")


def analyze():
    start("analyze")


def summary():
    start("summary")


def convert():
    start("convert")
