"""The IC-LoRA dataset: panel joining, panel boxes, aspect buckets at one or more resolutions, up-front
validation, batching.

Tiny images are drawn with PIL in tmp_path; no model, no GPU.
"""

import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import train
from iclora.data import PanelSetDataset, batches_by_bucket, load_rgb, make_buckets, nearest_bucket
from iclora.panels import grid_shape, join_panels, panel_boxes

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def write_set(folder, panels, caption="[SET] four colours, [IMAGE1] red [IMAGE2] green"):
    """A layout (b) set folder: panels saved as 0.png, 1.png, ... plus caption.txt (None: no caption file)."""
    folder.mkdir(parents=True)
    for k, panel in enumerate(panels):
        panel.save(folder / f"{k}.png")
    if caption is not None:
        (folder / "caption.txt").write_text(caption)


def write_joined(root, name, image, caption="[SCENE] a joined image"):
    """A layout (a) sample: <name>.png plus <name>.txt (None: no caption file)."""
    root.mkdir(parents=True, exist_ok=True)
    image.save(root / f"{name}.png")
    if caption is not None:
        (root / f"{name}.txt").write_text(caption)


def disc(size, diameter):
    """White image of `size` (W, H) with a black disc of `diameter` at its center."""
    image = Image.new("RGB", size, "white")
    x, y, r = size[0] / 2, size[1] / 2, diameter / 2
    ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill="black")
    return image


def dark_extent(pixels):
    """(width, height) of the bounding box of dark pixels in an (H, W, 3) array in [-1, 1]."""
    ys, xs = np.nonzero(pixels.mean(axis=-1) < 0)
    return xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


def colour_at(image, x, y):
    """RGB 0..255 of a (3, H, W) tensor in [-1, 1] at (x, y)."""
    return tuple(round((v + 1) * 127.5) for v in image[:, y, x].tolist())


@pytest.mark.parametrize("layout,size", [("row", (20, 90)), ("column", (60, 30)), ("grid", (40, 60))])
def test_join_panels_puts_each_panel_in_its_cell(layout, size):
    colours = [RED, GREEN, BLUE]
    joined = join_panels([Image.new("RGB", (30, 20), c) for c in colours], layout)
    assert (joined.height, joined.width) == size
    for colour, (left, top, right, bottom) in zip(colours, panel_boxes(*size, 3, layout), strict=True):
        assert right - left == 30 and bottom - top == 20
        assert joined.getpixel(((left + right) // 2, (top + bottom) // 2)) == colour
    if layout == "grid":  # 3 panels in 2x2 cells: the bottom-right cell stays black
        assert joined.getpixel((45, 30)) == (0, 0, 0)


def test_join_panels_rejects_panels_of_different_sizes():
    with pytest.raises(ValueError, match="one size"):
        join_panels([Image.new("RGB", (30, 20)), Image.new("RGB", (30, 21))], "row")


def test_panel_boxes_put_cell_edges_at_floor_of_the_even_split():
    assert panel_boxes(777, 1001, 3, "row") == [(0, 0, 333, 777), (333, 0, 667, 777), (667, 0, 1001, 777)]
    assert panel_boxes(777, 1001, 3, "grid") == [(0, 0, 500, 388), (500, 0, 1001, 388), (0, 388, 500, 777)]


@pytest.mark.parametrize("n,layout", [(3, "grid"), (3, "row"), (3, "column"), (4, "grid"), (5, "grid"),
                                      (7, "grid")])
def test_panel_boxes_tile_odd_canvases_without_gap_or_overlap(n, layout):
    width, height = 1001, 777
    cover = np.zeros((height, width), dtype=int)
    for left, top, right, bottom in panel_boxes(height, width, n, layout):
        cover[top:bottom, left:right] += 1
    assert cover.max() == 1
    empty = np.argwhere(cover == 0)  # only grid cells past the n-th, which end the last row
    if len(empty):
        (top, left), (bottom, right) = empty.min(axis=0), empty.max(axis=0) + 1
        assert (right, bottom) == (width, height) and len(empty) == (right - left) * (bottom - top)
        assert layout == "grid"


@pytest.mark.parametrize("resolution", [256, 512, 1024, 1280])
@pytest.mark.parametrize("multiple_h,multiple_w", [(16, 16), (16, 48), (32, 16)])
def test_buckets_have_16_multiple_sides_and_area_within_target(resolution, multiple_h, multiple_w):
    buckets = make_buckets(resolution, multiple_h, multiple_w)
    assert buckets
    for h, w in buckets:
        assert h % 16 == 0 and w % 16 == 0 and w % multiple_w == 0 and h % multiple_h == 0
        assert h * w <= resolution**2 and 1 / 4 <= w / h <= 4
    if (multiple_w, multiple_h) == (16, 16):
        assert (resolution, resolution) in buckets and (resolution // 2, resolution * 2) in buckets


def test_joined_image_becomes_a_tensor_in_minus_one_to_one(tmp_path):
    image = Image.new("RGB", (64, 64), "white")
    image.paste((0, 0, 0), (0, 0, 32, 64))
    write_joined(tmp_path, "a", image, caption="  [LEFT] black [RIGHT] white\n")
    item = PanelSetDataset(tmp_path, resolution=64)[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 64, 64)
    assert item["bucket"] == (64, 64) and item["path"] == str(tmp_path / "a.png")
    assert item["caption"] == "[LEFT] black [RIGHT] white"
    assert item["image"][:, :, 4].eq(-1).all() and item["image"][:, :, -4].eq(1).all()


def write_png48(path, rgb16):
    """An (H, W, 3) uint16 array as a 48-bit RGB PNG (PIL cannot write one): signature, IHDR, IDAT, IEND."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    h, w, _ = rgb16.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb16)  # filter byte 0 (none) per row
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bits per channel, colour type 2 (RGB)
    png = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)


@pytest.mark.parametrize("name,mode", [("grey16.png", "I;16"), ("grey32.tif", "I"), ("rgb48.png", "RGB")])
def test_16_bit_images_load_at_their_8_bit_brightness(tmp_path, name, mode):
    ramp = np.tile(np.arange(256, dtype=np.uint16) * 257, (4, 1))  # 0..65535: each 8-bit level k as k * 257
    path = tmp_path / name
    if mode == "RGB":
        write_png48(path, np.stack([ramp, ramp, ramp], axis=-1))
    else:
        Image.fromarray(ramp if mode == "I;16" else ramp.astype(np.int32)).save(path)
    assert Image.open(path).mode == mode
    expected = np.stack([np.tile(np.arange(256, dtype=np.uint8), (4, 1))] * 3, axis=-1)
    np.testing.assert_array_equal(np.array(load_rgb(path)), expected)  # a ramp of mean 127.5, not near-white


@pytest.mark.parametrize("layout", ["row", "column", "grid"])
def test_set_folders_are_joined_into_equal_panels_on_16_pixel_edges(tmp_path, layout):
    colours = [RED, GREEN, BLUE, YELLOW, RED]
    write_set(tmp_path / "s1", [Image.new("RGB", (50, 40), c) for c in colours])
    item = PanelSetDataset(tmp_path, resolution=256, layout=layout)[0]
    h, w = item["bucket"]
    rows, cols = {"row": (1, 5), "column": (5, 1), "grid": (2, 3)}[layout]
    assert item["image"].shape == (3, h, w) and h * w <= 256**2
    assert w % (16 * cols) == 0 and h % (16 * rows) == 0
    for colour, (left, top, right, bottom) in zip(colours, panel_boxes(h, w, 5, layout), strict=True):
        assert left % 16 == 0 and top % 16 == 0 and right - left == w // cols and bottom - top == h // rows
        assert colour_at(item["image"], (left + right) // 2, (top + bottom) // 2) == colour
        assert colour_at(item["image"], left + 1, top + 1) == colour
        assert colour_at(item["image"], right - 2, bottom - 2) == colour


def test_bucket_is_the_closest_aspect_ratio(tmp_path):
    write_joined(tmp_path, "wide", Image.new("RGB", (300, 100)))
    write_joined(tmp_path, "tall", Image.new("RGB", (100, 200)))
    write_joined(tmp_path, "storyboard", Image.new("RGB", (108, 162)))  # the authors' 1080x1620, scaled
    # buckets near 3:1 at resolution 96: W x H 144x64 (2.25) and 160x48 (3.33); near 1:2: 64x144 (0.44);
    # near 2:3: 80x112 (0.71)
    buckets = [s.bucket for s in PanelSetDataset(tmp_path, resolution=96).samples]
    assert buckets == [(112, 80), (144, 64), (48, 160)]
    assert nearest_bucket(162, 108, make_buckets(1024)) == (1248, 832)  # exactly 2:3


def test_resizing_never_stretches_joined_images(tmp_path):
    write_joined(tmp_path, "a", disc((620, 200), 160))  # 3.1:1 goes to a 3:1 bucket: cover-resize, then crop
    item = PanelSetDataset(tmp_path, resolution=256)[0]
    h, w = item["bucket"]
    assert abs(w / h - 3.1) < 0.2
    disc_w, disc_h = dark_extent(item["image"].permute(1, 2, 0).numpy())
    print(f"bucket {w}x{h}, disc {disc_w}x{disc_h}")
    assert abs(disc_w - disc_h) <= 1 and abs(disc_h - 160 * h / 200) <= 2


def test_resizing_never_stretches_panels(tmp_path):
    write_set(tmp_path / "s1", [disc((200, 120), 100), disc((200, 120), 100)])
    item = PanelSetDataset(tmp_path, resolution=256, layout="row")[0]
    h, w = item["bucket"]
    for left, top, right, bottom in panel_boxes(h, w, 2, "row"):
        disc_w, disc_h = dark_extent(item["image"][:, top:bottom, left:right].permute(1, 2, 0).numpy())
        print(f"panel {right - left}x{bottom - top}, disc {disc_w}x{disc_h}")
        assert abs(disc_w - disc_h) <= 1


def test_validation_lists_every_offending_file_in_one_error(tmp_path):
    panel = Image.new("RGB", (32, 32), RED)
    write_set(tmp_path / "corrupt", [panel, panel])
    (tmp_path / "corrupt" / "1.png").write_bytes(b"not a png at all")
    write_set(tmp_path / "truncated", [panel, panel])
    data = (tmp_path / "truncated" / "0.png").read_bytes()
    (tmp_path / "truncated" / "0.png").write_bytes(data[: len(data) // 2])
    write_set(tmp_path / "no_caption", [panel, panel], caption=None)
    write_set(tmp_path / "empty_caption", [panel, panel], caption=" \n")
    write_set(tmp_path / "mixed", [panel, Image.new("RGB", (32, 48))])
    (tmp_path / "no_panels").mkdir()
    write_set(tmp_path / "fine", [panel, panel])
    with pytest.raises(ValueError) as error:
        PanelSetDataset(tmp_path, resolution=64)
    message = str(error.value)
    print(message)
    assert message.startswith("6 problem(s)")
    for expected in [f"{tmp_path / 'corrupt' / '1.png'}: unreadable image",
                     f"{tmp_path / 'truncated' / '0.png'}: unreadable image",
                     f"{tmp_path / 'no_caption' / 'caption.txt'}: missing caption",
                     f"{tmp_path / 'empty_caption' / 'caption.txt'}: empty caption",
                     f"{tmp_path / 'mixed'}: panels of one set must share one size, got 0.png 32x32, "
                     f"1.png 32x48",
                     f"{tmp_path / 'no_panels'}: set folder has no panel images"]:
        assert expected in message
    assert "fine" not in message


def test_validation_of_joined_images_lists_every_offending_file(tmp_path):
    write_joined(tmp_path, "good", Image.new("RGB", (32, 32)))
    write_joined(tmp_path, "no_caption", Image.new("RGB", (32, 32)), caption=None)
    write_joined(tmp_path, "empty_caption", Image.new("RGB", (32, 32)), caption="")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "corrupt.txt").write_text("a caption")
    with pytest.raises(ValueError) as error:
        PanelSetDataset(tmp_path, resolution=64)
    message = str(error.value)
    print(message)
    assert message.startswith("3 problem(s)")
    assert f"{tmp_path / 'corrupt.jpg'}: unreadable image" in message
    assert f"{tmp_path / 'no_caption.txt'}: missing caption" in message
    assert f"{tmp_path / 'empty_caption.txt'}: empty caption" in message


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / ".DS_Store").write_bytes(b"hidden files are skipped")
    with pytest.raises(ValueError, match="no samples in"):
        PanelSetDataset(tmp_path)


def test_images_in_every_format_pil_opens_are_samples(tmp_path):
    files = [("a.png", RED), ("b.bmp", GREEN), ("c.gif", BLUE), ("d.tiff", YELLOW), ("e.tga", RED)]
    for name, colour in files:
        Image.new("RGB", (32, 32), colour).save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text(f"[SCENE] {name}")
    dataset = PanelSetDataset(tmp_path, resolution=32)
    assert [s.panels[0].name for s in dataset.samples] == ["a.png", "b.bmp", "c.gif", "d.tiff", "e.tga"]
    assert [colour_at(dataset[i]["image"], 16, 16) for i in range(5)] == [RED, GREEN, BLUE, YELLOW, RED]


def test_captions_without_an_image_and_images_sharing_a_caption_are_listed_problems_other_files_left_alone(
        tmp_path):
    write_joined(tmp_path, "fine", Image.new("RGB", (32, 32)))
    write_joined(tmp_path, "twice", Image.new("RGB", (32, 32)))
    Image.new("RGB", (32, 32)).save(tmp_path / "twice.jpg")
    (tmp_path / "orphan.txt").write_text("a caption whose image is missing")
    (tmp_path / "notes.md").write_text("neither an image nor a caption")
    (tmp_path / "fine_flux.npz").write_bytes(b"another trainer's latent cache")
    with pytest.raises(ValueError) as error:
        PanelSetDataset(tmp_path, resolution=32)
    message = str(error.value)
    assert message.startswith("3 problem(s)") and "fine" not in message and "notes.md" not in message
    assert f"{tmp_path / 'orphan.txt'}: caption of no image" in message
    for twin in ("twice.jpg", "twice.png"):
        assert f"{tmp_path / twin}: shares its caption with another image" in message


def test_a_second_txt_or_a_sub_folder_in_a_set_folder_is_a_listed_problem_other_files_left_alone(tmp_path):
    write_set(tmp_path / "s1", [Image.new("RGB", (32, 32))] * 2)
    (tmp_path / "s1" / "s1.txt").write_text("a second caption")
    (tmp_path / "s1" / "sub").mkdir()
    (tmp_path / "s1" / "Thumbs.db").write_bytes(b"not an image")
    with pytest.raises(ValueError) as error:
        PanelSetDataset(tmp_path, resolution=32)
    message = str(error.value)
    print(message)
    assert message.startswith("2 problem(s)") and "Thumbs.db" not in message
    assert f"{tmp_path / 's1' / 's1.txt'}: not a panel image or caption.txt" in message
    assert f"{tmp_path / 's1' / 'sub'}: not a panel image or caption.txt" in message


def test_panels_given_with_set_folders_of_another_panel_count_is_a_listed_problem(tmp_path):
    write_set(tmp_path / "s1", [Image.new("RGB", (32, 32))] * 2)
    write_set(tmp_path / "s2", [Image.new("RGB", (32, 32))] * 3)
    with pytest.raises(ValueError) as error:
        PanelSetDataset(tmp_path, resolution=64, panels=3)
    message = str(error.value)
    assert message.startswith("1 problem(s)")
    assert f"{tmp_path / 's1'}: a set folder of 2 panel files, but panels=3" in message
    shutil.rmtree(tmp_path / "s1")
    counts = [s.count for s in PanelSetDataset(tmp_path, resolution=64, panels=3).samples]
    assert counts == [3]  # the same count


def test_set_folder_panels_are_joined_in_natural_order_numbers_compared_as_numbers(tmp_path):
    (tmp_path / "s1").mkdir()
    for name, colour in [("10.png", BLUE), ("2.png", GREEN), ("1.png", RED)]:
        Image.new("RGB", (32, 32), colour).save(tmp_path / "s1" / name)
    (tmp_path / "s1" / "caption.txt").write_text("[SET] three colours")
    dataset = PanelSetDataset(tmp_path, resolution=64)
    assert [p.name for p in dataset.samples[0].panels] == ["1.png", "2.png", "10.png"]
    assert [colour_at(dataset[0]["image"], x, 16) for x in (16, 48, 80)] == [RED, GREEN, BLUE]


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        PanelSetDataset(tmp_path / "nowhere")


def test_folder_mixing_both_layouts_is_an_error(tmp_path):
    write_joined(tmp_path, "joined", Image.new("RGB", (32, 32)))
    write_set(tmp_path / "set", [Image.new("RGB", (32, 32))])
    with pytest.raises(ValueError, match="mixes joined images"):
        PanelSetDataset(tmp_path, resolution=64)


def test_unknown_layout_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown layout 'diagonal'"):
        PanelSetDataset(tmp_path, layout="diagonal")


def test_batches_by_bucket_never_mix_buckets_and_cover_every_index_once(tmp_path):
    for k, size in enumerate([(64, 64)] * 7 + [(128, 64)] * 5 + [(64, 128)] * 2):
        write_joined(tmp_path, f"s{k:02d}", Image.new("RGB", size))
    dataset = PanelSetDataset(tmp_path, resolution=64)
    assert len({s.bucket for s in dataset.samples}) == 3
    for seed in range(5):
        batches = list(batches_by_bucket(dataset, batch_size=3, seed=seed))
        assert sorted(i for batch in batches for i in batch) == list(range(len(dataset)))
        assert all(len({dataset.samples[i].bucket for i in batch}) == 1 and 1 <= len(batch) <= 3
                   for batch in batches)
    assert list(batches_by_bucket(dataset, 3, seed=0)) == list(batches_by_bucket(dataset, 3, seed=0))
    assert list(batches_by_bucket(dataset, 3, seed=0)) != list(batches_by_bucket(dataset, 3, seed=1))


# ------------------------------------------------------------------------------------------------------------
# Several resolutions (`train.py --resolution 512 768 1024`): one sample per set and resolution, never
# upscaled


def test_a_set_smaller_than_every_resolution_trains_at_its_own_size_rounded_down_per_panel(tmp_path):
    write_set(tmp_path / "s1", [Image.new("RGB", (100, 70), c) for c in (RED, GREEN)])  # W x H panels
    dataset = PanelSetDataset(tmp_path, resolution=[512, 768, 1024])
    # panels 96x64: 100 and 70 rounded down to 16
    assert [s.bucket for s in dataset.samples] == [(64, 192)] * 3
    item = dataset[0]
    assert item["image"].shape == (3, 64, 192)
    assert colour_at(item["image"], 48, 32) == RED and colour_at(item["image"], 144, 32) == GREEN


@pytest.mark.parametrize("layout", ["row", "column", "grid"])
def test_bucketing_never_upscales_keeps_panels_equal_and_crops_sets_beyond_4_to_1_only_by_rounding(tmp_path,
                                                                                                    layout):
    """Sets of 1 to 6 panels of many sizes at several resolutions: every bucket's panels are equal, multiples
    of 16, no larger than the set's panels on either side, and the bucket's area is within resolution² (unless
    a panel side is already at the 16-pixel minimum). A set of an aspect beyond 1:4-4:1 loses at most the
    rounding of each panel side to 16 px, in its own pixels and in the bucket's, when cover-resized: nothing
    else is cropped away."""
    sizes = [(w, h, n) for w in (16, 47, 100, 161, 300) for h in (20, 33, 90, 250)
             for n in (1, 2, 3, 4, 5, 6)]
    for k, (w, h, n) in enumerate(sizes):
        write_set(tmp_path / f"s{k:03d}", [Image.new("RGB", (w, h), RED)] * n)
    resolutions = [64, 96, 128, 256]
    dataset = PanelSetDataset(tmp_path, resolution=resolutions, layout=layout)
    assert len(dataset) == len(sizes) * len(resolutions)
    for i, sample in enumerate(dataset.samples):
        (w, h, n), resolution = sizes[i // len(resolutions)], resolutions[i % len(resolutions)]
        (H, W), (rows, cols) = sample.bucket, grid_shape(n, layout)
        assert H % (16 * rows) == 0 and W % (16 * cols) == 0, (sample.path, sample.bucket)
        assert H // rows <= h and W // cols <= w, f"{sample.path} upscaled: {w}x{h} panels to {sample.bucket}"
        where = (sample.path, resolution, sample.bucket)
        assert H * W <= resolution**2 or 16 in (H // rows, W // cols), where
        ph, pw = H // rows, W // cols
        if not 1 / 4 <= cols * w / (rows * h) <= 4 and 16 not in (ph, pw):
            scale = max(pw / w, ph / h)  # cover-resize, then centre-crop to pw x ph
            kept_w, kept_h = pw / (w * scale), ph / (h * scale)
            assert kept_w >= 1 - 16 / w - 16 / pw, (sample.path, sample.bucket)
            assert kept_h >= 1 - 16 / h - 16 / ph, (sample.path, sample.bucket)
    for i in (0, 37, len(dataset) - 1):  # the joined tensor has the bucket's shape
        assert dataset[i]["image"].shape == (3, *dataset.samples[i].bucket)


def test_a_row_of_six_square_panels_is_scaled_whole_at_every_resolution_not_centre_cropped(tmp_path):
    write_set(tmp_path / "s1", [disc((512, 512), 480)] * 6)  # 6:1, beyond the buckets' 4:1
    dataset = PanelSetDataset(tmp_path, resolution=[512, 1024, 1536])
    assert [s.bucket for s in dataset.samples] == [(208, 1248), (416, 2496), (512, 3072)]  # square panels
    image = dataset[0]["image"]
    # each panel's disc is whole: as wide as tall
    for left, top, right, bottom in panel_boxes(208, 1248, 6, "row"):
        disc_w, disc_h = dark_extent(image[:, top:bottom, left:right].permute(1, 2, 0).numpy())
        assert abs(disc_w - disc_h) <= 1 and abs(disc_h - 480 * 208 / 512) <= 2


def test_a_large_set_appears_at_every_listed_resolution_up_to_its_own_size(tmp_path):
    write_joined(tmp_path, "storyboard", Image.new("RGB", (1536, 1024)))  # 1254 px squared: below 1280
    dataset = PanelSetDataset(tmp_path, resolution=[1280, 256, 1024, 768, 512])
    assert dataset.resolutions == [256, 512, 768, 1024, 1280]
    buckets = [s.bucket for s in dataset.samples]
    assert buckets == [(208, 304), (416, 624), (624, 944), (832, 1248), (1024, 1536)]


def test_a_set_between_two_resolutions_takes_the_smaller_ones_and_its_own_size_for_each_above_as_ai_toolkit(
        tmp_path):
    """ai-toolkit makes one copy of the dataset per listed resolution and caps each at the image's own area,
    so every set has one sample per resolution; here the bucket at 512 (416x624) is taller than the image's
    400 px."""
    write_joined(tmp_path, "a", Image.new("RGB", (600, 400)))
    buckets = [s.bucket for s in PanelSetDataset(tmp_path, resolution=[256, 512, 768]).samples]
    assert buckets == [(208, 304), (400, 592), (400, 592)]


def test_batches_hold_samples_of_one_bucket_across_resolutions(tmp_path):
    for k in range(3):
        write_joined(tmp_path, f"s{k}", Image.new("RGB", (128, 64)))
    dataset = PanelSetDataset(tmp_path, resolution=[32, 64, 96])
    assert [s.bucket for s in dataset.samples[:3]] == [(16, 48), (48, 80), (64, 128)]
    batches = list(batches_by_bucket(dataset, batch_size=2, seed=0))
    assert sorted(i for batch in batches for i in batch) == list(range(9))
    assert all(len({dataset.samples[i].bucket for i in batch}) == 1 for batch in batches)


def test_a_set_of_an_aspect_beyond_the_buckets_is_scaled_down_to_the_resolutions_area_not_kept_whole(
        tmp_path):
    write_joined(tmp_path, "strip", Image.new("RGB", (4000, 200)))  # 20:1, wider than any bucket
    buckets = [s.bucket for s in PanelSetDataset(tmp_path, resolution=[512, 1024]).samples]
    assert buckets == [(112, 2336), (192, 4000)]


def test_panels_under_16_pixels_are_refused_rather_than_upscaled(tmp_path):
    write_joined(tmp_path, "tiny", Image.new("RGB", (40, 12)))
    with pytest.raises(ValueError, match=r"tiny\.png: panels of 40x12 px; at least 16x16 are needed"):
        PanelSetDataset(tmp_path, resolution=[512])


def test_flux_dev_trains_at_the_authors_resolutions_and_the_toy_at_96(tmp_path):
    assert train.parse_args(["--data", "x"]).resolution == [512, 768, 1024, 1280, 1536]
    assert train.parse_args(["--data", "x", "--model", "toy"]).resolution == [96]
    assert train.parse_args(["--data", "x", "--resolution", "1024", "512", "1024"]).resolution == [512, 1024]
    (tmp_path / "run.json").write_text('{"data": "x", "resolution": 768}')  # a config may give one number
    assert train.parse_args(["--config", str(tmp_path / "run.json")]).resolution == [768]
