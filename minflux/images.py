"""Opening an image file a user gives (--ref, --init, a dataset's images): the image as displayed, in 8-bit
RGB, or a ValueError naming the file and the flag it came from.

- EXIF rotation is applied.
- Transparency (RGBA, LA, a palette or RGB/L PNG with a transparent colour) is composited on white: the colour
  hidden under a transparent pixel is never used.
- 16-bit greyscale (modes "I;16", "I") is scaled from 0..65535 to 0..255; a 32-bit float image (mode "F") is
  read when its values lie in [0, 1] (scaled by 255) and refused otherwise, as are modes Pillow cannot turn
  into RGB.
- An image over Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) is refused, not merely warned of;
  a dataset's images are not capped by it (a camera's 100-megapixel photo is scaled down as any other), only
  by Pillow's own refusal at twice that.
"""

import math
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

WHITE = (255, 255, 255, 255)
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")  # "LAB"'s bands are L, A, B: a band named A is not enough


@contextmanager
def pixel_limit(path: Path, what: str, strict: bool = True):
    """Pillow's decompression-bomb error (over twice Image.MAX_IMAGE_PIXELS) and, when `strict`, its warning
    (over Image.MAX_IMAGE_PIXELS), raised inside the block as one ValueError naming the file and the limit."""
    limit = Image.MAX_IMAGE_PIXELS if strict else 2 * Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        if strict:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise ValueError(f"{what} {path}: more than {limit:,} pixels, Pillow's limit against "
                             f"decompression bombs (Image.MAX_IMAGE_PIXELS); refused: scale it down "
                             f"first") from None


def open_rgb(path: Path, what: str, strict: bool = True) -> Image.Image:
    """The image at `path` as displayed, in 8-bit RGB; `what` ("--ref", "--init", "dataset image") names it in
    a refusal; `strict` as pixel_limit's (False for a dataset). OSError (not an image, a truncated file) is
    left to the caller."""
    with pixel_limit(path, what, strict), Image.open(path) as image:
        return to_rgb(ImageOps.exif_transpose(image), path, what)


def to_rgb(image: Image.Image, path: Path, what: str) -> Image.Image:
    """An opened image in 8-bit RGB (the rules in the module's docstring)."""
    # 16-bit greyscale ("I;16", "I"): 0..65535 scaled to 0..255, which convert alone would clip
    if image.mode.startswith("I"):
        image = Image.fromarray(np.clip(np.asarray(image) / 257, 0, 255).round().astype(np.uint8))
    if image.mode == "F":
        image = float_to_8_bit(image, path, what)
    if image.mode == "La":  # premultiplied: Pillow converts it to RGBA only through LA
        image = image.convert("LA")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        on_white = Image.alpha_composite(Image.new("RGBA", image.size, WHITE), image.convert("RGBA"))
        return on_white.convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:  # "conversion from X to RGB not supported"
        raise ValueError(f"{what} {path}: an image of mode {image.mode!r}, which cannot be converted to RGB; "
                         f"save it as 8-bit RGB (or 16-bit greyscale)") from None


def float_to_8_bit(image: Image.Image, path: Path, what: str) -> Image.Image:
    """A float image (mode "F") whose values lie in [0, 1], scaled by 255 to 8-bit greyscale; any other
    range is refused: its meaning (HDR, depth, 0..255 or 0..65535 data) cannot be told from the file."""
    values = np.asarray(image, dtype=np.float64)
    low = float(values.min())
    high = float(values.max())
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low and high <= 1):
        raise ValueError(f"{what} {path}: a 32-bit float image (mode 'F') with values from {low:g} to "
                         f"{high:g}; float images are read only with values in [0, 1]: save it as 8- or "
                         f"16-bit")
    return Image.fromarray((values * 255).round().astype(np.uint8))


def read_image(path: Path, flag: str) -> Image.Image:
    """The image file a flag names (--ref, --init, --image, --mask), as open_rgb reads it, or a clear error
    naming both: a missing file, or one PIL cannot read (not an image, truncated)."""
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such image file")
    try:
        return open_rgb(path, flag)  # alpha on white; a decompression bomb or an unconvertible mode refused
    except OSError as error:  # PIL's UnidentifiedImageError, a truncated file
        raise ValueError(f"{flag} {path}: not a readable image ({error})") from None
