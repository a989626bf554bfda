"""Regional compilation: `torch.compile` on each transformer block's forward instead of on the whole model.

The blocks of one class share their compiled code (a block's parameters are inputs of the graph, not
constants), so the 19 double blocks compile once and the 38 single blocks once, instead of one graph of all 57
blocks. Only `forward` is compiled: the module call around it (block swap's hooks) and gradient checkpointing
stay eager, and the LoRA adapters and fp8 layers inside a block are compiled with it. A new input shape or
grad mode compiles again.
"""

import torch
from torch import nn


def compile_blocks(flow: nn.Module) -> nn.Module:
    """Compiles the forward of every double and single block of `flow`, in place; the first call of each block
    class compiles. Call it last: any later change to the blocks' layers (a LoRA merged, fp8) means compiling
    them again."""
    for block in [*flow.double_blocks, *flow.single_blocks]:
        block.forward = torch.compile(block.forward)
    return flow
