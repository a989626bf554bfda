"""The loss log and its curve (iclora/loss_log.py): the picture's size, its lines and axes on the odd runs
(one step, a constant loss, a span of many powers of ten, a zero loss), a resumed log's learning rates."""

import numpy as np
import pytest
from PIL import Image

from iclora.loss_log import (
    AVERAGE,
    LR,
    LossLog,
    centred_average,
    draw_loss,
    log_ticks,
    loss_range,
    round_ticks,
)


def drawn(tmp_path, losses, lrs=None, **size) -> np.ndarray:
    path = tmp_path / "curve.png"
    draw_loss(losses, lrs or [1e-4] * len(losses), path, **size)
    return np.asarray(Image.open(path).convert("RGB"))


def rows_of(picture: np.ndarray, colour) -> np.ndarray:
    """The rows below the title and legend (the first 40) that hold a pixel of `colour`."""
    return 40 + np.flatnonzero((picture[40:] == colour).all(-1).any(1))


def test_the_curve_is_a_png_of_the_asked_size(tmp_path):
    draw_loss([1.0, 0.5, 0.4], [1e-4] * 3, tmp_path / "curve.png", width=640, height=320)
    with Image.open(tmp_path / "curve.png") as image:
        assert (image.format, image.size) == ("PNG", (640, 320))


def test_the_curve_is_800_by_400_by_default(tmp_path):
    assert drawn(tmp_path, [1.0, 0.5, 0.4]).shape == (400, 800, 3)


def test_a_run_of_one_step_is_drawn_as_a_dot(tmp_path):
    picture = drawn(tmp_path, [0.5])
    assert 3 <= len(rows_of(picture, AVERAGE)) <= 6


def test_a_constant_loss_is_a_flat_line_in_the_middle_of_a_linear_axis(tmp_path):
    assert loss_range([0.3] * 50) == (pytest.approx(0.27), pytest.approx(0.33), False)
    rows = rows_of(drawn(tmp_path, [0.3] * 50), AVERAGE)
    assert rows.max() - rows.min() <= 2  # flat: as high as the line is wide
    assert abs(rows.mean() - (46 + 282) / 2) <= 2  # the loss box spans rows 46 to 282


def test_a_loss_spanning_twelve_orders_of_magnitude_fills_a_log_axis(tmp_path):
    losses = list(np.geomspace(1e6, 1e-6, 200))
    low, high, log = loss_range(losses)
    assert log and low < 1e-6 and high > 1e6
    rows = rows_of(drawn(tmp_path, losses), AVERAGE)
    assert rows.min() < 60 and rows.max() > 270  # top to bottom of the loss box, each step on the picture


def test_a_zero_loss_keeps_the_axis_linear(tmp_path):
    losses = [1e6, 1.0, 0.0]
    assert loss_range(losses)[2] is False  # no log of zero
    assert len(rows_of(drawn(tmp_path, losses), AVERAGE)) > 100


def test_the_learning_rate_is_drawn_in_the_strip_below_the_loss(tmp_path):
    lrs = [1e-3 * min(1.0, (step + 1) / 10) for step in range(40)]  # warm-up, then constant
    rows = rows_of(drawn(tmp_path, [1.0] * 40, lrs), LR)
    assert rows.min() >= 296 and rows.max() <= 354  # the strip spans rows 296 to 354


def test_the_centred_average_of_a_straight_line_is_the_line_itself_up_to_its_ends():
    line = [3.0 - 0.01 * step for step in range(100)]
    assert centred_average(line, 10) == pytest.approx(line)  # no lag, not even where the window shrinks


def test_the_centred_average_of_noise_around_a_level_is_near_that_level():
    noise = np.random.default_rng(0).normal(0.5, 0.1, 1000)
    assert np.abs(np.array(centred_average(list(noise), 25))[25:-25] - 0.5).max() < 0.05


def test_the_loss_axis_has_round_ticks_between_its_ends():
    assert round_ticks(0.13, 4.1) == pytest.approx([1, 2, 3, 4])
    assert round_ticks(0.27, 0.33) == pytest.approx([0.28, 0.30, 0.32])
    assert round_ticks(0, 1000) == pytest.approx([0, 200, 400, 600, 800, 1000])


def test_a_log_axis_has_ticks_at_one_two_and_five_times_powers_of_ten():
    assert log_ticks(0.12, 4.4) == pytest.approx([0.2, 0.5, 1, 2])
    assert log_ticks(1e-7, 2e7) == pytest.approx([1e-6, 1e-3, 1, 1e3, 1e6])


def test_a_resumed_log_keeps_the_learning_rates_of_its_kept_rows(tmp_path):
    path = tmp_path / "run.loss.csv"
    path.write_text("step,loss,lr,seconds\n1,0.9,1e-05,0.5\n2,0.8,2e-05,1.0\n3,0.7,3e-05,1.5\n")
    log = LossLog(path, start=2)
    with log:
        log.start_clock()
        log.add(3, 0.6, 4e-5)
    assert log.lrs == [1e-5, 2e-5, 4e-5]
    assert log.losses == [0.9, 0.8, 0.6]
