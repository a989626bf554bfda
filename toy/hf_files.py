"""Files in the layout of the official black-forest-labs/FLUX.1-dev repo, written from minflux models.

The BFL root files (flux1-dev.safetensors, ae.safetensors), text_encoder*/ as transformers writes them, the
diffusers configs and model_index.json (`write_weights_and_configs`), and the tokenizer folders for any
byte-level BPE merge list (`write_clip_tokenizer_files`, ids in OpenAI CLIP's order) or SentencePiece model
with T5's special ids (`write_t5_tokenizer_files`). Both the toy model's builder and the tests write their
repos with it.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from minflux.autoencoder import AutoEncoder, AutoEncoderParams
from minflux.clip import CLIPConfig, CLIPTextModel
from minflux.model import Flux, FluxParams
from minflux.t5 import T5Config, T5Encoder

T5_LENGTH = 512  # tokenizer_2's model_max_length: T5's prompt length for a guidance-distilled model
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
N_EXTRA_IDS = 100  # T5's <extra_id_N> sentinels, put on top of the SentencePiece pieces

MODEL_INDEX = {
    "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
}


# ---------------------------------------------------------------------------------------- Weights and configs


def write_json(path: Path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_weights(path: Path, state: dict[str, torch.Tensor]):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, path, metadata={"format": "pt"})


def clip_config(c: CLIPConfig) -> dict:
    """text_encoder/config.json, as transformers writes it for a CLIPTextModel."""
    return {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": c.eos_token_id, "hidden_act": c.hidden_act, "hidden_size": c.hidden_size,
        "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": c.intermediate_size,
        "layer_norm_eps": c.layer_norm_eps, "max_position_embeddings": c.max_position_embeddings,
        "model_type": "clip_text_model", "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers, "pad_token_id": 1, "projection_dim": c.hidden_size,
        "torch_dtype": "float32", "vocab_size": c.vocab_size}


def t5_config(c: T5Config) -> dict:
    """text_encoder_2/config.json, as transformers writes it for a T5EncoderModel."""
    return {
        "architectures": ["T5EncoderModel"], "classifier_dropout": 0.0, "d_ff": c.d_ff, "d_kv": c.d_kv,
        "d_model": c.d_model, "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1,
        "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
        "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": c.layer_norm_epsilon,
        "model_type": "t5", "num_decoder_layers": c.num_layers, "num_heads": c.num_heads,
        "num_layers": c.num_layers, "output_past": True, "pad_token_id": 0,
        "relative_attention_max_distance": c.relative_attention_max_distance,
        "relative_attention_num_buckets": c.relative_attention_num_buckets, "tie_word_embeddings": False,
        "torch_dtype": "float32", "use_cache": True, "vocab_size": c.vocab_size}


def transformer_config(p: FluxParams) -> dict:
    """transformer/config.json, diffusers' FluxTransformer2DModel fields."""
    return {
        "_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0",
        "attention_head_dim": p.hidden_size // p.num_heads, "axes_dims_rope": list(p.axes_dim),
        "guidance_embeds": p.guidance_embed, "in_channels": p.in_channels,
        "joint_attention_dim": p.context_in_dim, "num_attention_heads": p.num_heads, "num_layers": p.depth,
        "num_single_layers": p.depth_single_blocks, "patch_size": 1, "pooled_projection_dim": p.vec_in_dim}


def vae_config(a: AutoEncoderParams) -> dict:
    """vae/config.json, diffusers' AutoencoderKL fields."""
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0.dev0", "act_fn": "silu",
        "block_out_channels": [a.ch * m for m in a.ch_mult], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True, "in_channels": a.in_channels, "latent_channels": a.z_channels,
        "layers_per_block": a.num_res_blocks, "mid_block_add_attention": True, "norm_num_groups": 32,
        "out_channels": a.out_ch, "sample_size": a.resolution, "scaling_factor": a.scale_factor,
        "shift_factor": a.shift_factor, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "use_post_quant_conv": False, "use_quant_conv": False}


SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}


def write_weights_and_configs(repo: Path, flow: Flux, ae: AutoEncoder, t5: T5Encoder, clip: CLIPTextModel):
    """Weights and configs of the four models, the scheduler config and model_index.json: everything but the
    tokenizer folders, in FLUX.1-dev's file names, key names and config fields."""
    save_weights(repo / "flux1-dev.safetensors", flow.state_dict())
    save_weights(repo / "ae.safetensors", ae.state_dict())
    save_weights(repo / "text_encoder" / "model.safetensors",
                 {f"text_model.{k}": v for k, v in clip.state_dict().items()})
    save_weights(repo / "text_encoder_2" / "model.safetensors", t5.state_dict())
    write_json(repo / "text_encoder" / "config.json", clip_config(clip.cfg))
    write_json(repo / "text_encoder_2" / "config.json", t5_config(t5.cfg))
    write_json(repo / "transformer" / "config.json", transformer_config(flow.params))
    write_json(repo / "vae" / "config.json", vae_config(ae.params))
    write_json(repo / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    write_json(repo / "model_index.json", MODEL_INDEX)


# ------------------------------------------------------------------------------------------ Tokenizer folders


def added_token(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": True}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]
    codes = printable + [256 + i for i in range(len(others))]  # the other bytes get code points from 256 on
    return {b: chr(c) for b, c in zip(printable + others, codes, strict=True)}


def clip_vocab(merges: list[str]) -> dict[str, int]:
    chars = list(bytes_to_unicode().values())
    word_ends = [c + "</w>" for c in chars]
    merged = [m.replace(" ", "") for m in merges]
    tokens = chars + word_ends + merged + [CLIP_BOS, CLIP_EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise RuntimeError("two BPE merges make the same token; CLIP's vocab.json cannot hold that")
    return vocab


def write_clip_tokenizer_files(folder: Path, merges: list[str]) -> dict[str, int]:
    """vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json; returns the vocabulary."""
    vocab = clip_vocab(merges)
    write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(vocab[CLIP_BOS]): added_token(CLIP_BOS, True),
                                 str(vocab[CLIP_EOS]): added_token(CLIP_EOS, False)},
        "bos_token": CLIP_BOS, "clean_up_tokenization_spaces": True, "do_lower_case": True,
        "eos_token": CLIP_EOS, "errors": "replace", "model_max_length": 77, "pad_token": CLIP_EOS,
        "tokenizer_class": "CLIPTokenizer", "unk_token": CLIP_EOS})
    special = {k: v for k, v in added_token(CLIP_EOS, False).items() if k != "special"}
    write_json(folder / "special_tokens_map.json", {
        "bos_token": {**special, "content": CLIP_BOS, "normalized": True}, "eos_token": special,
        "pad_token": CLIP_EOS, "unk_token": special})
    return vocab


def write_t5_tokenizer_files(folder: Path, spiece_model: bytes, num_pieces: int) -> dict[str, int]:
    """spiece.model, tokenizer_config.json, special_tokens_map.json for a SentencePiece model of num_pieces
    pieces with T5's special ids (<pad> 0, </s> 1, <unk> 2); returns the ids of those and of the 100
    sentinels, which transformers puts after the pieces in reverse (`<extra_id_0>` is the last id)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(spiece_model)
    extras = [f"<extra_id_{i}>" for i in range(N_EXTRA_IDS)]
    ids = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for i, token in enumerate(extras):
        ids[token] = num_pieces + N_EXTRA_IDS - 1 - i
    decoder = {}
    for token, token_id in sorted(ids.items(), key=lambda item: item[1]):
        decoder[str(token_id)] = added_token(token, False)
    write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": True,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": extras, "clean_up_tokenization_spaces": True, "eos_token": "</s>",
        "extra_ids": N_EXTRA_IDS, "legacy": True, "model_max_length": T5_LENGTH, "pad_token": "<pad>",
        "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"})
    plain = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    write_json(folder / "special_tokens_map.json", {
        "additional_special_tokens": extras, "eos_token": {"content": "</s>", **plain},
        "pad_token": {"content": "<pad>", **plain}, "unk_token": {"content": "<unk>", **plain}})
    return ids
