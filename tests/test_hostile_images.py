"""Hostile or careless image files (issue #24, items 6-8): dataset links that leave --data, transparency,
float TIFFs and decompression bombs, through the dataset (iclora/data.py) and sample.py's --ref / --init
(minflux/images.py opens both).

Tiny images drawn in tmp_path; the sample tests that reach the model use the toy one with 2 steps, the
refusals a --model that does not exist (they come before any weight loads).
"""

import numpy as np
import pytest
from PIL import Image

import sample
from iclora.data import PanelSetDataset, load_rgb


def transparent(mode, size=(32, 32)):
    """A fully transparent image of `mode` whose hidden colour is black."""
    if mode == "RGBA":
        return Image.new("RGBA", size, (0, 0, 0, 0))
    if mode == "LA":
        return Image.new("LA", size, (0, 0))
    image = Image.new("P", size, 0)  # palette entry 0 is black, and the transparent one
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.info["transparency"] = 0
    return image


def joined_sample(root, name="a", image=None):
    """A layout (a) dataset of one joined image <name>.png and its caption; returns the dataset folder."""
    root.mkdir(parents=True, exist_ok=True)
    (image or Image.new("RGB", (32, 32), "red")).save(root / f"{name}.png")
    (root / f"{name}.txt").write_text("[SCENE] a joined image")
    return root


def test_a_caption_linked_from_outside_data_is_a_listed_problem_not_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's password")
    data = joined_sample(tmp_path / "data")
    (data / "a.txt").unlink()
    (data / "a.txt").symlink_to(secret)
    with pytest.raises(ValueError, match="problem") as refusal:
        PanelSetDataset(data, resolution=32)
    assert f"{data / 'a.txt'}: a symbolic link to {secret}, outside the dataset folder" in str(refusal.value)
    assert "password" not in str(refusal.value)


@pytest.mark.parametrize("linked", ["image", "set folder"])
def test_an_image_or_folder_linked_from_outside_data_is_a_listed_problem(tmp_path, linked):
    outside = tmp_path / "elsewhere"
    data = tmp_path / "data"
    if linked == "image":
        joined_sample(outside, "photo")
        joined_sample(data)
        (data / "b.png").symlink_to(outside / "photo.png")
        (data / "b.txt").write_text("[SCENE] another")
        link = data / "b.png"
        target = outside / "photo.png"
    else:
        outside.mkdir()
        Image.new("RGB", (32, 32), "red").save(outside / "1.png")
        (outside / "caption.txt").write_text("[SET] one panel")
        data.mkdir()
        (data / "s1").symlink_to(outside)
        link = data / "s1"
        target = outside
    with pytest.raises(ValueError, match="problem") as refusal:
        PanelSetDataset(data, resolution=32)
    message = str(refusal.value)
    assert f"{link}: a symbolic link to {target}, outside the dataset folder {data}; not followed" in message


def test_links_that_stay_inside_data_still_work(tmp_path):
    data = joined_sample(tmp_path / "data")
    (data / "b.png").symlink_to(data / "a.png")
    (data / "b.txt").symlink_to(data / "a.txt")
    assert len(PanelSetDataset(data, resolution=32)) == 2


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_a_transparent_dataset_image_is_composited_on_white(tmp_path, mode):
    data = joined_sample(tmp_path / "data", image=transparent(mode))
    assert Image.open(data / "a.png").mode == mode
    item = PanelSetDataset(data, resolution=32)[0]
    assert item["image"].min().item() == 1.0  # white in [-1, 1], not the hidden black


def test_a_transparent_init_image_reaches_the_model_as_white(tmp_path, monkeypatch):
    transparent("RGBA").save(tmp_path / "init.png")
    given = []
    real_from_pil = sample.from_pil

    def spy(image, height, width):
        given.append(np.array(image))
        return real_from_pil(image, height, width)

    monkeypatch.setattr(sample, "from_pil", spy)
    sample.main(["--model", "toy", "--prompt", "a red circle", "--steps", "2", "--device", "cpu",
                 "--init", str(tmp_path / "init.png"), "--out", str(tmp_path / "out.png")])
    [pixels] = given
    assert pixels.min() == 255


def test_a_partly_transparent_ref_is_blended_with_white(tmp_path):
    Image.new("RGBA", (32, 32), (0, 0, 0, 128)).save(tmp_path / "ref.png")  # half-covered black
    pixels = np.array(sample.read_image(tmp_path / "ref.png", "--ref"))
    assert (pixels == 127).all()  # 255 * (1 - 128/255) ≈ 127, not 0


def test_a_float_tiff_in_0_to_1_is_scaled_by_255(tmp_path):
    ramp = np.tile(np.arange(256, dtype=np.float32) / 255, (4, 1))  # each 8-bit level k as k / 255
    Image.fromarray(ramp).save(tmp_path / "ramp.tif")
    assert Image.open(tmp_path / "ramp.tif").mode == "F"
    expected = np.stack([np.tile(np.arange(256, dtype=np.uint8), (4, 1))] * 3, axis=-1)
    np.testing.assert_array_equal(np.array(load_rgb(tmp_path / "ramp.tif")), expected)


def test_a_float_tiff_outside_0_to_1_is_refused_naming_file_flag_and_mode(tmp_path):
    Image.fromarray(np.full((32, 32), 1000.0, dtype=np.float32)).save(tmp_path / "depth.tif")
    with pytest.raises(ValueError) as refusal:
        sample.main(["--model", str(tmp_path / "no-model-needed"), "--prompt", "x",
                     "--init", str(tmp_path / "depth.tif")])
    assert str(refusal.value).startswith(f"--init {tmp_path / 'depth.tif'}: a 32-bit float image (mode 'F') "
                                         f"with values from 1000 to 1000")


# Pillow warns over Image.MAX_IMAGE_PIXELS and raises over twice that: with a limit of 64x64 pixels,
# 80x80 is the warned size and 100x100 the refused one.
@pytest.mark.parametrize("flags", [["--init"], ["--panels", "2", "--ref"]], ids=["init", "ref"])
@pytest.mark.parametrize("side", [80, 100])
def test_a_decompression_bomb_is_refused_naming_file_flag_and_limit(tmp_path, monkeypatch, flags, side):
    Image.new("1", (side, side)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    flag = flags[-1]
    with pytest.raises(ValueError) as refusal:
        sample.main(["--model", str(tmp_path / "no-model-needed"), "--prompt", "x",
                     *flags, str(tmp_path / "bomb.png")])
    assert str(refusal.value).startswith(f"{flag} {tmp_path / 'bomb.png'}: more than 4,096 pixels, Pillow's "
                                         f"limit against decompression bombs")


def test_a_decompression_bomb_as_from_image_is_refused_naming_the_file(tmp_path, monkeypatch):
    Image.new("1", (80, 80)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    with pytest.raises(ValueError) as refusal:
        sample.main(["--from-image", str(tmp_path / "bomb.png")])
    assert str(refusal.value).startswith(f"--from-image {tmp_path / 'bomb.png'}: more than 4,096 pixels")


def test_a_decompression_bomb_in_a_dataset_is_a_listed_problem(tmp_path):
    data = joined_sample(tmp_path / "data", image=Image.new("1", (20000, 20000)))  # a few kB, 400 Mpx
    with pytest.raises(ValueError) as refusal:
        PanelSetDataset(data, resolution=32)
    limit = f"{2 * Image.MAX_IMAGE_PIXELS:,}"  # Pillow's own refusal: a dataset is not capped below it
    assert f"dataset image {data / 'a.png'}: more than {limit} pixels" in str(refusal.value)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the size this test is about
def test_a_large_dataset_photo_below_pillows_refusal_is_read_and_scaled_down(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 80 * 80)  # 96x96 is over it (a warning), under twice it
    data = joined_sample(tmp_path / "data", image=Image.new("RGB", (96, 96), "red"))
    dataset = PanelSetDataset(data, resolution=32)
    assert dataset[0]["image"].shape[-2:] == (32, 32)
