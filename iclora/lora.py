"""A hand-written LoRA injector for minflux's FLUX transformer (LoRA: Hu et al., arXiv 2106.09685).

A targeted `nn.Linear` (or fp8 `FP8Linear`, whose `scale` and `compute` come along) is replaced in place by a
`LoRALinear`, which keeps the base `weight` and `bias` under their official names and adds named adapters:
    y = W x + b + Σ_adapters scaling · B(A(dropout(x))),   scaling = multiplier · alpha / r.
A starts kaiming-uniform (as nn.Linear) and B at zero, so a fresh adapter leaves the model unchanged.
Adapters are float32 even on a bf16 or fp8 base, computed in the input's dtype (as under autocast), and never
merged into fp8 (`fold_lora` merges before `quantize_fp8` instead). LoRA files: `iclora/lora_files.py`.

Shape letters: N any leading dims, I in features, O out features, r rank.
"""

import math
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minflux.module_tree import replace
from minflux.quantize import FP8Linear, linear

# every Linear of the 19 double (img/txt: mod.lin, attn.qkv, attn.proj, mlp.0, mlp.2) and 38 single blocks
# (linear1, linear2, modulation.lin): 304 BFL linears = the 494 diffusers modules of the IC-LoRA release
DEFAULT_TARGETS = (r"double_blocks\.\d+\..+", r"single_blocks\.\d+\..+")


class LoRALinear(nn.Module):
    """A frozen nn.Linear (or FP8Linear: its `scale` too) plus named adapters, each with its own scaling."""

    def __init__(self, base: nn.Linear | FP8Linear):
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight.requires_grad_(False)
        self.register_parameter("bias", base.bias.requires_grad_(False) if base.bias is not None else None)
        self.register_buffer("scale", base.scale if isinstance(base, FP8Linear) else None)  # None: not fp8
        self.compute = base.compute if isinstance(base, FP8Linear) else None  # fp8: FP8Linear's own matmul
        # per adapter, by name
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.dropout = nn.ModuleDict()
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.merged: set[str] = set()  # the adapters added into weight (and bias)

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0, bias: bool = False,
                    generator: torch.Generator | None = None):
        """A new adapter: A kaiming-uniform like nn.Linear's, drawn on the CPU from `generator` so that runs
        reproduce; B zero, so the layer's output is unchanged."""
        if name in self.lora_A:
            raise ValueError(f"a LoRA adapter named {name!r} is already on this layer; pick another name")
        # built on meta and then allocated, so nn.Linear's own init draws nothing from the global RNG
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False, device="meta", dtype=torch.float32)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=bias, device="meta", dtype=torch.float32)
        self.lora_A[name].to_empty(device=self.weight.device)
        self.lora_B[name].to_empty(device=self.weight.device)
        bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=√5), nn.Linear's default
        A = torch.empty(rank, self.in_features).uniform_(-bound, bound, generator=generator)
        with torch.no_grad():
            self.lora_A[name].weight.copy_(A)
            self.lora_B[name].weight.zero_()
            if bias:
                self.lora_B[name].bias.zero_()
        self.dropout[name] = nn.Dropout(dropout) if dropout else nn.Identity()
        self.alpha[name] = float(alpha)
        self.scaling[name] = float(alpha) / rank

    def delta(self, name: str) -> tuple[Tensor, Tensor | None]:
        """scaling · B @ A (O, I) and scaling · B's bias (O,), in float32."""
        A = self.lora_A[name]
        B = self.lora_B[name]
        s = self.scaling[name]
        dw = s * (B.weight.float() @ A.weight.float())                            # (O, I)
        db = None if B.bias is None else s * B.bias.float()                      # (O,)
        return dw, db

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., I)
        out = linear(x, self.weight, self.scale, self.bias, self.compute)         # (..., O), as the base's
        for name, A in self.lora_A.items():
            if name in self.merged:  # already in weight
                continue
            # computed in x's dtype: no float32 copy of x
            B = self.lora_B[name]
            s = self.scaling[name]
            h = s * F.linear(self.dropout[name](x), A.weight.to(x.dtype))         # (..., r)
            bias = None if B.bias is None else (s * B.bias).to(x.dtype)
            out = out + F.linear(h, B.weight.to(x.dtype), bias)                   # (..., O)
        return out

    def extra_repr(self) -> str:
        adapters = dict(self.scaling)
        return f"in={self.in_features}, out={self.out_features}, adapters={adapters}, merged={self.merged}"


def linears(model: nn.Module, prefix: str = ""):
    """(name, module) of every nn.Linear, FP8Linear and LoRALinear (not the Linears inside a LoRALinear)."""
    for child_name, child in model.named_children():
        name = prefix + child_name
        if isinstance(child, (nn.Linear, FP8Linear, LoRALinear)):
            yield name, child
        else:
            yield from linears(child, name + ".")


def lora_linear_at(model: nn.Module, module_name: str) -> LoRALinear:
    """The LoRALinear at module_name, replacing a plain nn.Linear or FP8Linear there in place if needed."""
    module = model.get_submodule(module_name)
    if isinstance(module, LoRALinear):
        return module
    if not isinstance(module, (nn.Linear, FP8Linear)):
        raise ValueError(f"{module_name} is a {type(module).__name__}, not an nn.Linear: cannot carry a LoRA")
    wrapped = LoRALinear(module)
    replace(model, module_name, wrapped)
    return wrapped


def inject_lora(model: nn.Module, rank: int = 16, alpha: float = 16.0, targets=DEFAULT_TARGETS,
                dropout: float = 0.0, name: str = "default", seed: int = 0) -> list[str]:
    """Adds a fresh adapter (B = 0) to every Linear whose name fully matches one of the `targets` regexes and
    freezes every other parameter of the model, older adapters included, so only this adapter trains. A is
    drawn from a generator seeded with `seed`: torch's own default seed differs from process to process."""
    names = [n for n, _ in linears(model) if any(re.fullmatch(t, n) for t in targets)]
    if not names:
        raise ValueError(f"no Linear layer matches the LoRA targets {list(targets)}")
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for n in names:
        lora_linear_at(model, n).add_adapter(name, rank, alpha, dropout, generator=g)
    return names


def lora_layers(model: nn.Module, name: str) -> dict[str, LoRALinear]:
    """module name -> LoRALinear for every layer carrying adapter `name`."""
    found = {n: m for n, m in linears(model) if isinstance(m, LoRALinear) and name in m.lora_A}
    if not found:
        raise ValueError(f"the model has no LoRA adapter named {name!r}")
    return found


@torch.no_grad()
def merge_lora(model: nn.Module, name: str = "default", sign: int = 1):
    """sign 1: adds the adapter's delta into the base weights (computed in float32), and forward skips the
    adapter. sign -1: takes a merged delta out again (exact up to rounding in the base dtype)."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be 1 (merge) or -1 (unmerge), not {sign}")
    layers = lora_layers(model, name)
    if sign == 1:
        check_mergeable(layers, name)
    for m in layers.values():
        if (name in m.merged) == (sign == 1):  # already as asked
            continue
        dw, db = m.delta(name)
        m.weight.copy_((m.weight.float() + sign * dw).to(m.weight.dtype))
        if db is not None:
            m.bias.copy_((m.bias.float() + sign * db).to(m.bias.dtype))
        if sign == 1:
            m.merged.add(name)
        else:
            m.merged.remove(name)


def check_mergeable(layers: dict[str, LoRALinear], name: str):
    """A ValueError if adapter `name` cannot be merged: into fp8 weights, or a bias into a Linear without."""
    fp8 = [n for n, m in layers.items() if m.scale is not None and name not in m.merged]
    if fp8:
        raise ValueError(f"cannot merge LoRA {name!r} into fp8 weights ({fp8[0]}, ...): "
                         f"the sum would be rounded to fp8; "
                         f"keep it as an adapter, or merge it (fold_lora) before quantize_fp8")
    no_bias = [n for n, m in layers.items() if m.lora_B[name].bias is not None and m.bias is None]
    if no_bias:
        raise ValueError(f"cannot merge a LoRA bias into a Linear without bias: {', '.join(no_bias)}")


def set_lora_scale(model: nn.Module, name: str, multiplier: float):
    """scaling = multiplier · alpha / r for every layer of this adapter (re-merging it if it was merged)."""
    layers = lora_layers(model, name)
    merged = any(name in m.merged for m in layers.values())
    merge_lora(model, name, sign=-1)
    for m in layers.values():
        m.scaling[name] = multiplier * m.alpha[name] / m.lora_A[name].out_features
    if merged:
        merge_lora(model, name)


def remove_lora(model: nn.Module, name: str = "default"):
    """Drops the adapter, unmerging it first; a layer left with no adapter becomes its base again (nn.Linear
    or FP8Linear)."""
    merge_lora(model, name, sign=-1)
    drop_adapter(model, name)


def fold_lora(model: nn.Module, name: str = "default"):
    """Merges the adapter into the base weights for good and drops it: a layer left with no adapter becomes a
    plain nn.Linear again, which `quantize_fp8` can then quantize (LoRA merged before quantizing)."""
    merge_lora(model, name)
    drop_adapter(model, name)


def drop_adapter(model: nn.Module, name: str):
    """Deletes the adapter as it is (merged or not); a layer left with no adapter becomes its base again."""
    for module_name, m in lora_layers(model, name).items():
        del m.lora_A[name]
        del m.lora_B[name]
        del m.dropout[name]
        del m.alpha[name]
        del m.scaling[name]
        m.merged.discard(name)
        if m.lora_A:  # other adapters stay
            continue
        if m.scale is not None:
            base = FP8Linear(m.weight, m.scale, m.bias, m.compute)
        else:
            base = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            base.weight = m.weight
            base.bias = m.bias
        replace(model, module_name, base)


def lora_parameters(model: nn.Module, name: str = "default") -> list[nn.Parameter]:
    """The adapter's A and B parameters, for the optimizer."""
    params = []
    for m in lora_layers(model, name).values():
        params += m.lora_A[name].parameters()
        params += m.lora_B[name].parameters()  # B's weight and bias, if any
    return params


class LoRAWeights(NamedTuple):
    """One layer's adapter: A (r, I), B (O, r), B's bias (O,) or None, and alpha (scaling = alpha / r)."""
    A: Tensor
    B: Tensor
    bias: Tensor | None
    alpha: float


def lora_state(model: nn.Module, name: str = "default") -> dict[str, LoRAWeights]:
    """BFL module name -> the adapter's weights there, detached."""
    state = {}
    for module_name, m in lora_layers(model, name).items():
        A = m.lora_A[name]
        B = m.lora_B[name]
        bias = None if B.bias is None else B.bias.detach()
        state[module_name] = LoRAWeights(A.weight.detach(), B.weight.detach(), bias, m.alpha[name])
    return state
