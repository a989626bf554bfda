"""The CLIP text tower's pooled output equals transformers' CLIPTextModel, with FLUX's checkpoint names and
shapes."""

from dataclasses import asdict

import torch
import transformers

from minflux.clip import CLIPConfig, CLIPTextModel

BOS, EOS = 49406, 49407  # <|startoftext|>, <|endoftext|> (also the pad token) in the stock vocabulary


def reference_and_ours(cfg: CLIPConfig, bos_token_id: int = BOS, seed: int = 0):
    """A tiny random transformers CLIPTextModel, and ours carrying the same weights (its state dict,
    strictly)."""
    torch.manual_seed(seed)
    hf_config = transformers.CLIPTextConfig(**asdict(cfg), bos_token_id=bos_token_id)
    ref = transformers.CLIPTextModel(hf_config).eval()
    with torch.no_grad():  # LayerNorms start at weight 1, bias 0: make them matter too
        for name, p in ref.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    ours = CLIPTextModel(CLIPConfig.from_hf(ref.config.to_dict())).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def pooled_diff(ref, ours, ids: torch.Tensor) -> float:
    with torch.no_grad():
        got, want = ours(ids), ref(input_ids=ids).pooler_output
    diff = (got - want).abs()
    print(f"CLIP pooled: max abs diff {diff.max():.3e}, mean {diff.mean():.3e}")
    assert got.shape == (ids.shape[0], ours.cfg.hidden_size)
    return diff.max().item()


def test_clip_pooled_output_matches_transformers():
    """FLUX's legacy config (eos_token_id 2), on ids laid out like tokenized prompts of different lengths."""
    ref, ours = reference_and_ours(CLIPConfig.tiny())
    g = torch.Generator().manual_seed(1)
    ids = torch.full((3, 77), EOS)
    for row, n in enumerate([3, 20, 75]):
        ids[row, 0], ids[row, 1:n + 1] = BOS, torch.randint(0, BOS, (n,), generator=g)
    assert pooled_diff(ref, ours, ids) < 1e-5


def test_clip_pools_at_first_eos_like_transformers_when_eos_id_is_not_legacy():
    """A config with a true eos id pools at its first occurrence, even with larger token ids before it."""
    eos = 500
    cfg = CLIPConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, eos_token_id=eos)
    ref, ours = reference_and_ours(cfg, bos_token_id=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.full((3, 77), eos)
    for row, n in enumerate([4, 30, 70]):
        ids[row, :n] = torch.randint(eos + 1, 1000, (n,), generator=g)
    # the legacy rule would pool elsewhere
    assert not torch.equal(ids.argmax(-1), (ids == eos).int().argmax(-1))
    assert pooled_diff(ref, ours, ids) < 1e-5


def test_full_size_clip_matches_hf_names_and_shapes():
    """Built from FLUX's text_encoder config values: HF's tensors minus the `text_model.` prefix, same
    shapes."""
    hf_config = transformers.CLIPTextConfig(**asdict(CLIPConfig()), bos_token_id=0, pad_token_id=1,
                                            projection_dim=768)
    assert CLIPConfig.from_hf(hf_config.to_dict()) == CLIPConfig()
    with torch.device("meta"):
        ours, ref = CLIPTextModel(CLIPConfig()), transformers.CLIPTextModel(hf_config)
    want = {k.removeprefix("text_model."): v.shape for k, v in ref.state_dict().items()
            if not k.endswith("position_ids")}
    got = {k: v.shape for k, v in ours.state_dict().items()}
    assert got == want
    assert len(got) == 196
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480
