"""The FLUX autoencoder equals diffusers' AutoencoderKL, and has the official ae.safetensors names and
shapes."""

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from minflux.autoencoder import AutoEncoder, AutoEncoderParams


def diffusers_vae(p: AutoEncoderParams) -> AutoencoderKL:
    levels = len(p.ch_mult)
    return AutoencoderKL(
        in_channels=p.in_channels, out_channels=p.out_ch, down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels, block_out_channels=[p.ch * m for m in p.ch_mult],
        layers_per_block=p.num_res_blocks, latent_channels=p.z_channels, norm_num_groups=32, act_fn="silu",
        scaling_factor=p.scale_factor, shift_factor=p.shift_factor, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=True)


def to_diffusers(ours: AutoEncoder, ref: AutoencoderKL) -> dict:
    """Our BFL-named state dict under diffusers' names, by diffusers' own single-file converter (the
    oracle)."""
    return convert_ldm_vae_checkpoint(ours.state_dict(), ref.config)


def reference_and_ours(seed: int = 0):
    """A tiny random autoencoder of ours, and a diffusers AutoencoderKL carrying the same weights."""
    torch.manual_seed(seed)
    ours = AutoEncoder(AutoEncoderParams.tiny()).eval()
    with torch.no_grad():  # GroupNorms start at weight 1, bias 0: make their affine parameters matter too
        for name, t in ours.named_parameters():
            if "norm" in name:
                t.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(t))
    ref = diffusers_vae(ours.params).eval()
    ref.load_state_dict(to_diffusers(ours, ref), strict=True)
    return ref, ours


def image(seed: int = 1) -> torch.Tensor:
    """Non-square, so the 8x factor and the right/bottom-only padding of Downsample are both exercised."""
    return torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_mean_matches_diffusers():
    ref, ours = reference_and_ours()
    p, x = ours.params, image()
    with torch.no_grad():
        got = ours.encode(x)
        want = (ref.encode(x).latent_dist.mode() - p.shift_factor) * p.scale_factor
    diff = (got - want).abs()
    print(f"encode: max abs diff {diff.max():.3e}, mean {diff.mean():.3e}")
    assert got.shape == (1, 16, 8, 6)
    assert diff.max() < 1e-5


def test_decode_matches_diffusers():
    ref, ours = reference_and_ours()
    p, z = ours.params, torch.randn(1, 16, 8, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ours.decode(z)
        want = ref.decode(z / p.scale_factor + p.shift_factor).sample
    diff = (got - want).abs()
    print(f"decode: max abs diff {diff.max():.3e}, mean {diff.mean():.3e}")
    assert got.shape == (1, 3, 64, 48)
    assert diff.max() < 1e-5


def test_encode_with_generator_samples_the_gaussian():
    ref, ours = reference_and_ours()
    p, x = ours.params, image()
    with torch.no_grad():
        first = ours.encode(x, torch.Generator().manual_seed(7))
        again = ours.encode(x, torch.Generator().manual_seed(7))
        sample = ref.encode(x).latent_dist.sample(torch.Generator().manual_seed(7))
        want = (sample - p.shift_factor) * p.scale_factor
        mean = ours.encode(x)
    diff = (first - want).abs().max()
    print(f"sample vs diffusers latent_dist.sample: max abs diff {diff:.3e}")
    assert torch.equal(first, again)
    assert (first - mean).abs().max() > 1e-2
    assert diff < 1e-5


def test_full_size_autoencoder_has_official_names_and_shapes():
    with torch.device("meta"):
        sd = AutoEncoder(AutoEncoderParams()).state_dict()
    assert len(sd) == 244
    assert sum(t.numel() for t in sd.values()) == 83_819_683
    assert sd["encoder.conv_in.weight"].shape == (128, 3, 3, 3)
    assert sd["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert sd["encoder.conv_out.weight"].shape == (32, 512, 3, 3)
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd["decoder.conv_in.weight"].shape == (512, 16, 3, 3)
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert sd["decoder.up.1.block.0.conv1.weight"].shape == (256, 512, 3, 3)
    assert sd["decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.3.downsample.conv.weight" not in sd


def test_full_size_autoencoder_maps_onto_every_diffusers_tensor():
    with torch.device("meta"):
        ours, ref = AutoEncoder(AutoEncoderParams()), diffusers_vae(AutoEncoderParams())
    mapped = {k: tuple(t.shape) for k, t in to_diffusers(ours, ref).items()}
    assert mapped == {k: tuple(t.shape) for k, t in ref.state_dict().items()}


def test_params_are_inferred_from_checkpoint_shapes():
    for params in (AutoEncoderParams(), AutoEncoderParams.tiny()):
        with torch.device("meta"):
            sd = AutoEncoder(params).state_dict()
        assert AutoEncoderParams.from_state_dict(sd) == params
    del sd["decoder.conv_in.weight"]
    with pytest.raises(ValueError, match="decoder.conv_in.weight"):
        AutoEncoderParams.from_state_dict(sd)
