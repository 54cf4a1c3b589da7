"""Progress of the long commands (evaluate, analyze, the trainer's log line): images done, rate
and time left, on one line each."""
import math
import sys
import time
from typing import Optional


def hms(seconds: float) -> str:
    """3725.2 -> '1:02:05'; '?' when unknown (no rate yet)."""
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def images_line(done: int, total: int, rate: Optional[float]) -> str:
    """'2500/10000 images, 812 images/s, ETA 0:00:09'; without a rate yet (None or 0), the
    images only, or 'ETA 0:00:00' when all are done."""
    if done >= total:
        return f"{done}/{total} images" + (f", {rate:.0f} images/s" if rate else "") + \
            ", ETA 0:00:00"
    if not rate:
        return f"{done}/{total} images"
    return f"{done}/{total} images, {rate:.0f} images/s, ETA {hms((total - done) / rate)}"


class Checkpoints:
    """analyze's progress over several checkpoints of known image counts, printed to stderr at
    most every `every` seconds and at each checkpoint's end: that checkpoint's images, rate and
    ETA, and the ETA of all (the images of the checkpoints still to do at the rate so far)."""

    def __init__(self, checkpoints: int, images: int, every: float = 10.0, enabled: bool = True):
        self.checkpoints, self.images, self.every, self.enabled = checkpoints, images, every, enabled
        self.finished = 0  # checkpoints done in this process (skipped ones are not counted)
        self.left = checkpoints
        self.seconds = 0.0  # spent on finished checkpoints
        self.name, self.started, self.printed = "", 0.0, 0.0

    def say(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stderr, flush=True)

    def skip(self) -> None:
        self.left -= 1

    def start(self, name: str) -> None:
        self.name, self.started = name, time.perf_counter()
        self.printed = self.started

    def __call__(self, done: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or not (final or now - self.printed >= self.every):
            return
        self.printed, spent = now, now - self.started
        rate_all = (self.finished * self.images + done) / max(self.seconds + spent, 1e-9)
        left_all = ((self.left - 1) * self.images + self.images - done) / rate_all \
            if rate_all > 0 else float("inf")
        print(f"analyze: {self.name} ({self.checkpoints - self.left + 1}/{self.checkpoints}): "
              f"{images_line(done, self.images, done / max(spent, 1e-9))}; all: ETA "
              f"{hms(left_all)}",
              file=sys.stderr, flush=True)

    def end(self) -> None:
        self(self.images, final=True)
        self.finished += 1
        self.left -= 1
        self.seconds += time.perf_counter() - self.started
