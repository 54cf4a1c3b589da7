"""One start-up for every command line tool: the console scripts of pyproject.toml call the
functions below, and `python -m resnet_jax.X` calls `start("X")` at the top of X, so both load
tcmalloc (`preload`) before JAX is imported, then run the module's `run()`.

This module imports nothing heavy: the restart happens before JAX is imported and costs next to
nothing.
"""
import glob
import importlib
import importlib.util
import os
import sys

from resnet_jax import preload

TOOLS = ("train", "evaluate", "analyze", "summary", "convert", "compile")


def start(tool: str) -> None:
    """Restart with tcmalloc where it is missing, choose the platforms, then run
    resnet_jax.<tool>.run() and exit."""
    preload.use_tcmalloc()
    platforms = platforms_without_absent_tpu(os.environ)
    if platforms:
        os.environ["JAX_PLATFORMS"] = platforms
    sys.exit(importlib.import_module(f"resnet_jax.{tool}").run())


# A GPU plugin of jax, the device files its platform needs.
_GPU_PLUGINS = {"cuda": (("jax_cuda12_plugin", "jax_cuda13_plugin"), "/dev/nvidia[0-9]*"),
                "rocm": (("jax_rocm6_plugin", "jax_rocm7_plugin"), "/dev/kfd")}


def platforms_without_absent_tpu(environ) -> str:
    """The JAX_PLATFORMS a machine without TPU chips needs when libtpu is installed anyway (the
    `tpu` and `test` extras, for deviceless compiles): without it, JAX starts libtpu in every
    process, which takes its one-process lock and prints a page of errors about finding no TPU.
    '' (JAX chooses) where the user set JAX_PLATFORMS, libtpu is absent, or chips are present
    (/dev/accel*, /dev/vfio: TPU VMs). `compile` finds libtpu by itself (compile_only)."""
    if environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return ""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/*"):
        return ""
    gpus = [platform for platform, (plugins, devices) in _GPU_PLUGINS.items()
            if glob.glob(devices) and any(importlib.util.find_spec(p) for p in plugins)]
    return ",".join(gpus + ["cpu"])


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


def absl_run(main, module: str, *, positional=(0, None), usage: str = "options go as "
              "--flag=value", config: bool = False) -> None:
    """absl's app.run(main) with `module`'s flags and docstring as --help's: absl shows those of
    the script it was started as (the console script's wrapper, or `python -m`'s copy of the
    module), which define none. `positional`: how many arguments besides the flags the tool
    takes, N or (least, most) with most None for any; another count is one `error:` line naming
    `usage`, exit 2, before `main` runs. `config`: --config NAME:ARG and its --config.KEY
    overrides are resolved first (config.command_line), for a tool that defines --config."""
    from absl import app, flags
    from resnet_jax.errors import exit_on_user_error
    if config:
        from resnet_jax import config as config_lib
        with exit_on_user_error():
            sys.argv[1:] = config_lib.command_line(sys.argv[1:])
    for flag in flags.FLAGS.get_key_flags_for_module(module):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    main_module = sys.modules["__main__"]
    main_module.__doc__ = sys.modules[module].__doc__

    def checked_main(argv):
        with exit_on_user_error():
            check_positional(argv[1:], positional, usage)
        return main(argv)

    try:
        app.run(checked_main, flags_parser=_parse_flags)
    except BrokenPipeError:  # `... | head`: the reader has what it wanted; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for exit's flush
        sys.exit(0)


def check_positional(args, positional, usage: str) -> None:
    """UserError unless `args` (the command line less its flags) number as `positional` says
    (absl_run's)."""
    from resnet_jax.errors import UserError
    least, most = (positional, positional) if isinstance(positional, int) else positional
    if most is not None and len(args) > most:
        raise UserError(f"unexpected arguments {list(args[most:])}; {usage}")
    if len(args) < least:
        raise UserError(usage)


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
