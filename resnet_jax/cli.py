"""One start-up for every command line tool: the console scripts of pyproject.toml call the
functions below, and `python -m resnet_jax.X` calls `start("X")` at the top of X, so both load
tcmalloc (`preload`) before JAX is imported, then run the module's `run()`.

This module imports nothing heavy: the restart happens before JAX is imported and costs next to
nothing.
"""
import importlib
import os
import sys

from resnet_jax import preload

TOOLS = ("train", "evaluate", "analyze", "summary", "convert", "compile")


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


def compile_for():
    start("compile")


def absl_run(main, module: str) -> None:
    """absl's app.run(main) with `module`'s flags and docstring as --help's: absl shows those of
    the script it was started as (the console script's wrapper, or `python -m`'s copy of the
    module), which define none."""
    from absl import app, flags
    for flag in flags.FLAGS.get_key_flags_for_module(module):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    main_module = sys.modules["__main__"]
    main_module.__doc__ = sys.modules[module].__doc__
    try:
        app.run(main, flags_parser=_parse_flags)
    except BrokenPipeError:  # `... | head`: the reader has what it wanted; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for exit's flush
        sys.exit(0)


def _parse_flags(argv):
    """absl's parsing, but a bad flag (misspelled, or a value of the wrong type) is the house's
    `error:` line and exit 2, not absl's `FATAL Flags parsing error` and exit 1."""
    from absl import flags
    from resnet_jax.errors import UserError, exit_on_user_error
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        with exit_on_user_error():
            message = " ".join(str(e).split()).replace(" ?", "?")
            raise UserError(f"{message} (--help lists the flags)") from None
