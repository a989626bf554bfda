"""A training run's loss log, `<stem>.loss.csv` (step, loss, learning rate, seconds), and its curve,
`<stem>.loss.png`, drawn at each save: every step's loss, its centred average, and the learning rate below."""

import contextlib
import csv
import math
import os
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from iclora.distributed import rank


class LossLog:
    """The log, written by rank 0, each row on disk at once: `tail -f` shows the run. Resumed at step
    `start`, it keeps the earlier rows up to that step (later ones belong to the run that was lost) and its
    clock goes on from the last of them. `losses` and `lrs`: every step's, for the curve."""

    def __init__(self, path: Path, start: int):
        self.path = path
        self.kept = []
        self.begin = None  # set by start_clock, when the steps start
        if start and path.exists():
            with open(path, newline="") as f:
                self.kept = [r for r in csv.reader(f) if r and r[0].isdigit() and int(r[0]) <= start]
        self.losses = [float(r[1]) for r in self.kept]
        self.lrs = [float(r[2]) for r in self.kept]

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
        training goes on, and the curve still gets every step's loss and learning rate."""
        self.losses.append(loss)
        self.lrs.append(lr)
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


# the curve's look: the raw loss faint, its average strong, the learning rate in a strip below
RAW = (200, 200, 200)
AVERAGE = (30, 90, 200)
LR = (220, 120, 30)
GRID = (235, 235, 235)


def centred_average(values: list[float], half: int) -> list[float]:
    """Each value's mean with up to `half` values on each side: a centred window, so the average does not
    lag behind the curve. Near the ends it shrinks to as many values as there are on both sides (the first and
    last values are their own average), so that it stays centred there too."""
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    average = []
    for i in range(len(values)):
        k = min(half, i, len(values) - 1 - i)
        average.append((sums[i + k + 1] - sums[i - k]) / (2 * k + 1))
    return average


def round_ticks(low: float, high: float, most: int = 6) -> list[float]:
    """At most `most` round values from low to high (at least two where the span allows), 1, 2 or 5 times a
    power of ten apart."""
    power = math.floor(math.log10((high - low) / most))
    for step in [m * 10.0**p for p in (power, power + 1) for m in (1, 2, 5)]:
        first = math.ceil(low / step)
        last = math.floor(high / step)
        if last - first < most:
            return [k * step for k in range(first, last + 1)]
    return [low, high]  # not reached: 10 ** (power + 1) is more than a `most`th of the span


def log_ticks(low: float, high: float, most: int = 6) -> list[float]:
    """Round values from low to high for a log axis: the powers of ten, with 2 and 5 times them (or 3 times)
    where they fit, every second or third power where they do not; the linear ones where the span holds less
    than two."""
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for mantissas in ((1, 2, 5), (1, 3), (1,)):
        ticks = [m * 10.0**p for p in decades for m in mantissas if low <= m * 10.0**p <= high]
        if len(ticks) <= most:
            return ticks if len(ticks) >= 2 else round_ticks(low, high, most)
    every = math.ceil(len(ticks) / most)
    return [tick for tick in ticks if round(math.log10(tick)) % every == 0]  # 1e-3, 1, 1e3: 1 among them


class Axes:
    """A box on the picture, (left, top, right, bottom) in pixels, spanning steps 0 to `steps` across and
    low to high up, on a log scale if `log`."""

    def __init__(self, box: tuple[int, int, int, int], steps: int, low: float, high: float, log: bool):
        self.box = box
        self.steps = steps
        self.log = log
        self.low = self.scale(low)
        self.high = self.scale(high)

    def scale(self, value: float) -> float:
        return math.log10(value) if self.log else value

    def x(self, step: float) -> float:
        left, _, right, _ = self.box
        return left + (right - left) * step / self.steps

    def y(self, value: float) -> float:
        _, top, _, bottom = self.box
        return bottom - (bottom - top) * (self.scale(value) - self.low) / (self.high - self.low)


def loss_range(losses: list[float]) -> tuple[float, float, bool]:
    """The loss axis: its low and high ends, a little beyond the losses', and whether it is logarithmic (when
    every loss is positive and the largest is at least ten times the smallest)."""
    low = min(losses)
    high = max(losses)
    if low > 0 and high >= 10 * low:
        margin = (high / low) ** 0.03
        return low / margin, high * margin, True
    margin = 0.03 * (high - low) or 0.1 * abs(low) or 1.0  # a constant loss sits in the middle
    return low - margin, high + margin, False


def draw_curve(draw: ImageDraw.ImageDraw, axes: Axes, values: list[float], colour, width: int):
    """values[i] at step i + 1; a run of one step is a dot."""
    points = [(axes.x(i + 1), axes.y(v)) for i, v in enumerate(values)]
    if len(points) == 1:
        x, y = points[0]
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        return
    draw.line(points, fill=colour, width=width, joint="curve")


def draw_y_ticks(draw: ImageDraw.ImageDraw, axes: Axes, ticks: list[float], font):
    """A grid line and a label left of the box at each tick, then the box."""
    left, top, right, bottom = axes.box
    for tick in ticks:
        y = axes.y(tick)
        draw.line((left, y, right, y), fill=GRID)
        draw.text((left - 6, y), f"{tick:.4g}", fill="black", font=font, anchor="rm")
    draw.rectangle(axes.box, outline="black")


def draw_x_ticks(draw: ImageDraw.ImageDraw, boxes: list[Axes], steps: int, font):
    """Whole steps at round values: a grid line through every box, a label under the last."""
    for tick in round_ticks(0, steps):
        if tick != int(tick):
            continue  # a run of a few steps: no step 0.5
        for axes in boxes:
            draw.line((axes.x(tick), axes.box[1] + 1, axes.x(tick), axes.box[3] - 1), fill=GRID)
        under = (boxes[-1].x(tick), boxes[-1].box[3] + 4)
        draw.text(under, f"{tick:.0f}", fill="black", font=font, anchor="mt")


def vertical_text(image: Image.Image, text: str, centre: tuple[float, float], font):
    """`text` turned a quarter to the left, centred on `centre`, (x, y): an axis' name."""
    label = Image.new("RGB", font.getbbox(text)[2:], "white")
    ImageDraw.Draw(label).text((0, 0), text, fill="black", font=font)
    label = label.rotate(90, expand=True)
    image.paste(label, (round(centre[0] - label.width / 2), round(centre[1] - label.height / 2)))


def draw_loss(losses: list[float], lrs: list[float], path, width: int = 800, height: int = 400):
    """The loss of every step (faint grey) and its centred average (blue; `centred_average`, a fortieth of the
    run on each side, one step at least), on a log axis when the losses span ten times or more, and below them
    the learning rate, as a PNG drawn with pillow. The title holds the mean of the last 100 steps."""
    steps = len(losses)
    low, high, log = loss_range(losses)
    loss_axes = Axes((70, 46, width - 20, height - 118), steps, low, high, log)
    lr_axes = Axes((70, height - 104, width - 20, height - 46), steps, 0.0, max(lrs) or 1.0, False)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    draw_y_ticks(draw, loss_axes, log_ticks(low, high) if log else round_ticks(low, high), font)
    draw_y_ticks(draw, lr_axes, [0.0, max(lrs)], font)
    draw_x_ticks(draw, [loss_axes, lr_axes], steps, font)
    half = max(1, steps // 40)
    draw_curve(draw, loss_axes, losses, RAW, 1)
    draw_curve(draw, loss_axes, centred_average(losses, half), AVERAGE, 2)
    draw_curve(draw, lr_axes, lrs, LR, 2)
    vertical_text(image, "loss" + (" (log scale)" if log else ""), (14, (46 + height - 118) / 2), font)
    vertical_text(image, "lr", (14, height - 75), font)
    draw.text(((70 + width - 20) / 2, height - 8), "step", fill="black", font=font, anchor="ms")
    last = losses[-100:]
    title = f"loss {sum(last) / len(last):.4g}: the mean of the last {len(last)} steps, of {steps}"
    draw.text((70, 6), title, fill="black", font=ImageFont.load_default(size=15))
    legend = [("each step", (150, 150, 150)), (f"centred mean of {2 * half + 1}", AVERAGE),
              ("learning rate", LR)]
    x = width - 20
    for text, colour in reversed(legend):
        draw.text((x, 40), text, fill=colour, font=font, anchor="rs")  # under the title
        x -= font.getlength(text) + 16
    image.save(path, format="PNG")
