"""Image conditioning for FLUX.1 Fill and FLUX.1 Kontext, as BFL's src/flux/sampling.py prepares it
(prepare_fill, prepare_kontext). The transformer is dev's in both; only what it is given differs:

- Fill: every image token gets 320 more input channels after its own 64: the packed latent of the image with
  the area to paint blanked (64), then the pixel mask, 8×8 pixels per latent pixel, packed 2×2 (256).
- Kontext: the context image's packed latent tokens follow the image tokens, at positions (1, row, col), the
  generated ones being at (0, row, col); the prediction is cut back to the image tokens.

`conditioned(flow, cond)` has the flow's own signature, so `denoise` and the training loss run it unchanged.
The recipes (`fill_mask`, `fill_condition`, `kontext_condition`) follow diffusers' FluxFillPipeline and
FluxKontextPipeline, random draws included, so that a seed gives their image (docs/fill-and-kontext.md).
Shape letters: B images, Li image tokens, Lc context tokens, c latent channels (16), H/W pixels, A axes (3).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps
from torch import Tensor

from .sampling import image_ids, pack

# Kontext's training resolutions, (width, height), as BFL and diffusers list them: a context image is resized
# to the one whose aspect is closest to its own.
KONTEXT_RESOLUTIONS = [(672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248),
                       (880, 1184), (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832),
                       (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672)]


@dataclass
class Condition:
    """What a Fill or Kontext flow sees besides the noisy image tokens; the batch is 1 or the images'."""
    channels: Tensor | None = None   # (B, Li, 320) Fill: fill_channels
    tokens: Tensor | None = None     # (B, Lc, 4c) Kontext: the context's packed latents
    token_ids: Tensor | None = None  # (B, Lc, A) their positions, context_ids


def mask_channels(mask: Tensor) -> Tensor:
    """A pixel mask (B, 1, H, W), 1 = paint, as Fill reads it: each latent pixel's 8×8 mask pixels become 64
    channels, then 2×2 latent pixels are packed as the latents are: (B, Li, 256), the channel of pixel
    (py, px) in latent pixel (ph, pw) of a token being (py·8 + px)·4 + ph·2 + pw."""
    mask = rearrange(mask, "b 1 (h py) (w px) -> b (py px) h w", py=8, px=8)     # (B, 64, H/8, W/8)
    return pack(mask)                                                             # (B, Li, 256)


def fill_channels(masked_latents: Tensor, mask: Tensor) -> Tensor:
    """Fill's extra input: the latents (B, c, H/8, W/8) of the image with the area to paint blanked, and the
    pixel mask (B, 1, H, W), packed and joined per token: (B, Li, 4c + 256)."""
    return torch.cat([pack(masked_latents), mask_channels(mask)], dim=-1)        # (B, Li, 320)


def context_ids(batch: int, height: int, width: int) -> Tensor:
    """Positions of a height×width context image's tokens: the image grid from (0, 0), first axis 1."""
    ids = image_ids(batch, height, width).clone()  # image_ids' rows share memory   # (B, Lc, A)
    ids[..., 0] = 1
    return ids


def kontext_size(height: int, width: int) -> tuple[int, int]:
    """The Kontext resolution (height, width) whose aspect is closest to a height×width image's, after that
    size is floored to 16 as diffusers does (BFL compares the unfloored size; they rarely differ)."""
    height = height // 16 * 16
    width = width // 16 * 16
    best = min(KONTEXT_RESOLUTIONS, key=lambda wh: abs(width / height - wh[0] / wh[1]))
    return best[1], best[0]


def conditioned(flow, cond: Condition | None):
    """`flow` when there is no condition; else a callable with its signature that adds the Fill channels to
    the image tokens, or appends the Kontext tokens with their positions and cuts the prediction back."""
    if cond is None:
        return flow

    def forward(img: Tensor, img_ids: Tensor, *args, **kwargs) -> Tensor:
        # img: (B, Li, 4c)  img_ids: (B, Li, A); the rest is passed on as it comes
        B, Li = img.shape[:2]
        if cond.channels is not None:
            channels = cond.channels.to(img).expand(B, -1, -1)                    # (B, Li, 320)
            img = torch.cat([img, channels], dim=-1)                              # (B, Li, 384)
        if cond.tokens is not None:
            tokens = cond.tokens.to(img).expand(B, -1, -1)                        # (B, Lc, 4c)
            ids = cond.token_ids.to(img_ids).expand(B, -1, -1)                    # (B, Lc, A)
            img = torch.cat([img, tokens], dim=1)                                 # (B, Li + Lc, 4c)
            img_ids = torch.cat([img_ids, ids], dim=1)                            # (B, Li + Lc, A)
        return flow(img, img_ids, *args, **kwargs)[:, :Li]                        # (B, Li, 4c)

    return forward


def fill_mask(mask: Image.Image, height: int, width: int) -> Tensor:
    """A mask image (white = paint) as diffusers' Fill pipeline reads it: resized to height×width (LANCZOS,
    stretched, in the image's own mode), made greyscale, then 0 or 1 at half: (1, 1, H, W)."""
    mask = mask.resize((width, height), Image.Resampling.LANCZOS).convert("L")
    binary = torch.from_numpy(np.array(mask).astype(np.float32) / 255.0) >= 0.5        # (H, W)
    return rearrange(binary.float(), "h w -> 1 1 h w")


def fill_condition(pipe, pixels: Tensor, mask: Tensor, g: torch.Generator) -> Condition:
    """Fill's channels for the image `pixels` (1, 3, H, W) in [-1, 1] and its `mask` (1, 1, H, W): the image
    with the area to paint set to 0 (mid grey), encoded to a posterior sample drawn from `g`. In diffusers'
    order this is the generator's third draw, after the image's own latents and the noise (sample.py)."""
    masked_latents = pipe.encode_image(pixels * (1 - mask), g).cpu()              # (1, c, H/8, W/8)
    return Condition(channels=fill_channels(masked_latents, mask))


def fill_panels(refs: list, height: int, width: int) -> tuple[Image.Image, Image.Image]:
    """A Fill input for a panel set: each (reference image, panel box (left, top, right, bottom)) is
    cover-resized into its box on a mid-grey height×width canvas; the mask is white (paint) but over them."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    mask = Image.new("L", (width, height), 255)
    for picture, (left, top, right, bottom) in refs:
        fitted = ImageOps.fit(picture.convert("RGB"), (right - left, bottom - top), Image.Resampling.LANCZOS)
        image.paste(fitted, (left, top))
        mask.paste(0, (left, top, right, bottom))
    return image, mask


def context_size(height: int, width: int, mode: str = "preferred") -> tuple[int, int]:
    """The (height, width) a height×width context image is resized to: "preferred", the Kontext resolution
    of the closest aspect (kontext_size); "own", its own size floored to 16."""
    if mode == "own":
        return height // 16 * 16, width // 16 * 16
    return kontext_size(height, width)


def output_size(height: int, width: int, area: int) -> tuple[int, int]:
    """A height×width image's aspect at about `area` pixels, floored to 16 (diffusers' Kontext max_area)."""
    aspect = width / height
    return round(math.sqrt(area / aspect)) // 16 * 16, round(math.sqrt(area * aspect)) // 16 * 16


def kontext_condition(pipe, image: Image.Image, height: int, width: int) -> Condition:
    """Kontext's context: the image resized to height×width (LANCZOS, stretched), encoded to its latents'
    mean (no random draw), packed, at positions (1, row, col)."""
    image = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.array(image).astype(np.float32) / 255.0) * 2.0 - 1.0   # (H, W, 3)
    latents = pipe.encode_image(rearrange(pixels, "h w c -> 1 c h w")).cpu()           # (1, c, H/8, W/8)
    return Condition(tokens=pack(latents), token_ids=context_ids(1, height, width))
