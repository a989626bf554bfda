"""The one linear op of minflux: `F.linear`, with PyTorch's oneDNN GEMM for frozen float32 weights on the CPU.

Every linear layer of the transformer, T5 and CLIP is a `Linear` from here: an `nn.Linear` (same parameters, same
state-dict names) whose forward calls `linear`. On a GPU, in bf16, or for weights being trained, that is plain
`F.linear`. For float32 weights on the CPU that are not being trained (inference, and the frozen base under a
LoRA) it calls PyTorch's own oneDNN matmul (`torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile uses on
CPU) instead of the BLAS behind `F.linear`. The arithmetic is the same float32 GEMM in another summation order;
the kernel differs: on AMD CPUs MKL's sgemm takes its AVX2 path while oneDNN uses every vector unit the CPU has
(2.1–2.4× faster on a 2-core AMD EPYC for the transformer's shapes; see bench/RESULTS.md). Set `ONEDNN = False`
to use `F.linear` everywhere.

Shape letters: N any leading dims, I in features, O out features.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _FrozenLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W and b frozen: the backward pass returns only the input's gradient, gy W."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        return _onednn(x, weight, bias)                                        # (..., O)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        return _onednn(grad, weight.t(), None), None, None                     # (..., I)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias): (..., I) -> (..., O)."""
    trained = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
    if ONEDNN and not trained and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32:
        return _FrozenLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear` above."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
