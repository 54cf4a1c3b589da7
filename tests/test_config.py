"""The config as data: configs load without JAX, every key is described, validate() finds every
problem at once, and every entry point starts the same way (console scripts included)."""
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

from conftest import tiny_config
from resnet_jax import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = f"{REPO}/configs/cpu.py:tiny"


def _run(*args, env=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_configs_import_only_ml_collections():
    code = ("import importlib.util, sys\n"
            "for name in ('cifar10', 'cpu', 'imagenet'):\n"
            "    spec = importlib.util.spec_from_file_location(name, f'configs/{name}.py')\n"
            "    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
            "    module.get_config()\n"
            "heavy = sorted(m for m in ('jax', 'flax', 'orbax', 'optax', 'resnet_jax.train')\n"
            "               if m in sys.modules)\n"
            "print(heavy)\n")
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_every_default_key_has_a_meaning():
    text = config_lib.describe(config_lib.default_config())
    lines = text.splitlines()
    keys = [ln.split(" = ")[0] for ln in lines if not ln.startswith(" ")]
    assert "lr" in keys and "data.source" in keys and "model_options.shortcut" in keys
    for key in keys:
        assert config_lib.MEANING.get(key), f"{key} has no meaning in config.KEYS"
    # a changed value shows its default beside it
    c = config_lib.default_config()
    c.lr = 0.5
    assert "lr = 0.5  (default 0.1)" in config_lib.describe(c)


def test_the_recipes_validate():
    from resnet_jax.config import load_config
    for spec in ("cifar10.py:resnet110", "cpu.py:tiny", "cpu.py:resnet20", "imagenet.py:resnet50",
                 "imagenet.py:resnet50,steps"):
        assert config_lib.validate(load_config(f"{REPO}/configs/{spec}")) == [], spec


@pytest.mark.parametrize("changes, message", [
    (dict(checkpoint_every=0), "checkpoint_every must be an integer >= 1, not 0"),
    (dict(log_every=-3), "log_every must be an integer >= 1, not -3"),
    (dict(num_steps=-5), "num_steps must be an integer >= 1, not -5"),
    (dict(batch_size=0), "batch_size must be an integer >= 1, not 0"),
    (dict(lr=-0.1), "lr must be > 0, not -0.1"),
    (dict(lr=float("inf")), "lr must be > 0, not inf"),  # diverged at once, saved NaN
    (dict(weight_decay=float("nan")), "weight_decay must be >= 0, not nan"),
    (dict(lr_boundaries=(15, 10)), "lr_boundaries must be increasing steps >= 1, not (15, 10)"),
    (dict(lr_boundaries=(0, 10)), "lr_boundaries must be increasing steps >= 1, not (0, 10)"),
    (dict(lr_boundaries=(10, 10)), "lr_boundaries must be increasing steps >= 1, not (10, 10)"),
    (dict(warmup_smoothing=1.0), "warmup_smoothing must be in [0, 1), not 1.0"),
    (dict(warmup_smoothing=-0.5), "warmup_smoothing must be in [0, 1), not -0.5"),
    ({"data.source": "synthetic:abc"}, "data.source: synthetic:N needs a positive image count, not 'abc'"),
    ({"data.source": "folder:"}, "data.source: folder: needs a path"),
    ({"data.source": "nfs:/x"}, "data.source: unknown data source 'nfs:/x'"),
    ({"data.pipeline": "gpu"}, "data.pipeline must be 'device' or 'host', not 'gpu'"),
    ({"data.pipeline": "host", "data.source": "synthetic:64"},
     "data.pipeline='host' reads a tfds data set or folder:PATH, not 'synthetic:64'"),
    (dict(compute_dtype="float16"), "compute_dtype must be 'float32' or 'bfloat16', not 'float16'"),
    (dict(weight_decay_on="biases"), "weight_decay_on must be 'all' or 'kernels', not 'biases'"),
    (dict(bn_group_size=5), "bn_group_size 5 does not divide batch_size 32"),
    (dict(batch_size=30), "batch_size 30 does not split over 4 devices; use a multiple of 4"),
    (dict(eval_batch_size=66), "eval_batch_size 66 does not split over 4 devices"),
])
def test_validate_names_each_problem(changes, message):
    problems = config_lib.validate(tiny_config(**changes), num_devices=4)
    assert len(problems) == 1, problems
    assert problems[0].startswith(message), problems


def test_validate_reports_every_problem_at_once():
    problems = config_lib.validate(tiny_config(checkpoint_every=0, log_every=0, lr=-1.0,
                                         **{"data.source": "synthetic:abc"}))
    assert len(problems) == 4, problems


def test_check_names_model_problems_without_building_the_model(monkeypatch):
    from resnet_jax.models import registry
    monkeypatch.setattr(registry, "create_model", lambda *a, **k: pytest.fail("built a model"))
    config_lib.check(tiny_config())
    with pytest.raises(config_lib.UserError, match=r"^lr must be > 0, not -1.0\nwidths must be 3 "
                       r"positive integers, one per stage, not \(4, 8\)$"):
        config_lib.check(tiny_config(lr=-1.0, **{"model_options.widths": (4, 8)}))


@pytest.mark.slow
def test_cli_reports_config_problems_before_loading_anything(tmp_path):
    workdir = tmp_path / "w"
    proc = _run("-m", "resnet_jax.train", "--config", TINY, "--workdir", str(workdir),
                "--config.checkpoint_every=0", "--config.log_every=0",
                "--config.data.source=folder:/nonexistent")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: log_every must be an integer >= 1, not 0",
        "error: checkpoint_every must be an integer >= 1, not 0"]  # the folder is never read
    assert not workdir.exists()


@pytest.mark.slow
def test_help_and_describe_need_no_config():
    proc = _run("-m", "resnet_jax.train", "--help")
    assert "error" not in proc.stderr and "--workdir" in proc.stdout
    assert "--[no]allow_config_change:" in proc.stdout and "--[no]describe:" in proc.stdout
    assert "--config: a shipped config" in proc.stdout  # defined in config.py, listed as the tool's
    proc = _run("-m", "resnet_jax.train", "--describe")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checkpoint_every = 2000" in proc.stdout and "warmup_smoothing = 0.95" in proc.stdout
    proc = _run("-m", "resnet_jax.train", "--config", TINY, "--describe")
    assert "num_steps = 20  (default 64000)" in proc.stdout


def _console_scripts():
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(_console_scripts()))
def test_console_scripts_start_like_python_m(script, tcmalloc):
    """What pip's wrapper for the entry point does, run with --help: the tool's own flags are
    listed, and the process that prints them has tcmalloc mapped (the wrapper restarted)."""
    module, _, function = _console_scripts()[script].partition(":")
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('tcmalloc mapped:', 'tcmalloc' in "
            "open('/proc/self/maps').read()))\n"
            f"sys.argv[0] = {script!r}\n"
            f"from {module} import {function}\n"
            f"sys.exit({function}())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "RESNET_JAX_PRELOADED")}
    proc = subprocess.run([sys.executable, "-c", code, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(env, PYTHONPATH=str(REPO)))
    assert "tcmalloc mapped: True" in proc.stdout, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    flag = {"train": "--workdir", "evaluate": "--checkpoint", "analyze": "--out",
            "summary": "--image_size", "convert": "--option", "compile": "--topology"}[script.rsplit("-", 1)[1]]
    assert flag in proc.stdout, proc.stdout[-2000:]


def test_configs_are_addressed_by_name_or_file(tmp_path, monkeypatch):
    by_name = config_lib.load_config("cifar10:resnet110")
    assert by_name.model == "resnet110" and by_name.warmup_lr == 0.01
    assert config_lib.load_config(f"{REPO}/configs/cifar10.py:resnet110") == by_name
    assert config_lib.available_configs() == ["cifar10", "cpu", "imagenet"]
    monkeypatch.chdir(tmp_path)  # the repository's own commands, run outside it
    assert config_lib.load_config("configs/cpu.py:tiny").num_steps == 20
    own = tmp_path / "mine.py"
    own.write_text("from resnet_jax.config import default_config\n"
                   "def get_config(arg):\n    c = default_config(); c.seed = int(arg); return c\n")
    assert config_lib.load_config("mine.py:7").seed == 7


@pytest.mark.parametrize("spec, message", [
    ("nope:resnet20", "unknown config 'nope'; use a shipped config NAME:ARG (cifar10, cpu, "
                      "imagenet; e.g. cifar10:resnet56) or a file PATH.py:ARG"),
    ("configs/nope.py:resnet20", "config file 'configs/nope.py' not found; use a shipped config"),
    ("elsewhere/cpu.py:tiny", "config file 'elsewhere/cpu.py' not found"),
])
def test_unknown_configs_are_named(spec, message):
    with pytest.raises(config_lib.UserError, match="^" + message.replace("(", r"\(")
                       .replace(")", r"\)").replace(".", r"\.")):
        config_lib.load_config(spec)


def test_command_line_gives_config_flags_a_file():
    argv = config_lib.command_line(["--config", "cpu:tiny", "--config.lr=0.5", "--workdir=W"])
    assert argv == ["--config", f"{config_lib.configs_dir()}/cpu.py:tiny", "--config.lr=0.5",
                    "--workdir=W"]
    assert config_lib.command_line(["--config=imagenet:resnet50,steps"]) == [
        f"--config={config_lib.configs_dir()}/imagenet.py:resnet50,steps"]
    with pytest.raises(config_lib.UserError, match="--config is required: a shipped config "
                       r"NAME:ARG \(cifar10, cpu, imagenet"):
        config_lib.command_line(["--workdir=W"])
    with pytest.raises(config_lib.UserError, match="unknown config key 'nope'"):
        config_lib.command_line(["--config", "cpu:tiny", "--config.nope=1"])


@pytest.mark.parametrize("args, message", [
    (["resnet_jax.train", "--config", TINY, "--workdir", "/nonexistent/w", "--config.lr=abc"],
     "error: flag --config.lr=abc: could not convert string to float: 'abc' (--help lists"),
    (["resnet_jax.train", "--config", TINY, "--workdirr", "/nonexistent/w"],
     "error: Unknown command line flag 'workdirr'. Did you mean: workdir? (--help lists"),
    (["resnet_jax.evaluate", "--batch_size=abc"], "error: flag --batch_size=abc: invalid literal"),
    (["resnet_jax.summary", "resnet20", "--image_size", "-5"],
     "error: flag --image_size=-5: -5 is not a positive integer"),
    (["resnet_jax.summary", "resnet20", "--image_size", "0"],
     "error: flag --image_size=0: 0 is not a positive integer"),
    (["resnet_jax.compile", "--config", TINY, "--batch_size", "-4"],
     "error: flag --batch_size=-4: -4 is not a positive integer"),
])
def test_a_bad_flag_is_the_documented_error_line_and_exit_2(args, message):
    """absl printed `FATAL Flags parsing error` and exited 1."""
    proc = _run("-m", *args, env=dict(JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(message), proc.stderr


def test_output_cut_short_by_its_reader_is_no_traceback():
    """`train --describe | head` ended in a BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "resnet_jax.train", "--describe"], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before it writes anything: its first write meets a closed pipe
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and stderr == "", stderr[-2000:]
