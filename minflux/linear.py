"""The one linear op of minflux: `F.linear`, with PyTorch's oneDNN GEMM for frozen float32 weights on the CPU.

Every linear layer of the transformer, T5 and CLIP is a `Linear` from here: an `nn.Linear` (same parameters, same
state-dict names) whose forward calls `linear`. On a GPU, in bf16, or for weights being trained, that is plain
`F.linear`. For float32 weights on the CPU that are not being trained (inference, and the frozen base under a
LoRA) it calls PyTorch's own oneDNN matmul (`torch.ops.mkldnn._linear_pointwise`, a private op: if a PyTorch
release drops it, `ONEDNN` is False and everything is `F.linear`) instead of the BLAS behind `F.linear`. The
arithmetic is the same float32 GEMM in another summation order; the kernel differs: on AMD CPUs MKL's sgemm takes
its AVX2 path while oneDNN uses every vector unit the CPU has (2.0–2.4× faster on a 2-core AMD EPYC for the
transformer's shapes; see bench/RESULTS.md). That path has a backward pass for the input, but no forward-mode AD
or torch.func transforms. Set `ONEDNN = False` (or turn oneDNN off with `torch.backends.mkldnn.flags(enabled=False)`)
to use `F.linear` everywhere.

Shape letters: N any leading dims, I in features, O out features.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
MIN_MACS = 1 << 21  # below ~2M multiply-adds oneDNN's fixed cost per call (~15 µs) outweighs its faster GEMM


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _FrozenLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W and b frozen: the backward pass returns only the input's gradient, gy W."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        return _onednn(x, weight, bias)                                        # (N..., O)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        return _onednn(grad, weight.t(), None), None, None                     # (N..., I)


def _takes_onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Frozen float32 CPU weights, well-formed operands (anything else gets F.linear's own checks and errors)."""
    f32 = torch.float32
    return (ONEDNN and x.device.type == weight.device.type == "cpu" and x.dtype == weight.dtype == f32
            and x.layout == weight.layout == torch.strided and weight.dim() == 2 and x.dim() >= 1
            and x.shape[-1] == weight.shape[1] > 0 and x.numel() * weight.shape[0] >= MIN_MACS
            and (bias is None or (bias.shape == weight.shape[:1] and bias.dtype == f32 and bias.is_contiguous()
                                  and bias.device == weight.device and bias.layout == torch.strided))
            and not (torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)))
            and torch._C._get_mkldnn_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias): (N..., I) -> (N..., O)."""
    if _takes_onednn(x, weight, bias):
        return _FrozenLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear` above."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
