"""The benchmark entry point: its rows, and one line for bad input."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# benchmarks/ is a folder of the checkout, not part of the installed package.
_spec = importlib.util.spec_from_file_location("benchmarks_run", os.path.join(REPO, "benchmarks", "run.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_rows_carry_pytorch_ratio_only_where_pytorch_ran():
    row = bench.make_row("resnet20", "train", "train step", 300.0, "images/s", 600.0)
    assert (row["pytorch_value"], row["ratio"]) == (600.0, 0.5)
    assert "ratio" not in bench.make_row("resnet20", "compile", "train step", 9.0, "s")
    assert "0.50x" in bench.format_row(row)


def test_pytorch_is_asked_only_for_its_own_nets():
    assert bench.torch_images_per_s("torch_cifar.py", "train", "vgg19", 128, 1, 2) is None
    assert bench.torch_images_per_s("", "train", "resnet20", 128, 1, 2) is None


@pytest.mark.parametrize("args,message", [
    (["--models", "resnet21"], "unknown model 'resnet21'"),
    (["--modes", "trian"], "unknown mode 'trian'"),
    (["--pytorch", "/nonexistent/torch_cifar.py"], "is not a file"),
    (["--repeats", "0"], "must be positive"),
])
def test_bad_input_is_one_line(args, message):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_interleaved_calls_take_turns_after_warmup():
    order = []
    calls = [lambda: order.append("eval"), lambda: order.append("analyze")]
    times = bench.interleaved_seconds(calls, warmup=1, repeats=3)
    assert order == ["eval", "analyze"] * 4
    assert [len(t) for t in times] == [3, 3] and all(t >= 0 for t in times[0] + times[1])


def test_eval_and_analyze_rows(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--models", "resnet20",
                           "--modes", "eval,analyze", "--batch", "8", "--warmup", "1",
                           "--repeats", "2", "--pytorch", "", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {row["mode"]: row for row in json.loads(out.read_text())}
    assert rows["eval"]["unit"] == rows["analyze"]["unit"] == "images/s"
    assert rows["eval"]["value"] > 0 and rows["analyze"]["of_eval"] > 0
