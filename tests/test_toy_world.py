"""The toy world: seeded scenes, canonical captions, reading clean and degraded renders back, the recolour
task's scores, and the dataset script. Pure numpy/PIL on small images; no model."""

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from iclora.data import PanelSetDataset
from toy.world import (
    BLIND_CAPTION,
    COLOURS,
    PALETTE,
    RECOLOUR,
    SET_SUMMARY,
    Scene,
    Shape,
    analyse,
    caption,
    caption_match,
    make_set,
    panel_consistency,
    random_scene,
    recolour,
    render,
    rule_score,
)

ROOT = Path(__file__).resolve().parents[1]


def degrade(image, rng, blur=1.0, sigma=20.0):
    """What a blurry, noisy generator might make of a clean render: a Gaussian blur, then pixel noise on
    the 0..255 scale."""
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    pixels = pixels + rng.normal(0.0, sigma, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def test_scenes_and_sets_are_determined_by_the_seed():
    assert [random_scene(random.Random(7)) for _ in range(3)] == [random_scene(random.Random(7))] * 3
    (a, caption_a), (b, caption_b) = make_set(random.Random(7)), make_set(random.Random(7))
    assert caption_a == caption_b and a.tobytes() == b.tobytes()
    assert len({caption(random_scene(random.Random(seed))) for seed in range(20)}) > 15


def test_random_scenes_keep_the_rules():
    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng)
        assert 1 <= len(scene.shapes) <= 3
        assert len({shape.cell for shape in scene.shapes}) == len(scene.shapes)
        assert all(shape.colour != scene.background for shape in scene.shapes)


def test_scene_rejects_bad_values():
    with pytest.raises(ValueError, match="colour 'purple'"):
        Shape("circle", "purple", "large", "center")
    with pytest.raises(ValueError, match="share a cell"):
        Scene("red", (Shape("circle", "blue", "large", "top"), Shape("square", "blue", "small", "top")))
    with pytest.raises(ValueError, match="background colour 'red'"):
        Scene("red", (Shape("circle", "red", "large", "top"),))


def test_caption_is_canonical_and_mentions_every_shape():
    circle = Shape("circle", "red", "large", "top left")
    square = Shape("square", "blue", "small", "center")
    triangle = Shape("triangle", "white", "small", "bottom right")
    assert caption(Scene("yellow", (square, circle))) == caption(Scene("yellow", (circle, square))) == (
        "a large red circle at the top left and a small blue square at the center, on a yellow background")
    assert caption(Scene("black", (triangle, square, circle))) == (
        "a large red circle at the top left, a small blue square at the center and "
        "a small white triangle at the bottom right, on a black background")
    rng = random.Random(1)
    for _ in range(50):
        scene = random_scene(rng)
        text = caption(scene)
        for shape in scene.shapes:
            assert f"a {shape.size} {shape.colour} {shape.kind} at the {shape.cell}" in text
        assert text.endswith(f"on a {scene.background} background")


def test_render_is_flat_palette_colours():
    image = render(random_scene(random.Random(2)), size=64)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert {colour for _, colour in image.getcolors()} <= set(PALETTE.values())


def test_analyse_reads_clean_renders_exactly():
    rng = random.Random(3)
    for size in (64, 40, 128):
        for _ in range(100 if size == 64 else 20):
            scene = random_scene(rng)
            assert analyse(render(scene, size)) == scene, caption(scene)


def test_analyse_survives_blur_and_noise():
    rng, noise = random.Random(4), np.random.default_rng(4)
    shapes = background = colour_and_cell = kind = size = extras = 0
    for _ in range(200):
        scene = random_scene(rng)
        seen = analyse(degrade(render(scene, 64), noise, blur=1.0, sigma=20.0))
        found = {shape.cell: shape for shape in seen.shapes}
        background += seen.background == scene.background
        extras += len(found.keys() - {shape.cell for shape in scene.shapes})
        for shape in scene.shapes:
            other = found.get(shape.cell)
            shapes += 1
            colour_and_cell += other is not None and other.colour == shape.colour
            kind += other is not None and other.kind == shape.kind
            size += other is not None and other.size == shape.size
    print(f"\n200 scenes, blur 1 + noise 20, {shapes} shapes: background {background / 200:.3f}, colour+cell "
          f"{colour_and_cell / shapes:.3f}, size {size / shapes:.3f}, kind {kind / shapes:.3f}, "
          f"extra shapes {extras}")
    assert background == 200 and extras == 0
    assert colour_and_cell / shapes >= 0.95 and size / shapes >= 0.95
    assert kind / shapes >= 0.85


def test_caption_match_counts_facts():
    scene = Scene("yellow", (Shape("circle", "red", "large", "top left"),
                             Shape("square", "blue", "small", "center")))
    assert caption_match(render(scene), scene) == 1.0
    wrong_kind = Scene("yellow", (Shape("triangle", "red", "large", "top left"), scene.shapes[1]))
    # background + 2 shapes x (cell, colour, kind, size)
    assert caption_match(render(wrong_kind), scene) == 8 / 9
    extra = Scene("yellow", scene.shapes + (Shape("circle", "green", "small", "bottom"),))
    assert caption_match(render(extra), scene) == 9 / 10  # an unasked-for shape is one failed fact
    assert caption_match(render(Scene("green", ())), scene) == 0.0
    assert caption_match(Image.new("RGB", (64, 64), (128, 128, 128)), scene) == 0.0  # grey: no palette pixel


def test_recolour_is_a_derangement_that_keeps_layout():
    assert sorted(RECOLOUR) == sorted(RECOLOUR.values()) == sorted(COLOURS)
    assert all(before != after for before, after in RECOLOUR.items())
    scene = random_scene(random.Random(5))
    mapped = recolour(scene)
    assert [(s.kind, s.size, s.cell) for s in mapped.shapes] == [
        (s.kind, s.size, s.cell) for s in scene.shapes]
    assert mapped.background == RECOLOUR[scene.background]


def test_rule_score_is_one_for_true_pairs_and_low_otherwise():
    rng = random.Random(6)
    unrelated = []
    for _ in range(50):
        left, other = random_scene(rng), random_scene(rng)
        assert rule_score(render(left), render(recolour(left))) == 1.0
        assert rule_score(render(left), render(left)) == 0.0  # the identity map moves no colour
        unrelated.append(rule_score(render(left), render(other)))
    print(f"\nrule_score of unrelated pairs: mean {np.mean(unrelated):.3f}, max {max(unrelated):.3f}")
    assert unrelated[0] < 0.5 and np.mean(unrelated) < 0.15


def test_make_set_joins_two_panels_with_a_joint_caption():
    joined, text = make_set(random.Random(8), panel_size=48)
    assert joined.size == (96, 48)
    left = random_scene(random.Random(8))  # make_set draws the left scene first
    assert text == f"{SET_SUMMARY}; [LEFT] {caption(left)}; [RIGHT] {caption(recolour(left))}"
    assert text.startswith("[TWO-PANEL] ") and text.count("[LEFT] ") == text.count("[RIGHT] ") == 1


def test_panel_consistency_of_a_true_set_is_perfect():
    joined, _ = make_set(random.Random(9))
    left = random_scene(random.Random(9))
    assert panel_consistency(joined, left) == {"caption_left": 1.0, "caption_right": 1.0, "rule": 1.0}
    swapped = Image.new("RGB", joined.size)
    swapped.paste(joined.crop((64, 0, 128, 64)), (0, 0))
    swapped.paste(joined.crop((0, 0, 64, 64)), (64, 0))
    assert panel_consistency(swapped, left)["rule"] < 0.5


def test_with_a_given_left_panel_the_rule_is_checked_against_it_not_against_the_canvas_copy():
    joined, _ = make_set(random.Random(9))
    left = random_scene(random.Random(9))
    smudged = joined.copy()
    smudged.paste((255, 255, 255) if left.background != "white" else (0, 0, 0), (0, 0, 64, 64))  # copy lost
    assert panel_consistency(smudged, left)["rule"] < 0.5
    assert panel_consistency(smudged, left, given_left=render(left))["rule"] == 1.0


def test_blind_recolour_sets_are_the_recolour_sets_with_one_caption_for_all():
    image, text = make_set(random.Random(4), task="blind_recolour")
    assert image == make_set(random.Random(4))[0]
    assert text == BLIND_CAPTION == ("[TWO-PANEL] the same scene in two colour schemes; [LEFT] the scene; "
                                     "[RIGHT] the same scene")


@pytest.mark.slow
def test_make_sets_writes_readable_pairs(tmp_path):
    script = [sys.executable, str(ROOT / "toy" / "make_sets.py")]
    subprocess.run(script + ["--out", str(tmp_path / "sets"), "--count", "5", "--size", "64", "--seed", "0"],
                   check=True, capture_output=True)
    subprocess.run(script + ["--out", str(tmp_path / "scenes"), "--single", "4", "--size", "32",
                             "--seed", "1"], check=True, capture_output=True)
    for folder, prefix, count, size in (("sets", "set", 5, (128, 64)), ("scenes", "scene", 4, (32, 32))):
        images = sorted((tmp_path / folder).glob("*.png"))
        assert [p.name for p in images] == [f"{prefix}_{i:03d}.png" for i in range(count)]
        for path in images:
            with Image.open(path) as image:
                assert image.size == size
            assert path.with_suffix(".txt").read_text().strip()
    dataset = PanelSetDataset(tmp_path / "sets", resolution=96)  # 96**2 holds the exact 2:1 bucket (64, 128)
    assert len(dataset) == 5 and {sample.bucket for sample in dataset.samples} == {(64, 128)}
    first_set = (tmp_path / "sets" / "set_000.txt").read_text().strip()
    # make_sets.py draws 1-2 shapes by default
    assert first_set == make_set(random.Random(0), max_shapes=2)[1]
    help_text = subprocess.run(script + ["--help"], check=True, capture_output=True, text=True).stdout
    assert all(flag in help_text
               for flag in ("--out", "--count", "--single", "--size", "--seed", "--max-shapes"))

