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
import string
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from iclora.atomic_files import atomic_write
from iclora.lora import LoRALinear, LoRAWeights, linears, lora_linear_at, lora_state, set_lora_scale
from iclora.lora_layouts import Layout, foreign_layouts
from minflux.convert import Rows, transformer_table
from minflux.loading import open_safetensors

PEFT_ROLES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias", ".lora_down.weight": "A",
              ".lora_up.weight": "B", ".lora_A": "A", ".lora_B": "B", ".alpha": "alpha"}
TEXT_ENCODER_KEY = re.compile(r"text_encoder|lora_te")
# down (A) weight suffix -> up (B) weight suffix, in every layout we read
DOWN_UP = {".lora_A.weight": ".lora_B.weight", ".lora_down.weight": ".lora_up.weight",
           ".down.weight": ".up.weight", ".lora_A": ".lora_B"}
LORA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float64 is read as float32
# bf16's largest value is 3.39e38 (float32's 3.40e38), and the norms after a layer square its outputs: the
# largest value a LoRA may give for inputs of size 1 is the square root of that
LARGEST_OUTPUT = math.sqrt(torch.finfo(torch.bfloat16).max)
# an input layer's module in any layout: BFL's img_in (kohya's lora_unet_img_in), diffusers' x_embedder
INPUT_LAYER = re.compile(r"(?:^|[._])(?:img_in|x_embedder)$")
# the models whose input layer takes this many channels (minflux/variants.py tells them apart the same way)
INPUT_MODELS = {64: "FLUX.1 dev, schnell or Kontext", 384: "FLUX.1 Fill"}
NAME_CHARACTERS = set(string.ascii_letters + string.digits + "_")  # of a module name's dotted parts


def module_table(model: nn.Module, keys=()) -> dict[str, tuple[str, Rows]]:
    """diffusers module -> (BFL module, rows it fills), for the model's sizes and for every block index that
    `keys` name: a key for a block the model lacks then maps to a BFL name, reported as missing rather than
    as an unknown key."""
    p = model.params
    blocks = 0  # one more than the largest block index in the keys
    for key in keys:
        for index in re.findall(r"[._](\d+)(?=[._])", key):
            blocks = max(blocks, int(index) + 1)
    table = transformer_table(max(p.depth, blocks), max(p.depth_single_blocks, blocks), p.hidden_size,
                              int(p.hidden_size * p.mlp_ratio))
    # the table's norm scales (`.weight`) are no linears
    return {name: target for name, target in table.items() if not name.endswith(".weight")}


def save_lora(model: nn.Module, path, name: str = "default", metadata: dict[str, str] | None = None,
              dtype: torch.dtype | None = None):
    """Writes adapter `name` in the PEFT/diffusers layout, atomically; dtype defaults to the adapters'."""
    metadata = metadata or {}
    not_str = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if not_str:
        raise ValueError(f"safetensors metadata must map str to str; not so for {not_str}")
    by_bfl = defaultdict(list)  # BFL module -> [(diffusers module, rows of it)]
    for diffusers_name, (bfl, rows) in module_table(model).items():
        by_bfl[bfl].append((diffusers_name, slice(None) if rows is None else rows))
    weights = {}
    # alpha / r folded into B and its bias: every client reads scale 1
    for bfl, w in lora_state(model, name).items():
        s = w.alpha / w.A.shape[0]
        weights[bfl] = w._replace(B=w.B * s, bias=None if w.bias is None else w.bias * s)
    if dtype == torch.float16:
        big = beyond_fp16(weights)
        if big:
            warnings.warn(f"{path}: {big} exceeds fp16's range (65504); "
                          f"written in bf16 instead, never as inf", stacklevel=1)
            dtype = torch.bfloat16
    tensors = {}
    for bfl, w in weights.items():
        check_finite(named_parts(bfl, w), f"{path}: not written: adapter {name!r}")
        if bfl not in by_bfl:
            raise ValueError(f"{bfl} has no diffusers name: cannot save its LoRA in the PEFT layout")
        cast = dtype or w.A.dtype
        for diffusers_name, rows in by_bfl[bfl]:
            key = f"transformer.{diffusers_name}"
            tensors[f"{key}.lora_A.weight"] = w.A.to(cast).clone()        # (r, I), shared by the parts
            tensors[f"{key}.lora_B.weight"] = w.B[rows].to(cast).clone()  # (rows, r)
            if w.bias is not None:
                tensors[f"{key}.lora_B.bias"] = w.bias[rows].to(cast).clone()
    on_cpu = {k: v.cpu() for k, v in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(on_cpu, tmp, metadata={"format": "pt", **metadata}))


def named_parts(bfl: str, w: LoRAWeights) -> dict[str, Tensor]:
    """An adapter's tensors as messages name them: "<bfl> A", "<bfl> B" and, if it has one, "<bfl> bias"."""
    parts = {f"{bfl} A": w.A, f"{bfl} B": w.B}
    if w.bias is not None:
        parts[f"{bfl} bias"] = w.bias
    return parts


def beyond_fp16(weights: dict[str, LoRAWeights]) -> str | None:
    """The name of the first tensor holding a value beyond fp16's range, if any."""
    for bfl, w in weights.items():
        for part, tensor in named_parts(bfl, w).items():
            if tensor.abs().max() > torch.finfo(torch.float16).max:
                return part
    return None


def check_finite(sd: dict[str, Tensor], source: str):
    """A ValueError naming the first tensor that holds NaN or inf: such a LoRA turns every image to noise."""
    for key, tensor in sd.items():
        if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all():
            kind = "NaN" if torch.isnan(tensor).any() else "inf"
            raise ValueError(f"{source}: {key} holds {kind} values, as after a diverged training run; such a "
                             f"LoRA only makes noise")


def read_lora_file(path) -> dict[str, Tensor]:
    """The tensors of a LoRA file, checked (`check_tensors`, `check_deltas`), with a clear error for a file
    that is not safetensors. Newer diffusers saves keep alpha in their `lora_adapter_metadata` JSON instead of
    in `.alpha` keys: those alphas become `.alpha` keys."""
    with open_safetensors(path, "not a readable safetensors LoRA file") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    source = str(path)
    check_tensors(sd, source)
    alpha, alpha_pattern, rslora = adapter_config(meta, source)
    down_keys = [k for k in sd if k.endswith((".lora_A.weight", ".lora_down.weight"))]
    for key in down_keys:
        module = key.rsplit(".", 2)[0]
        if f"{module}.alpha" in sd or alpha is None:
            continue
        value = module_alpha(module.removeprefix("transformer."), alpha_pattern, alpha)
        if rslora:  # rank-stabilised LoRA scales by alpha / sqrt(r) instead of alpha / r
            value *= math.sqrt(sd[key].shape[0])
        sd[f"{module}.alpha"] = torch.tensor(value, dtype=torch.float64)  # as given: check_deltas judges it
    check_deltas(sd, source)
    return sd


def check_tensors(sd: dict[str, Tensor], source: str):
    """A ValueError naming the file and the first tensor that no LoRA holds: a dtype other than float16,
    bfloat16, float32 or float64 within float32's range (alphas may be integers), NaN or inf, an alpha of
    more than one number, a down weight of rank 0."""
    for key, tensor in sd.items():
        alpha = key.endswith(".alpha")
        integer = not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)
        if tensor.dtype not in LORA_DTYPES and not (alpha and integer):
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise ValueError(f"{source}: {key} is {dtype}; a LoRA's tensors are float16, bfloat16 or float32 "
                             f"(float64 is read as float32)")
        if tensor.dtype == torch.float64 and not alpha and beyond(tensor, torch.finfo(torch.float32).max):
            raise ValueError(f"{source}: {key} is float64 and holds values beyond float32's range (3.4e38), "
                             f"in which adapters are kept")
    check_finite(sd, source)
    for key, tensor in sd.items():
        if key.endswith(".alpha") and tensor.numel() != 1:
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, but an alpha is one number")
        if key.endswith(tuple(DOWN_UP)) and tensor.ndim == 0:
            raise ValueError(f"{source}: {key} is a single number; a down (A) weight is (rank, in features)")
        if key.endswith(tuple(DOWN_UP)) and tensor.shape[0] == 0:
            raise ValueError(f"{source}: {key} has rank 0 (shape {tuple(tensor.shape)}): an adapter without "
                             f"rows changes nothing and its alpha / rank is undefined")


def check_input_channels(sd: dict[str, Tensor], source: str, channels: int):
    """A ValueError naming the file and its input-layer key where the LoRA's img_in (x_embedder) adapter takes
    another number of channels than the model's `channels`: a Fill LoRA (384) on dev or Kontext (64), or the
    other way round. It needs only the model's header, so sample.py calls it before any weight loads."""
    for module, key_a, _ in lora_pairs(sd):
        width = sd[key_a].shape[-1] if sd[key_a].ndim == 2 else channels  # other shapes: load_lora's error
        if not INPUT_LAYER.search(module) or width == channels:
            continue
        made_for = f", a LoRA for {INPUT_MODELS[width]}" if width in INPUT_MODELS else ""
        raise ValueError(f"{source}: {key_a} takes {width} input channels{made_for}; this model's img_in "
                         f"takes {channels} ({INPUT_MODELS.get(channels, 'an unknown model')}): use it on "
                         f"the model it was trained on")


def beyond(tensor: Tensor, limit: float) -> bool:
    """Whether any value of the tensor is larger than `limit` in size (inf included, NaN not)."""
    return tensor.numel() > 0 and not tensor.is_meta and bool(tensor.abs().max() > limit)


def check_deltas(sd: dict[str, Tensor], source: str):
    """A ValueError naming the file and the first adapter whose values a run cannot hold, checked like NaN:
    for inputs of size 1 (|x_j| <= 1), neither its hidden values scale·A·x nor its output scale·(B·A·x + bias)
    may pass LARGEST_OUTPUT. Both are bounded by the largest row sums of |A| and |B|, a cheap bound that is
    exact for the hidden values."""
    for module, key_a, key_b in lora_pairs(sd):
        A = sd[key_a].double()                                                    # (r, I)
        B = sd[key_b].double()                                                    # (O, r)
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            continue  # wrong shapes are refused on loading, naming both
        if A.is_meta or B.is_meta:  # no values to bound
            continue
        r = A.shape[0]
        alpha = float(sd[f"{module}.alpha"]) if f"{module}.alpha" in sd else float(r)
        scale = abs(alpha) / r
        hidden = scale * float(A.abs().sum(1).max())                            # max |scale·A·x|
        output = hidden * float(B.abs().sum(1).max()) if B.numel() else 0.0     # max |scale·B·A·x|
        bias = sd.get(f"{module}.lora_B.bias")
        if bias is not None and bias.numel():
            output += scale * float(bias.double().abs().max())
        if not max(hidden, output) <= LARGEST_OUTPUT:
            raise ValueError(f"{source}: {key_b} (with {key_a}, alpha {alpha:.3g}, rank {r}) gives values "
                             f"up to {max(hidden, output):.3g} for inputs of size 1, beyond "
                             f"{LARGEST_OUTPUT:.2g} (the square root of bf16's and float32's largest value; "
                             f"norms square a layer's outputs): such a LoRA only makes noise")


def lora_pairs(sd: dict[str, Tensor]) -> list[tuple[str, str, str]]:
    """(module, down key, up key) of every module in sd with both weights, in any layout we read."""
    pairs = []
    for key in sd:
        for down, up in DOWN_UP.items():
            module = key.removesuffix(down)
            if key.endswith(down) and module + up in sd:
                pairs.append((module, key, module + up))
    return pairs


def adapter_config(meta: dict[str, str], source: str) -> tuple[float | None, dict[str, float], bool]:
    """(lora_alpha or None, alpha_pattern, use_rslora) of the adapter config that newer diffusers saves keep
    in a file's `lora_adapter_metadata` JSON, each checked: a ValueError names the file and the entry."""
    where = f"{source}: lora_adapter_metadata"
    text = meta.get("lora_adapter_metadata") or "{}"
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's stack
        raise ValueError(f"{where} is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where} should be a JSON object (an adapter config), not {text[:40]!r}")
    alphas = config_values(config, "lora_alpha")
    alpha = number(alphas[0], f"{where}: lora_alpha") if alphas else None
    patterns = config_values(config, "alpha_pattern")
    given = (patterns[0] if patterns else None) or {}
    if not isinstance(given, dict):
        raise ValueError(f"{where}: alpha_pattern should be a JSON object (module name -> alpha), "
                         f"not {given!r:.40}")
    alpha_pattern = {}
    for key, value in given.items():
        name = module_name(key, f"{where}: alpha_pattern key")
        alpha_pattern[name] = number(value, f"{where}: alpha_pattern[{key!r}]")
    rslora = config_values(config, "use_rslora")
    for value in rslora:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: use_rslora is {value!r}, not true or false")
    return alpha, alpha_pattern, any(rslora)


def number(value, what: str) -> float:
    """A metadata value as a float, or a ValueError naming `what` if it is no finite number."""
    # NaN, inf and ints beyond any float fail the comparison (an int is compared exactly, never converted)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= sys.float_info.max:
        raise ValueError(f"{what} is {value!r:.40}, not a finite number")
    return float(value)


def module_name(key: str, what: str) -> str:
    """An alpha_pattern key as the module name (or end of one) it stands for, `\\.` read as a dot; anything
    else, a regular expression above all, is refused, never run: a crafted pattern could take hours to match
    (catastrophic backtracking) or fail to compile."""
    name = key.replace("\\.", ".")
    parts = name.split(".")
    if not all(part and set(part) <= NAME_CHARACTERS for part in parts):
        raise ValueError(f"{what} {key!r:.60} is not a module name (letters, digits and _, joined by "
                         f"dots, as in 'transformer_blocks.0.attn.to_q' or 'attn.to_q'): keys are matched "
                         f"as names, not run as patterns")
    return name


def config_values(config: dict, name: str) -> list:
    """The values of `name` in a diffusers adapter config, whose keys may be prefixed
    (`transformer.lora_alpha`)."""
    return [value for key, value in config.items() if key.split(".")[-1] == name]


def module_alpha(module: str, alpha_pattern: dict[str, float], alpha: float) -> float:
    """A module's alpha in a peft config: that of the first alpha_pattern entry naming it or the end of its
    name in whole dotted parts (PEFT's `(.*\\.)?<key>$` with the key read as a name: `attn.to_q` matches
    `transformer_blocks.0.attn.to_q`, not `attn.to_qk`), else lora_alpha."""
    for name, value in alpha_pattern.items():
        if module == name or module.endswith("." + name):
            return value
    return alpha


def layouts(model: nn.Module, keys) -> list[Layout]:
    """PEFT/diffusers (with or without `transformer.` and peft's `base_model.model.`), then the foreign
    ones."""
    table = module_table(model, keys)
    prefixes = ("", "transformer.", "base_model.model.", "base_model.model.transformer.")
    targets = {}
    for diffusers_name, target in table.items():
        for prefix in prefixes:
            targets[prefix + diffusers_name] = target
    peft = Layout("PEFT/diffusers", PEFT_ROLES, targets)
    return [peft, *foreign_layouts(model, table)]


def module_and_role(key: str, layout: Layout) -> tuple[str, str] | None:
    """(module, role) of a key naming a tensor of one of the layout's modules, else None."""
    for suffix, role in layout.roles.items():
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            if module in layout.targets:
                return module, role
    return None


def tensors_by_module(sd: dict[str, Tensor], layout: Layout):
    """What `layout` reads in sd: {module: {role: (key, tensor)}}, the full tensors, and the keys it does
    not know."""
    modules = defaultdict(dict)
    full = {}
    unknown = []
    for key, tensor in sd.items():
        found = module_and_role(key, layout)
        if found is not None:
            module, role = found
            modules[module][role] = (key, tensor)
        elif key in layout.full_tensors:
            full[key] = tensor
        else:
            unknown.append(key)
    return modules, full, unknown


def find_layout(model: nn.Module, sd: dict[str, Tensor], source: str):
    """(layout, tensors by module, full tensors) of the first layout that knows every key, else a
    ValueError naming the closest."""
    unsupported = [k for k in sd if k.endswith((".dora_scale", ".diff", ".diff_b"))]
    if unsupported:
        raise ValueError(f"{source}: DoRA (dora_scale) / full-weight .diff tensors are not supported "
                         f"(e.g. {unsupported[0]})")
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


def shares_one_adapter(pieces: list[tuple[Rows, LoRAWeights]]) -> bool:
    """Whether all pieces carry one A and one alpha: a fused adapter split into parts on save, as ours."""
    first = pieces[0][1]
    if len(pieces) == 1:
        return True
    if first.A.is_meta:  # no values to compare
        return False
    return all(torch.equal(p.A, first.A) and p.alpha == first.alpha for _, p in pieces)


def fused_adapter(pieces: list[tuple[Rows, LoRAWeights]], out_features: int) -> LoRAWeights:
    """The one adapter of a BFL linear whose rows these pieces fill, each a file module's (rows, its LoRA:
    A (r, I), B (rows, r), bias (rows,) or None). Pieces sharing one A and alpha become that adapter again;
    others stack their A's over a block-diagonal B, each piece's scaling s_i folded into its block (absent
    rows stay zero): exactly Σ_i s_i · B_i A_i."""
    first = pieces[0][1]
    shared = shares_one_adapter(pieces)
    A = first.A if shared else torch.cat([p.A for _, p in pieces])              # (R, I)
    B = A.new_zeros(out_features, A.shape[0])                                   # (O, R)
    bias = A.new_zeros(out_features) if any(p.bias is not None for _, p in pieces) else None
    offset = 0
    for rows, p in pieces:
        r = p.A.shape[0]
        if rows is None:
            rows = slice(None)
        if shared:
            cols = slice(None)
            scaling = 1.0
        else:
            cols = slice(offset, offset + r)
            scaling = p.alpha / r
        B[rows, cols] += scaling * p.B
        if p.bias is not None:
            bias[rows] += scaling * p.bias
        offset += r
    alpha = first.alpha if shared else float(A.shape[0])  # stacked: scalings folded into B, so alpha = R
    return LoRAWeights(A, B, bias, alpha)


def load_lora(model: nn.Module, path_or_state_dict, name: str = "default", multiplier: float = 1.0,
              source: str | None = None) -> list[str]:
    """Adds adapter `name` from a LoRA file or state dict in any known layout; returns the BFL modules it
    covers. `source` names a state dict in error messages (a path names itself)."""
    sd, source = transformer_tensors(path_or_state_dict, source)
    check_input_channels(sd, source, model.params.in_channels)
    layout, modules, full = find_layout(model, sd, source)
    if any(isinstance(m, LoRALinear) and name in m.lora_A for _, m in linears(model)):
        raise ValueError(f"the model already has a LoRA adapter named {name!r}; "
                         f"load this one under another name")

    # 1. Check every tensor against the module it targets, before touching the model.
    model_linears = dict(linears(model))
    pieces = defaultdict(list)  # BFL module -> [(rows, LoRAWeights)]
    for module, tensors in modules.items():
        bfl, rows, weights = checked_piece(model_linears, layout, module, tensors, source)
        pieces[bfl].append((rows, weights))
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for key, tensor in full.items():
        if tensor.shape != params[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, "
                             f"the model's is {tuple(params[key].shape)}")

    # 2. One adapter per BFL linear, then the full tensors.
    with torch.no_grad():
        for bfl, group in pieces.items():
            weights = fused_adapter(group, model_linears[bfl].out_features)
            add_adapter_weights(lora_linear_at(model, bfl), name, weights)
        for key, tensor in full.items():
            params[key].copy_(tensor)
    set_lora_scale(model, name, multiplier)
    return list(pieces)


def transformer_tensors(path_or_state_dict, source: str | None) -> tuple[dict[str, Tensor], str]:
    """The tensors of a LoRA file or state dict, checked (`check_tensors`, `check_deltas`), less any
    text-encoder tensors (skipped with a warning), and the source's name for messages."""
    if isinstance(path_or_state_dict, dict):
        sd = dict(path_or_state_dict)
        source = source or "LoRA state dict"
        check_tensors(sd, source)
        check_deltas(sd, source)
    else:
        sd = read_lora_file(path_or_state_dict)
        source = str(path_or_state_dict)
    skipped = [k for k in sd if TEXT_ENCODER_KEY.match(k)]
    if skipped:
        warnings.warn(f"{source}: skipping {len(skipped)} text-encoder LoRA tensors (e.g. {skipped[0]}); "
                      f"only the transformer part is loaded", stacklevel=1)
        sd = {k: v for k, v in sd.items() if k not in skipped}
        if not sd:
            raise ValueError(f"{source}: only text-encoder LoRA tensors, which are not supported")
    if not sd:
        raise ValueError(f"{source}: no tensors")
    return sd, source


def checked_piece(model_linears: dict[str, nn.Module], layout: Layout, module: str, tensors: dict,
                  source: str) -> tuple[str, Rows, LoRAWeights]:
    """The BFL linear that a file module's tensors {role: (key, tensor)} target, the rows of it they fill
    and their LoRA in float32, once checked: both A and B given, a linear the model has, the right shapes."""
    if "A" not in tensors or "B" not in tensors:
        given = ", ".join(key for key, _ in tensors.values())
        raise ValueError(f"{source} ({layout.name}): {module} needs both a down (A) and an up (B) weight, "
                         f"has only {given}")
    bfl, rows = layout.targets[module]
    if bfl not in model_linears:
        raise ValueError(f"{source}: key {tensors['A'][0]} targets module {bfl}, "
                         f"which this model does not have")
    linear = model_linears[bfl]
    key_a, A = tensors["A"]
    key_b, B = tensors["B"]
    r = A.shape[0]
    n = linear.out_features if rows is None else len(torch.arange(linear.out_features)[rows])  # rows filled
    expected = [(key_a, A, (r, linear.in_features)), (key_b, B, (n, r))]
    if "bias" in tensors:
        key_bias, bias = tensors["bias"]
        expected.append((key_bias, bias, (n,)))
    for key, tensor, shape in expected:
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, but {bfl} "
                             f"({linear.out_features}×{linear.in_features}) needs {shape}")
    bias = tensors["bias"][1].float() if "bias" in tensors else None
    alpha = float(tensors["alpha"][1]) if "alpha" in tensors else float(r)
    return bfl, rows, LoRAWeights(A.float(), B.float(), bias, alpha)


def add_adapter_weights(layer: LoRALinear, name: str, weights: LoRAWeights):
    """Adds adapter `name` to the layer, holding these weights (call under torch.no_grad)."""
    layer.add_adapter(name, weights.A.shape[0], weights.alpha, bias=weights.bias is not None)
    layer.lora_A[name].weight.copy_(weights.A)
    layer.lora_B[name].weight.copy_(weights.B)
    if weights.bias is not None:
        layer.lora_B[name].bias.copy_(weights.bias)
