"""The pieces of flow-matching LoRA training that `train.py` strings together.

In-Context LoRA (arXiv 2410.23775, §3) fine-tunes FLUX.1-dev on joined panel images with a small LoRA and the
ordinary rectified-flow objective. With the project's one convention (t = 1 is noise):
    x_t = (1 − t)·x0 + t·ε,   the model is trained to predict v = ε − x0   (mean squared error).
t is drawn logit-normal (SD3 paper §3.1) and then shifted toward noise by FLUX's resolution shift, the same
shift the sampler uses for that image size. The distilled guidance input is held fixed (default 1.0).

Every random draw of step s comes from a generator seeded with (seed, s), so resuming from a checkpoint
continues bit-for-bit without having to store any RNG state (on CPU; on a GPU, nondeterministic CUDA kernels
such as attention backward can add tiny run-to-run differences).

Shape letters: B batch, N image tokens, L text tokens, c latent channels, h/w latent size.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from minflux.sampling import add_noise, image_ids, pack, shift_mu, text_ids, time_shift

from .lora_files import atomic_write


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def sample_timesteps(batch: int, image_tokens: int, g: torch.Generator, mode: str = "logit_normal") -> Tensor:
    """t in (0, 1) for each example: logit-normal or uniform, then FLUX's shift for this many tokens."""
    if mode == "logit_normal":
        t = torch.sigmoid(torch.randn(batch, generator=g))
    elif mode == "uniform":
        t = torch.rand(batch, generator=g).clamp(1e-5, 1 - 1e-5)
    else:
        raise ValueError(f"unknown timestep sampling {mode!r}; use logit_normal or uniform")
    return time_shift(shift_mu(image_tokens), t)                                                      # (B,)


def flow_matching_loss(flow, x0: Tensor, txt: Tensor, vec: Tensor, g: torch.Generator, guidance: float = 1.0,
                       timestep_mode: str = "logit_normal") -> Tensor:
    """MSE between the predicted and the true velocity ε − x0 at a random point of the noise-data line."""
    B, _, h, w = x0.shape
    x0 = pack(x0)                                                                 # (B, N, 4c)
    noise = torch.randn(x0.shape, generator=g).to(x0)
    t = sample_timesteps(B, x0.shape[1], g, timestep_mode).to(x0)                 # (B,)
    x_t = add_noise(x0, noise, t[:, None, None])                                # (B, N, 4c)
    dtype, device = next(flow.parameters()).dtype, x0.device
    v = flow(x_t.to(dtype), image_ids(B, 8 * h, 8 * w).to(device), txt.to(dtype), text_ids(B, txt.shape[1]).to(device),
             timesteps=t.to(dtype), y=vec.to(dtype), guidance=torch.full((B,), guidance, dtype=dtype, device=device))
    return F.mse_loss(v.float(), (noise - x0).float())


@dataclass
class Example:
    latents: Tensor  # (c, h, w) the joined image, encoded once
    txt: Tensor      # (L, 4096) T5 states of its caption
    vec: Tensor      # (768,) CLIP pooled


@torch.no_grad()
def cache_examples(pipe, dataset) -> list[Example]:
    """Encodes every image and caption once, so the VAE and text encoders can leave the GPU for training."""
    cache = []
    for i in tqdm(range(len(dataset)), desc="caching latents and text"):
        item = dataset[i]
        latents = pipe.encode_image(item["image"][None])[0].cpu()
        txt, vec = pipe.encode_prompts([item["caption"]])
        cache.append(Example(latents, txt[0].cpu(), vec[0].cpu()))
    return cache


def collate(examples: list[Example], empty: Example, dropout: float, g: torch.Generator, device) -> tuple:
    """Stacks a batch; each caption is replaced by the empty caption with probability `dropout`."""
    drop = (torch.rand(len(examples), generator=g) < dropout).tolist()
    texts = [empty if d else e for d, e in zip(drop, examples)]
    return (torch.stack([e.latents for e in examples]).to(device), torch.stack([e.txt for e in texts]).to(device),
            torch.stack([e.vec for e in texts]).to(device))


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Linear warm-up over the first `warmup` steps, then constant (as the authors' trainer)."""
    return lr * min(1.0, (step + 1) / max(1, warmup))


def atomic_save(obj, path: Path):
    """torch.save, atomically (a crash never leaves a broken file)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def is_finite(loss: Tensor) -> bool:
    return math.isfinite(loss.item())
