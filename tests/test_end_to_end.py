"""sample.py on a tiny checkpoint in the official HF repo layout gives diffusers' FluxPipeline image, per
pixel."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

import sample
from tests.tiny_repo import write_tiny_repo

PROMPT = "a small red circle above a blue square, on a yellow background"


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("repos")
    return {(layout, schnell): write_tiny_repo(root / f"{layout}-{schnell}",
                                               layout="both" if layout == "ref" else layout,
                                               schnell=schnell, seed=3)
            for layout, schnell in [("ref", False), ("bfl", False), ("diffusers", False), ("ref", True)]}


def diffusers_images(folder, width, height, steps, guidance, seed, num_images=1, max_sequence_length=512):
    pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
    out = pipe(PROMPT, width=width, height=height, num_inference_steps=steps, guidance_scale=guidance,
               num_images_per_prompt=num_images, generator=torch.Generator().manual_seed(seed),
               max_sequence_length=max_sequence_length)
    return [np.asarray(im, dtype=np.int16) for im in out.images]


def our_images(folder, tmp_path, width, height, steps, guidance, seed, num_images=1):
    paths = sample.main(["--model", str(folder), "--prompt", PROMPT, "--width", str(width),
                         "--height", str(height), "--steps", str(steps), "--guidance", str(guidance),
                         "--seed", str(seed), "--num-images", str(num_images),
                         "--out", str(tmp_path / "out.png"), "--device", "cpu"])
    return [np.asarray(Image.open(p), dtype=np.int16) for p in paths]


def assert_same_images(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        diff = np.abs(a - b)
        print(f"image {a.shape[1]}x{a.shape[0]}: max pixel diff {diff.max()}, mean {diff.mean():.4f}, "
              f"pixel std {b.std():.1f}")
        assert b.std() > 5, "the reference image is flat: the test would prove nothing"
        assert diff.max() <= 1


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_sample_py_matches_diffusers_pipeline_for_each_repo_layout(repos, tmp_path, layout):
    want = diffusers_images(repos["ref", False], width=80, height=48, steps=4, guidance=3.5, seed=7)
    got = our_images(repos[layout, False], tmp_path, width=80, height=48, steps=4, guidance=3.5, seed=7)
    assert_same_images(got, want)


def test_sample_py_prefers_bfl_files_when_both_layouts_exist(repos, tmp_path):
    want = diffusers_images(repos["ref", False], width=48, height=64, steps=3, guidance=2.0, seed=11)
    got = our_images(repos["ref", False], tmp_path, width=48, height=64, steps=3, guidance=2.0, seed=11)
    assert_same_images(got, want)


def test_several_images_per_prompt_match_diffusers(repos, tmp_path):
    want = diffusers_images(repos["ref", False], width=64, height=64, steps=2, guidance=3.5, seed=5,
                            num_images=2)
    got = our_images(repos["ref", False], tmp_path, width=64, height=64, steps=2, guidance=3.5, seed=5,
                     num_images=2)
    assert_same_images(got, want)
    assert np.abs(got[0] - got[1]).max() > 0, "the two images of one run must differ"


def test_schnell_is_detected_and_matches_diffusers(repos, tmp_path):
    want = diffusers_images(repos["ref", True], width=64, height=32, steps=4, guidance=0.0, seed=1,
                            max_sequence_length=256)
    got = our_images(repos["ref", True], tmp_path, width=64, height=32, steps=4, guidance=0.0, seed=1)
    assert_same_images(got, want)
