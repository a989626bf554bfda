"""fp8 weights: each Linear weight in a model's blocks is stored in 8 bits with a float32 scale per output
row, half of bf16's memory. A forward either dequantizes the weight to the input's dtype and runs F.linear
(the "dequantize" path, any device), or computes in fp8 (the "scaled_mm" path): the input quantized per row
(token) on the fly, then `torch._scaled_mm` with both row scales and bf16 out, the fast path of CUDA
capability 9.0 (H100, H200). `set_fp8_compute` picks the path (--fp8-compute on, off, auto) for every layer.

`quantize_fp8` turns the nn.Linear layers of a model's blocks into `FP8Linear` (per-row absmax / 448, e4m3fn),
a layer at a time; `fp8_layers` does the same on the meta device for an fp8 checkpoint (plain casts: scale 1;
ComfyUI "scaled fp8": a `scale_weight` per layer), so `minflux.loading` can assign the file's tensors as they
are stored. Norms, embeddings and biases keep their dtype. The model files know nothing of this.

Shape letters: M rows (tokens), O out features, I in features.
"""

import sys

import torch
import torch.nn.functional as F
from einops import pack, unpack
from torch import Tensor, nn

from .module_tree import FP8_DTYPES, replace

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
FP8_MODES = ("on", "off", "auto")  # --fp8-compute
ROWWISE_CAPABILITY = (9, 0)  # the CUDA capability whose torch._scaled_mm takes row-wise scales: H100, H200


def is_fp8(t: Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def dequantize(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """fp8 (O, I) times its row scales (O,), in float32, then cast to `dtype`."""
    return (weight.float() * scale[:, None]).to(dtype)                            # (O, I)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each row of x (M, I) in e4m3fn, divided by its absmax / 448: the fp8 rows and their float32 scales
    (M, 1), which multiply them back; an all-zero row gets scale 1 (and stays zero)."""
    scale = x.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX                  # (M, 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    rows = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)  # (M, I)
    return rows, scale


class ScaledLinear(torch.autograd.Function):
    """x (M, I) times an e4m3fn weight (O, I) with row scales (O,), computed in fp8: x quantized per row, then
    torch._scaled_mm with x's scales (M, 1) and the weight's (1, O), bf16 out, cast to x's dtype. A bf16 bias
    is fused (torch._scaled_mm takes a bias of its output's dtype only), another added after. The input
    gradient uses the dequantized weight: the weight's row scales lie on the reduction axis of
    grad (M, O) @ W (O, I), where a row-scaled matmul cannot apply them."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight, scale)
        fused = bias if bias is not None and bias.dtype == torch.bfloat16 else None
        x8, x_scale = quantize_rows(x.contiguous())  # row-major, as _scaled_mm's first operand must be
        out = torch._scaled_mm(x8, weight.t(), x_scale, scale[None, :], bias=fused,
                               out_dtype=torch.bfloat16).to(x.dtype)              # (M, O)
        return out if bias is None or fused is not None else out + bias.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # grad: (M, O) in x's dtype
        weight, scale = ctx.saved_tensors
        grad_x = grad @ dequantize(weight, scale, grad.dtype)                     # (M, I)
        grad_bias = grad.sum(0) if ctx.needs_input_grad[3] else None              # (O,)
        return grad_x, None, None, grad_bias


def linear(x: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None, compute: str | None):
    """F.linear of x (..., I) and weight (O, I), for a plain weight (scale None) and an fp8 one with row
    scales (O,): dequantized to x's dtype (compute "dequantize") or computed in fp8 ("scaled_mm")."""
    if scale is None:
        return F.linear(x, weight, bias)
    if compute != "scaled_mm":
        return F.linear(x, dequantize(weight, scale, x.dtype), bias)
    rows, shape = pack([x], "* i")                                                # (M, I)
    out = ScaledLinear.apply(rows, weight, scale, bias)                           # (M, O)
    return unpack(out, shape, "* o")[0]                                           # (..., O)


class FP8Linear(nn.Module):
    """A Linear whose `weight` (O, I) is fp8 (frozen), with a float32 `scale` (O,) per row; `bias` (O,) is
    kept in its dtype. `compute` is how forward multiplies: "dequantize" or "scaled_mm" (set_fp8_compute)."""

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None, compute: str = "dequantize"):
        super().__init__()
        if not is_fp8(weight) or scale.shape != weight.shape[:1]:
            raise ValueError(f"FP8Linear needs an fp8 weight (O, I) and a scale (O,), got {weight.dtype} "
                             f"{tuple(weight.shape)} and {tuple(scale.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scale", scale.float())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.compute = compute

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        """Per-row absmax / 448 in e4m3fn; an all-zero row gets scale 1 (and stays zero)."""
        weight, scale = quantize_rows(linear.weight.detach())                    # (O, I), (O, 1)
        return cls(weight, scale[:, 0], None if linear.bias is None else linear.bias.detach())

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        return dequantize(self.weight, self.scale, dtype)                          # (O, I)

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., I) -> (..., O), in x's dtype
        return linear(x, self.weight, self.scale, self.bias, self.compute)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.weight.dtype}, {self.compute}"


def block_linears(model: nn.Module) -> list[str]:
    """The nn.Linear layers inside the model's repeated blocks (its nn.ModuleLists): nearly all of the
    weights. The layers around them (FLUX's input and time/text embedders and its output layer, 0.5% of its
    weights) are left: quantizing them too cost the toy model's recolour LoRA 0.05 of its text-mode rule
    score, the blocks alone 0.02."""
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    linears = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and any(name.startswith(f"{b}.") for b in lists):
            linears.append(name)
    return linears


@torch.no_grad()
def quantize_fp8(model: nn.Module) -> nn.Module:
    """Replaces every nn.Linear of the model's blocks (`block_linears`) by an FP8Linear, in place, one at a
    time (the extra memory is one layer). Call it before adding LoRA adapters, or their own nn.Linear layers
    are quantized too."""
    for name in block_linears(model):
        replace(model, name, FP8Linear.from_linear(model.get_submodule(name)))
    return model


def fp8_path(mode: str, device) -> tuple[str, str]:
    """The path of --fp8-compute `mode` on `device`, "scaled_mm" or "dequantize", and why. auto takes
    torch._scaled_mm on CUDA capability 9.0 and up (row-wise scales) where a trial call runs; on takes it
    wherever the device runs it, which is tried first (a ValueError if not); off dequantizes."""
    if mode not in FP8_MODES:
        raise ValueError(f"--fp8-compute {mode}: expected one of {', '.join(FP8_MODES)}")
    device = torch.device(device)
    if mode == "off":
        return "dequantize", "--fp8-compute off"
    if mode == "on":
        check_scaled_mm(device)
        return "scaled_mm", f"--fp8-compute on, on {device}"
    if device.type != "cuda":
        return "dequantize", f"--fp8-compute auto on {device}: fp8 matmuls only on CUDA capability 9.0 and up"
    capability = torch.cuda.get_device_capability(device)
    why = f"--fp8-compute auto on {device}, CUDA capability {capability[0]}.{capability[1]}"
    if tuple(capability) < ROWWISE_CAPABILITY:
        return "dequantize", f"{why}: row-wise scaled fp8 matmuls need 9.0 and up (H100, H200)"
    try:  # a newer card whose torch build lacks the kernel dequantizes, and says so
        check_scaled_mm(device)
    except ValueError as error:
        return "dequantize", f"{why}: {error}"
    return "scaled_mm", f"{why}: row-wise scaled fp8 matmuls"


def check_scaled_mm(device: torch.device):
    """A ValueError, naming the device, if it cannot run a row-wise scaled fp8 matmul (tried on 16×16)."""
    try:  # the call is fixed and valid: whatever it raises, the device cannot run it
        x8 = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
        scale = torch.ones(16, 1, device=device)
        torch._scaled_mm(x8, x8.t(), scale, scale.t().contiguous(), out_dtype=torch.bfloat16)
    except Exception as e:  # RuntimeError, NotImplementedError, AssertionError (no CUDA), TypeError (MPS)
        raise ValueError(f"--fp8-compute on: {device} cannot run torch._scaled_mm with row-wise scales "
                         f"({str(e).splitlines()[0]}); use --fp8-compute auto or off") from None


def set_fp8_compute(model: nn.Module, mode: str, device) -> str:
    """Sets how every fp8 layer of the model (an FP8Linear, or a LoRALinear on one) multiplies, per
    --fp8-compute `mode` on `device`: "scaled_mm" where fp8_path takes it and torch._scaled_mm takes the
    layer (an e4m3fn weight, in and out features multiples of 16), else "dequantize". Returns what was set
    and why, for the run to print; "" if the model has no fp8 layer."""
    path, why = fp8_path(mode, device)
    layers = [m for m in model.modules() if hasattr(m, "compute") and is_fp8(m.weight)]
    scaled = 0
    for layer in layers:
        sides = layer.in_features % 16 == layer.out_features % 16 == 0  # torch._scaled_mm's K and N
        fits = layer.weight.dtype == torch.float8_e4m3fn and sides
        layer.compute = path if fits else "dequantize"
        scaled += layer.compute == "scaled_mm"
    if not layers:
        return ""
    if path == "dequantize":
        return f"fp8 compute: off, the {len(layers)} fp8 layers dequantize their weights ({why})"
    others = len(layers) - scaled
    rest = f"; {others} dequantize (e5m2, or sides not multiples of 16)" if others else ""
    return f"fp8 compute: torch._scaled_mm in {scaled} of {len(layers)} fp8 layers ({why}){rest}"


def apply_fp8(flow: nn.Module, t5: nn.Module, quantize: str | None, mode: str, device):
    """--quantize fp8: the Linears of the flow's and T5's blocks in fp8 (quantize_fp8); then --fp8-compute
    `mode` on the flow's fp8 layers, an fp8 file's too, and what it chose printed (stderr). T5 keeps
    dequantizing: it runs once per prompt. Call it before LoRA adapters wrap the layers (they take the
    layer's `compute` with it)."""
    if quantize == "fp8":
        quantize_fp8(t5)
        quantize_fp8(flow)
    note = set_fp8_compute(flow, mode, device)
    if note:
        print(note, file=sys.stderr)


def fp8_layers(model: nn.Module, sd: dict[str, Tensor], source: str, dtype=None) -> dict[str, Tensor]:
    """For a model built on meta and a checkpoint's state dict: each nn.Linear whose weight is fp8 in `sd`
    becomes an FP8Linear on meta, and the state dict returned has its `scale` (ComfyUI's `scale_weight`,
    scalar or per row, else 1). Any other fp8 tensor (a norm scale, ...) is upcast to `dtype`, else to that of
    the rest of the file."""
    # ComfyUI's marker `scaled_fp8` goes, and so do its `scale_input`s: fixed per-tensor scales of the
    # activations, where the scaled_mm path computes one per row on the fly
    sd = {k: v for k, v in sd.items() if k != "scaled_fp8" and not k.endswith(".scale_input")}
    if dtype is None:
        dtype = stored_float_dtype(sd)
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    out = {}
    for key, value in sd.items():
        layer = key.removesuffix(".weight")
        if key.endswith(".scale_weight"):
            if f"{key.removesuffix('.scale_weight')}.weight" not in sd:
                raise ValueError(f"{source}: {key} scales a weight the file does not have")
            continue
        if not is_fp8(value):
            out[key] = value
            continue
        scale = sd.get(f"{layer}.scale_weight", torch.ones(())).float().flatten()
        if key.endswith(".weight") and layer in linears:
            rows = value.shape[0]
            if scale.numel() not in (1, rows):
                raise ValueError(f"{source}: {layer}.scale_weight has {scale.numel()} values; expected 1 or "
                                 f"{rows} (one per row of {key}, {tuple(value.shape)})")
            out[key] = value
            out[f"{layer}.scale"] = scale.expand(rows).clone()
            replace(model, layer, meta_fp8_linear(value, model.get_submodule(layer).bias))
        else:  # tiny: norm scales and the like
            if scale.numel() > 1:  # one per row: (rows, 1, ..., 1), to broadcast over the other dims
                scale = scale.reshape(-1, *[1] * (value.dim() - 1))
            out[key] = (value.float() * scale).to(dtype)
    return out


def stored_float_dtype(sd: dict[str, Tensor]) -> torch.dtype:
    """The dtype of the first float tensor that is neither fp8 nor a scale (bf16 if there is none)."""
    for key, value in sd.items():
        if value.is_floating_point() and not is_fp8(value) and not key.endswith(".scale_weight"):
            return value.dtype
    return torch.bfloat16


def meta_fp8_linear(weight: Tensor, bias: Tensor | None) -> FP8Linear:
    """An FP8Linear on the meta device, shaped for `weight` (fp8) and `bias`, for a checkpoint to fill."""
    meta_bias = None if bias is None else torch.empty_like(bias, device="meta")
    scale = torch.empty(weight.shape[0], device="meta")
    return FP8Linear(torch.empty_like(weight, device="meta"), scale, meta_bias)
