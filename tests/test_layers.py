"""In bf16, the QK norm and RoPE give exactly what BFL's float32 formulas give (issue #14 removed their
float32 copies of q and k, not their float32 arithmetic)."""

import torch
from einops import rearrange

from minflux.layers import EmbedND, RMSNorm, apply_rope


def bf16_heads(seed: int) -> torch.Tensor:
    """(B, L, H, D) = (2, 40, 3, 16) bf16, a strided view of a wider projection as the blocks' q and k are."""
    g = torch.Generator().manual_seed(seed)
    return (4 * torch.randn(2, 40, 3 * 3 * 16, generator=g)).bfloat16()[..., : 3 * 16].unflatten(-1, (3, 16))


def test_qk_norm_in_bf16_is_bfls_float32_rms_cast_back_then_scaled():
    x, norm = bf16_heads(0), RMSNorm(16).bfloat16()
    with torch.no_grad():
        norm.scale.copy_(torch.linspace(0.5, 2, 16))
    xf = x.float()
    want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * norm.scale
    assert torch.equal(norm(x), want)


def test_rope_in_bf16_is_the_float32_rotation_rounded_once():
    x = bf16_heads(1)
    ids = torch.stack([torch.zeros(40), torch.arange(40) // 8, torch.arange(40) % 8], dim=-1)  # (L, A)
    ids = ids[None].expand(2, -1, -1)                                         # (B, L, A)
    pe = EmbedND(10_000, [4, 6, 6])(ids)                                      # (2, B, L, 1, D): cos, sin
    cos, sin = (rearrange(t, "b l h (p two) -> b l h p two", two=2)[..., 0] for t in pe)  # (B, L, 1, P)
    x0, x1 = rearrange(x.float(), "b l h (p two) -> two b l h p", two=2)
    rotated = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    want = rearrange(rotated, "b l h p two -> b l h (p two)")
    assert torch.equal(apply_rope(x, pe), want.bfloat16())
