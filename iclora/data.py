"""In-Context LoRA training data: each panel set becomes ONE image with ONE caption, bucketed by aspect ratio.

Follows In-Context LoRA (arXiv 2410.23775, section 3): the panels of a set are joined into a single image,
described by one joint caption, and trained on as ordinary text-to-image data.
A dataset folder holds ONE of two layouts; mixing them is an error:

(a) joined images, the usual LoRA layout and what the authors' trainer reads:
        sets/<name>/set01.jpg  set01.txt  set02.png  set02.txt  ...
    every image (.jpg .jpeg .png .webp) has a same-named .txt caption.
(b) one sub-folder per set, joined on the fly:
        sets/<name>/set01/a.png  b.png  c.png  caption.txt
    the panels (one size per set) are taken in file-name order and joined in `layout`: "row" (side by side),
    "column" (stacked) or "grid" (ceil(sqrt(n)) columns filled row-major; unused cells of the last row stay black).

Each sample goes to the bucket closest to its aspect ratio. Buckets span 1:4 to 4:1, have an area of at most
resolution**2 and sides that are multiples of 16; in layout (b) the width is a multiple of 16*cols and the height
of 16*rows, so every panel is cover-resized and center-cropped (never stretched) to the same 16-multiple size
and panel edges fall on 16-pixel boundaries. Layout (a) is the one-panel case of the same path.

Every image and caption is checked when the dataset is built; one ValueError lists every problem.
A bucket is (H, W), like the image tensor (3, H, W); PIL sizes are (W, H).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
LAYOUTS = ("row", "column", "grid")


def grid_shape(n: int, layout: str) -> tuple[int, int]:
    """(cols, rows) of the cells that hold n panels in a layout."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}, expected one of {LAYOUTS}")
    if layout == "row":
        return n, 1
    if layout == "column":
        return 1, n
    cols = math.ceil(math.sqrt(n))
    return cols, math.ceil(n / cols)


def panel_boxes(width: int, height: int, n: int, layout: str) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of each of n panels on a width x height canvas, in panel order.

    Cell edges sit at floor(i * width / cols) and floor(j * height / rows): the cells tile the canvas exactly,
    and on a canvas the grid does not divide they differ by at most one pixel. Grid cells past the n-th are empty.
    """
    cols, rows = grid_shape(n, layout)
    xs = [i * width // cols for i in range(cols + 1)]
    ys = [j * height // rows for j in range(rows + 1)]
    return [(xs[k % cols], ys[k // cols], xs[k % cols + 1], ys[k // cols + 1]) for k in range(n)]


def join_panels(panels: list[Image.Image], layout: str) -> Image.Image:
    """Paste equal-sized panels into one RGB image in the given layout (empty grid cells stay black)."""
    sizes = sorted({panel.size for panel in panels})
    if len(sizes) != 1:
        raise ValueError(f"join_panels needs at least one panel, all of one size; got sizes {sizes}")
    (w, h), (cols, rows) = sizes[0], grid_shape(len(panels), layout)
    canvas = Image.new("RGB", (cols * w, rows * h))
    for panel, box in zip(panels, panel_boxes(cols * w, rows * h, len(panels), layout)):
        canvas.paste(panel.convert("RGB"), box[:2])
    return canvas


def make_buckets(resolution: int, multiple_w: int = 16, multiple_h: int = 16) -> list[tuple[int, int]]:
    """(H, W) buckets, aspect 1:4 to 4:1, area <= resolution**2: for each width, the tallest height that fits."""
    area, buckets = resolution * resolution, []
    for w in range(multiple_w, 2 * resolution + 1, multiple_w):  # W/H <= 4 and W*H <= area give W <= 2*resolution
        h = area // w // multiple_h * multiple_h
        if h > 0 and 1 / 4 <= w / h <= 4:
            buckets.append((h, w))
    return buckets


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The (H, W) bucket closest to width/height in log aspect ratio; ties go to the larger area."""
    return min(buckets, key=lambda b: (abs(math.log(b[1] * height / (b[0] * width))), -b[0] * b[1]))


def load_rgb(path: Path) -> Image.Image:
    """The image as displayed (EXIF rotation applied), in RGB."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


@dataclass
class Sample:
    path: Path  # the joined image (a) or the set folder (b)
    panels: list[Path]  # [path] in layout (a); the panel files in order in layout (b)
    caption: str
    bucket: tuple[int, int]  # (H, W)


class PanelSetDataset(torch.utils.data.Dataset):
    """Panel sets as dicts of image (3, H, W) in [-1, 1], caption, bucket (H, W) and path.
    (Caption dropout is the trainer's: it caches each caption's embedding once, see iclora/training.py.)"""

    def __init__(self, root, resolution=1024, layout="row"):
        grid_shape(1, layout)  # rejects an unknown layout
        self.root, self.resolution, self.layout = Path(root), resolution, layout
        if not self.root.is_dir():
            raise ValueError(f"dataset folder {self.root} does not exist")
        entries = sorted(p for p in self.root.iterdir() if not p.name.startswith("."))
        images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        folders = [p for p in entries if p.is_dir()]
        if images and folders:
            raise ValueError(f"{self.root} mixes joined images ({images[0].name}, ...) and set folders "
                             f"({folders[0].name}/, ...); use one layout per dataset folder")
        problems, self.samples = [], []
        for path in images:
            self._add_sample(path, [path], path.with_suffix(".txt"), problems)
        for folder in folders:
            panels = sorted(p for p in folder.iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            if panels:
                self._add_sample(folder, panels, folder / "caption.txt", problems)
            else:
                problems.append(f"{folder}: set folder has no panel images ({', '.join(IMAGE_SUFFIXES)})")
        if problems:
            raise ValueError(f"{len(problems)} problem(s) in dataset {self.root}:\n  " + "\n  ".join(problems))
        if not self.samples:
            raise ValueError(f"no samples in {self.root}: expected images with same-named .txt captions, "
                             "or one sub-folder per set holding panel images and caption.txt")

    def _add_sample(self, path, panels, caption_path, problems):
        """Check one sample; append it to self.samples, or one line per problem to `problems`."""
        found = len(problems)
        caption = read_caption(caption_path, problems)
        sizes = {}
        for panel in panels:
            try:
                with Image.open(panel) as image:
                    image.verify()  # checks the file's structure; load_rgb then decodes every pixel
                sizes[panel] = load_rgb(panel).size
            except Exception as error:  # PIL raises many types for bad files; each becomes a listed problem
                problems.append(f"{panel}: unreadable image ({type(error).__name__}: {error})")
        if len(set(sizes.values())) > 1:
            listing = ", ".join(f"{p.name} {w}x{h}" for p, (w, h) in sizes.items())
            problems.append(f"{path}: panels of one set must share one size, got {listing}")
        if len(problems) > found:
            return
        (w, h), (cols, rows) = sizes[panels[0]], grid_shape(len(panels), self.layout)
        buckets = make_buckets(self.resolution, 16 * cols, 16 * rows)
        if not buckets:
            problems.append(f"{path}: {len(panels)} panels in a {cols}x{rows} {self.layout} do not fit "
                            f"resolution {self.resolution} with 16-pixel panel sides")
            return
        self.samples.append(Sample(path, panels, caption, nearest_bucket(cols * w, rows * h, buckets)))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        sample = self.samples[i]
        (h, w), (cols, rows) = sample.bucket, grid_shape(len(sample.panels), self.layout)
        panels = [ImageOps.fit(load_rgb(p), (w // cols, h // rows), Image.Resampling.LANCZOS) for p in sample.panels]
        pixels = torch.from_numpy(np.array(join_panels(panels, self.layout)))  # (H, W, 3) uint8
        image = rearrange(pixels, "h w c -> c h w").float() / 127.5 - 1.0  # (3, H, W) in [-1, 1]
        return dict(image=image, caption=sample.caption, bucket=sample.bucket, path=str(sample.path))


def read_caption(path: Path, problems: list[str]) -> str:
    """The stripped caption text, or "" with a line added to `problems` if it is missing, unreadable or empty."""
    if not path.is_file():
        problems.append(f"{path}: missing caption file")
        return ""
    try:
        caption = path.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as error:
        problems.append(f"{path}: unreadable caption ({error})")
        return ""
    if not caption:
        problems.append(f"{path}: empty caption")
    return caption


def batches_by_bucket(dataset: PanelSetDataset, batch_size: int, seed: int):
    """One epoch of index lists, each from a single bucket (a batch tensor has one shape).

    Indices are shuffled within each bucket and cut into batches (a bucket's last batch may be smaller), then
    the batches are shuffled; every index appears exactly once. Pass seed + epoch for a new order each epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng, by_bucket = np.random.default_rng(seed), {}
    for i, sample in enumerate(dataset.samples):
        by_bucket.setdefault(sample.bucket, []).append(i)
    batches = []
    for indices in by_bucket.values():
        indices = rng.permutation(indices).tolist()
        batches += [indices[k:k + batch_size] for k in range(0, len(indices), batch_size)]
    return iter([batches[k] for k in rng.permutation(len(batches))])
