"""The FLUX.1 transformer ("flow model"): 19 double-stream, then 38 single-stream blocks over [text, image].

Mirrors BFL's src/flux/model.py (FluxParams, with the same field names, and Flux); CONFIGS holds the
flux-dev and flux-schnell sizes of src/flux/util.py's `configs`. Parameter names are the checkpoint's, so
`flux1-dev.safetensors` loads with a strict `load_state_dict` and no mapping table. Given packed image
latents x_t and the time t, the model predicts the velocity v = ε − x0 (minflux/sampling.py states the
project's time convention).

Shape letters: B batch, Lt text tokens, Li image tokens, L = Lt + Li, C hidden size, D head dim,
A position axes (3).
"""

import re
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .layers import DoubleStreamBlock, EmbedND, LastLayer, MLPEmbedder, SingleStreamBlock, timestep_embedding


def count_numbered(sd: dict, prefix: str) -> int:
    """How many numbered children `prefix.0.`, `prefix.1.`, ... the keys of a state dict name (1 + the
    largest index, 0 if none): the block and level counts of every layout. It lives in the model math, beside
    FluxParams.from_state_dict, so that autoencoder.py and convert.py share it and no math file imports IO."""
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    largest = -1
    for key in sd:
        match = pattern.match(key)
        if match:
            largest = max(largest, int(match[1]))
    return largest + 1


@dataclass
class FluxParams:
    in_channels: int = 64            # 16 latent channels × 2×2 patch
    out_channels: int = 64
    vec_in_dim: int = 768            # CLIP-L pooled output
    context_in_dim: int = 4096       # T5-XXL hidden size
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19                  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)  # rotary dims per position axis, sums to the head dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True      # FLUX.1-dev is guidance-distilled; schnell is not

    @staticmethod
    def from_state_dict(sd: dict, axes_dim=(16, 56, 56), theta: int = 10_000,
                        source="checkpoint") -> "FluxParams":
        """Reads every size off a checkpoint's tensor shapes (the RoPE split and theta are not stored)."""
        required = ["img_in.weight", "txt_in.weight", "vector_in.in_layer.weight",
                    "single_blocks.0.linear1.weight", "double_blocks.0.img_attn.norm.query_norm.scale",
                    "final_layer.linear.weight"]
        missing = [k for k in required if k not in sd]
        if missing:
            raise ValueError(f"{source}: not a FLUX transformer checkpoint: missing {', '.join(missing)}")
        hidden, in_channels = sd["img_in.weight"].shape
        head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        linear1_rows = sd["single_blocks.0.linear1.weight"].shape[0]               # 3C (qkv) + mlp width
        return FluxParams(
            in_channels=in_channels,
            out_channels=sd["final_layer.linear.weight"].shape[0],
            vec_in_dim=sd["vector_in.in_layer.weight"].shape[1],
            context_in_dim=sd["txt_in.weight"].shape[1],
            hidden_size=hidden,
            mlp_ratio=(linear1_rows - 3 * hidden) / hidden,
            num_heads=hidden // head_dim,
            depth=count_numbered(sd, "double_blocks"),
            depth_single_blocks=count_numbered(sd, "single_blocks"),
            axes_dim=tuple(axes_dim),
            theta=theta,
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd,
            guidance_embed="guidance_in.in_layer.weight" in sd,
        )


CONFIGS = {
    "flux-dev": FluxParams(),
    "flux-schnell": FluxParams(guidance_embed=False),
    # hidden 768, 12 heads of 64: the benchmark's middle size
    "mid": FluxParams(hidden_size=768, num_heads=12, depth=2, depth_single_blocks=4, axes_dim=(8, 28, 28)),
    # a few thousand parameters, for tests
    "tiny": FluxParams(in_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=32, num_heads=2,
                       depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6)),
}


class Flux(nn.Module):
    def __init__(self, params: FluxParams):
        super().__init__()
        head_dim = params.hidden_size // params.num_heads
        if params.hidden_size % params.num_heads or sum(params.axes_dim) != head_dim:
            raise ValueError(f"axes_dim {params.axes_dim} must sum to the head dim "
                             f"{params.hidden_size}/{params.num_heads}")
        self.params = params
        p = params
        self.pe_embedder = EmbedND(p.theta, list(p.axes_dim))
        self.img_in = nn.Linear(p.in_channels, p.hidden_size)
        self.time_in = MLPEmbedder(256, p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size)
        self.guidance_in = MLPEmbedder(256, p.hidden_size) if p.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(p.context_in_dim, p.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias) for _ in range(p.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio) for _ in range(p.depth_single_blocks))
        self.final_layer = LastLayer(p.hidden_size, p.out_channels)
        self.gradient_checkpointing = False

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                y: Tensor, guidance: Tensor | None = None) -> Tensor:
        # img: (B, Li, in)  img_ids: (B, Li, A)  txt: (B, Lt, context)  txt_ids: (B, Lt, A)
        # timesteps: (B,) in [0, 1], 1 = pure noise   y: (B, vec_in)   guidance: (B,) e.g. 3.5
        img = self.img_in(img)                                                    # (B, Li, C)
        vec = self.time_in(timestep_embedding(timesteps))                         # (B, C)
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this is a guidance-distilled model (FLUX.1-dev): pass a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)                                                    # (B, Lt, C)
        pe = self.pe_embedder(torch.cat([txt_ids, img_ids], dim=1))               # (2, B, L, 1, D): cos, sin

        for block in self.double_blocks:
            img, txt = self.run_block(block, img, txt, vec, pe)
        x = torch.cat([txt, img], dim=1)                                          # (B, L, C), L = Lt + Li
        for block in self.single_blocks:
            x = self.run_block(block, x, vec, pe)
        return self.final_layer(x[:, txt.shape[1] :], vec)                        # (B, Li, out)

    def run_block(self, block: nn.Module, *args):
        """Runs a block, recomputing its activations in the backward pass when checkpointing is on."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def preset(name: str, **overrides) -> FluxParams:
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose one of {', '.join(CONFIGS)}")
    return replace(CONFIGS[name], **overrides)
