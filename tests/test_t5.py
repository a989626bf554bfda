"""The T5 encoder equals transformers' T5EncoderModel, and has the FLUX checkpoint's names and shapes."""

from dataclasses import asdict

import pytest
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention

from minflux.t5 import T5Config, T5Encoder, relative_position_bucket

# transformers lists shared.weight twice, under this name too; FLUX's loader drops this key
TIED_COPY = "encoder.embed_tokens.weight"


def reference(cfg: T5Config) -> transformers.T5EncoderModel:
    return transformers.T5EncoderModel(transformers.T5Config(**asdict(cfg), feed_forward_proj="gated-gelu"))


def reference_and_ours(seed: int = 0):
    """A tiny random T5EncoderModel, and ours carrying the same weights (its state dict, loaded strictly)."""
    torch.manual_seed(seed)
    ref = reference(T5Config.tiny()).eval()
    with torch.no_grad():  # norm weights start at 1: make them matter too
        for name, p in ref.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    ours = T5Encoder(T5Config.from_hf(ref.config.to_dict())).eval()
    sd = {k: v for k, v in ref.state_dict().items() if k != TIED_COPY}
    ours.load_state_dict(sd, strict=True)
    return ref, ours


@pytest.mark.parametrize("length", [40, 200])
def test_t5_encoder_matches_transformers(length):
    """40 tokens reach the log-spaced buckets (max distance 20 in the tiny config), 200 the capped last
    bucket."""
    ref, ours = reference_and_ours()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = ours(ids), ref(input_ids=ids).last_hidden_state
    diff = (got - want).abs()
    print(f"T5 L={length}: max abs diff {diff.max():.3e}, mean {diff.mean():.3e}")
    assert got.shape == (2, length, ours.cfg.d_model)
    assert diff.max() < 1e-5


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
    rel = torch.arange(-300, 301)[None, :]
    want = T5Attention._relative_position_bucket(rel, True, num_buckets, max_distance)
    assert torch.equal(relative_position_bucket(rel, num_buckets, max_distance), want)


def test_full_size_t5_matches_hf_names_and_shapes():
    """Built from FLUX's text_encoder_2 config values: every tensor of T5EncoderModel, same name and shape."""
    hf_config = transformers.T5Config(**asdict(T5Config()), feed_forward_proj="gated-gelu",
                                      tie_word_embeddings=False)
    assert T5Config.from_hf(hf_config.to_dict()) == T5Config()
    with torch.device("meta"):
        ours, ref = T5Encoder(T5Config()), transformers.T5EncoderModel(hf_config)
    want = {k: v.shape for k, v in ref.state_dict().items() if k != TIED_COPY}
    assert {k: v.shape for k, v in ours.state_dict().items()} == want
    assert sum(p.numel() for p in ours.parameters()) == 4_762_310_656


def test_t5_config_rejects_non_gated():
    config = transformers.T5Config(feed_forward_proj="relu").to_dict()
    with pytest.raises(ValueError, match="feed_forward_proj='relu'"):
        T5Config.from_hf(config)
