"""The six pieces of a FLUX.1 repo held together: text encoders with their tokenizers, the flow transformer
and the autoencoder. They load to the CPU and each moves to the device when first used (with `offload`, only
while it runs), so a caller can still change a model on the CPU first (merge a LoRA, quantize) without it ever
being on the GPU whole.

`generate` is the text-to-image recipe of BFL's `cli.py` in a few lines; `sample.py` spells the same recipe
out with every option. Defaults and pixel conversion match diffusers' FluxPipeline, so the same prompt, seed,
size, steps and guidance give the same image.

Shape letters: B images, Lt text tokens, Li image tokens, c latent channels, h/w latent height/width.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import loading
from .autoencoder import AutoEncoder
from .clip import CLIPTextModel
from .conditioning import Condition, conditioned
from .hub import Repo
from .model import Flux
from .module_tree import compute_dtype
from .sampling import denoise, get_noise, get_schedule, image_ids, pack, text_ids, unpack
from .t5 import T5Encoder
from .tokenizers import CLIPTokenizer, T5Tokenizer
from .variants import detect_variant


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
    variant: str = "dev"  # "dev" (or schnell), "fill" or "kontext": minflux/variants.py

    @property
    def is_schnell(self) -> bool:
        return not self.flow.params.guidance_embed

    @property
    def dtype(self) -> torch.dtype:
        """The flow transformer's dtype, in which sampling runs."""
        return compute_dtype(self.flow)

    def on_device(self, model: nn.Module) -> nn.Module:
        """Moves `model` to the device (a no-op once there). With offload, the other models go back to the
        CPU first."""
        if self.offload:
            for other in (self.flow, self.ae, self.t5, self.clip):
                if other is not model:
                    other.to("cpu")
        return model.to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """T5's hidden states (B, Lt, 4096) for every token (pads too: no mask), and CLIP's pooled vectors
        (B, 768), one of each per prompt."""
        txt = self.on_device(self.t5)(self.t5_tokenizer(prompts).to(self.device))           # (B, Lt, 4096)
        vec = self.on_device(self.clip)(self.clip_tokenizer(prompts).to(self.device))       # (B, 768)
        return txt, vec

    def schedule(self, height: int, width: int, steps: int | None = None) -> list[float]:
        """The times from 1 to 0 for this image size: 28 shifted steps for dev, 4 unshifted for schnell."""
        steps = steps or (4 if self.is_schnell else 28)
        return get_schedule(steps, (height // 16) * (width // 16), shift=not self.is_schnell)

    @torch.no_grad()
    def encode_image(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> latents (B, c, H/8, W/8), the mean or (`generator`) a sample."""
        ae = self.on_device(self.ae)
        return ae.encode(images.to(self.device, next(ae.parameters()).dtype), generator).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, c, h, w) -> pixels (B, 3, 8h, 8w) in [-1, 1]."""
        ae = self.on_device(self.ae)
        return ae.decode(latents.to(self.device, next(ae.parameters()).dtype))

    @torch.no_grad()
    def sample(self, txt: Tensor, vec: Tensor, size: tuple[int, int], steps: int | None = None,
               guidance: float = 3.5, seed: int = 0, progress: bool = True, after_step=None,
               img_ids: Tensor | None = None, cond: Condition | None = None) -> Tensor:
        """Encoded prompts -> clean latents (B, c, h, w) of a `size` (height, width) image, all from one noise
        draw of `seed` (as diffusers does); `after_step(x, t)` edits the start and every step (see `denoise`);
        `img_ids` (1, Li, 3) replaces the canvas's positions; `cond`, a Fill or Kontext model's Condition."""
        height, width = size
        B, Lt = txt.shape[:2]
        x = pack(get_noise(B, height, width, seed)).to(self.device, self.dtype)  # (B, Li, 4c) at t = 1
        img_ids = image_ids(B, height, width) if img_ids is None else img_ids.expand(B, -1, -1)   # (B, Li, 3)
        flow = conditioned(self.on_device(self.flow), cond)
        x = denoise(flow, x, img_ids, txt, text_ids(B, Lt), vec, self.schedule(height, width, steps),
                    guidance, after_step, progress=progress)
        return unpack(x, height, width)

    def generate(self, prompts: list[str], height: int = 1024, width: int = 1024, steps: int | None = None,
                 guidance: float = 3.5, seed: int = 0, progress: bool = True) -> list[Image.Image]:
        """Text to images, one per prompt: the whole recipe (sample.py spells it out with every option)."""
        txt, vec = self.encode_prompts(prompts)                                   # (B, Lt, 4096), (B, 768)
        return to_pil(self.decode(self.sample(txt, vec, (height, width), steps, guidance, seed, progress)))


def from_pil(image: Image.Image, height: int, width: int) -> Tensor:
    """An image cover-resized and center-cropped to height×width, never stretched: (1, 3, H, W) in the
    range [-1, 1]."""
    image = ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.array(image)).float() / 127.5 - 1.0                          # (H, W, 3)
    return rearrange(x, "h w c -> 1 c h w")


def to_pil(x: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> images, rounding like diffusers' image processor."""
    x = ((x.float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return [Image.fromarray(rearrange(img, "c h w -> h w c").numpy()) for img in x]


def load_t5_tokenizer(model: str, transformer: Path | None = None) -> T5Tokenizer:
    """The repo's T5 tokenizer with the model's token limit, loaded before (and without) any weight."""
    repo = Repo(model)
    loading.check_repo(repo, transformer)
    return loading.load_tokenizers(repo, loading.t5_max_length(repo, transformer))[1]


def load_pipeline(model: str | Repo = "black-forest-labs/FLUX.1-dev", device: str = "cpu",
                  dtype: str | None = None, offload: bool = False, transformer: Path | None = None,
                  variant: str | None = None) -> Pipeline:
    """Loads all six pieces of a FLUX repo (see `minflux.loading`) to the CPU; each goes to `device` on first
    use. `dtype` None keeps the stored dtypes but fp16's, which become bf16 (fp8 weights stay fp8 in any
    case). `transformer`: a local single file (bf16, fp32 or fp8) used instead of the repo's transformer.
    `variant` (dev, fill, kontext; None: told from the files) is checked against the weights before they
    load (minflux/variants.py). `model` may be a Repo already made."""
    repo = model if isinstance(model, Repo) else Repo(model)
    loading.check_repo(repo, transformer)
    variant = detect_variant(repo, transformer, variant)
    torch_dtype = loading.parse_dtype(dtype)
    clip_tok, t5_tok = loading.load_tokenizers(repo, loading.t5_max_length(repo, transformer))
    bar = tqdm(total=4, desc=f"loading {repo.model}", unit="model")  # FLUX.1-dev: 34 GB to read
    flow = loading.load_flow(repo, torch_dtype, transformer)
    bar.update()
    ae = loading.load_ae(repo, torch_dtype)
    bar.update()
    t5 = loading.load_t5(repo, torch_dtype)
    bar.update()
    clip = loading.load_clip(repo, torch_dtype)
    bar.update()
    bar.close()
    return Pipeline(flow, ae, t5, clip, t5_tok, clip_tok, torch.device(device), offload, variant)
