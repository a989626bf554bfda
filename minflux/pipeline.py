"""Text-to-image with FLUX.1: prompts -> (T5, CLIP) -> Euler sampling of the transformer -> autoencoder -> pixels.

Follows the BFL reference `flux/cli.py` + `flux/sampling.py`; defaults and pixel conversion match diffusers'
FluxPipeline, so the same prompt, seed, size, steps and guidance give the same image.

Image-to-image (SDEdit, as BFL's demo and diffusers' FluxImg2ImgPipeline): the schedule starts at index
i0 = `img2img_start(steps, strength)` from x = (1 − t0)·x_init + t0·ε, with ε the seed's noise; strength 1 is
exactly text-to-image, strength 0 returns the init latents.

Shape letters: B images, L text tokens, N image tokens, c latent channels, h/w latent size.
"""

from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps
from torch import Tensor, nn

from . import loading
from .hub import Repo
from .autoencoder import AutoEncoder
from .clip import CLIPTextModel
from .model import Flux
from .sampling import (add_noise, check_size, denoise, get_noise, get_schedule, image_ids, img2img_start, pack,
                       text_ids, unpack)
from .t5 import T5Encoder
from .tokenizers import CLIPTokenizer, T5Tokenizer


@dataclass
class Pipeline:
    flow: Flux
    ae: AutoEncoder
    t5: T5Encoder
    clip: CLIPTextModel
    t5_tokenizer: T5Tokenizer
    clip_tokenizer: CLIPTokenizer
    device: torch.device = torch.device("cpu")
    offload: bool = False  # keep models on the CPU and move each to `device` only while it runs

    @property
    def is_schnell(self) -> bool:
        return not self.flow.params.guidance_embed

    @property
    def default_steps(self) -> int:
        return 4 if self.is_schnell else 28

    def on_device(self, model: nn.Module) -> nn.Module:
        """Moves `model` to the device; with offload, first sends every other model back to the CPU."""
        if self.offload:
            for other in (self.flow, self.ae, self.t5, self.clip):
                if other is not model:
                    other.to("cpu")
        return model.to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """T5 hidden states (B, L, 4096) for every token (pads too, no mask), and CLIP's pooled vector (B, 768)."""
        txt = self.on_device(self.t5)(self.t5_tokenizer(prompts).to(self.device))           # (B, L, 4096)
        vec = self.on_device(self.clip)(self.clip_tokenizer(prompts).to(self.device))       # (B, 768)
        return txt, vec

    @property
    def ae_dtype(self) -> torch.dtype:
        return next(self.ae.parameters()).dtype

    @property
    def flow_dtype(self) -> torch.dtype:
        return next(self.flow.parameters()).dtype

    @torch.no_grad()
    def generate(self, prompts: list[str], width: int = 1024, height: int = 1024, steps: int | None = None,
                 guidance: float = 3.5, seed: int = 0, num_images: int = 1, progress: bool = True) -> list[Image.Image]:
        """num_images per prompt, all from one noise draw of `seed` (as diffusers does with one generator)."""
        txt, vec = self.encode_prompts([p for p in prompts for _ in range(num_images)])
        return to_pil(self.decode(self.sample(txt, vec, width, height, steps, guidance, seed, progress)))

    def schedule(self, width: int, height: int, steps: int | None = None, strength: float = 1.0) -> list[float]:
        """The times sample() visits: the shifted schedule for this size (linear for schnell), from img2img's start."""
        steps = self.default_steps if steps is None else steps
        ts = get_schedule(steps, (width // 16) * (height // 16), shift=not self.is_schnell)
        return ts[img2img_start(steps, strength):]

    @torch.no_grad()
    def sample(self, txt: Tensor, vec: Tensor, width: int, height: int, steps: int | None = None,
               guidance: float = 3.5, seed: int = 0, progress: bool = True, init: Tensor | None = None,
               strength: float = 1.0, noise: Tensor | None = None, after_step=None) -> Tensor:
        """Encoded prompts -> clean latents (B, c, h, w), integrating from the seed's noise at t = 1, or with
        `init` latents (1 or B, c, h, w) from t0 = schedule[img2img_start(steps, strength)] (module docstring).
        `noise` (B, c, h, w) replaces the seed's draw; `after_step(x, t_next)` is passed on to `denoise`."""
        check_size(height, width)
        B, dtype = txt.shape[0], self.flow_dtype
        x = get_noise(B, height, width, seed) if noise is None else noise.float().cpu()    # (B, c, h, w)
        if x.shape != (B, 16, height // 8, width // 8):
            raise ValueError(f"noise must have shape {(B, 16, height // 8, width // 8)}, got {tuple(x.shape)}")
        timesteps = self.schedule(width, height, steps, strength)
        if init is not None:
            if init.shape[1:] != x.shape[1:] or init.shape[0] not in (1, B):
                raise ValueError(f"init latents must have shape (1 or {B}, {', '.join(map(str, x.shape[1:]))}) "
                                 f"for a {width}×{height} image, got {tuple(init.shape)}")
            x = add_noise(init.float().cpu(), x, timesteps[0])                             # (B, c, h, w)
        elif strength != 1.0:
            raise ValueError(f"strength {strength} needs init latents (image-to-image); text-to-image is strength 1")
        x = pack(x).to(self.device, dtype)                                                  # (B, N, 4c)
        x = denoise(self.on_device(self.flow), x, image_ids(B, height, width).to(self.device), txt.to(dtype),
                    text_ids(B, txt.shape[1]).to(self.device), vec.to(dtype), timesteps, guidance, after_step,
                    progress)
        return unpack(x, height, width)

    @torch.no_grad()
    def encode_image(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> latents (B, c, H/8, W/8): the mean, or a sample with `generator`."""
        return self.on_device(self.ae).encode(images.to(self.device, self.ae_dtype), generator).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, c, h, w) -> pixels (B, 3, 8h, 8w) in [-1, 1]."""
        return self.on_device(self.ae).decode(latents.to(self.device, self.ae_dtype))


def from_pil(image: Image.Image, width: int, height: int) -> Tensor:
    """An image cover-resized and center-cropped to width×height (never stretched) -> (1, 3, H, W) in [-1, 1]."""
    image = ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.array(image)).float() / 127.5 - 1.0                          # (H, W, 3)
    return rearrange(x, "h w c -> 1 c h w")


def to_pil(x: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> images, rounding like diffusers' image processor."""
    x = ((x.float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return [Image.fromarray(rearrange(img, "c h w -> h w c").numpy()) for img in x]


def load_pipeline(model: str = "black-forest-labs/FLUX.1-dev", device: str = "cpu", dtype: str | None = None,
                  offload: bool = False) -> Pipeline:
    """Loads all six pieces of a FLUX repo (see `minflux.loading`). `dtype` None keeps the stored dtypes."""
    repo = Repo(model)
    loading.check_repo(repo)
    torch_dtype = loading.parse_dtype(dtype)
    flow = loading.load_flow(repo, torch_dtype)
    clip_tok, t5_tok = loading.load_tokenizers(repo, t5_max_length=512 if flow.params.guidance_embed else 256)
    device = torch.device(device)
    pipe = Pipeline(flow, loading.load_ae(repo, torch_dtype), loading.load_t5(repo, torch_dtype),
                    loading.load_clip(repo, torch_dtype), t5_tok, clip_tok, device, offload)
    if not offload:
        for m in (pipe.flow, pipe.ae, pipe.t5, pipe.clip):
            m.to(device)
    return pipe
