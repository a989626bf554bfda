"""LoRA files for the FLUX transformer: saved in the PEFT/diffusers layout, loaded from the four layouts seen for FLUX.

The layouts are those seen for FLUX LoRAs (diffusers/PEFT, kohya sd-scripts, BFL, XLabs x-flux).
Every diffusers <-> BFL name mapping comes from the one table in
`minflux/convert.py` (each diffusers linear fills a set of rows of one BFL linear).

Saving writes only LoRA tensors, `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight`, plus a scalar
`.alpha` per module when alpha != rank (diffusers' FLUX loader reads these as network alphas; no `.alpha` means
scale 1). A fused BFL linear is split exactly: A is shared, B is cut by rows (the final adaLN rows are un-swapped).
In diffusers, load such a file with `FluxPipeline.load_lora_weights` (it reads `.alpha`);
`FluxTransformer2DModel.load_lora_adapter` on its own ignores `.alpha` keys and would use scale 1.
The adapter config is NOT written as diffusers' `lora_adapter_metadata`: diffusers refuses a file that has both it
and `.alpha` keys. Caller metadata goes in as plain safetensors string metadata.

Loading detects the layout from the key names:
    PEFT/diffusers  [base_model.model.][transformer.]<diffusers module>.lora_A.weight / .lora_B.weight (or lora_down
                    / lora_up), .alpha
                    (the ali-vilab In-Context-LoRA release: no alpha, rank 16, fp16, 494 modules)
    kohya           lora_unet_<BFL module, dots as underscores>.lora_down.weight / .lora_up.weight / .alpha,
                    and ComfyUI's diffusion_model.<BFL module>.lora_down.weight / ..., and kohya's diffusers
                    naming lora_transformer_<diffusers module, dots as underscores>.lora_down.weight / ...
    BFL-native      [diffusion_model.]<BFL module>.lora_A.weight / .lora_B.weight / .lora_B.bias, plus full tensors
                    (unprefixed) such as
                    `...query_norm.scale` that are copied into the model (remove_lora does NOT undo that copy)
    XLabs           double_blocks.{i}.processor.{qkv,proj}_lora{1,2}.{down,up}.weight (1 = img, 2 = txt),
                    single_blocks.{i}.processor.{qkv,proj}_lora.{down,up}.weight (qkv: first 3C rows of linear1)
Several diffusers modules that land in one BFL linear (to_q/to_k/to_v[/proj_mlp]) become ONE adapter of rank
R = Σ r_i with A = [A_1; ...; A_n] and a block-diagonal B (each part's scale folded into its block, absent parts are
zero), which is exactly Σ_i s_i · B_i A_i. Adapters are float32 whatever the file's dtype. A module without
an alpha key has scale 1 (alpha = r), even when other modules of the file have one (diffusers would give it
the file's most common alpha instead).
Text-encoder LoRA keys (`text_encoder*`, `text_encoders.`, `lora_te*`) are skipped with a warning, so the
transformer part of a file that also trains CLIP/T5 still loads; a file with only those keys is an error.

Shape letters: r rank, R fused rank, I in features, O out features, C hidden size.
"""

import json
import math
import os
import re
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from minflux.convert import transformer_table

from .lora import LoRALinear, linears, lora_state, set_lora_scale, wrap

# key suffix -> role, per layout
FORMATS = {
    "PEFT/diffusers": {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias", ".lora_down.weight": "A",
                       ".lora_up.weight": "B", ".lora_A": "A", ".lora_B": "B", ".alpha": "alpha"},
    "kohya": {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"},
    "BFL-native": {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias"},
    "XLabs": {".down.weight": "A", ".up.weight": "B"},
}
TEXT_ENCODER = re.compile(r"text_encoder|lora_te")


def module_table(model: nn.Module, keys=()) -> dict[str, tuple[str, slice | Tensor | None]]:
    """diffusers module -> (BFL module, rows it fills), for the model's sizes and every block index `keys` name.

    Covering the indices in the keys lets a key for a block the model lacks map to a BFL name that is then
    reported as missing, instead of as an unknown key."""
    p = model.params
    n = max([int(i) + 1 for k in keys for i in re.findall(r"[._](\d+)(?=[._])", k)], default=0)
    table = transformer_table(max(p.depth, n), max(p.depth_single_blocks, n), p.hidden_size,
                              int(p.hidden_size * p.mlp_ratio))
    return {name: target for name, target in table.items() if not name.endswith(".weight")}  # drop norm params


def save_lora(model: nn.Module, path, name: str = "default", metadata: dict[str, str] | None = None,
              dtype: torch.dtype | None = None):
    """Writes adapter `name` in the PEFT/diffusers layout (atomically); dtype defaults to the adapters' own."""
    if bad := [k for k, v in (metadata or {}).items() if not isinstance(k, str) or not isinstance(v, str)]:
        raise ValueError(f"safetensors metadata must map str to str; not so for {bad}")
    by_bfl = defaultdict(list)
    for diffusers_name, (bfl, rows) in module_table(model).items():
        by_bfl[bfl].append((diffusers_name, slice(None) if rows is None else rows))
    tensors = {}
    for bfl, (A, B, bias, alpha) in lora_state(model, name).items():
        if bfl not in by_bfl:
            raise ValueError(f"{bfl} has no diffusers name: cannot save its LoRA in the PEFT layout")
        cast = dtype or A.dtype
        for diffusers_name, rows in by_bfl[bfl]:
            key = f"transformer.{diffusers_name}"
            tensors[f"{key}.lora_A.weight"] = A.to(cast).clone()        # (r, I), shared by the parts
            tensors[f"{key}.lora_B.weight"] = B[rows].to(cast).clone()  # (rows, r)
            if bias is not None:
                tensors[f"{key}.lora_B.bias"] = bias[rows].to(cast).clone()
            if alpha != A.shape[0]:
                tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    atomic_write(Path(path), lambda tmp: save_file({k: v.cpu() for k, v in tensors.items()}, tmp,
                                                   metadata={"format": "pt", **(metadata or {})}))


def atomic_write(path: Path, write):
    """`write(tmp)` to a temporary file beside `path`, then rename: a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_lora_file(path) -> dict[str, Tensor]:
    """The tensors of a LoRA file, with a clear error for a file that is not safetensors. Newer diffusers saves
    keep alpha in the `lora_adapter_metadata` JSON instead of `.alpha` keys; those alphas become `.alpha` keys."""
    try:
        with safe_open(str(path), framework="pt") as f:
            sd, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors LoRA file: {e}") from None
    config = json.loads(meta.get("lora_adapter_metadata") or "{}")
    alpha = next((v for k, v in config.items() if k.split(".")[-1] == "lora_alpha"), None)
    patterns = next((v for k, v in config.items() if k.split(".")[-1] == "alpha_pattern"), None) or {}
    rslora = any(v for k, v in config.items() if k.split(".")[-1] == "use_rslora")
    for key in [k for k in sd if k.endswith((".lora_A.weight", ".lora_down.weight"))]:
        module = key.rsplit(".", 2)[0]
        if f"{module}.alpha" in sd or alpha is None:
            continue
        bare = module.removeprefix("transformer.")
        matched = [a for pattern, a in patterns.items() if re.fullmatch(rf"(.*\.)?{pattern}", bare)]
        value = float(matched[0] if matched else alpha)
        if rslora:  # rank-stabilised LoRA scales by alpha / sqrt(r) instead of alpha / r
            value *= math.sqrt(sd[key].shape[0])
        sd[f"{module}.alpha"] = torch.tensor(value)
    return sd


def resolvers(model: nn.Module, keys) -> dict:
    """Per layout: the module part of a key -> (BFL module, rows) or None if the layout does not know it."""
    table = module_table(model, keys)
    bfl_names = {n for n, _ in linears(model)} | {bfl for bfl, _ in table.values()}
    kohya = {"lora_unet_" + n.replace(".", "_"): (n, None) for n in bfl_names}
    kohya |= {"lora_transformer_" + d.replace(".", "_"): target for d, target in table.items()}
    C = model.params.hidden_size

    def comfy_or_kohya(m: str):
        if m in kohya:
            return kohya[m]
        bfl = m.removeprefix("diffusion_model.")
        return (bfl, None) if m.startswith("diffusion_model.") and bfl in bfl_names else None

    def xlabs(m: str):
        match = re.fullmatch(r"(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(qkv|proj)_lora(\d?)", m)
        if not match:
            return None
        kind, i, layer, stream = match.groups()
        if kind == "double" and stream in ("1", "2"):
            return f"double_blocks.{i}.{'img' if stream == '1' else 'txt'}_attn.{layer}", None
        if kind == "single" and not stream:
            if layer == "qkv":
                return f"single_blocks.{i}.linear1", slice(0, 3 * C)
            return f"single_blocks.{i}.linear2", None
        return None

    def bfl_native(m: str):
        bfl = m.removeprefix("diffusion_model.")
        return (bfl, None) if bfl in bfl_names else None

    return {"PEFT/diffusers": lambda m: table.get(m.removeprefix("base_model.model.").removeprefix("transformer.")),
            "kohya": comfy_or_kohya, "BFL-native": bfl_native, "XLabs": xlabs}


def parse(sd: dict[str, Tensor], suffixes: dict[str, str], resolve, full: set[str]):
    """Groups keys by source module: {module: {"target": (bfl, rows), role: (key, tensor)}}, full tensors, unknown."""
    parts, extra, unknown = defaultdict(dict), {}, []
    for key, tensor in sd.items():
        for suffix, role in suffixes.items():
            if key.endswith(suffix) and (target := resolve(module := key[: -len(suffix)])):
                parts[module] |= {"target": target, role: (key, tensor)}
                break
        else:
            if key in full:
                extra[key] = tensor
            else:
                unknown.append(key)
    return parts, extra, unknown


def detect(model: nn.Module, sd: dict[str, Tensor], source: str):
    """(layout, parts, full tensors) of the one layout that knows every key, else a ValueError."""
    model_tensors = {k for k in model.state_dict() if ".lora_" not in k}  # never our own adapters' tensors
    tried = {}
    for fmt, resolve in resolvers(model, sd).items():
        parts, extra, unknown = parse(sd, FORMATS[fmt], resolve, model_tensors if fmt == "BFL-native" else set())
        if not unknown and parts:
            return fmt, parts, extra
        tried[fmt] = unknown
    best = min(tried, key=lambda f: len(tried[f]))
    raise ValueError(f"{source}: not a FLUX transformer LoRA in any known layout (tried {', '.join(tried)}); "
                     f"closest is {best}, which does not know {len(tried[best])} key(s), e.g. "
                     f"{', '.join(tried[best][:3])}")


def rows_count(rows, out_features: int) -> int:
    if rows is None:
        return out_features
    return len(range(out_features)[rows]) if isinstance(rows, slice) else len(rows)


def load_lora(model: nn.Module, path_or_state_dict, name: str = "default", multiplier: float = 1.0,
              source: str | None = None) -> list[str]:
    """Adds adapter `name` from a LoRA file (any layout above) to the model; returns the BFL modules it covers.
    `source` names a state dict in error messages (a path names itself)."""
    if isinstance(path_or_state_dict, dict):
        sd, source = dict(path_or_state_dict), source or "LoRA state dict"
    else:
        sd, source = read_lora_file(path_or_state_dict), str(path_or_state_dict)
    if skipped := [k for k in sd if TEXT_ENCODER.match(k)]:
        warnings.warn(f"{source}: skipping {len(skipped)} text-encoder LoRA tensors (e.g. {skipped[0]}); "
                      f"only the transformer part is loaded")
        sd = {k: v for k, v in sd.items() if k not in skipped}
        if not sd:
            raise ValueError(f"{source}: only text-encoder LoRA tensors, which are not supported")
    if not sd:
        raise ValueError(f"{source}: no tensors")
    fmt, parts, extra = detect(model, sd, source)
    if any(isinstance(m, LoRALinear) and name in m.lora_A for _, m in linears(model)):
        raise ValueError(f"the model already has a LoRA adapter named {name!r}; load this one under another name")

    # 1. Check every tensor against the module it targets, before touching the model.
    model_linears = dict(linears(model))
    pieces = defaultdict(list)  # BFL module -> [(rows, A (r, I), B (rows, r), bias (rows,) | None, alpha, r)]
    for module, p in parts.items():
        if "A" not in p or "B" not in p:
            raise ValueError(f"{source} ({fmt}): {module} needs both a down (A) and an up (B) weight, has only "
                             f"{', '.join(key for role, (key, _) in p.items() if role != 'target')}")
        bfl, rows = p["target"]
        if bfl not in model_linears:
            raise ValueError(f"{source}: key {p['A'][0]} targets module {bfl}, which this model does not have")
        linear = model_linears[bfl]
        (key_a, A), (key_b, B) = p["A"], p["B"]
        r, n = A.shape[0], rows_count(rows, linear.out_features)
        checks = [(key_a, A, (r, linear.in_features)), (key_b, B, (n, r))]
        if "bias" in p:
            checks.append((*p["bias"], (n,)))
        for key, tensor, want in checks:
            if tuple(tensor.shape) != want:
                raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, but {bfl} "
                                 f"({linear.out_features}×{linear.in_features}) needs {want}")
        bias = p["bias"][1].float() if "bias" in p else None
        alpha = float(p["alpha"][1]) if "alpha" in p else float(r)
        pieces[bfl].append((rows, A.float(), B.float(), bias, alpha, r))
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for key, tensor in extra.items():
        if tensor.shape != params[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, "
                             f"the model's is {tuple(params[key].shape)}")

    # 2. One adapter per BFL linear; parts of a fused linear go into row blocks of B. Parts that share one A and
    #    alpha (a fused adapter split on save, as ours) become that adapter again; others stack their A's.
    for bfl, group in pieces.items():
        out = model_linears[bfl].out_features
        if len(group) == 1 and group[0][0] is None:
            _, A, B, bias, alpha, _ = group[0]
        elif not group[0][1].is_meta and all(torch.equal(g[1], group[0][1]) and g[4] == group[0][4] for g in group):
            _, A, _, _, alpha, _ = group[0]                                      # (r, I)
            B = A.new_zeros(out, A.shape[0])                                     # (O, r)
            bias = A.new_zeros(out) if any(g[3] is not None for g in group) else None
            for rows, _, B_i, bias_i, _, _ in group:
                B[slice(None) if rows is None else rows] += B_i
                if bias_i is not None:
                    bias[slice(None) if rows is None else rows] += bias_i
        else:
            A = torch.cat([g[1] for g in group])                                 # (R, I)
            B = A.new_zeros(out, A.shape[0])                                     # (O, R) block-diagonal
            bias = A.new_zeros(out) if any(g[3] is not None for g in group) else None
            offset = 0
            for rows, _, B_i, bias_i, alpha_i, r in group:
                rows = slice(None) if rows is None else rows
                B[rows, offset : offset + r] = B_i * (alpha_i / r)
                if bias_i is not None:
                    bias[rows] += bias_i * (alpha_i / r)
                offset += r
            alpha = float(A.shape[0])                                            # scale 1: folded into B
        layer = wrap(model, bfl)
        layer.add_adapter(name, A.shape[0], alpha, bias=bias is not None)
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(A)
            layer.lora_B[name].weight.copy_(B)
            if bias is not None:
                layer.lora_B[name].bias.copy_(bias)
    if pieces:
        set_lora_scale(model, name, multiplier)
    with torch.no_grad():
        for key, tensor in extra.items():
            params[key].copy_(tensor)
    return list(pieces)
