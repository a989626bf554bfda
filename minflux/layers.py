"""The building blocks of the FLUX.1 transformer: an MMDiT with parallel single-stream blocks.

Mirrors BFL's src/flux/math.py (rope, apply_rope, attention) and src/flux/modules/layers.py (EmbedND,
timestep_embedding, MLPEmbedder, Modulation, RMSNorm, QKNorm, SelfAttention, DoubleStreamBlock,
SingleStreamBlock, LastLayer). Module and parameter names are the checkpoint's (`img_attn.qkv`,
`img_mod.lin`, `linear1`, ...), so `flux1-dev.safetensors` loads unchanged.

Shape letters: B batch, L tokens (text + image), H heads, D head dim, C model width (hidden_size),
F mlp width, P rotary pairs (D / 2), A position axes (3), K the q/k/v triple.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------------------
# Positions: 3-axis rotary embedding (RoPE) with interleaved pairs


def rope(pos: Tensor, dim: int, theta: float) -> Tensor:
    """cos and sin of the angles pos·θ_j, θ_j = theta^(-2j/dim), each repeated for both dims of pair j:
    (B, L) -> (2, B, L, dim), float32. The angles are computed in float64, on the CPU for MPS (which has no
    float64), then moved to pos's device."""
    device = torch.device("cpu") if pos.device.type == "mps" else pos.device
    freqs = theta ** -(torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)     # (dim/2,)
    angles = pos.to(device, torch.float64)[..., None] * freqs                                 # (B, L, dim/2)
    cos_sin = repeat(torch.stack([angles.cos(), angles.sin()]), "k b l p -> k b l (p two)", two=2)
    return cos_sin.to(pos.device, torch.float32)                                              # (2, B, L, dim)


class EmbedND(nn.Module):
    """Concatenates the per-axis rotations: axis a owns axes_dim[a] of the D dims of each head."""

    def __init__(self, theta: float, axes_dim: list[int]):
        super().__init__()
        self.theta, self.axes_dim = theta, axes_dim

    def forward(self, ids: Tensor) -> Tensor:
        # ids: (B, L, A) positions (0, row, col) for image tokens, zeros for text tokens
        axes = zip(ids.unbind(-1), self.axes_dim, strict=True)
        pe = [rope(pos, d, self.theta) for pos, d in axes]                        # A × (2, B, L, d)
        return torch.cat(pe, dim=-1)[:, :, :, None]                               # (2, B, L, 1, D): cos, sin


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotates each adjacent pair of head dims by its angle:
    (x_2j, x_2j+1) -> (x_2j·cos − x_2j+1·sin, x_2j·sin + x_2j+1·cos).
    In float32, as BFL: a bf16 x times the float32 table promotes, with no float32 copy of x."""
    cos, sin = pe                                                                 # (B, L, 1, D) each
    x0, x1 = rearrange(x, "b l h (p two) -> two b l h p", two=2)                  # (B, L, H, P) each
    swapped = rearrange(torch.stack([-x1, x0], dim=-1), "b l h p two -> b l h (p two)")  # (−x_2j+1, x_2j)
    return (x * cos).add_(swapped * sin).type_as(x)                               # (B, L, H, D)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Full (unmasked) attention over the joint text + image sequence, RoPE on q and k.

    Tensors stay token-major (B, L, H, D) until here, so joining the text and image streams is a cheap
    contiguous concatenation; SDPA takes head-major views."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)                                   # (B, L, H, D)
    q, k, v = (rearrange(t, "b l h d -> b h l d") for t in (q, k, v))
    x = F.scaled_dot_product_attention(q, k, v)                                   # (B, H, L, D)
    return rearrange(x, "b h l d -> b l (h d)")                                   # (B, L, C)


# ----------------------------------------------------------------------------------------------------------
# Conditioning: timestep / guidance / pooled-text embedders and adaLN modulation


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0,
                       time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding [cos | sin] of 1000·t (t in [0, 1]); also used for the guidance value."""
    t = time_factor * t                                                           # (B,)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs                                             # (B, dim/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)                   # (B, dim)
    return emb.to(t.dtype) if t.is_floating_point() else emb


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))                           # (B, in) -> (B, C)


class Modulation(nn.Module):
    """adaLN: `vec` -> n chunks of (shift, scale, gate), each (B, 1, C) to broadcast over tokens."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.n = 6 if double else 3
        self.lin = nn.Linear(dim, self.n * dim)

    def forward(self, vec: Tensor) -> list[Tensor]:
        out = self.lin(F.silu(vec))[:, None]                                      # (B, 1, n·C)
        return out.chunk(self.n, dim=-1)                                          # n × (B, 1, C)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (1 + scale) * x + shift


# ----------------------------------------------------------------------------------------------------------
# Attention pieces


class RMSNorm(nn.Module):
    """Per-head RMS norm for q and k: computed in float32 and cast back before `scale` (BFL's order; the
    parameter is named `scale`, as in the checkpoint). F.rms_norm is that math, and recent PyTorch fuses it
    into one CUDA kernel."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, L, H, D), normalised over D
        return F.rms_norm(x, x.shape[-1:], eps=1e-6) * self.scale                 # (B, L, H, D)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)                   # (B, L, H, D), in v's dtype


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """The fused projection is laid out (K, H, D): all q features, then all k, then all v, head-major."""
    return rearrange(qkv, "b l (k h d) -> k b l h d", k=3, h=num_heads).unbind(0)  # 3 × (B, L, H, D)


class SelfAttention(nn.Module):
    """The per-stream attention weights of a double block; the attention itself runs on the joint sequence."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = split_qkv(self.qkv(x), self.num_heads)                          # (B, L, H, D) each
        q, k = self.norm(q, k, v)
        return q, k, v


def mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


# ----------------------------------------------------------------------------------------------------------
# The two block types


class DoubleStreamBlock(nn.Module):
    """Separate weights for the image and text streams, one attention over both (MMDiT, SD3 paper §3)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = mlp(hidden_size, mlp_hidden)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = mlp(hidden_size, mlp_hidden)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        # img: (B, Li, C)   txt: (B, Lt, C)   vec: (B, C)   pe: (2, B, L, 1, D)
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)

        iq, ik, iv = self.img_attn.qkv_heads(modulate(self.img_norm1(img), i_shift1, i_scale1))
        tq, tk, tv = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), t_shift1, t_scale1))
        q = torch.cat([tq, iq], dim=1)                                            # (B, L, H, D), text first
        k = torch.cat([tk, ik], dim=1)                                            # (B, L, H, D)
        v = torch.cat([tv, iv], dim=1)                                            # (B, L, H, D)
        attn = attention(q, k, v, pe)                                             # (B, L, C)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + i_gate1 * self.img_attn.proj(img_attn)                        # (B, Li, C)
        img = img + i_gate2 * self.img_mlp(modulate(self.img_norm2(img), i_shift2, i_scale2))
        txt = txt + t_gate1 * self.txt_attn.proj(txt_attn)                        # (B, Lt, C)
        txt = txt + t_gate2 * self.txt_mlp(modulate(self.txt_norm2(txt), t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One set of weights over the joint sequence; attention and MLP run in parallel (ViT-22B style)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden)  # qkv, mlp-in, fused
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden, hidden_size)      # attn-out, mlp-out, fused
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        # x: (B, L, C)   vec: (B, C)   pe: (2, B, L, 1, D)
        shift, scale, gate = self.modulation(vec)
        h = self.linear1(modulate(self.pre_norm(x), shift, scale))                # (B, L, 3C + F)
        qkv, mlp_in = h.split([3 * x.shape[-1], self.mlp_hidden], dim=-1)
        q, k, v = split_qkv(qkv, self.num_heads)                                  # (B, L, H, D) each
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe)                                             # (B, L, C)
        return x + gate * self.linear2(torch.cat([attn, self.mlp_act(mlp_in)], dim=-1))


class LastLayer(nn.Module):
    """adaLN (shift, scale) then a projection back to patch channels."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)       # (B, 1, C) each
        return self.linear(modulate(self.norm_final(x), shift, scale))            # (B, L, out)
