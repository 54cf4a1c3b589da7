"""resnet_jax.cli: the start-up every command shares; here, that a machine without TPU chips
never starts libtpu (installed for deviceless compiles), so CPU commands print nothing of it."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from resnet_jax import cli
from resnet_jax.errors import UserError


def test_platforms_leave_out_an_absent_tpu_and_respect_the_user():
    assert cli.platforms_without_absent_tpu({"JAX_PLATFORMS": "tpu"}) == ""
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail("libtpu is not installed (the test extra brings it)")
    if not os.path.exists("/dev/accel0") and not os.path.exists("/dev/vfio"):
        assert cli.platforms_without_absent_tpu({}).split(",")[-1] == "cpu"
        assert "tpu" not in cli.platforms_without_absent_tpu({})


@pytest.mark.slow
def test_a_cpu_command_prints_nothing_of_libtpu():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    done = subprocess.run([sys.executable, "-m", "resnet_jax.summary", "resnet20",
                           "--image_size", "32"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resnet20" in done.stdout.lower() or "ResNet-20" in done.stdout
    assert "TPU" not in done.stderr and "libtpu" not in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("args, positional, message", [
    (["x"], 0, "unexpected arguments ['x']; USAGE"),
    (["a", "b"], 1, "unexpected arguments ['b']; USAGE"),
    ([], 1, "USAGE"),
    ([], (1, None), "USAGE"),
])
def test_arguments_besides_the_flags_are_counted_in_one_place(args, positional, message):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        cli.check_positional(args, positional, "USAGE")


@pytest.mark.parametrize("args, positional", [([], 0), (["a"], 1), (["a", "b", "c"], (1, None))])
def test_the_arguments_a_tool_takes_pass(args, positional):
    cli.check_positional(args, positional, "USAGE")


def test_an_unexpected_argument_is_one_error_line_and_exit_2(monkeypatch, capsys):
    """train and compile raised absl's UsageError: the module's docstring and exit 1. (absl's
    own app.run, which installs its log handler for good, is left to the CLI tests.)"""
    from absl import app
    monkeypatch.setattr(app, "run", lambda main, flags_parser: sys.exit(main(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["resnet-jax-train", "extra"])
    monkeypatch.setattr(sys.modules["__main__"], "__doc__", sys.modules["__main__"].__doc__)
    with pytest.raises(SystemExit) as e:
        cli.absl_run(lambda argv: pytest.fail("main ran"), cli.__name__, positional=0)
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: unexpected arguments ['extra']; options go as "
                                       "--flag=value\n")
