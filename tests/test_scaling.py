"""benchmarks/scaling.py: the figures of docs/scaling.md come from the modules and are current."""
import dataclasses
import importlib.util
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# benchmarks/ is a folder of the checkout, not part of the installed package.
_spec = importlib.util.spec_from_file_location("benchmarks_scaling", REPO / "benchmarks" / "scaling.py")
scaling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scaling)


@pytest.mark.slow
def test_doc_holds_the_current_tables():
    doc = (REPO / "docs" / "scaling.md").read_text()
    assert scaling.replace_tables(doc, scaling.tables()) == doc, \
        "docs/scaling.md is stale: run python -m benchmarks.scaling --write docs/scaling.md"


@pytest.mark.parametrize("name, size, layers", [
    ("resnet56", 32, 55),   # every conv but none of the option-A shortcuts has a BN
    ("resnet50", 224, 53),  # 49 convs on the main path + 4 projection shortcuts
    ("vgg19", 224, 0),
])
def test_bn_layers_counts_scanned_blocks(name, size, layers):
    assert scaling.bn_layers(name, size)[0] == layers


def test_step_time_model():
    row = scaling.work(scaling.Workload("resnet20", 32, 128, 64_000, 0.05))
    assert row["train_flops"] == 6 * row["mult_adds"] * 128
    assert row["grad_bytes"] == 4 * row["params"]
    hw = scaling.HARDWARE[0]
    one = scaling.step_time(row, dataclasses.replace(hw, devices=1))
    assert one["allreduce"] == one["bn"] == 0  # nothing to reduce with
    two = scaling.step_time(row, dataclasses.replace(hw, devices=2))
    assert two["compute"] == pytest.approx(one["compute"] / 2)
    assert two["bn"] == pytest.approx(2 * row["bn_layers"] * scaling.COLLECTIVE_LATENCY)
    assert two["allreduce"] == pytest.approx(row["grad_bytes"] / hw.allreduce_bw)
    assert two["images_per_s"] == pytest.approx(128 / two["total"])


def cli(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.scaling", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
                               "PATH": "/usr/bin:/bin"})


def test_bad_input_is_one_line(tmp_path):
    unmarked = tmp_path / "notes.md"
    unmarked.write_text("# notes without the generated section\n")
    for args, message in [
        (["--cifar_utilization=0"], "--cifar_utilization must be in (0, 1]"),
        ([f"--write={tmp_path}/missing.md"], "cannot read"),
        ([f"--write={unmarked}"], "has no '<!-- begin: python -m benchmarks.scaling -->'"),
    ]:
        result = cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert unmarked.read_text() == "# notes without the generated section\n"
