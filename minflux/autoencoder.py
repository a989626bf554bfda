"""The FLUX.1 autoencoder: a convolutional VAE that maps RGB images to 16-channel latents 8x smaller.

Mirrors BFL's src/flux/modules/autoencoder.py: AutoEncoderParams, ResnetBlock, AttnBlock, Downsample,
Upsample, Encoder, Decoder and AutoEncoder keep its names; MidBlock is the `mid` module its Encoder and
Decoder build inline, and AutoEncoder.encode draws its DiagonalGaussian's sample. Module and parameter names
are those of `ae.safetensors` (`encoder.down.0.block.1.conv2`, ...): the file loads with a strict
`load_state_dict`.

Shape letters: B batch, C channels (they change from level to level), H W the height and width of the
current feature map (the image's, at the input), Z latent channels, h w the latent grid (H/8, W/8).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .model import count_numbered


@dataclass
class AutoEncoderParams:
    resolution: int = 256  # only bookkeeping in the reference; nothing depends on it
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @classmethod
    def tiny(cls) -> "AutoEncoderParams":
        """For tests: 4 levels keep the official 8x downsampling; 32 channels fit the 32 GroupNorm groups."""
        return cls(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)

    @classmethod
    def from_state_dict(cls, sd: dict, scale_factor: float = 0.3611, shift_factor: float = 0.1159,
                        source="checkpoint"):
        """Reads every size off the tensor shapes of an `ae.safetensors`-style dict (the file does not store
        scale_factor and shift_factor)."""
        required = ["encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "decoder.conv_in.weight",
                    "decoder.conv_out.weight"]
        missing = [k for k in required if k not in sd]
        if missing:
            raise ValueError(f"{source}: not a FLUX autoencoder checkpoint: missing {', '.join(missing)}")
        ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
        levels = count_numbered(sd, "encoder.down")
        level_widths = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
        return cls(in_channels=in_channels, ch=ch, out_ch=sd["decoder.conv_out.weight"].shape[0],
                   ch_mult=tuple(width // ch for width in level_widths),
                   num_res_blocks=count_numbered(sd, "encoder.down.0.block"),
                   z_channels=sd["decoder.conv_in.weight"].shape[1],
                   scale_factor=scale_factor, shift_factor=shift_factor)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


# ----------------------------------------------------------------------------------------------------------
# Building blocks


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3, twice, plus a skip (a 1x1 conv `nin_shortcut` when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                                     # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))                                     # (B, C_out, H, W)
        return self.nin_shortcut(x) + h                                           # (B, C_out, H, W)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions; q, k, v and proj_out are 1x1 convs (as stored)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        h = self.norm(x)                                                          # (B, C, H, W)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)                               # (B, 1, H*W, C)
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=H, w=W)                      # (B, C, H, W)
        return x + self.proj_out(h)                                               # (B, C, H, W)


class Downsample(nn.Module):
    """Halves H and W: pads one pixel on the right and bottom only, then an unpadded stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (0, 1, 0, 1))                                                # (B, C, H+1, W+1)
        return self.conv(x)                                                       # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")                    # (B, C, 2H, 2W)
        return self.conv(x)                                                       # (B, C, 2H, 2W)


class MidBlock(nn.Module):
    """The bottleneck shared by encoder and decoder: resnet -> attention -> resnet at constant width."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))                         # (B, C, H, W)


# ----------------------------------------------------------------------------------------------------------
# Encoder, decoder, autoencoder


class Encoder(nn.Module):
    """Image -> 2Z channels (mean and log-variance) on a grid 2^(levels-1) times smaller."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip([p.ch, *widths[:-1]], widths, strict=True)):
            level = nn.Module()  # a plain container: its attribute names are the checkpoint's
            blocks = range(p.num_res_blocks)
            level.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out) for j in blocks)
            level.downsample = Downsample(c_out) if i < len(widths) - 1 else nn.Identity()
            self.down.append(level)
        self.mid = MidBlock(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * p.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)                                                       # (B, C, H, W)
        for level in self.down:
            for block in level.block:
                h = block(h)                                                  # (B, C_level, H_level, W_level)
            h = level.downsample(h)                                     # halves H, W except at the last level
        h = self.mid(h)                                                           # (B, C, h, w)
        return self.conv_out(F.silu(self.norm_out(h)))                            # (B, 2Z, h, w)


class Decoder(nn.Module):
    """Z channels -> image. `up` is numbered like the encoder's `down`, so its widest level,
    up.{levels-1}, runs first."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        self.conv_in = nn.Conv2d(p.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        self.up = nn.ModuleList()
        # level i's input comes from level i + 1 (the last level's from the mid block)
        for i, (c_in, c_out) in enumerate(zip([*widths[1:], widths[-1]], widths, strict=True)):
            level = nn.Module()
            blocks = range(p.num_res_blocks + 1)
            level.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out) for j in blocks)
            level.upsample = Upsample(c_out) if i > 0 else nn.Identity()
            self.up.append(level)
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], p.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))                                             # (B, C, h, w)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)                                                  # (B, C_level, H_level, W_level)
            h = level.upsample(h)                                                # doubles H, W except at up.0
        return self.conv_out(F.silu(self.norm_out(h)))                            # (B, 3, H, W)


class AutoEncoder(nn.Module):
    """Pixels in [-1, 1] <-> the FLUX transformer's normalized latents `scale_factor * (z - shift_factor)`."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The latent Gaussian's mean; with a `generator`, a sample `mean + std * noise` drawn from it."""
        if x.ndim != 4 or x.shape[1] != self.params.in_channels:
            raise ValueError(f"expected images (B, {self.params.in_channels}, H, W), got {tuple(x.shape)}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)                            # (B, Z, h, w) each
        z = mean
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise.to(mean.device)
        return self.params.scale_factor * (z - self.params.shift_factor)          # (B, Z, h, w)

    def decode(self, z: Tensor) -> Tensor:
        """Normalized latents -> pixels in about [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.params.z_channels:
            raise ValueError(f"expected latents (B, {self.params.z_channels}, h, w), got {tuple(z.shape)}")
        z = z / self.params.scale_factor + self.params.shift_factor               # (B, Z, h, w)
        return self.decoder(z)                                                    # (B, 3, H, W)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))                                        # (B, 3, H, W)
