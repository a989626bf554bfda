"""LoRA files for the FLUX transformer: saved in the PEFT/diffusers layout, loaded from any known layout.

We save what the IC-LoRA release uses, `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight`, with
alpha / r folded into B (no `.alpha` keys: every client reads scale 1), diffusers modules mapped to BFL
linears by `minflux/convert.py`'s table. Loading detects the layout from the key names (the others are in
`iclora/lora_layouts.py`); several file modules that land in one fused BFL linear become one adapter with
exactly the sum of their deltas. Layouts and diffusers' quirks are in `docs/lora-formats.md`.

Shape letters: r rank, R fused rank, I in features, O out features.
"""

import json
import math
import re
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from minflux.convert import Rows, transformer_table
from minflux.loading import open_safetensors

from .atomic_files import atomic_write
from .lora import LoRALinear, LoRAWeights, linears, lora_linear_at, lora_state, set_lora_scale
from .lora_layouts import Layout, foreign_layouts
from .panels import LAYOUTS
from .references import REF_MODES

PEFT_ROLES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias", ".lora_down.weight": "A",
              ".lora_up.weight": "B", ".lora_A": "A", ".lora_B": "B", ".alpha": "alpha"}
TEXT_ENCODER_KEY = re.compile(r"text_encoder|lora_te")


def module_table(model: nn.Module, keys=()) -> dict[str, tuple[str, Rows]]:
    """diffusers module -> (BFL module, rows it fills), for the model's sizes and every block index `keys`
    name.

    Covering the indices in the keys lets a key for a block the model lacks map to a BFL name that is then
    reported as missing, instead of as an unknown key."""
    p = model.params
    n = max([int(i) + 1 for k in keys for i in re.findall(r"[._](\d+)(?=[._])", k)], default=0)
    table = transformer_table(max(p.depth, n), max(p.depth_single_blocks, n), p.hidden_size,
                              int(p.hidden_size * p.mlp_ratio))
    return {name: target for name, target in table.items() if not name.endswith(".weight")}  # drop norm params


def save_lora(model: nn.Module, path, name: str = "default", metadata: dict[str, str] | None = None,
              dtype: torch.dtype | None = None):
    """Writes adapter `name` in the PEFT/diffusers layout (atomically); dtype defaults to the adapters'
    own."""
    if bad := [k for k, v in (metadata or {}).items() if not isinstance(k, str) or not isinstance(v, str)]:
        raise ValueError(f"safetensors metadata must map str to str; not so for {bad}")
    by_bfl = defaultdict(list)
    for diffusers_name, (bfl, rows) in module_table(model).items():
        by_bfl[bfl].append((diffusers_name, slice(None) if rows is None else rows))
    tensors, weights = {}, {}
    for bfl, w in lora_state(model, name).items():  # alpha / r folded into B and its bias: every client reads scale 1
        s = w.alpha / w.A.shape[0]
        weights[bfl] = w._replace(B=w.B * s, bias=None if w.bias is None else w.bias * s)
    if dtype == torch.float16 and (big := next((f"{bfl} {part}" for bfl, w in weights.items() for part, t in
                                                zip(("A", "B", "bias"), w[:3]) if t is not None
                                                and t.abs().max() > torch.finfo(torch.float16).max), None)):
        warnings.warn(f"{path}: {big} exceeds fp16's range (65504); written in bf16 instead, never as inf")
        dtype = torch.bfloat16
    for bfl, w in weights.items():
        check_finite({f"{bfl} {part}": t for part, t in zip(("A", "B", "bias"), w[:3]) if t is not None},
                     f"{path}: not written: adapter {name!r}")
        if bfl not in by_bfl:
            raise ValueError(f"{bfl} has no diffusers name: cannot save its LoRA in the PEFT layout")
        cast = dtype or w.A.dtype
        for diffusers_name, rows in by_bfl[bfl]:
            key = f"transformer.{diffusers_name}"
            tensors[f"{key}.lora_A.weight"] = w.A.to(cast).clone()        # (r, I), shared by the parts
            tensors[f"{key}.lora_B.weight"] = w.B[rows].to(cast).clone()  # (rows, r)
            if w.bias is not None:
                tensors[f"{key}.lora_B.bias"] = w.bias[rows].to(cast).clone()
    atomic_write(Path(path), lambda tmp: save_file({k: v.cpu() for k, v in tensors.items()}, tmp,
                                                   metadata={"format": "pt", **(metadata or {})}))


def check_finite(sd: dict[str, Tensor], source: str):
    """A ValueError naming the first tensor that holds NaN or inf: such a LoRA turns every image to noise."""
    for key, tensor in sd.items():
        if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all():
            kind = "NaN" if torch.isnan(tensor).any() else "inf"
            raise ValueError(f"{source}: {key} holds {kind} values, as after a diverged training run; such a "
                             f"LoRA only makes noise")


def read_lora_file(path) -> dict[str, Tensor]:
    """The tensors of a LoRA file, with a clear error for a file that is not safetensors. Newer diffusers
    saves keep alpha in the `lora_adapter_metadata` JSON instead of `.alpha` keys; those alphas become
    `.alpha` keys."""
    with open_safetensors(path, "not a readable safetensors LoRA file") as f:
        sd, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    check_finite(sd, str(path))
    config = json.loads(meta.get("lora_adapter_metadata") or "{}")
    alpha = next((v for k, v in config.items() if k.split(".")[-1] == "lora_alpha"), None)
    patterns = next((v for k, v in config.items() if k.split(".")[-1] == "alpha_pattern"), None) or {}
    rslora = any(v for k, v in config.items() if k.split(".")[-1] == "use_rslora")
    for key in [k for k in sd if k.endswith((".lora_A.weight", ".lora_down.weight"))]:
        module = key.rsplit(".", 2)[0]
        if f"{module}.alpha" in sd or alpha is None:
            continue
        bare = module.removeprefix("transformer.")
        value = float(next((a for pattern, a in patterns.items() if re.fullmatch(rf"(.*\.)?{pattern}", bare)), alpha))
        if rslora:  # rank-stabilised LoRA scales by alpha / sqrt(r) instead of alpha / r
            value *= math.sqrt(sd[key].shape[0])
        sd[f"{module}.alpha"] = torch.tensor(value)
    return sd


CONDITIONAL_KEYS = ("ref_panels", "panels", "layout", "ref_mode", "panel_height", "panel_width")


def conditional_metadata(ref_panels: list[int], panels: int, layout: str, ref_mode: str, panel_height: int,
                         panel_width: int) -> dict[str, str]:
    """What a conditional IC-LoRA (`train.py --ref-panel`) records: its 1-based reference panels ("1" or
    "1,3"), the panel count and layout, how reference tokens were given (iclora/references.py) and the trained
    panel size."""
    return {"ref_panels": ",".join(map(str, ref_panels)), "panels": str(panels), "layout": layout,
            "ref_mode": ref_mode, "panel_height": str(panel_height), "panel_width": str(panel_width)}


def read_conditional_metadata(path) -> dict | None:
    """`conditional_metadata`'s values read back from a LoRA file (ints as ints); None for a plain LoRA."""
    with open_safetensors(path, "not a readable safetensors LoRA file") as f:
        meta = f.metadata() or {}
    if "ref_panels" not in meta:
        return None
    try:
        found = {k: meta[k] for k in CONDITIONAL_KEYS}
        found["ref_panels"] = [int(k) for k in found["ref_panels"].split(",")]
        found |= {k: int(found[k]) for k in ("panels", "panel_height", "panel_width")}
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: broken conditional IC-LoRA metadata ({type(e).__name__}: {e}); expected the "
                         f"keys {', '.join(CONDITIONAL_KEYS)} as train.py --ref-panel writes them") from None
    sizes = (found["panel_height"], found["panel_width"])
    if found["ref_mode"] not in REF_MODES or found["layout"] not in LAYOUTS or any(s < 16 or s % 16 for s in sizes):
        raise ValueError(f"{path}: broken conditional IC-LoRA metadata: ref_mode {found['ref_mode']!r}, layout "
                         f"{found['layout']!r}, panel size {sizes[1]}x{sizes[0]}; expected one of {REF_MODES}, one "
                         f"of {LAYOUTS}, sides multiples of 16")
    return found


def layouts(model: nn.Module, keys) -> list[Layout]:
    """PEFT/diffusers (with or without `transformer.` and peft's `base_model.model.`), then the foreign
    ones."""
    table = module_table(model, keys)
    prefixes = ("", "transformer.", "base_model.model.", "base_model.model.transformer.")
    peft = Layout("PEFT/diffusers", PEFT_ROLES, {p + d: target for d, target in table.items() for p in prefixes})
    return [peft, *foreign_layouts(model, table)]


def tensors_by_module(sd: dict[str, Tensor], layout: Layout):
    """What `layout` reads in sd: {module: {role: (key, tensor)}}, the full tensors, and the keys it does not
    know."""
    modules, full, unknown = defaultdict(dict), {}, []
    for key, tensor in sd.items():
        for suffix, role in layout.roles.items():
            if key.endswith(suffix) and (module := key[: -len(suffix)]) in layout.targets:
                modules[module][role] = (key, tensor)
                break
        else:
            if key in layout.full_tensors:
                full[key] = tensor
            else:
                unknown.append(key)
    return modules, full, unknown


def find_layout(model: nn.Module, sd: dict[str, Tensor], source: str):
    """(layout, tensors by module, full tensors) of the first layout that knows every key, else a
    ValueError."""
    if bad := [k for k in sd if k.endswith((".dora_scale", ".diff", ".diff_b"))]:
        raise ValueError(f"{source}: DoRA (dora_scale) / full-weight .diff tensors are not supported (e.g. {bad[0]})")
    tried = {}
    for layout in layouts(model, sd):
        modules, full, unknown = tensors_by_module(sd, layout)
        if modules and not unknown:
            return layout, modules, full
        tried[layout.name] = unknown
    best = min(tried, key=lambda name: len(tried[name]))
    raise ValueError(f"{source}: not a FLUX transformer LoRA in any known layout (tried {', '.join(tried)}); "
                     f"closest is {best}, which does not know {len(tried[best])} key(s), e.g. "
                     f"{', '.join(tried[best][:3])}")


def fused_adapter(pieces: list[tuple[Rows, LoRAWeights]], out_features: int) -> LoRAWeights:
    """The one adapter of a BFL linear whose rows these pieces fill, each a file module's (rows, its LoRA: A
    (r, I), B (rows, r), bias (rows,) or None). Pieces sharing one A and alpha (a fused adapter split on save,
    as ours) become that adapter again; others stack their A's over a block-diagonal B, each piece's scaling
    s_i folded into its block (absent rows stay zero): exactly Σ_i s_i · B_i A_i."""
    first = pieces[0][1]
    shared = len(pieces) == 1 or (not first.A.is_meta and all(torch.equal(p.A, first.A) and p.alpha == first.alpha
                                                                for _, p in pieces))
    A = first.A if shared else torch.cat([p.A for _, p in pieces])              # (R, I)
    B = A.new_zeros(out_features, A.shape[0])                                   # (O, R)
    bias = A.new_zeros(out_features) if any(p.bias is not None for _, p in pieces) else None
    offset = 0
    for rows, p in pieces:
        r, rows = p.A.shape[0], slice(None) if rows is None else rows
        cols, scaling = (slice(None), 1.0) if shared else (slice(offset, offset + r), p.alpha / r)
        B[rows, cols] += scaling * p.B
        if p.bias is not None:
            bias[rows] += scaling * p.bias
        offset += r
    return LoRAWeights(A, B, bias, first.alpha if shared else float(A.shape[0]))  # folded: alpha = R, scaling 1


def load_lora(model: nn.Module, path_or_state_dict, name: str = "default", multiplier: float = 1.0,
              source: str | None = None) -> list[str]:
    """Adds adapter `name` from a LoRA file or state dict in any known layout; returns the BFL modules it
    covers. `source` names a state dict in error messages (a path names itself)."""
    if isinstance(path_or_state_dict, dict):
        sd, source = dict(path_or_state_dict), source or "LoRA state dict"
        check_finite(sd, source)
    else:
        sd, source = read_lora_file(path_or_state_dict), str(path_or_state_dict)
    if skipped := [k for k in sd if TEXT_ENCODER_KEY.match(k)]:
        warnings.warn(f"{source}: skipping {len(skipped)} text-encoder LoRA tensors (e.g. {skipped[0]}); "
                      f"only the transformer part is loaded")
        sd = {k: v for k, v in sd.items() if k not in skipped}
        if not sd:
            raise ValueError(f"{source}: only text-encoder LoRA tensors, which are not supported")
    if not sd:
        raise ValueError(f"{source}: no tensors")
    layout, modules, full = find_layout(model, sd, source)
    if any(isinstance(m, LoRALinear) and name in m.lora_A for _, m in linears(model)):
        raise ValueError(f"the model already has a LoRA adapter named {name!r}; load this one under another name")

    # 1. Check every tensor against the module it targets, before touching the model.
    model_linears = dict(linears(model))
    pieces = defaultdict(list)  # BFL module -> [(rows, LoRAWeights)]
    for module, tensors in modules.items():
        if "A" not in tensors or "B" not in tensors:
            raise ValueError(f"{source} ({layout.name}): {module} needs both a down (A) and an up (B) weight, has "
                             f"only {', '.join(key for key, _ in tensors.values())}")
        bfl, rows = layout.targets[module]
        if bfl not in model_linears:
            raise ValueError(f"{source}: key {tensors['A'][0]} targets module {bfl}, which this model does not have")
        linear = model_linears[bfl]
        (key_a, A), (key_b, B) = tensors["A"], tensors["B"]
        r = A.shape[0]
        n = linear.out_features if rows is None else len(torch.arange(linear.out_features)[rows])  # rows filled
        checks = [(key_a, A, (r, linear.in_features)), (key_b, B, (n, r))]
        if "bias" in tensors:
            checks.append((*tensors["bias"], (n,)))
        for key, tensor, want in checks:
            if tuple(tensor.shape) != want:
                raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, but {bfl} "
                                 f"({linear.out_features}×{linear.in_features}) needs {want}")
        bias = tensors["bias"][1].float() if "bias" in tensors else None
        alpha = float(tensors["alpha"][1]) if "alpha" in tensors else float(r)
        pieces[bfl].append((rows, LoRAWeights(A.float(), B.float(), bias, alpha)))
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for key, tensor in full.items():
        if tensor.shape != params[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, "
                             f"the model's is {tuple(params[key].shape)}")

    # 2. One adapter per BFL linear, then the full tensors.
    with torch.no_grad():
        for bfl, group in pieces.items():
            w = fused_adapter(group, model_linears[bfl].out_features)
            layer = lora_linear_at(model, bfl)
            layer.add_adapter(name, w.A.shape[0], w.alpha, bias=w.bias is not None)
            layer.lora_A[name].weight.copy_(w.A)
            layer.lora_B[name].weight.copy_(w.B)
            if w.bias is not None:
                layer.lora_B[name].bias.copy_(w.bias)
        for key, tensor in full.items():
            params[key].copy_(tensor)
    set_lora_scale(model, name, multiplier)
    return list(pieces)
