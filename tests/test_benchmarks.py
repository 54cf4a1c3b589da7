"""The benchmark entry point: its rows, and one line for bad input."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test here starts processes or trains

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
    for script, name in (("torch_cifar.py", "vgg19"), ("", "resnet20")):
        with bench.pytorch_step(script, "train", name, 128, 2) as step:
            assert step is None


def test_pytorch_steps_take_turns_with_ours(torch_reference):
    """The reference's own train step, one per call from a child process that stays up, taking
    its turn after ours in every round."""
    order = []
    with bench.pytorch_step(str(torch_reference), "train", "plain20", 4, 1) as step:
        ours = lambda: order.append("ours")
        theirs = lambda: (step(), order.append("pytorch"))
        (times,), torch_times = bench.timed_with_pytorch([ours], theirs, warmup=1, repeats=2)
    assert order == ["ours", "pytorch"] + ["ours", "ours", "pytorch", "pytorch"] * 2
    assert len(times) == len(torch_times) == 2
    assert step._proc.returncode == 0 and min(torch_times) > max(times)


def test_a_failing_reference_is_one_clear_error(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("raise SystemExit('no torch here')\n")
    with pytest.raises(RuntimeError, match="(?s)PyTorch reference failed.*no torch here"):
        with bench.pytorch_step(str(script), "train", "resnet20", 4, 1):
            pass


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
    assert order == ["eval", "analyze"] + ["eval", "eval", "analyze", "analyze"] * 3
    assert [len(t) for t in times] == [3, 3] and all(t >= 0 for t in times[0] + times[1])


@pytest.mark.slow
def test_eval_analyze_and_responses_rows(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--models", "resnet20",
                           "--modes", "eval,analyze,responses", "--batch", "8", "--warmup", "1",
                           "--repeats", "2", "--pytorch", "", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {row["mode"]: row for row in json.loads(out.read_text())}
    assert rows["eval"]["unit"] == rows["analyze"]["unit"] == "images/s"
    assert rows["eval"]["value"] > 0 and rows["analyze"]["of_eval"] > 0
    assert rows["responses"]["unit"] == "% of train" and rows["responses"]["value"] > 0
    assert rows["responses"]["metric"] == "1000 images' responses / 2000 steps"


@pytest.mark.slow
def test_analysis_memory_rows():
    """Each figure comes from its own child process: streaming and forward-only both run."""
    spec = importlib.util.spec_from_file_location(
        "benchmarks_analysis_memory", os.path.join(REPO, "benchmarks", "analysis_memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = {row["metric"]: row for row in module.run("resnet20", counts=(8, 24), batch_size=8)}
    assert rows["peak RSS"]["images"] == 24 and rows["peak RSS"]["value"] > 100
    assert rows["analysis throughput"]["value"] > 0
    assert rows["forward-only throughput (BN inference)"]["value"] > 0
    assert "peak RSS growth 8 -> 24 images" in rows


def test_train_row_against_pytorch(tmp_path, torch_reference):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--models", "plain20",
                           "--modes", "train", "--batch", "8", "--warmup", "1", "--repeats", "3",
                           "--pytorch", str(torch_reference), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["mode"] == "train" and row["value"] > 0 and row["pytorch_value"] > 0
    assert row["ratio"] > 0


@pytest.mark.parametrize("tcmalloc", [False, True])
def test_pytorch_gets_our_tcmalloc_only_when_asked(tmp_path, monkeypatch, tcmalloc):
    """By default PyTorch runs as users start it, without the allocator resnet-jax preloads for
    itself; --pytorch_tcmalloc hands it the same one."""
    seen = tmp_path / "ld_preload"
    script = tmp_path / "reference.py"
    script.write_text("import os\n"
                      "def timed(step, warmup, steps): pass\n"
                      "def bench(mode, depths, plain, batch, steps):\n"
                      f"    timed(lambda: open({str(seen)!r}, 'w').write(\n"
                      "        os.environ.get('LD_PRELOAD', '')), 0, 1)\n")
    ours = str(tmp_path / "libtcmalloc_minimal.so.4")  # absent: the loader ignores it
    monkeypatch.setenv("LD_PRELOAD", ours)
    monkeypatch.setenv(bench.PRELOADED, ours)
    with bench.pytorch_step(str(script), "train", "resnet20", 4, 1, tcmalloc) as step:
        step()
    assert (ours in seen.read_text()) == tcmalloc
