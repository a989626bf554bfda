"""In-Context LoRA sampling: panel canvases, the joint caption, and reference panels that condition the others.

Follows In-Context LoRA (arXiv 2410.23775): §3, a set of n panels is ONE image with ONE caption; §4.2,
image-conditioned generation by SDEdit/RePaint-style masking of the known panels in latent space.
Panels tile the canvas as `iclora.data.panel_boxes` places them; their sides are multiples of 16 px, so each
panel is an exact rectangle of packed 2×2 latent tokens.

Reference panels: every Euler step ends at some t_next; the known panels' tokens are then pulled toward their clean
reference latent x_ref noised to t_next with ε, the initial noise of those tokens (so at t = 1 both agree):
    x[known] ← (1 − s)·x[known] + s·((1 − t_next)·x_ref + t_next·ε)
s is the reference strength: 1 replaces the region (RePaint), 0 ignores the reference (plain generation), in
between the model may drift from the reference by a bounded amount. With `stop` F the last round(F·steps) steps
leave the region alone, so the model can smooth the seams; with F = 0 the last step sets the region to x_ref.

Shape letters: B images, N image tokens, c latent channels (16), h/w latent height/width.
"""

import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from minflux.pipeline import Pipeline, from_pil
from minflux.sampling import add_noise, pack

from .data import grid_shape, panel_boxes

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def joint_caption(summary: str | None, panel_prompts: list[str]) -> str:
    """The paper's joint caption, a sentence on the whole set, then one marked description per panel:
        "This three-panel image shows <summary>; [IMAGE1] <p1>; [IMAGE2] <p2>; [IMAGE3] <p3>"
    (without a summary: "This three-panel image; [IMAGE1] ..."). With no panel prompts the summary is returned
    unchanged, so a caption written by hand in the LoRA's own style ([SCENE-1], [LEFT], ...) passes through."""
    if not panel_prompts:
        if not summary or not summary.strip():
            raise ValueError("give a prompt, panel prompts, or both")
        return summary
    if empty := [i for i, p in enumerate(panel_prompts, 1) if not p.strip()]:
        raise ValueError(f"panel prompt {empty[0]} is empty")
    n = len(panel_prompts)
    head = f"This {NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n}-panel image"
    if summary and summary.strip():
        head += f" shows {summary.strip()}"
    return "; ".join([head] + [f"[IMAGE{i}] {p.strip()}" for i, p in enumerate(panel_prompts, 1)])


def panel_size(n: int, layout: str, width: int, height: int) -> tuple[int, int]:
    """(width, height) of one of the n panels that tile a width×height canvas; both must be multiples of 16."""
    cols, rows = grid_shape(n, layout)
    for side, name, cells in ((width, "width", cols), (height, "height", rows)):
        if side <= 0 or side % (16 * cells):
            nearest = 16 * cells * max(1, round(side / (16 * cells)))
            raise ValueError(f"a canvas {name} of {side} px does not split into {cells} panels whose sides are "
                             f"multiples of 16 px; use a canvas {name} of {nearest} (panels {nearest // cells} px) "
                             f"or give the panel {name}")
    return width // cols, height // rows


def canvas_size(n: int, layout: str, panel_width: int, panel_height: int) -> tuple[int, int]:
    """(width, height) of the canvas joining n panels of panel_width×panel_height in a layout."""
    for side, name in ((panel_width, "width"), (panel_height, "height")):
        if side <= 0 or side % 16:
            raise ValueError(f"panel {name} {side} is not a positive multiple of 16 px (a panel must cover whole "
                             f"latent tokens); nearest valid: {16 * max(1, round(side / 16))}")
    cols, rows = grid_shape(n, layout)
    return cols * panel_width, rows * panel_height


def split_panels(image: Image.Image, n: int, layout: str) -> list[Image.Image]:
    """The n panels of a joined image (a grid's unused cells are dropped)."""
    return [image.crop(box) for box in panel_boxes(image.width, image.height, n, layout)]


def reference_panels(num_refs: int, ref_panels: list[int], n: int) -> list[int]:
    """0-based panel of each reference: reference i fixes panel i, or ref_panels gives a 1-based panel per reference."""
    if num_refs and n < 2:
        raise ValueError("reference images need a panel set (--panels N with N >= 2): at least one panel to generate")
    panels = list(ref_panels) if ref_panels else list(range(1, num_refs + 1))
    if len(panels) != num_refs:
        raise ValueError(f"{len(panels)} --ref-panel value(s) for {num_refs} --ref image(s); give one per --ref")
    if bad := [k for k in panels if not 1 <= k <= n]:
        raise ValueError(f"--ref-panel {bad[0]} is not a panel of this {n}-panel set (1..{n})")
    if len(set(panels)) != len(panels):
        raise ValueError(f"two references fix the same panel: --ref-panel {panels}")
    if len(panels) >= n:
        raise ValueError(f"{len(panels)} reference(s) fix every panel of this {n}-panel set: nothing left to generate")
    return [k - 1 for k in panels]


@torch.no_grad()
def reference_latents(pipe: Pipeline, refs: list[tuple[Image.Image, tuple[int, int, int, int]]], width: int,
                      height: int) -> tuple[Tensor, Tensor]:
    """Each reference image cover-resized to its panel box (left, top, right, bottom) and VAE-encoded (the mean),
    placed on a width×height canvas: packed latents (1, N, 4c) and the mask of the known tokens (N,)."""
    known = torch.zeros(1, pipe.ae.params.z_channels, height // 8, width // 8)       # (1, c, h, w)
    mask = torch.zeros(height // 16, width // 16, dtype=torch.bool)
    for image, (left, top, right, bottom) in refs:
        if any(v % 16 for v in (left, top, right, bottom)):
            raise ValueError(f"panel box {(left, top, right, bottom)} is not on the 16-px token grid")
        latent = pipe.encode_image(from_pil(image, right - left, bottom - top)).cpu()   # (1, c, h', w')
        known[:, :, top // 8 : bottom // 8, left // 8 : right // 8] = latent
        mask[top // 16 : bottom // 16, left // 16 : right // 16] = True
    return pack(known), rearrange(mask, "h w -> (h w)")                             # (1, N, 4c), (N,)


def pin_references(known: Tensor, mask: Tensor, noise: Tensor, timesteps: list[float], strength: float = 1.0,
                   stop: float = 0.0):
    """The `after_step(x, t_next)` hook of the module docstring, for the initial noise (B, c, h, w) of this run
    and the times it visits; `strength` s and `stop` F are both in [0, 1]."""
    for name, value in (("reference strength", strength), ("reference stop", stop)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    steps = len(timesteps) - 1
    t_stop = timesteps[steps - round(stop * steps)]  # after step k (t_next = timesteps[k + 1]) pin iff t_next >= t_stop
    eps, keep = pack(noise.float().cpu()), rearrange(mask, "n -> n 1")             # (B, N, 4c), (N, 1)

    def after_step(x: Tensor, t_next: float) -> Tensor:
        if t_next < t_stop:
            return x
        target = add_noise(known, eps, t_next).to(x.device)                         # (B, N, 4c)
        pulled = torch.lerp(x.float(), target, strength)  # lerp is exact at 0 and 1
        return torch.where(keep.to(x.device), pulled, x.float()).to(x.dtype)       # (B, N, 4c)

    return after_step
