"""Rectified-flow sampling for FLUX.1: noise, latent packing, the shifted schedule and the Euler loop.

Mirrors BFL's src/flux/sampling.py: get_noise, time_shift, get_schedule, denoise and unpack keep its names;
pack, image_ids and text_ids are the latent half of its `prepare`, and shift_mu is its `get_lin_function`.

The project's one convention for time (stated here, used everywhere):
    t = 1 is pure noise, t = 0 is data;   x_t = (1 − t)·x0 + t·ε;
    the model predicts the velocity v = ε − x0;   an Euler step is x += (t_next − t)·v.

Sizes are (height, width), as in BFL's files. Shape letters: B batch, c latent channels (16), h/w latent
height and width (image size / 8), Li image tokens ((h/2)·(w/2)), Lt text tokens.
"""

import math

import torch
from einops import rearrange, repeat
from torch import Tensor
from tqdm.auto import tqdm

# Limits on what one sampling run may ask for (flags, a PNG's settings, a LoRA's metadata), checked before
# anything is allocated, so that an absurd request is refused with a message instead of dying in the
# allocator. 4096 px a side is 4× the 1024 px FLUX.1 was trained at: 65536 image tokens.
MAX_SIDE = 4096  # pixels, each side of the canvas and of each panel
MAX_PANELS = 16  # panels of one set
MAX_IMAGES = 64  # --num-images: images per prompt and seed, drawn in one batch


def check_size(height: int, width: int):
    """A canvas of height×width pixels: both sides positive multiples of 16, and at most MAX_SIDE."""
    if width % 16 or height % 16 or width <= 0 or height <= 0:
        nearest_width, nearest_height = 16 * max(1, round(width / 16)), 16 * max(1, round(height / 16))
        raise ValueError(f"width and height must be positive multiples of 16 (the VAE's 8× times the 2×2 "
                         f"patch), got {width}×{height} (W×H); nearest valid size: "
                         f"{nearest_width}×{nearest_height}")
    if width > MAX_SIDE or height > MAX_SIDE:
        raise ValueError(f"a {width}×{height} (W×H) image is over the limit of {MAX_SIDE} px a side; give a "
                         f"smaller size")


def get_noise(num: int, height: int, width: int, seed: int, g: torch.Generator | None = None) -> Tensor:
    """Initial latent noise, drawn exactly as the reference pipelines do: float32, from a CPU generator
    seeded with `seed`, or from `g`."""
    check_size(height, width)
    g = g or torch.Generator("cpu").manual_seed(seed)
    return torch.randn(num, 16, height // 8, width // 8, generator=g, dtype=torch.float32)  # (B, c, h, w)


def pack(x: Tensor) -> Tensor:
    """Latent image -> sequence of 2×2 patches, row-major."""
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)   # (B, Li, 4c)


def unpack(x: Tensor, height: int, width: int) -> Tensor:
    """The inverse of pack for an image of height×width pixels: (B, Li, 4c) -> (B, c, h, w)."""
    return rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 16, w=width // 16, ph=2, pw=2)


def image_ids(batch: int, height: int, width: int) -> Tensor:
    """RoPE positions (0, row, col) of each packed image token."""
    ids = torch.zeros(height // 16, width // 16, 3)
    ids[..., 1] = torch.arange(height // 16)[:, None]
    ids[..., 2] = torch.arange(width // 16)[None, :]
    return repeat(ids, "h w a -> b (h w) a", b=batch)                            # (B, Li, 3)


def text_ids(batch: int, length: int) -> Tensor:
    return torch.zeros(batch, length, 3)                                        # (B, Lt, 3): RoPE is identity


def add_noise(x0: Tensor, noise: Tensor, t: float | Tensor) -> Tensor:
    """The point at time t on the straight line from data x0 (t = 0) to noise (t = 1)."""
    return (1 - t) * x0 + t * noise


def shift_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's time-shift exponent, linear in the token count: 0.5 at 256 tokens (a 256²px image), 1.15 at
    4096 tokens (1024²px)."""
    return base_shift + (max_shift - base_shift) * (image_seq_len - 256) / (4096 - 256)


def time_shift(mu: float, t: Tensor) -> Tensor:
    """Moves the schedule toward t = 1 (more noise) by e^mu: larger images need more steps at high noise."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def get_schedule(num_steps: int, image_seq_len: int, shift: bool = True) -> list[float]:
    """num_steps + 1 times from 1 to 0; mu grows linearly with the token count (0.5 at 256, 1.15 at 4096).
    Computed in float64, so the first time is exactly 1 (pure noise), as in diffusers' scheduler."""
    ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if shift:
        ts[:-1] = time_shift(shift_mu(image_seq_len), ts[:-1])  # t = 0 stays 0
    return ts.tolist()


def img2img_start(num_steps: int, strength: float) -> int:
    """Index into the schedule where image-to-image starts: strength 1 is the whole schedule (text-to-image),
    0 is its end (no step). The rule and its float rounding are diffusers' (docs/notes.md): int(n − n·s)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1] (0 keeps the input image, 1 ignores it), "
                         f"got {strength}")
    return int(num_steps - num_steps * strength)


@torch.no_grad()
def denoise(model, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, vec: Tensor,
            timesteps: list[float], guidance: float = 3.5, after_step=None, progress: bool = True) -> Tensor:
    """Euler integration of dx/dt = v along `timesteps` (1 -> 0 for text-to-image) in img's device and dtype.
    `after_step(x, t)` may edit x at the start (t = timesteps[0]) and after each step (t = t_next), e.g. to
    pin reference panels, and returns the new x."""
    txt, vec = txt.to(img), vec.to(img)                                           # (B, Lt, C), (B, C)
    img_ids, txt_ids = img_ids.to(img.device), txt_ids.to(img.device)             # (B, Li, 3), (B, Lt, 3)
    B = img.shape[0]
    g = torch.full((B,), guidance, dtype=img.dtype, device=img.device)
    if after_step is not None:
        img = after_step(img, timesteps[0])
    steps = list(zip(timesteps[:-1], timesteps[1:], strict=True))                 # (t, t_next) pairs
    for t, t_next in tqdm(steps, desc="sampling", disable=not progress):
        t_batch = torch.full((B,), t, dtype=img.dtype, device=img.device)
        v = model(img, img_ids, txt, txt_ids, timesteps=t_batch, y=vec, guidance=g)  # (B, Li, 4c)
        img = (img.float() + (t_next - t) * v.float()).to(img.dtype)
        if after_step is not None:
            img = after_step(img, t_next)
    return img
