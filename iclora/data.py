"""In-Context LoRA training data (arXiv 2410.23775 §3): each panel set becomes ONE image with ONE caption.

A dataset folder holds (a) joined images with same-named .txt captions (the usual LoRA layout, the authors'),
or (b) one sub-folder per set, `set01/1.png 2.png caption.txt`, its panels joined in natural file-name order
in a `layout` (iclora/panels.py); not both. A joined image's panels are located (and resized one by one, as a
set folder's) only when `panels` says how many it holds. A set is one sample per resolution, in the aspect
bucket nearest its own (1:4 to 4:1, area <= resolution², sides multiples of 16 per panel), panels
cover-resized; where that bucket is larger than the set (never upscaled) or the set is beyond 1:4-4:1 (never
cropped): its own size, panel sides rounded down to 16, scaled down to at most resolution² (README, "Dataset
layout"). Every file is checked when the dataset is built; one ValueError lists every problem.
"""

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps

from .panels import grid_shape, join_panels, split_panels

IMAGE_SUFFIXES = {suffix for suffix, name in Image.registered_extensions().items() if name in Image.OPEN}


def make_buckets(resolution: int, multiple_h: int = 16, multiple_w: int = 16) -> list[tuple[int, int]]:
    """(H, W) buckets, aspect 1:4 to 4:1, area <= resolution**2: for each width, the tallest height that
    fits."""
    widths = range(multiple_w, 2 * resolution + 1, multiple_w)  # W <= 4H and W·H <= resolution² give W <= 2·resolution
    buckets = [(resolution * resolution // w // multiple_h * multiple_h, w) for w in widths]
    return [(h, w) for h, w in buckets if h > 0 and 1 / 4 <= w / h <= 4]


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The (H, W) bucket closest to height×width in log aspect ratio; ties go to the larger area."""
    return min(buckets, key=lambda b: (abs(math.log(b[1] * height / (b[0] * width))), -b[0] * b[1]))


def load_rgb(path: Path) -> Image.Image:
    """The image as displayed (EXIF rotation applied), in 8-bit RGB."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):  # 16-bit greyscale ("I;16", "I"): 0..65535 to 0..255; convert would clip
            image = Image.fromarray(np.clip(np.asarray(image) / 257, 0, 255).round().astype(np.uint8))
        return image.convert("RGB")


@dataclass
class Sample:
    path: Path  # the joined image (a) or the set folder (b)
    panels: list[Path]  # [path] in layout (a); the panel files in order in layout (b)
    caption: str
    bucket: tuple[int, int]  # (H, W)
    count: int | None  # panels in the set; None for a joined image without `panels` (where they are is unknown)


class PanelSetDataset(torch.utils.data.Dataset):
    """Samples, (set, bucket) pairs, as dicts of image (3, H, W) in [-1, 1], caption, bucket (H, W) and path;
    a set's samples are consecutive, one per resolution from the smallest (`resolution`: one side or a list).
    (Caption dropout is the trainer's: it caches each caption's embedding once, see iclora/training.py.)"""

    def __init__(self, root, resolution: int | list[int] = 1024, layout="row", panels: int | None = None):
        grid_shape(1, layout)  # rejects an unknown layout
        if panels is not None and panels < 1:
            raise ValueError(f"panels must be at least 1, got {panels}")
        self.resolutions = sorted({int(r) for r in ([resolution] if isinstance(resolution, int) else resolution)})
        self.root, self.layout, self.panels = Path(root), layout, panels
        if not self.root.is_dir():
            raise ValueError(f"dataset folder {self.root} does not exist")
        problems, self.samples = [], []
        folders, images, texts = list_folder(self.root)
        if images and folders:
            raise ValueError(f"{self.root} mixes joined images ({images[0].name}, ...) and set folders "
                             f"({folders[0].name}/, ...); use one layout per dataset folder")
        stems = Counter(image.with_suffix("") for image in images)  # an image's caption is its stem + .txt
        problems += [f"{text}: caption of no image" for text in texts if text.with_suffix("") not in stems]
        problems += [f"{p}: shares its caption with another image" for p in images if stems[p.with_suffix("")] > 1]
        for image in images:
            self._add_sample(image, [image], image.with_suffix(".txt"), problems)
        for folder in folders:
            inner, panels, texts = list_folder(folder)
            problems += [f"{p}: not a panel image or caption.txt" for p in inner + texts if p.name != "caption.txt"]
            if panels and self.panels not in (None, len(panels)):  # --panels locates the panels of joined images
                problems.append(f"{folder}: a set folder of {len(panels)} panel files, but panels={self.panels}")
            if panels:
                self._add_sample(folder, panels, folder / "caption.txt", problems)
            else:
                problems.append(f"{folder}: set folder has no panel images (any format PIL opens: png, jpg, ...)")
        if problems:
            raise ValueError(f"{len(problems)} problem(s) in dataset {self.root}:\n  " + "\n  ".join(problems))
        if not self.samples:
            raise ValueError(f"no samples in {self.root}: expected images and their .txt captions, or set folders")

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
        count = len(panels) if path.is_dir() else self.panels
        (w, h), (rows, cols) = sizes[panels[0]], grid_shape(count or 1, self.layout)
        h, w = (rows * h, cols * w) if path.is_dir() else (h, w)  # a set folder's size: its panels joined
        own = (h // rows // 16 * 16 * rows, w // cols // 16 * 16 * cols)  # its size, panel sides rounded down to 16
        if not all(own):
            problems.append(f"{path}: panels of {w // cols}x{h // rows} px; at least 16x16 are needed")
            return
        for resolution in self.resolutions:
            if not (buckets := make_buckets(resolution, 16 * rows, 16 * cols)):
                problems.append(f"{path}: a {cols}x{rows} {self.layout} of panels does not fit resolution {resolution}")
                return
            bucket = nearest_bucket(h, w, buckets)
            if bucket[0] > own[0] or bucket[1] > own[1] or not 1 / 4 <= w / h <= 4:  # never upscaled nor cropped
                k = min(1.0, resolution / math.sqrt(own[0] * own[1]))  # to a bucket: own size, area <= resolution²
                bucket = tuple(n * max(16, int(side // n * k) // 16 * 16) for side, n in zip(own, (rows, cols)))
            self.samples.append(Sample(path, panels, caption, bucket, count))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        sample = self.samples[i]
        (h, w), (rows, cols) = sample.bucket, grid_shape(sample.count or 1, self.layout)
        images = [load_rgb(p) for p in sample.panels]
        if sample.path.is_file() and sample.count:  # a joined image: its panels are resized one by one
            images = split_panels(images[0], sample.count, self.layout)
        panels = [ImageOps.fit(image, (w // cols, h // rows), Image.Resampling.LANCZOS) for image in images]
        pixels = torch.from_numpy(np.array(join_panels(panels, self.layout)))  # (H, W, 3) uint8
        image = rearrange(pixels, "h w c -> c h w").float() / 127.5 - 1.0  # (3, H, W) in [-1, 1]
        return dict(image=image, caption=sample.caption, bucket=sample.bucket, path=str(sample.path))


def list_folder(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Sub-folders, images and .txt files, in natural order (2 before 10); other files (caches ...) are left
    alone."""
    natural = lambda p: ([int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", p.name)], p.name)
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=natural)
    folders = [p for p in entries if p.is_dir()]
    images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    texts = [p for p in entries if p.is_file() and p.suffix.lower() == ".txt"]
    return folders, images, texts


def read_caption(path: Path, problems: list[str]) -> str:
    """The stripped caption text, or "" with a line added to `problems` if it is missing, unreadable or
    empty."""
    try:
        caption = path.read_text(encoding="utf-8-sig").strip() if path.is_file() else None
    except (OSError, UnicodeDecodeError) as error:
        problems.append(f"{path}: unreadable caption ({error})")
        return ""
    if not caption:
        problems.append(f"{path}: " + ("missing caption file" if caption is None else "empty caption"))
    return caption or ""


def batches_by_bucket(dataset: PanelSetDataset, batch_size: int, seed: int):
    """One epoch of index lists, each from a single bucket (a batch tensor has one shape): indices are
    shuffled within each bucket and cut into batches (a bucket's last may be smaller), then the batches are
    shuffled; every index appears exactly once. Pass seed + epoch for a new order each epoch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng, by_bucket = np.random.default_rng(seed), {}
    for i, sample in enumerate(dataset.samples):
        by_bucket.setdefault(sample.bucket, []).append(i)
    shuffled = [rng.permutation(indices).tolist() for indices in by_bucket.values()]
    batches = [indices[k:k + batch_size] for indices in shuffled for k in range(0, len(indices), batch_size)]
    return iter([batches[k] for k in rng.permutation(len(batches))])
