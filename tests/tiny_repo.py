"""Writes a tiny random FLUX repo in the exact layout of black-forest-labs/FLUX.1-dev (or -schnell, -Fill-dev,
-Kontext-dev: `variant`).

The diffusers folders are written by diffusers / transformers themselves (`save_pretrained`, sharded where the
official repo is sharded), so their key names and index files are the reference's own. The BFL root files
(`flux1-dev.safetensors`, `ae.safetensors`) carry the same weights under the BFL names.
"""

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from minflux.convert import transformer_from_diffusers, vae_from_diffusers
from minflux.model import preset
from tests.tokenizer_files import write_clip_tokenizer, write_t5_tokenizer
from toy.hf_files import MODEL_INDEX


def jitter_(module: torch.nn.Module, std: float, names=("norm",)):
    """Random values for the parameters a fresh init sets to constants (norm weights, zero-init linears)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(n in name for n in names):
                p.add_(torch.randn_like(p) * std)


# per variant: the transformer's input channels, the BFL file's name, the pipeline class of model_index.json
VARIANTS = {"dev": (None, None, None),
            "fill": (384, "flux1-fill-dev.safetensors", "FluxFillPipeline"),
            "kontext": (None, "flux1-kontext-dev.safetensors", "FluxKontextPipeline")}


def write_tiny_repo(folder: Path, layout: str = "both", schnell: bool = False, seed: int = 0,
                    variant: str = "dev") -> Path:
    """layout: "both" (as on the hub), "bfl" (root single files only) or "diffusers" (folders only); variant:
    "dev" (or schnell), "fill" (384 input channels) or "kontext" (dev's shapes, its own names)."""
    in_channels, bfl_name, pipeline_class = VARIANTS[variant]
    torch.manual_seed(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    p = preset("tiny", guidance_embed=not schnell)

    write_clip_tokenizer(folder / "tokenizer")
    t5_vocab = write_t5_tokenizer(folder / "tokenizer_2")
    clip_config = CLIPTextConfig(
        vocab_size=49408, hidden_size=p.vec_in_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=p.vec_in_dim, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    CLIPTextModel(clip_config).save_pretrained(folder / "text_encoder")
    t5_config = T5Config(
        vocab_size=t5_vocab, d_model=p.context_in_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    T5EncoderModel(t5_config).save_pretrained(folder / "text_encoder_2", max_shard_size="100KB")

    out = {} if in_channels is None else {"out_channels": p.in_channels}  # Fill: 384 channels in, 64 out
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels or p.in_channels, num_layers=p.depth,
        num_single_layers=p.depth_single_blocks, **out,
        attention_head_dim=p.hidden_size // p.num_heads, num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim, guidance_embeds=not schnell,
        axes_dims_rope=p.axes_dim)
    jitter_(transformer, 0.3, names=("norm", "proj_out"))  # diffusers zero-inits nothing, but norms are all 1
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 32, 32], layers_per_block=1,
        latent_channels=16, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
    jitter_(vae, 0.1)
    transformer.save_pretrained(folder / "transformer", max_shard_size="100KB")
    vae.save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0 if schnell else 3.0, use_dynamic_shifting=not schnell,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    ).save_pretrained(folder / "scheduler")
    index = MODEL_INDEX if pipeline_class is None else {**MODEL_INDEX, "_class_name": pipeline_class}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))

    if layout in ("both", "bfl"):
        name = bfl_name or ("flux1-schnell.safetensors" if schnell else "flux1-dev.safetensors")
        save_file(transformer_from_diffusers(transformer.state_dict()), folder / name)
        save_file(vae_from_diffusers(vae.state_dict()), folder / "ae.safetensors")
    if layout == "bfl":  # drop the folders' weights, keep their configs (RoPE split, latent scale/shift)
        for sub in ("transformer", "vae"):
            for f in (folder / sub).glob("*.safetensors*"):
                f.unlink()
    elif layout != "both" and layout != "diffusers":
        raise ValueError(layout)
    return folder


def copy_repo(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
