"""How other trainers name the tensors of a FLUX LoRA: kohya sd-scripts (and ComfyUI), BFL (and fal), and
XLabs' x-flux.

A `Layout` is two tables: which key suffix holds which tensor, and which BFL linear (and rows of it) the
rest of the key names. The PEFT/diffusers layout, the one we save, is in `iclora/lora_files.py`; every
layout is described, with examples, in `docs/lora-formats.md`.
"""

import re
from typing import NamedTuple

from torch import nn

from iclora.lora import linears
from minflux.convert import Rows


class Layout(NamedTuple):
    """How one trainer names the tensors of a LoRA file."""

    name: str
    roles: dict[str, str]                       # key suffix -> "A", "B", "bias" or "alpha"
    targets: dict[str, tuple[str, Rows]]        # the rest of the key -> (BFL linear, the rows it fills)
    full_tensors: frozenset[str] = frozenset()  # keys copied whole into the model (BFL's norm scales)


# BFL linear -> XLabs module (lora1: img stream, lora2: txt stream)
XLABS_NAMES = {r"double_blocks\.(\d+)\.img_attn\.(qkv|proj)": r"double_blocks.\1.processor.\2_lora1",
               r"double_blocks\.(\d+)\.txt_attn\.(qkv|proj)": r"double_blocks.\1.processor.\2_lora2",
               r"single_blocks\.(\d+)\.linear1": r"single_blocks.\1.processor.qkv_lora",
               r"single_blocks\.(\d+)\.linear2": r"single_blocks.\1.processor.proj_lora"}


def foreign_layouts(model: nn.Module, diffusers_modules: dict[str, tuple[str, Rows]]) -> list[Layout]:
    """kohya, BFL-native and XLabs, for this model and the blocks that `diffusers_modules` covers."""
    bfl = {n: (n, None) for n, _ in linears(model)} | {b: (b, None) for b, _ in diffusers_modules.values()}
    xlabs = xlabs_targets(bfl, model.params.hidden_size)
    kohya = {f"lora_unet_{n.replace('.', '_')}": target for n, target in bfl.items()}
    kohya |= {f"lora_transformer_{d.replace('.', '_')}": target for d, target in diffusers_modules.items()}
    model_tensors = frozenset(k for k in model.state_dict() if ".lora_" not in k)  # never our own adapters
    return [Layout("kohya", {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"},
                   kohya | prefixed(bfl, "diffusion_model.")),
            Layout("BFL-native", {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias"},
                   bfl | prefixed(bfl, "diffusion_model.", "base_model.model."), model_tensors),
            Layout("XLabs", {".down.weight": "A", ".up.weight": "B"},
                   xlabs | prefixed(xlabs, "diffusion_model."))]


def xlabs_targets(bfl_names, hidden_size: int) -> dict[str, tuple[str, Rows]]:
    """XLabs module -> (BFL linear, rows of it) for the BFL linears XLabs trains; a single block's qkv_lora
    fills the first 3·hidden_size rows of linear1, which holds qkv and the MLP's input."""
    targets = {}
    for bfl in bfl_names:
        for pattern, name in XLABS_NAMES.items():
            if re.fullmatch(pattern, bfl):
                rows = slice(0, 3 * hidden_size) if bfl.endswith("linear1") else None
                targets[re.sub(pattern, name, bfl)] = (bfl, rows)
    return targets


def prefixed(targets: dict, *prefixes: str) -> dict:
    """The same targets under each prefix (ComfyUI's `diffusion_model.`, or the `base_model.model.` of
    fal's Kontext trainer)."""
    renamed = {}
    for prefix in prefixes:
        for key, target in targets.items():
            renamed[prefix + key] = target
    return renamed
