"""Regional compilation: `torch.compile` on each transformer block's forward instead of on the whole model.

The blocks of one class share their compiled code (a block's parameters are inputs of the graph, not
constants), so the 19 double blocks compile once and the 38 single blocks once, instead of one graph of all 57
blocks. Only `forward` is compiled: the module call around it (block swap's hooks) and gradient checkpointing
stay eager, and the LoRA adapters and fp8 layers inside a block are compiled with it. A new input shape or
grad mode compiles again.

`qk_norm` places the q/k RMSNorm (`QKNorm`) apart from the rest of the block, so that Inductor cannot fuse its
backward with RoPE's: the kernel where compiled training failed on a GPU (bench/RESULTS.md, docs/notes.md).
`mode` and `options` are torch.compile's; bench/compile_repro.py and bench/gpu.py compare them.
"""

import torch
from torch import nn

from .layers import QKNorm

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
QK_NORMS = {
    "fused": "compiled inside the block (Inductor may fuse its kernels with RoPE's)",
    "separate": "each QKNorm compiled on its own (a graph break at its call: no kernel spans norm and RoPE)",
    "eager": "each QKNorm left uncompiled (a graph break at its call)",
}


def compile_blocks(flow: nn.Module, mode: str = "default", qk_norm: str = "fused",
                   options: dict | None = None) -> nn.Module:
    """Compiles the forward of every double and single block of `flow`, in place; the first call of each block
    class compiles. `mode`: one of MODES (torch.compile's; "reduce-overhead" replays CUDA graphs); `qk_norm`:
    one of QK_NORMS; `options`: Inductor settings (e.g. {"max_fusion_size": 1}), only with the default mode,
    as torch.compile allows. Call it last: any later change to the blocks' layers (a LoRA merged, fp8) means
    compiling them again."""
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r}: expected one of {', '.join(MODES)}")
    if qk_norm not in QK_NORMS:
        raise ValueError(f"qk_norm {qk_norm!r}: expected one of {', '.join(QK_NORMS)}")
    if options and mode != "default":
        raise ValueError(f"Inductor options go with the default mode only, not with {mode!r}")
    settings = dict(options=options) if options else dict(mode=None if mode == "default" else mode)
    blocks = [*flow.double_blocks, *flow.single_blocks]
    if qk_norm != "fused":
        for block in blocks:
            for norm in block.modules():
                if isinstance(norm, QKNorm):
                    norm.forward = apart(norm.forward, qk_norm == "separate", settings)
    for block in blocks:
        block.forward = torch.compile(block.forward, **settings)
    return flow


def apart(forward, compiled: bool, settings: dict):
    """`forward` hidden from the block's compilation (a graph break), and then compiled on its own or not."""
    if compiled:
        forward = torch.compile(forward, **settings)
    return torch.compiler.disable(forward, recursive=not compiled)
