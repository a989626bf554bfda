"""fp8 weights, a memory saving and not a speed-up: each Linear weight in a model's blocks is stored in 8 bits
with a float32 scale per output row; each forward dequantizes it to the input's dtype, then runs F.linear.

`quantize_fp8` turns the nn.Linear layers of a model's blocks into `FP8Linear` (per-row absmax / 448, e4m3fn),
a layer at a time; `fp8_layers` does the same on the meta device for an fp8 checkpoint (plain casts: scale 1;
ComfyUI "scaled fp8": a `scale_weight` per layer), so `minflux.loading` can assign the file's tensors as they
are stored. Norms, embeddings and biases keep their dtype. The model files know nothing of this.

Shape letters: O out features, I in features.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .module_tree import FP8_DTYPES, replace

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def is_fp8(t: Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def dequantize(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """fp8 (O, I) times its row scales (O,), in float32, then cast to `dtype`."""
    return (weight.float() * scale[:, None]).to(dtype)                            # (O, I)


class FP8Linear(nn.Module):
    """A Linear whose `weight` (O, I) is fp8 (frozen), with a float32 `scale` (O,) per row; `bias` (O,) is
    kept in its dtype."""

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None):
        super().__init__()
        if not is_fp8(weight) or scale.shape != weight.shape[:1]:
            raise ValueError(f"FP8Linear needs an fp8 weight (O, I) and a scale (O,), got {weight.dtype} "
                             f"{tuple(weight.shape)} and {tuple(scale.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scale", scale.float())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        """Per-row absmax / 448 in e4m3fn; an all-zero row gets scale 1 (and stays zero)."""
        w = linear.weight.detach().float()                                        # (O, I)
        scale = w.abs().amax(dim=1) / E4M3_MAX                                    # (O,)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        weight = (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return cls(weight, scale, None if linear.bias is None else linear.bias.detach())

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        return dequantize(self.weight, self.scale, dtype)                          # (O, I)

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., I) -> (..., O), computed in x's dtype
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.weight.dtype}"


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


def fp8_layers(model: nn.Module, sd: dict[str, Tensor], source: str, dtype=None) -> dict[str, Tensor]:
    """For a model built on meta and a checkpoint's state dict: each nn.Linear whose weight is fp8 in `sd`
    becomes an FP8Linear on meta, and the state dict returned has its `scale` (ComfyUI's `scale_weight`,
    scalar or per row, else 1). Any other fp8 tensor (a norm scale, ...) is upcast to `dtype`, else to that of
    the rest of the file."""
    # ComfyUI's marker `scaled_fp8` goes, and so do its `scale_input`s: they serve fp8 matmuls of the
    # activations, which we do not do (activations stay in the run's dtype)
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
