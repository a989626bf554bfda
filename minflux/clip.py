"""The CLIP ViT-L/14 text tower in FLUX.1: its pooled output is the transformer's vector conditioning `y`.

BFL's HFEmbedder (src/flux/modules/conditioner.py, loaded by load_clip in src/flux/util.py) takes the
pooler_output of transformers' CLIPTextModel; this file writes that text tower out (OpenAI's CLIP ViT-L/14).
Parameter names are the HF checkpoint keys without their `text_model.` prefix, e.g.
`encoder.layers.3.mlp.fc1.weight`: the loader strips it, as transformers v5 does, so FLUX's `text_encoder/`
loads with a strict `load_state_dict`. FLUX uses only the pooled vector (the final-norm state of the first
<|endoftext|> token), so that is what `forward` returns.

Shape letters: B batch, L tokens (at most 77), C width (hidden_size), H heads, D head width (C / H).
"""

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


@dataclass
class CLIPConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 2  # FLUX's config keeps openai's legacy (wrong) value; it picks the pooling rule

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP config: hidden_act={self.hidden_act!r} is not supported, "
                             f"only {', '.join(ACTIVATIONS)}")

    @classmethod
    def tiny(cls) -> "CLIPConfig":
        """For tests, with the full vocabulary: the real ids 49406 and 49407 of <|startoftext|> and
        <|endoftext|> work."""
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

    @classmethod
    def from_hf(cls, config: dict) -> "CLIPConfig":
        """Reads the fields above from a HF CLIP text `config.json` dict; the others are ignored."""
        # a field the file lacks keeps the official value; sizes are checked against the weights on load
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: causal self-attention (scale 1/sqrt(D)), then a 2-layer MLP."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        width = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.self_attn = nn.ModuleDict({name: nn.Linear(width, width)
                                        for name in ("q_proj", "k_proj", "v_proj", "out_proj")})
        self.layer_norm1 = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(width, cfg.intermediate_size),
                                      fc2=nn.Linear(cfg.intermediate_size, width)))
        self.layer_norm2 = nn.LayerNorm(width, eps=cfg.layer_norm_eps)

    def attention(self, x: Tensor) -> Tensor:
        q, k, v = (rearrange(self.self_attn[name](x), "b l (h d) -> b h l d", h=self.heads)
                   for name in ("q_proj", "k_proj", "v_proj"))
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)                     # (B, H, L, D)
        return self.self_attn.out_proj(rearrange(x, "b h l d -> b l (h d)"))            # (B, L, C)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.layer_norm1(x))                                     # (B, L, C)
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))            # (B, L, C)


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.ModuleDict(dict(
            token_embedding=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            position_embedding=nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size),
        ))
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(
            [CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def pool_positions(self, input_ids: Tensor) -> Tensor:
        """Where each row's pooled vector is read, by transformers' rule. Configs with eos_token_id 2
        (openai's legacy value, kept by FLUX) pool at the largest token id: <|endoftext|> is the last id of
        the stock vocabulary and argmax takes the first of ties, so this is the first <|endoftext|>. Other
        configs carry the true eos id and pool where it first occurs, which stays right when tokens are added
        to the vocabulary."""
        if self.cfg.eos_token_id == 2:
            return input_ids.argmax(dim=-1)                                              # (B,)
        return (input_ids == self.cfg.eos_token_id).int().argmax(dim=-1)                 # (B,)

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.ndim != 2 or input_ids.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(f"CLIP input_ids must be (batch, tokens <= {self.cfg.max_position_embeddings}), "
                             f"got shape {tuple(input_ids.shape)}")
        positions = self.embeddings.position_embedding.weight[: input_ids.shape[1]]       # (L, C)
        x = self.embeddings.token_embedding(input_ids) + positions                       # (B, L, C)
        for layer in self.encoder.layers:
            x = layer(x)                                                                 # (B, L, C)
        x = self.final_layer_norm(x)                                                     # (B, L, C)
        rows = torch.arange(x.shape[0], device=x.device)
        return x[rows, self.pool_positions(input_ids)]                                   # (B, C)
