"""A training run's loss log, `<stem>.loss.csv` (step, loss, learning rate, seconds), and its curve,
`<stem>.loss.png`, drawn at each save."""

import contextlib
import csv
import os
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

from iclora.distributed import rank


class LossLog:
    """The log, written by rank 0, each row on disk at once: `tail -f` shows the run. Resumed at step
    `start`, it keeps the earlier rows up to that step (later ones belong to the run that was lost) and its
    clock goes on from the last of them. `losses`: every step's, for the curve."""

    def __init__(self, path: Path, start: int):
        self.path = path
        self.kept = []
        self.begin = None  # set by start_clock, when the steps start
        if start and path.exists():
            with open(path, newline="") as f:
                self.kept = [r for r in csv.reader(f) if r and r[0].isdigit() and int(r[0]) <= start]
        self.losses = [float(r[1]) for r in self.kept]

    def __enter__(self):
        self.file = open(self.path if rank() == 0 else os.devnull, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerows([["step", "loss", "lr", "seconds"], *self.kept])
        return self

    def __exit__(self, *exception):
        with contextlib.suppress(OSError):  # reported by add
            self.file.close()

    def start_clock(self):
        self.begin = time.perf_counter() - (float(self.kept[-1][3]) if self.kept else 0.0)

    def add(self, step: int, loss: float, lr: float):
        """One step's row; a failure to write it (disk full) is a warning, once, and the log stops there:
        training goes on, and the curve still gets every step's loss."""
        self.losses.append(loss)
        if self.writer is None:
            return
        try:
            seconds = time.perf_counter() - self.begin
            self.writer.writerow([step, f"{loss:.6f}", f"{lr:.3g}", f"{seconds:.2f}"])
            self.file.flush()
        except OSError as error:
            print(f"warning: could not write the loss log {self.path} at step {step} ({error.strerror}): "
                  f"it stops there; training goes on", file=sys.stderr)
            self.writer = None


def draw_loss(losses: list[float], path, width: int = 640, height: int = 320):
    """The loss of every step (grey) and its moving average (blue) as a PNG, drawn with pillow."""
    losses = losses * 2 if len(losses) == 1 else losses  # a line needs two points
    decay = min(0.98, max(0.0, 1 - 10 / len(losses)))  # a window of a tenth of the run, at most ~50 steps
    smooth = []
    average = 0.0
    for i, v in enumerate(losses, 1):
        average = decay * average + (1 - decay) * v
        smooth.append(average / (1 - decay**i))  # bias-corrected as Adam's moments: no pull toward 0
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 60, 24, width - 12, height - 28
    low, high = min(losses), max(losses)

    def to_xy(i: int, v: float) -> tuple[float, float]:
        return (left + (right - left) * i / max(1, len(losses) - 1),
                bottom - (bottom - top) * (v - low) / ((high - low) or 1))

    draw.rectangle((left, top, right, bottom), outline="black")
    draw.line([to_xy(i, v) for i, v in enumerate(losses)], fill=(190, 190, 190))
    draw.line([to_xy(i, v) for i, v in enumerate(smooth)], fill=(30, 90, 200), width=2)
    labels = [(f"{high:.3g}", (4, top - 6)), (f"{low:.3g}", (4, bottom - 6)), ("step 1", (left, bottom + 6)),
              (f"step {len(losses)}", (right - 60, bottom + 6)), ("loss (blue: moving average)", (left, 4))]
    for text, xy in labels:
        draw.text(xy, text, fill="black")
    image.save(path, format="PNG")
