"""The four models of a whole FLUX.1 image at full size with random weights, for bench/gpu.py's image and
overheads sections: minflux's Pipeline (T5-XXL, CLIP-L, the flow transformer, the autoencoder) and, when
diffusers is installed, its FluxPipeline with the same transformer and autoencoder weights.

Tokenizers are left out (no files on the GPU machine; they take milliseconds on the CPU): the timed image
starts from token ids. Both pipelines encode with minflux's T5 and CLIP (same weights, same time; the GPU
machine may lack transformers' encoders), so they differ in the 28 denoising steps and the decode.
"""

import argparse

import torch
from torch import nn

import bench
from minflux.autoencoder import AutoEncoder, AutoEncoderParams
from minflux.clip import CLIPConfig, CLIPTextModel
from minflux.convert import vae_from_diffusers
from minflux.pipeline import Pipeline
from minflux.t5 import T5Config, T5Encoder


@torch.no_grad()
def random_(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Every parameter N(0, std), as bench.build does for the transformer (timing does not depend on it)."""
    for t in model.parameters():
        t.normal_(0.0, std)
    return model


def on_device(model_class, config, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`model_class(config)` built in `dtype` on the device, no float32 copy, random weights."""
    with torch.device("meta"):
        model = model_class(config).to(dtype)
    return random_(model.to_empty(device=device)).eval().requires_grad_(False)


def text_encoders(config: str, device, dtype) -> tuple[T5Encoder, CLIPTextModel]:
    """T5-XXL and CLIP-L at full size (FLUX.1-dev's), or the tests' tiny ones for `config` tiny."""
    t5 = T5Config.tiny() if config == "tiny" else T5Config()
    clip = CLIPConfig.tiny() if config == "tiny" else CLIPConfig()
    return on_device(T5Encoder, t5, device, dtype), on_device(CLIPTextModel, clip, device, dtype)


def diffusers_vae(p: AutoEncoderParams, device, dtype):
    from diffusers import AutoencoderKL

    levels = len(p.ch_mult)
    with torch.device(device):
        vae = AutoencoderKL(
            in_channels=p.in_channels, out_channels=p.out_ch,
            down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
            block_out_channels=[p.ch * m for m in p.ch_mult], layers_per_block=p.num_res_blocks,
            latent_channels=p.z_channels, norm_num_groups=32, act_fn="silu",
            scaling_factor=p.scale_factor, shift_factor=p.shift_factor, use_quant_conv=False,
            use_post_quant_conv=False, mid_block_add_attention=True)
    return random_(vae.to(dtype)).eval().requires_grad_(False)


def autoencoders(config: str, device, dtype, reference: bool) -> tuple[AutoEncoder, nn.Module | None]:
    """Ours, and diffusers' AutoencoderKL with the same weights when `reference`."""
    p = AutoEncoderParams.tiny() if config == "tiny" else AutoEncoderParams()
    if not reference:
        return on_device(AutoEncoder, p, device, dtype), None
    ref = diffusers_vae(p, device, dtype)
    with torch.device("meta"):
        ours = AutoEncoder(p)
    ours.load_state_dict(vae_from_diffusers(ref.state_dict()), assign=True)
    return ours.eval(), ref


def pipelines(config: str, device: torch.device, dtype: torch.dtype, reference: bool) -> tuple:
    """(ours: Pipeline, theirs: FluxPipeline or None): the transformers and autoencoders share weights."""
    flow, ref = bench.build(argparse.Namespace(config=config, no_reference=not reference), device, dtype)
    t5, clip = text_encoders(config, device, dtype)
    ae, ref_vae = autoencoders(config, device, dtype, ref is not None)
    ours = Pipeline(flow, ae, t5, clip, None, None, device=device)
    try:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    except ImportError as e:  # FluxPipeline imports transformers
        print(f"diffusers' FluxPipeline is unavailable ({e}): timing minflux only")
        ref = None
    if ref is None:
        return ours, None

    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler_config.json
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    theirs = FluxPipeline(scheduler=scheduler, vae=ref_vae, text_encoder=None, tokenizer=None,
                          text_encoder_2=None, tokenizer_2=None, transformer=ref)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


def token_ids(pipe: Pipeline, text_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random T5 ids (1, text_tokens) and CLIP ids (1, 77), as the tokenizers would give for one prompt."""
    g = torch.Generator().manual_seed(0)
    t5 = torch.randint(0, pipe.t5.cfg.vocab_size, (1, text_tokens), generator=g)
    clip = torch.randint(0, pipe.clip.cfg.vocab_size, (1, pipe.clip.cfg.max_position_embeddings), generator=g)
    return t5.to(device), clip.to(device)
