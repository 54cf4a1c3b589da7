"""The one writer of the files a run appends to (metrics.jsonl): whole lines or nothing.

A line goes out in one `os.write` on an O_APPEND descriptor; a write that fails part-way (a full
disk) is cut back to the file's size before it, and opening a file whose last line a killed
process left half-written drops that half line. A reader therefore only ever sees whole lines,
and a resumed run's first line never lands on the end of another. Values that JSON cannot hold
(NaN, Infinity) are written as null (`dumps`). Every JSON file a tool writes goes through here
too (`write_json`: evaluate's and compile's --json, analyze's outputs).
"""
import json
import math
import os

from resnet_jax import storage


def finite_or_none(obj):
    """`obj` with every float that is NaN or infinite replaced by None (JSON's null)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """Standard JSON (never the bare NaN/Infinity that json.dumps writes by default)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def write_json(path: str, obj) -> None:
    """Write `obj` as JSON (`dumps`), local or on gs://, so that a reader never sees half a
    file: every JSON file the tools write."""
    storage.write(path, dumps(obj, indent=1) + "\n")


class LineLog:
    """Appends whole lines to a local file; see the module's docstring."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._drop_partial_line()

    def _drop_partial_line(self, chunk: int = 1 << 16) -> None:
        end = os.fstat(self.fd).st_size
        with open(self.path, "rb") as f:
            pos = end
            while pos > 0:
                start = max(0, pos - chunk)
                f.seek(start)
                block = f.read(pos - start)
                if pos == end and block.endswith(b"\n"):
                    return
                newline = block.rfind(b"\n")
                if newline >= 0:
                    os.ftruncate(self.fd, start + newline + 1)
                    return
                pos = start
        if end:
            os.ftruncate(self.fd, 0)  # one half line and nothing before it

    def append(self, line: str) -> None:
        """Write `line` (ending in a newline) whole, or raise OSError leaving the file as it was."""
        data = line.encode()
        assert data.endswith(b"\n"), "whole lines only"
        size = os.fstat(self.fd).st_size
        try:
            written = os.write(self.fd, data)
            if written != len(data):
                raise OSError(28, f"No space left on device (wrote {written} of {len(data)} bytes)")
        except OSError:
            try:
                os.ftruncate(self.fd, size)
            except OSError:
                pass  # the next open drops the partial line
            raise

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
