"""Reference panels (In-Context LoRA, arXiv 2410.23775 §4.2): given panels condition the generated ones.

One mask throughout the project, `ref_mask` (Li,): True on the reference tokens, the given ones; the model
generates the others, and the training loss is taken on those alone. Before the first step and after every
Euler step (to t_next), SDEdit/RePaint-style, x[ref_mask] ← (1 − s)·x[ref_mask] + s·r(t_next): s = 1 replaces
them; with `stop` F, the last round(F·steps) steps leave them to the model to smooth the seams. r(t), which
training gives the model too (`reference_tokens`, `image_positions`): "noised" (1 − t)·x_ref + t·ε, with the
run's initial noise ε (the paper's); "clean" x_ref; "moved" x_ref at the RoPE positions of the first generated
panel, first axis r for the r-th reference (as FLUX.1 Kontext), so a token finds its reference at its own
(row, col). Only LoRAs trained so (`train.py --ref-panel`, which records the mode) use the last two.
Shape letters: B images, Li image tokens, c latent channels (16), h/w latent height/width.
"""

import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from iclora.panels import panel_boxes
from minflux.pipeline import Pipeline, from_pil
from minflux.sampling import add_noise, image_ids, pack


def reference_panels(num_refs: int, ref_panels: list[int], n: int) -> list[int]:
    """0-based panel of each reference: reference i fixes panel i, or ref_panels gives a 1-based panel per
    reference."""
    if num_refs and n < 2:
        raise ValueError("reference images need a panel set (--panels N with N >= 2): "
                         "at least one panel to generate")
    panels = list(ref_panels) if ref_panels else list(range(1, num_refs + 1))
    if len(panels) != num_refs:
        raise ValueError(f"{len(panels)} --ref-panel value(s) for {num_refs} --ref image(s); "
                         f"give one per --ref")
    for k in panels:
        if not 1 <= k <= n:
            raise ValueError(f"--ref-panel {k} is not a panel of this {n}-panel set (1..{n})")
    if len(set(panels)) != len(panels):
        raise ValueError(f"two references fix the same panel: --ref-panel {panels}")
    if len(panels) >= n:
        raise ValueError(f"{len(panels)} reference(s) fix every panel of this {n}-panel set: "
                         f"nothing left to generate")
    return [k - 1 for k in panels]


@torch.no_grad()
def reference_latents(pipe: Pipeline, refs: list[tuple[Image.Image, tuple[int, int, int, int]]], height: int,
                      width: int) -> tuple[Tensor, Tensor]:
    """Each reference image cover-resized to its panel box (left, top, right, bottom) and VAE-encoded (the
    mean), placed on a height×width canvas: packed latents (1, Li, 4c) and ref_mask (Li,)."""
    ref_latents = torch.zeros(1, pipe.ae.params.z_channels, height // 8, width // 8)  # (1, c, h, w)
    ref_mask = torch.zeros(height // 16, width // 16, dtype=torch.bool)
    for image, (left, top, right, bottom) in refs:
        if any(v % 16 for v in (left, top, right, bottom)):
            raise ValueError(f"panel box {(left, top, right, bottom)} is not on the 16-px token grid")
        latent = pipe.encode_image(from_pil(image, bottom - top, right - left)).cpu()   # (1, c, h', w')
        ref_latents[:, :, top // 8 : bottom // 8, left // 8 : right // 8] = latent
        ref_mask[top // 16 : bottom // 16, left // 16 : right // 16] = True
    return pack(ref_latents), rearrange(ref_mask, "h w -> (h w)")                   # (1, Li, 4c), (Li,)


REF_MODES = ("noised", "clean", "moved")


def reference_tokens(ref_latents: Tensor, eps: Tensor, t: float | Tensor, mode: str = "noised") -> Tensor:
    """r(t) of the module docstring for packed reference latents and noise, both (B, Li, 4c); t is a float
    or (B, 1, 1)."""
    if mode == "noised":
        return add_noise(ref_latents, eps, t)                                       # (B, Li, 4c)
    if mode in ("clean", "moved"):
        return ref_latents.expand_as(eps)                                           # (B, Li, 4c)
    raise ValueError(f"unknown reference mode {mode!r}; expected one of {REF_MODES}")


def image_positions(height: int, width: int, n: int, layout: str, refs: list[int], mode: str) -> Tensor:
    """RoPE positions (1, Li, 3) of a height×width canvas of n panels whose 0-based `refs` are references
    given in `mode`: the canvas's own (image_ids), but for "moved" (module docstring)."""
    ids = rearrange(image_ids(1, height, width), "1 (h w) a -> h w a", h=height // 16).clone()  # (h, w, 3)
    if mode == "moved":
        boxes = [[side // 16 for side in box] for box in panel_boxes(height, width, n, layout)]
        first_generated = min(set(range(n)) - set(refs))
        left, top = boxes[first_generated][:2]
        for r, k in enumerate(refs, 1):  # reference r's tokens take the first generated panel's (row, col)
            ref_left, ref_top, ref_right, ref_bottom = boxes[k]
            height_k, width_k = ref_bottom - ref_top, ref_right - ref_left
            ids[ref_top:ref_bottom, ref_left:ref_right] = ids[top : top + height_k, left : left + width_k]
            ids[ref_top:ref_bottom, ref_left:ref_right, 0] = r
    return rearrange(ids, "h w a -> 1 (h w) a")                                                  # (1, Li, 3)


def pin_references(ref_latents: Tensor, ref_mask: Tensor, noise: Tensor, timesteps: list[float],
                   strength: float = 1.0, stop: float = 0.0, mode: str = "noised"):
    """The `after_step(x, t_next)` hook of the module docstring, for the initial noise (B, c, h, w) of this
    run and the times it visits; `strength` s and `stop` F are both in [0, 1]. Callers also apply it to the
    start, `x = after_step(x, timesteps[0])` (a no-op for "noised" from pure noise)."""
    for name, value in (("reference strength", strength), ("reference stop", stop)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    reference_tokens(ref_latents, ref_latents, 0.0, mode)  # rejects an unknown mode now
    steps = len(timesteps) - 1
    # after step k (t_next = timesteps[k + 1]) the references are pinned iff t_next >= t_stop
    t_stop = timesteps[steps - round(stop * steps)]
    eps = pack(noise.float().cpu())                                                # (B, Li, 4c)
    pinned = rearrange(ref_mask, "n -> n 1")                                       # (Li, 1) ref_mask

    def after_step(x: Tensor, t_next: float) -> Tensor:
        if t_next < t_stop:
            return x
        target = reference_tokens(ref_latents, eps, t_next, mode).to(x.device)     # (B, Li, 4c)
        pulled = torch.lerp(x.float(), target, strength)  # lerp is exact at 0 and 1
        return torch.where(pinned.to(x.device), pulled, x.float()).to(x.dtype)     # (B, Li, 4c)

    return after_step
