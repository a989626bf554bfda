"""sample.py on tiny FLUX.1 Fill and Kontext checkpoints in the official layouts gives diffusers'
FluxFillPipeline and FluxKontextPipeline images, per pixel, for the same seeds; and its Fill and Kontext
inputs are refused clearly, before any weight loads, when they cannot work."""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline, FluxKontextPipeline
from PIL import Image, ImageDraw, ImageOps

import sample
from minflux import hub
from minflux.png_settings import SETTINGS_KEY
from tests.tiny_repo import write_tiny_repo

PROMPT = "a small red circle above a blue square, on a yellow background"


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("variant-repos")
    return {(variant, layout): write_tiny_repo(root / f"{variant}-{layout}", layout=layout, seed=5,
                                               variant=variant)
            for variant in ("fill", "kontext") for layout in ("bfl", "diffusers")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, repos):
    """diffusers' own reading of the diffusers-layout repos (the BFL-layout ones hold the same weights)."""
    return {"fill": FluxFillPipeline.from_pretrained(repos["fill", "diffusers"], dtype=torch.float32),
            "kontext": FluxKontextPipeline.from_pretrained(repos["kontext", "diffusers"],
                                                           dtype=torch.float32)}


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random RGB picture (the tiny VAE needs no detail to tell two apart)."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


def mask_image(width: int, height: int, box) -> Image.Image:
    """Black, with a white (paint) rectangle `box` (left, top, right, bottom) drawn soft-edged."""
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask.resize((width // 2, height // 2)).resize((width, height), Image.Resampling.BILINEAR)


def save(image: Image.Image, path):
    image.save(path)
    return str(path)


def ours(repo, tmp_path, *flags, seed=7, steps=3) -> list[np.ndarray]:
    paths = sample.main(["--model", str(repo), "--prompt", PROMPT, "--steps", str(steps), "--seed", str(seed),
                         "--out", str(tmp_path / "out.png"), "--device", "cpu", *flags])
    return [np.asarray(Image.open(p), dtype=np.int16) for p in paths]


def assert_same(label, got: np.ndarray, want: np.ndarray):
    assert got.shape == want.shape, label
    diff = np.abs(got - want)
    print(f"{label}: max pixel diff {diff.max()}, mean {diff.mean():.4f}, pixel std {want.std():.1f}")
    assert want.std() > 5, "the reference image is flat: the test would prove nothing"
    assert diff.max() <= 1, label


def fill_reference(pipe, image, mask, height, width, seed=7, steps=3, guidance=30.0, strength=1.0):
    out = pipe(PROMPT, image=image, mask_image=mask, height=height, width=width, num_inference_steps=steps,
               guidance_scale=guidance, strength=strength, generator=torch.Generator().manual_seed(seed),
               max_sequence_length=512)
    return np.asarray(out.images[0], dtype=np.int16)


def kontext_reference(pipe, context, height, width, auto_resize, seed=7, steps=3, guidance=2.5):
    out = pipe(image=context, prompt=PROMPT, height=height, width=width, max_area=height * width,
               _auto_resize=auto_resize, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), max_sequence_length=512)
    return np.asarray(out.images[0], dtype=np.int16)


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_fill_with_image_and_mask_gives_diffusers_image(repos, reference, tmp_path, layout):
    image = picture(80, 48, seed=1)
    mask = mask_image(80, 48, (24, 8, 63, 39))
    want = fill_reference(reference["fill"], image, mask, 48, 80)
    got = ours(repos["fill", layout], tmp_path, "--image", save(image, tmp_path / "i.png"),
               "--mask", save(mask, tmp_path / "m.png"))
    assert_same(f"Fill {layout} vs FluxFillPipeline", got[0], want)


def test_fill_at_strength_below_one_gives_diffusers_image(repos, reference, tmp_path):
    image = picture(64, 64, seed=2)
    mask = mask_image(64, 64, (0, 0, 31, 63))
    want = fill_reference(reference["fill"], image, mask, 64, 64, steps=4, strength=0.6)
    got = ours(repos["fill", "bfl"], tmp_path, "--image", save(image, tmp_path / "i.png"),
               "--mask", save(mask, tmp_path / "m.png"), "--strength", "0.6", steps=4)
    assert_same("Fill strength 0.6 vs FluxFillPipeline", got[0], want)


def test_fill_paints_the_panels_not_given_as_diffusers_does_on_the_same_image_and_mask(repos, reference,
                                                                                       tmp_path):
    ref = picture(40, 56, seed=3)  # another size than the panel: cover-resized and center-cropped into it
    width, height = 96, 48  # two 48×48 panels side by side; the reference fixes the second
    image = Image.new("RGB", (width, height), (128, 128, 128))
    image.paste(ImageOps.fit(ref, (48, 48), Image.Resampling.LANCZOS), (48, 0))
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, 48, 48))
    want = fill_reference(reference["fill"], image, mask, height, width)
    got = ours(repos["fill", "diffusers"], tmp_path, "--panels", "2", "--panel-width", "48",
               "--panel-height", "48", "--ref", save(ref, tmp_path / "r.png"), "--ref-panel", "2")
    assert_same("Fill panel set vs FluxFillPipeline", got[0], want)


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_kontext_with_a_context_of_another_size_gives_diffusers_image(repos, reference, tmp_path, layout):
    context = picture(40, 72, seed=4)  # (W, H); its own size, floored to 16: 32×64
    want = kontext_reference(reference["kontext"], context, 48, 80, auto_resize=False)
    got = ours(repos["kontext", layout], tmp_path, "--image", save(context, tmp_path / "c.png"),
               "--context-size", "own", "--width", "80", "--height", "48")
    assert_same(f"Kontext {layout} vs FluxKontextPipeline", got[0], want)


@pytest.mark.slow
def test_kontext_context_resized_to_the_preferred_resolution_gives_diffusers_image(repos, reference,
                                                                                   tmp_path):
    context = picture(50, 30, seed=5)  # the closest preferred aspect is 1568×672 (W×H)
    want = kontext_reference(reference["kontext"], context, 32, 48, auto_resize=True, steps=2)
    got = ours(repos["kontext", "bfl"], tmp_path, "--image", save(context, tmp_path / "c.png"),
               "--context-size", "preferred", "--width", "48", "--height", "32", steps=2)
    assert_same("Kontext preferred context vs FluxKontextPipeline", got[0], want)


def test_kontext_output_takes_the_contexts_aspect_at_the_toy_area_without_a_size(tmp_path, monkeypatch):
    kontext = tmp_path / "flux1-kontext-toy.safetensors"  # toy/model's dev weights, named as a Kontext
    kontext.symlink_to(hub.TOY_MODEL / "flux1-dev.safetensors")
    monkeypatch.setitem(hub.TOY_VARIANTS, "toy-kontext", kontext)
    got = ours("toy-kontext", tmp_path, "--image", save(picture(120, 60, seed=6), tmp_path / "c.png"),
               steps=1)
    assert got[0].shape == (32, 80, 3)  # 2:1 at 64² px is 90.5×45.3 (W×H): rounded, floored to 16


def test_a_missing_toy_variant_names_the_script_that_builds_it(tmp_path, monkeypatch):
    monkeypatch.setitem(hub.TOY_VARIANTS, "toy-fill", tmp_path / "flux1-fill-toy.safetensors")
    with pytest.raises(FileNotFoundError, match=r"--model toy-fill: .* built from toy/model by "
                                                r"`python toy/train_variants.py`"):
        hub.Repo("toy-fill")


def test_image_and_mask_are_stored_with_absolute_paths(repos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save(picture(32, 32, seed=1), tmp_path / "i.png")
    save(mask_image(32, 32, (0, 0, 15, 31)), tmp_path / "m.png")
    paths = sample.main(["--model", str(repos["fill", "bfl"]), "--prompt", "p", "--steps", "1",
                         "--image", "i.png", "--mask", "m.png", "--out", "o.png"])
    settings = json.loads(Image.open(paths[0]).info[SETTINGS_KEY])
    assert settings["image"] == str(tmp_path / "i.png")
    assert settings["mask"] == str(tmp_path / "m.png")
    assert settings["guidance"] == 30.0 and settings["steps"] == 1  # Fill's default guidance, as used


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight load fails the test: the refusals must come before."""
    def load(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was refused")
    monkeypatch.setattr(sample, "load_pipeline", load)


@pytest.mark.parametrize("variant,flags,error", [
    ("fill", ["--image", "I80", "--mask", "M64"], r"--mask .*m64\.png: 64×64 px \(W×H\), but the --image is "
                                                  r"80×48"),
    ("fill", ["--image", "I80", "--mask", "TEXT"], r"--mask .*notes\.png: not a readable image"),
    ("fill", ["--image", "I80", "--mask", "FLOAT"], r"--mask .*float\.tif: a 32-bit float image \(mode 'F'\) "
                                                    r"with values from 0 to 1000"),
    ("fill", ["--image", "MISSING", "--mask", "M64"], r"--image .*missing\.png: no such image file"),
    ("fill", ["--image", "I80"], r"give both --image IMG and --mask MASK"),
    ("fill", [], r"give either --image IMG --mask MASK, or a panel set"),
    ("fill", ["--image", "I80", "--mask", "M80", "--init", "I80"], r"--init is for text-to-image models"),
    ("kontext", [], r"FLUX\.1 Kontext: give one context image with --image"),
    ("kontext", ["--image", "I80", "--mask", "M80"], r"--mask is for a FLUX\.1 Fill model; .* is FLUX\.1 "
                                                     r"Kontext"),
    ("kontext", ["--image", "TEXT"], r"--image .*notes\.png: not a readable image"),
    ("fill", ["--image", "I80", "--mask", "M80", "--context-size", "own"], r"--context-size is for a FLUX\.1 "
                                                                          r"Kontext model's context image"),
])
def test_bad_fill_and_kontext_inputs_are_refused_before_any_weight_loads(repos, tmp_path, no_weights, variant,
                                                                         flags, error):
    named = {"I80": save(picture(80, 48, 1), tmp_path / "i80.png"),
             "M80": save(mask_image(80, 48, (0, 0, 9, 9)), tmp_path / "m80.png"),
             "M64": save(mask_image(64, 64, (0, 0, 9, 9)), tmp_path / "m64.png"),
             "MISSING": str(tmp_path / "missing.png"), "TEXT": str(tmp_path / "notes.png")}
    (tmp_path / "notes.png").write_text("not an image")
    floats = np.linspace(0, 1000, 80 * 48, dtype=np.float32).reshape(48, 80)  # not 0..1: no greyscale
    Image.fromarray(floats).save(tmp_path / "float.tif")
    named["FLOAT"] = str(tmp_path / "float.tif")
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        sample.main(["--model", str(repos[variant, "bfl"]), "--prompt", "x", "--out", str(tmp_path / "o.png"),
                     *[named.get(flag, flag) for flag in flags]])


@pytest.mark.parametrize("flags,error", [
    (["--image", "I"], r"--image is Fill's image to paint or Kontext's context; --model toy is a "
                       r"text-to-image model"),
    (["--mask", "I"], r"--mask is for a FLUX\.1 Fill model; --model toy is a text-to-image model"),
    (["--variant", "fill"], r"--variant fill does not match toy, whose transformer takes 64 input channels"),
])
def test_fill_and_kontext_flags_on_a_dev_model_are_refused_before_any_weight_loads(tmp_path, no_weights,
                                                                                   flags, error):
    image = save(picture(32, 32, 1), tmp_path / "i.png")
    with pytest.raises(ValueError, match=error):
        sample.main(["--model", "toy", "--prompt", "x", "--out", str(tmp_path / "o.png"),
                     *[image if flag == "I" else flag for flag in flags]])


def test_an_output_that_would_overwrite_the_image_or_mask_is_refused(repos, tmp_path, no_weights):
    image = save(picture(32, 32, 1), tmp_path / "i.png")
    mask = save(mask_image(32, 32, (0, 0, 9, 9)), tmp_path / "m.png")
    for flag, path in (("--image", image), ("--mask", mask)):
        with pytest.raises(ValueError, match=rf"would overwrite the {flag} file"):
            sample.main(["--model", str(repos["fill", "bfl"]), "--prompt", "x", "--image", image,
                         "--mask", mask, "--out", path])


@pytest.mark.parametrize("variant", ["fill", "kontext"])
def test_block_swap_and_offload_change_nothing_and_fp8_runs_on_both_variants(repos, tmp_path, variant):
    image = save(picture(48, 32, seed=8), tmp_path / "i.png")
    mask = save(mask_image(48, 32, (0, 0, 23, 31)), tmp_path / "m.png")
    given = ["--image", image, "--width", "48", "--height", "32"]
    given += ["--mask", mask] if variant == "fill" else ["--context-size", "own"]
    plain = ours(repos[variant, "bfl"], tmp_path / "plain", *given, steps=2)
    swapped = ours(repos[variant, "bfl"], tmp_path / "swap", *given, "--blocks-to-swap", "2", "--offload",
                   steps=2)
    fp8 = ours(repos[variant, "bfl"], tmp_path / "fp8", *given, "--quantize", "fp8", steps=2)
    assert np.array_equal(plain[0], swapped[0])
    assert fp8[0].shape == plain[0].shape == (32, 48, 3)
