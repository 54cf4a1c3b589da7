"""The run's appended files: whole lines or nothing, and standard JSON."""
import json
import os

import pytest

from resnet_jax import lines, periodic, workdir


def test_a_write_that_fails_part_way_leaves_whole_lines_and_the_rerun_appends_cleanly(
        tmp_path, monkeypatch):
    """Disk full mid-run left half a line; the rerun's first row landed on its end
    (`"lr": 0.1000000014{"step": 16, ...`) and plots refused the file."""
    writer = periodic.MetricWriter(str(tmp_path), True)
    writer.write(1, dict(loss=2.5, lr=0.1))
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lines.os, "write", half_then_full)
    with pytest.raises(workdir.WriteFailed, match="No space left on device"):
        writer.write(2, dict(loss=2.4, lr=0.1))
    monkeypatch.setattr(lines.os, "write", real_write)
    writer.close()
    path = tmp_path / "metrics.jsonl"
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [1]
    with open(path, "a") as f:  # what a SIGKILL mid-write would leave
        f.write('{"step": 2, "loss": 2.4, "lr": 0.10000')
    again = periodic.MetricWriter(str(tmp_path), True)
    again.write(16, dict(loss=float("nan"), lr=float("inf")))
    again.close()
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 16]
    assert rows[1]["loss"] is None and rows[1]["lr"] is None  # standard JSON, never NaN/Infinity


def test_a_file_holding_only_half_a_line_is_emptied(tmp_path):
    (tmp_path / "m").write_text('{"step": 1, "lo')
    log = lines.LineLog(tmp_path / "m")
    log.append('{"step": 1}\n')
    log.close()
    assert (tmp_path / "m").read_text() == '{"step": 1}\n'
    assert lines.dumps({"a": [float("-inf"), 1.5]}) == '{"a": [null, 1.5]}'
