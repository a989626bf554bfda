"""In-Context LoRA training data (arXiv 2410.23775 §3): each panel set becomes ONE image with ONE caption.

A dataset folder holds either (a) joined images with same-named .txt captions (the usual LoRA layout, the
authors'), or (b) one sub-folder per set, `set01/1.png 2.png caption.txt`, its panels joined in natural
file-name order in a `layout` (iclora/panels.py). A joined image's panels are located, and resized one by
one as a set folder's are, only when `panels` says how many it holds. A set is one sample per resolution, in
the aspect bucket nearest its own (1:4 to 4:1, area <= resolution², sides multiples of 16 per panel), its
panels cover-resized. A set that bucket would upscale or crop (beyond 1:4-4:1) keeps its own size instead,
panel sides rounded down to 16 and scaled down to at most resolution² (docs/training.md, "Dataset layout").
Every file is checked when the dataset is built; one ValueError lists every problem.
"""

import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps

from iclora.panels import grid_shape, join_panels, split_panels
from iclora.references import reference_panels
from minflux.images import open_rgb, pixel_limit
from minflux.tokenizers import overlong

IMAGE_SUFFIXES = {suffix for suffix, name in Image.registered_extensions().items() if name in Image.OPEN}


def make_buckets(resolution: int, multiple_h: int = 16, multiple_w: int = 16) -> list[tuple[int, int]]:
    """(H, W) buckets of aspect 1:4 to 4:1 and area at most resolution², sides multiples of multiple_h and
    multiple_w: for each width, the tallest height that fits."""
    area = resolution * resolution
    buckets = []
    # W <= 4H and W·H <= resolution² give W <= 2·resolution
    for w in range(multiple_w, 2 * resolution + 1, multiple_w):
        h = area // w // multiple_h * multiple_h
        if h > 0 and 1 / 4 <= w / h <= 4:
            buckets.append((h, w))
    return buckets


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The (H, W) bucket closest to height×width in log aspect ratio; ties go to the larger area."""
    return min(buckets, key=lambda b: (abs(math.log(b[1] * height / (b[0] * width))), -b[0] * b[1]))


def round_down_per_panel(height: int, width: int, rows: int, cols: int) -> tuple[int, int]:
    """(H, W) of a height×width set of rows×cols panels once each panel's sides are rounded down to a
    multiple of 16 (0 where a panel side is under 16 px)."""
    return height // rows // 16 * 16 * rows, width // cols // 16 * 16 * cols


def fit_own_size(own: tuple[int, int], rows: int, cols: int, resolution: int) -> tuple[int, int]:
    """The bucket of a set no aspect bucket suits: its own size `own` (from round_down_per_panel), scaled
    down to an area of at most resolution², each panel side rounded down to 16 px and at least 16."""
    scale = min(1.0, resolution / math.sqrt(own[0] * own[1]))
    height = rows * max(16, int(own[0] // rows * scale) // 16 * 16)
    width = cols * max(16, int(own[1] // cols * scale) // 16 * 16)
    return height, width


def load_rgb(path: Path) -> Image.Image:
    """A dataset image as displayed, in 8-bit RGB (minflux/images.py: alpha on white, 16-bit greyscale and
    [0, 1] float scaled to 8 bits, decompression bombs and unconvertible modes refused)."""
    return open_rgb(path, "dataset image", strict=False)  # not capped: scaled down


@dataclass
class Sample:
    path: Path  # the joined image (a) or the set folder (b)
    panels: list[Path]  # [path] in layout (a); the panel files in order in layout (b)
    caption: str
    bucket: tuple[int, int]  # (H, W)
    count: int | None  # panels in the set; None for a joined image without `panels` (they cannot be located)


class PanelSetDataset(torch.utils.data.Dataset):
    """Samples, (set, bucket) pairs, as dicts of image (3, H, W) in [-1, 1], caption, bucket (H, W) and path;
    a set's samples are consecutive, one per resolution from the smallest (`resolution`: one side or a list).
    (Caption dropout is the trainer's: it caches each caption's embedding once, see iclora/training.py.)"""

    def __init__(self, root, resolution: int | list[int] = 1024, layout="row", panels: int | None = None):
        grid_shape(1, layout)  # rejects an unknown layout
        if panels is not None and panels < 1:
            raise ValueError(f"panels must be at least 1, got {panels}")
        resolutions = [resolution] if isinstance(resolution, int) else resolution
        self.resolutions = sorted({int(r) for r in resolutions})
        self.root = Path(root)
        self.layout = layout
        self.panels = panels
        if not self.root.is_dir():
            raise ValueError(f"dataset folder {self.root} does not exist")
        self.samples = []
        problems = []
        folders, images, texts = list_folder(self.root, self.root, problems)
        if images and folders:
            raise ValueError(f"{self.root} mixes joined images ({images[0].name}, ...) and set folders "
                             f"({folders[0].name}/, ...); use one layout per dataset folder")
        stems = Counter(image.with_suffix("") for image in images)  # an image's caption is its stem + .txt
        problems += [f"{text}: caption of no image" for text in texts if text.with_suffix("") not in stems]
        problems += [f"{p}: shares its caption with another image"
                     for p in images if stems[p.with_suffix("")] > 1]
        for image in images:
            self._add_sample(image, [image], image.with_suffix(".txt"), problems)
        for folder in folders:
            inner, panel_files, texts = list_folder(folder, self.root, problems)
            problems += [f"{p}: not a panel image or caption.txt"
                         for p in inner + texts if p.name != "caption.txt"]
            # --panels is there to locate the panels of joined images: a set folder must agree with it
            if panel_files and self.panels not in (None, len(panel_files)):
                problems.append(f"{folder}: a set folder of {len(panel_files)} panel files, "
                                f"but panels={self.panels}")
            if panel_files:
                self._add_sample(folder, panel_files, folder / "caption.txt", problems)
            else:
                problems.append(f"{folder}: set folder has no panel images "
                                f"(any format PIL opens: png, jpg, ...)")
        if problems:
            listing = "\n  ".join(problems)
            raise ValueError(f"{len(problems)} problem(s) in dataset {self.root}:\n  {listing}")
        if not self.samples:
            raise ValueError(f"no samples in {self.root}: expected images and their .txt captions, "
                             f"or set folders")

    def _add_sample(self, path, panels, caption_path, problems):
        """Check one sample; append it to self.samples, or one line per problem to `problems`."""
        found = len(problems)
        caption = read_caption(caption_path, problems)
        sizes = image_sizes(panels, problems)
        if len(set(sizes.values())) > 1:
            listing = ", ".join(f"{p.name} {w}x{h}" for p, (w, h) in sizes.items())
            problems.append(f"{path}: panels of one set must share one size, got {listing}")
        if len(problems) > found:
            return
        count = len(panels) if path.is_dir() else self.panels
        rows, cols = grid_shape(count or 1, self.layout)
        w, h = sizes[panels[0]]
        if path.is_dir():  # a set folder's size: its panels joined
            h = rows * h
            w = cols * w
        own = round_down_per_panel(h, w, rows, cols)
        if not all(own):
            problems.append(f"{path}: panels of {w // cols}x{h // rows} px; at least 16x16 are needed")
            return
        for resolution in self.resolutions:
            buckets = make_buckets(resolution, 16 * rows, 16 * cols)
            if not buckets:
                problems.append(f"{path}: a {cols}x{rows} {self.layout} of panels "
                                f"does not fit resolution {resolution}")
                return
            bucket = nearest_bucket(h, w, buckets)
            upscaled = bucket[0] > own[0] or bucket[1] > own[1]
            cropped = not 1 / 4 <= w / h <= 4
            if upscaled or cropped:  # neither is done: the set keeps its own size
                bucket = fit_own_size(own, rows, cols, resolution)
            self.samples.append(Sample(path, panels, caption, bucket, count))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        sample = self.samples[i]
        h, w = sample.bucket
        rows, cols = grid_shape(sample.count or 1, self.layout)
        images = [load_rgb(p) for p in sample.panels]
        if sample.path.is_file() and sample.count:  # a joined image: its panels are resized one by one
            images = split_panels(images[0], sample.count, self.layout)
        panels = [ImageOps.fit(image, (w // cols, h // rows), Image.Resampling.LANCZOS) for image in images]
        pixels = torch.from_numpy(np.array(join_panels(panels, self.layout)))  # (H, W, 3) uint8
        image = rearrange(pixels, "h w c -> c h w").float() / 127.5 - 1.0  # (3, H, W) in [-1, 1]
        return dict(image=image, caption=sample.caption, bucket=sample.bucket, path=str(sample.path))


def image_sizes(panels: list[Path], problems: list[str]) -> dict[Path, tuple[int, int]]:
    """(width, height) of each readable image, as displayed; a line in `problems` for each unreadable one."""
    sizes = {}
    for panel in panels:
        try:
            with pixel_limit(panel, "dataset image", strict=False), Image.open(panel) as image:
                image.verify()  # checks the file's structure; load_rgb then decodes every pixel
            sizes[panel] = load_rgb(panel).size
        except ValueError as error:  # open_rgb's refusals (a decompression bomb, a float image's range, ...)
            problems.append(str(error))
        except Exception as error:  # PIL raises many types for bad files; each becomes a listed problem
            problems.append(f"{panel}: unreadable image ({type(error).__name__}: {error})")
    return sizes


def natural_key(path: Path):
    """Sorts file names in natural order: runs of digits compare as numbers (2 before 10), and the rest
    ignoring case."""
    parts = [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", path.name)]
    return parts, path.name


def list_folder(folder: Path, root: Path, problems: list[str]) -> tuple[list[Path], list[Path], list[Path]]:
    """Sub-folders, images and .txt files, in natural order (2 before 10); other files (caches ...) are left
    alone, as are hidden ones. A symbolic link that would be read but leads outside the dataset folder `root`
    is not followed: it is a line in `problems`."""
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=natural_key)
    entries = [p for p in entries if stays_inside(p, root, problems)]
    folders = [p for p in entries if p.is_dir()]
    images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    texts = [p for p in entries if p.is_file() and p.suffix.lower() == ".txt"]
    return folders, images, texts


def stays_inside(path: Path, root: Path, problems: list[str]) -> bool:
    """False, with a line in `problems`, for a folder, image or .txt whose real location (symbolic links
    followed) is outside `root`: a link must not bring a file from elsewhere into the LoRA."""
    read = path.is_dir() or (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES | {".txt"})
    target = Path(os.path.realpath(path))
    if not read or target.is_relative_to(root.resolve()):
        return True
    problems.append(f"{path}: a symbolic link to {target}, outside the dataset folder {root}; not followed "
                    f"(copy the file into the folder instead)")
    return False


def read_caption(path: Path, problems: list[str]) -> str:
    """The stripped caption text; "" and a line in `problems` if the file is missing, unreadable or empty."""
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
    """One epoch of index lists, each from a single bucket (a batch tensor has one shape): indices are
    shuffled within each bucket and cut into batches (a bucket's last may be smaller), then the batches are
    shuffled; every index appears exactly once. Pass seed + epoch for a new order each epoch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng(seed)
    by_bucket = {}
    for i, sample in enumerate(dataset.samples):
        by_bucket.setdefault(sample.bucket, []).append(i)
    batches = []
    for indices in by_bucket.values():
        shuffled = rng.permutation(indices).tolist()
        for k in range(0, len(shuffled), batch_size):
            batches.append(shuffled[k : k + batch_size])
    order = rng.permutation(len(batches))
    return iter([batches[k] for k in order])


# The checks of a built dataset against the run's flags, made before any weight loads.


def check_captions(t5_tokenizer, dataset, val_prompts: list[str], strict: bool = False):
    """Warns of each training caption and validation prompt that T5 reads only in part; with `strict`,
    refuses them instead."""
    named = [(f"the caption of {s.path}", s.caption) for s in dataset.samples[::len(dataset.resolutions)]]
    messages = overlong(t5_tokenizer, named + [(f"--val-prompt {p[:40]!r}", p) for p in val_prompts])
    if messages and strict:
        raise ValueError("--strict-captions: " + "\n".join(messages))
    for message in messages:
        warnings.warn(message, stacklevel=2)


def check_reference_panels(dataset, ref_panels: list[int]) -> int:
    """The panel count of every set: each set's panels are located (set folders, or joined images with
    `panels`), all sets have one count, and that count holds every 1-based reference panel."""
    unknown = [s.path.name for s in dataset.samples[::len(dataset.resolutions)] if s.count is None]
    if unknown:
        raise ValueError(f"--ref-panel needs to know where the panels are, but {dataset.root} holds joined "
                         f"images ({', '.join(unknown[:3])}, ...): give --panels N (and --layout) for the "
                         f"panels in each")
    counts = {s.count for s in dataset.samples}
    if len(counts) > 1:
        raise ValueError(f"--ref-panel: the sets of {dataset.root} hold different numbers of panels "
                         f"({sorted(counts)}); a conditional LoRA is trained on one panel count")
    reference_panels(len(ref_panels), ref_panels, counts.pop())  # a panel not there, or nothing to generate
    return dataset.samples[0].count
