"""Two small operations on a model's tree of modules: `replace` puts a module in place of another (as
minflux/quantize.py swaps Linears for fp8 ones, and iclora/lora.py wraps them with adapters), and
`compute_dtype` reads the dtype a model computes in (minflux/pipeline.py, iclora/training.py).
"""

import torch
from torch import nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # the weights minflux/quantize.py stores


def replace(model: nn.Module, name: str, module: nn.Module):
    """Puts `module` where the submodule of dotted `name` was (e.g. "double_blocks.0.img_attn.qkv")."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in: that of its first parameter that is not fp8 (fp8 weights are
    dequantized to it)."""
    for p in model.parameters():
        if p.dtype not in FP8_DTYPES:
            return p.dtype
    raise ValueError("every parameter of the model is fp8: it has no dtype to compute in")
