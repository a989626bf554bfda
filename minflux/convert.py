"""The one place where other checkpoint layouts are mapped onto the BFL names that minflux uses.

The HF repos ship the transformer and the autoencoder twice: as BFL single files (our native names) and in the
diffusers layout (`transformer/`, `vae/`). diffusers splits BFL's fused linears (qkv, single-block `linear1`)
into separate q/k/v/mlp linears and stores the final adaLN (shift, scale) halves swapped. Both facts are
captured by one table: each diffusers linear lands in a set of *rows* of one BFL linear. The LoRA converters
in `iclora/` reuse it. The block counts come off the key names through `model.count_numbered`.
"""

import re
from collections import defaultdict

import torch
from torch import Tensor

from .model import count_numbered

Rows = slice | Tensor | None  # which output rows of the BFL tensor a diffusers tensor fills (None = all)


def transformer_table(depth: int, depth_single: int, hidden: int,
                      mlp_hidden: int) -> dict[str, tuple[str, Rows]]:
    """diffusers module (or norm parameter) name -> (BFL name, rows of the BFL tensor it fills)."""
    C, F = hidden, mlp_hidden
    q, k, v = slice(0, C), slice(C, 2 * C), slice(2 * C, 3 * C)  # BFL's fused qkv: q rows, then k, then v
    m = slice(3 * C, 3 * C + F)                                  # single blocks' linear1: the mlp rows follow
    swapped_halves = torch.cat([torch.arange(C, 2 * C), torch.arange(C)])
    table = {
        "x_embedder": ("img_in", None),
        "context_embedder": ("txt_in", None),
        "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", None),
        "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", None),
        "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", None),
        "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", None),
        "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", None),
        "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", None),
        "proj_out": ("final_layer.linear", None),
        # diffusers chunks the final modulation as (scale, shift), BFL as (shift, scale)
        "norm_out.linear": ("final_layer.adaLN_modulation.1", swapped_halves),
    }
    for i in range(depth):
        table |= double_block_table(f"transformer_blocks.{i}", f"double_blocks.{i}", (q, k, v))
    for i in range(depth_single):
        table |= single_block_table(f"single_transformer_blocks.{i}", f"single_blocks.{i}", (q, k, v), m)
    return table


def double_block_table(d: str, b: str, qkv_rows: tuple[slice, slice, slice]) -> dict[str, tuple[str, Rows]]:
    """transformer_table's entries for the double block named `d` in diffusers and `b` in BFL."""
    table = {}
    qkv_names = {"img": ("to_q", "to_k", "to_v"), "txt": ("add_q_proj", "add_k_proj", "add_v_proj")}
    for stream, names in qkv_names.items():
        for name, rows in zip(names, qkv_rows, strict=True):
            table[f"{d}.attn.{name}"] = (f"{b}.{stream}_attn.qkv", rows)
    table |= {
        f"{d}.norm1.linear": (f"{b}.img_mod.lin", None),
        f"{d}.norm1_context.linear": (f"{b}.txt_mod.lin", None),
        f"{d}.attn.to_out.0": (f"{b}.img_attn.proj", None),
        f"{d}.attn.to_add_out": (f"{b}.txt_attn.proj", None),
        f"{d}.ff.net.0.proj": (f"{b}.img_mlp.0", None),
        f"{d}.ff.net.2": (f"{b}.img_mlp.2", None),
        f"{d}.ff_context.net.0.proj": (f"{b}.txt_mlp.0", None),
        f"{d}.ff_context.net.2": (f"{b}.txt_mlp.2", None),
        f"{d}.attn.norm_q.weight": (f"{b}.img_attn.norm.query_norm.scale", None),
        f"{d}.attn.norm_k.weight": (f"{b}.img_attn.norm.key_norm.scale", None),
        f"{d}.attn.norm_added_q.weight": (f"{b}.txt_attn.norm.query_norm.scale", None),
        f"{d}.attn.norm_added_k.weight": (f"{b}.txt_attn.norm.key_norm.scale", None),
    }
    return table


def single_block_table(d: str, b: str, qkv_rows: tuple[slice, slice, slice],
                       mlp_rows: slice) -> dict[str, tuple[str, Rows]]:
    """transformer_table's entries for the single block named `d` in diffusers and `b` in BFL."""
    q, k, v = qkv_rows
    return {
        f"{d}.attn.to_q": (f"{b}.linear1", q),
        f"{d}.attn.to_k": (f"{b}.linear1", k),
        f"{d}.attn.to_v": (f"{b}.linear1", v),
        f"{d}.proj_mlp": (f"{b}.linear1", mlp_rows),
        f"{d}.proj_out": (f"{b}.linear2", None),
        f"{d}.norm.linear": (f"{b}.modulation.lin", None),
        f"{d}.attn.norm_q.weight": (f"{b}.norm.query_norm.scale", None),
        f"{d}.attn.norm_k.weight": (f"{b}.norm.key_norm.scale", None),
    }


def expected_keys(table: dict[str, tuple[str, Rows]], guided: bool) -> set[str]:
    """The keys of a diffusers file with this table's modules (weight and bias each; a norm's parameter is
    named in full); a model without guidance (schnell) has no guidance embedder."""
    keys = set()
    for module in table:
        if "guidance_embedder" in module and not guided:
            continue
        if module.endswith(".weight"):
            keys.add(module)
        else:
            keys |= {f"{module}.weight", f"{module}.bias"}
    return keys


def transformer_from_diffusers(sd: dict[str, Tensor],
                               source: str = "a diffusers transformer") -> dict[str, Tensor]:
    """A diffusers-named transformer state dict -> BFL names: q/k/v(/mlp) fused, norm_out un-swapped, sizes
    read off the tensors. Missing or unexpected keys are refused, naming `source` (the file or folder)."""
    hidden = sd["x_embedder.weight"].shape[0] if "x_embedder.weight" in sd else 0
    mlp_widths = [v.shape[0] for k, v in sd.items() if k.endswith(".proj_mlp.weight")]
    mlp_hidden = mlp_widths[0] if mlp_widths else 0
    depth = count_numbered(sd, "transformer_blocks")
    depth_single = count_numbered(sd, "single_transformer_blocks")
    table = transformer_table(depth, depth_single, hidden, mlp_hidden)
    guided = any(k.startswith("time_text_embed.guidance_embedder.") for k in sd)  # schnell has none
    want = expected_keys(table, guided)
    missing, unexpected = sorted(want - set(sd)), sorted(set(sd) - want)
    problem = f"{source}: not a diffusers FLUX transformer; "
    if missing:
        raise ValueError(problem + f"missing keys: {', '.join(missing[:5])}")
    if unexpected:
        raise ValueError(problem + f"unexpected keys: {', '.join(unexpected[:5])}")
    parts = defaultdict(list)  # BFL key -> [(rows, tensor)]
    for key, tensor in sd.items():
        if key in table:  # a norm's parameter, named in full
            name, rows = table[key]
        else:
            module, leaf = key.rsplit(".", 1)
            bfl_module, rows = table[module]
            name = f"{bfl_module}.{leaf}"
        parts[name].append((rows, tensor))
    out = {}
    for name, pieces in parts.items():
        first_rows, first = pieces[0]
        if len(pieces) == 1 and first_rows is None:
            out[name] = first
            continue
        n = sum(r.stop - r.start if isinstance(r, slice) else len(r) for r, _ in pieces)
        fused = first.new_empty((n, *first.shape[1:]))
        for rows, tensor in pieces:
            fused[rows] = tensor
        out[name] = fused
    return out


# diffusers AutoencoderKL -> BFL AutoEncoder: renames applied in order (decoder levels are renumbered below)
VAE_RULES = [
    (r"\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r".down.\1.block.\2."),
    (r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample."),
    (r"\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r".up.<\1>.block.\2."),
    (r"\.up_blocks\.(\d+)\.upsamplers\.0\.", r".up.<\1>.upsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
]


def vae_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A `vae/` state dict (diffusers names) -> the names of `ae.safetensors`."""
    levels = count_numbered(sd, "decoder.up_blocks")
    out = {}
    for key, tensor in sd.items():
        name = key
        for pattern, repl in VAE_RULES:
            name = re.sub(pattern, repl, name)
        # diffusers counts decoder levels from the low-resolution end, BFL from the high-resolution end
        name = re.sub(r"<(\d+)>", lambda m: str(levels - 1 - int(m[1])), name)
        if ".attn_1." in name and name.endswith("weight") and tensor.ndim == 2:
            # the attention projections: 1×1 convs in BFL, linears in diffusers
            tensor = tensor[:, :, None, None]
        out[name] = tensor
    return out
