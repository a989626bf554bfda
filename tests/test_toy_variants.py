"""The toy Fill and Kontext of toy/variants/ (toy/train_variants.py): the shipped files have FLUX.1 Fill-dev's
and Kontext-dev's key names at the toy's sizes, Fill starts as exactly the dev toy, the edit pairs are real
edits, and a tiny run writes both files, the same bytes twice."""

import random

import pytest
import torch
from safetensors import safe_open

from minflux.conditioning import Condition, conditioned, fill_channels
from minflux.hub import Repo
from minflux.pipeline import load_pipeline
from minflux.sampling import image_ids, text_ids
from minflux.variants import detect_variant
from toy import train_variants
from toy.world import random_scene

MODEL = train_variants.ROOT / "toy" / "model"
VARIANTS = train_variants.ROOT / "toy" / "variants"
TINY_RUN = ["--examples", "16", "--steps", "2", "--batch", "4", "--eval", "2", "--eval-steps", "2",
            "--threads", "1"]


def shapes(path) -> dict[str, tuple[int, ...]]:
    with safe_open(path, "pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def tensors(path) -> dict[str, bytes]:
    with safe_open(path, "pt") as f:
        return {key: f.get_tensor(key).numpy().tobytes() for key in f.keys()}


def official_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """The dev toy's names and shapes, as the official files differ from dev's: Fill-dev only in img_in's 384
    input columns, Kontext-dev not at all."""
    want = shapes(MODEL / "flux1-dev.safetensors")
    if variant == "fill":
        want["img_in.weight"] = (want["img_in.weight"][0], 384)
    return want


@pytest.mark.parametrize("variant", train_variants.VARIANTS)
def test_shipped_variant_has_the_dev_toys_names_and_the_official_variants_shapes(variant):
    assert shapes(VARIANTS / train_variants.FILES[variant]) == official_shapes(variant)


@pytest.mark.parametrize("variant", train_variants.VARIANTS)
def test_shipped_variant_is_told_by_minflux_variants_with_toy_model(variant):
    """Fill by its 384 input channels, Kontext by "kontext" in the file's name."""
    assert detect_variant(Repo(str(MODEL)), VARIANTS / train_variants.FILES[variant]) == variant


def test_fill_starts_as_exactly_the_dev_toy_whatever_its_extra_channels():
    pipe = load_pipeline(str(MODEL))
    fill = train_variants.start_from_dev(pipe.flow, "fill").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 64, generator=g)                                        # (B, Li, 4c): 64×64 px
    extra = fill_channels(torch.randn(2, 16, 8, 8, generator=g), torch.ones(2, 1, 64, 64))
    inputs = dict(txt=torch.randn(2, 7, 64, generator=g), txt_ids=text_ids(2, 7),
                  timesteps=torch.full((2,), 0.6), y=torch.randn(2, 64, generator=g),
                  guidance=torch.full((2,), 3.5))
    with torch.no_grad():
        want = pipe.flow(x, image_ids(2, 64, 64), **inputs)
        got = conditioned(fill, Condition(channels=extra))(x, image_ids(2, 64, 64), **inputs)
    assert torch.equal(got, want)


def test_edit_pairs_change_the_scene_and_keep_one_or_two_shapes():
    rng = random.Random(0)
    for _ in range(500):
        scene = random_scene(rng, 2)
        edited = train_variants.edit_scene(scene, rng)
        assert edited != scene and 1 <= len(edited.shapes) <= 2


@pytest.mark.slow
def test_tiny_run_writes_both_variants_byte_for_byte_the_same_twice(tmp_path):
    logs = []
    for run in ("a", "b"):
        logs.append(train_variants.main(["--out", str(tmp_path / run), *TINY_RUN]))
    for variant, name in train_variants.FILES.items():
        first = tmp_path / "a" / name
        assert shapes(first) == official_shapes(variant)
        assert tensors(first) == tensors(tmp_path / "b" / name)
        assert (tmp_path / "a" / f"{variant}-samples.png").exists()
        assert logs[0][variant]["scores"] == logs[1][variant]["scores"]
