"""The T5 v1.1 encoder (T5-XXL in FLUX.1): turns the prompt's T5 tokens into the transformer's text stream.

BFL's HFEmbedder (src/flux/modules/conditioner.py, loaded by load_t5 in src/flux/util.py) takes the
last_hidden_state of transformers' T5EncoderModel; this file writes that encoder out (T5 v1.1, Raffel et al.).
Its names are the HF checkpoint keys, e.g. `encoder.block.3.layer.1.DenseReluDense.wi_0.weight`, so FLUX's
`text_encoder_2/` loads with a strict `load_state_dict`. HF files may also hold `encoder.embed_tokens.weight`,
a tied copy of `shared.weight`: this module has only `shared`, and the loader drops that key. FLUX calls the
encoder without an attention mask, so every token attends to the pads too, here as well.

Shape letters: B batch, L tokens, C model width (d_model), H heads, D head width (d_kv).
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def tiny(cls) -> "T5Config":
        """For tests: 8 buckets up to distance 20, so that a few dozen tokens reach both the log-spaced
        buckets and the last ones."""
        return cls(vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=20)

    @classmethod
    def from_hf(cls, config: dict) -> "T5Config":
        """Reads the fields above from a HF T5 `config.json` dict; the rest (decoder, dropout) is ignored."""
        ff = config.get("feed_forward_proj")
        if ff != "gated-gelu":
            raise ValueError(f"T5 config: feed_forward_proj={ff!r} is not supported, "
                             f"only 'gated-gelu' (T5 v1.1)")
        # a field the file lacks keeps the official value; sizes are checked against the weights on load
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


def relative_position_bucket(rel: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bidirectional bucket for each relative position rel = key position - query position.

    Half of the buckets serve keys before (or at) the query, half keys after it. Within a half, distances
    below half its size get a bucket each; longer ones share log-spaced buckets, and every distance from
    max_distance on falls into the half's last bucket."""
    half = num_buckets // 2
    exact = half // 2
    n = rel.abs()
    log_ratio = torch.log(n.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(n < exact, n, far)


class T5LayerNorm(nn.Module):
    """RMS norm: no mean subtraction and no bias, computed in float32, cast back to the weight's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()                                                             # (B, L, D)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)                              # (B, L, D)


class T5Attention(nn.Module):
    """Self-attention with a learned relative position bias and NO 1/sqrt(D) scale (T5 folds it into the
    init). Only block 0 owns the bias table; the bias it gives is added in every block."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.cfg = cfg
        inner = cfg.num_heads * cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, length: int) -> Tensor:
        pos = torch.arange(length, device=self.relative_attention_bias.weight.device)
        rel = pos[None, :] - pos[:, None]                                     # (L, L) query rows, key columns
        buckets = relative_position_bucket(
            rel, self.cfg.relative_attention_num_buckets, self.cfg.relative_attention_max_distance)
        return rearrange(self.relative_attention_bias(buckets), "q k h -> 1 h q k")    # (1, H, L, L)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        q, k, v = (rearrange(proj(x), "b l (h d) -> b h l d", h=self.cfg.num_heads)
                   for proj in (self.q, self.k, self.v))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # (B, H, L, D)
        return self.o(rearrange(x, "b h l d -> b l (h d)"))                              # (B, L, C)


class T5GatedFeedForward(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x), no biases: the "gated-gelu" feed-forward of T5 v1.1."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))          # (B, L, C)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        attn_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        ff_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        # HF's sub-layers: 0 self-attention, 1 the feed-forward (named "DenseReluDense")
        self.layer = nn.ModuleList([
            nn.ModuleDict(dict(SelfAttention=T5Attention(cfg, has_relative_bias), layer_norm=attn_norm)),
            nn.ModuleDict(dict(DenseReluDense=T5GatedFeedForward(cfg), layer_norm=ff_norm)),
        ])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        attn, ff = self.layer
        x = x + attn.SelfAttention(attn.layer_norm(x), bias)                            # (B, L, C)
        return x + ff.DenseReluDense(ff.layer_norm(x))                                  # (B, L, C)


class T5Encoder(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = nn.ModuleDict(dict(
            block=nn.ModuleList([T5Block(cfg, has_relative_bias=i == 0) for i in range(cfg.num_layers)]),
            final_layer_norm=T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon),
        ))

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"T5 input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        x = self.shared(input_ids)                              # (B, L, C): no scaling, no absolute positions
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(input_ids.shape[1])  # (1, H, L, L)
        for block in self.encoder.block:
            x = block(x, bias)                                                           # (B, L, C)
        return self.encoder.final_layer_norm(x)                                          # (B, L, C)
