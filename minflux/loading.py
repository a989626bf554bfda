"""Building the FLUX.1 models from the official files of a `minflux.hub.Repo`, as the loaders of BFL's
src/flux/util.py do (load_flow_model, load_ae, load_t5, load_clip).

The transformer and the autoencoder come as BFL single files at the repo's root (`flux1-dev.safetensors`,
`ae.safetensors`: our native names, preferred) or as diffusers folders (`transformer/`, `vae/`, converted by
`minflux.convert`); CLIP-L from `text_encoder/`, T5-XXL from `text_encoder_2/` (sharded), the tokenizers from
`tokenizer/` and `tokenizer_2/`. Models are built on meta and *assigned* memory-mapped safetensors, so a 12B
model never exists twice in RAM. Dtypes are kept unless asked, but fp16 becomes bf16: T5's and FLUX's
activations overflow fp16. A transformer file (BFL or diffusers names, or ComfyUI's `model.diffusion_model.*`)
may hold fp8 Linear weights (plain casts, ComfyUI scaled fp8), kept as `minflux.quantize.FP8Linear`.
"""

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .autoencoder import AutoEncoder, AutoEncoderParams
from .clip import CLIPConfig, CLIPTextModel
from .convert import transformer_from_diffusers, vae_from_diffusers
from .hub import LAYOUT_HELP
from .model import Flux, FluxParams
from .quantize import fp8_layers, is_fp8
from .t5 import T5Config, T5Encoder
from .tokenizers import CLIPTokenizer, T5Tokenizer

SUPPORTED = "bf16/fp32 official files, and for the transformer fp8 plain casts or ComfyUI scaled fp8"


@contextmanager
def open_safetensors(path, problem: str = "unreadable safetensors file (truncated or corrupt download?)"):
    """safe_open(path), any failure to read it a ValueError `<path>: <problem>: <why>`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: {problem}: {e}") from None


COMFY_PREFIX = "model.diffusion_model."  # a ComfyUI checkpoint's transformer keys; other keys are skipped


def read_safetensors(paths: list, dtype: torch.dtype | None = None,
                     fp8: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of the files, floats cast to `dtype` (None: fp16 to bf16, others kept); fp8 tensors are
    kept as stored where `fp8` allows them. Of a ComfyUI checkpoint only `model.diffusion_model.*` is read,
    without the prefix."""
    sd = {}
    for path in paths:
        with open_safetensors(path) as f:
            keys = [k for k in f.keys() if k.startswith(COMFY_PREFIX)]
            if not keys:
                keys = f.keys()
            for key in keys:
                t = f.get_tensor(key)
                check_stored_dtype(t, key, path, fp8)
                # fp8 weights, their scales and non-float tensors keep their stored dtype
                keep = is_fp8(t) or key.endswith(".scale_weight") or not t.is_floating_point()
                cast = dtype or {torch.float16: torch.bfloat16}.get(t.dtype, t.dtype)
                sd[key.removeprefix(COMFY_PREFIX)] = t if keep else t.to(cast)
    return sd


def check_stored_dtype(t: torch.Tensor, key: str, path, fp8: bool):
    """Refuses fp8 where `fp8` does not allow it, and the other one-byte formats (NF4, int8) everywhere."""
    if is_fp8(t) and not fp8:
        raise ValueError(f"{path}: {key} is stored in {t.dtype}; fp8 is read for the transformer's "
                         f"single file only; supported: {SUPPORTED}")
    if t.dtype.itemsize == 1 and not is_fp8(t) and t.dtype != torch.bool:
        if t.dtype == torch.uint8:
            looks = "bitsandbytes NF4/FP4 (4-bit values packed in bytes)"
        else:
            looks = "int8 quantization (bitsandbytes LLM.int8, quanto, ...)"
        raise ValueError(f"{path}: {key} is stored in {t.dtype}, which looks like {looks}: "
                         f"that format is not supported; supported: {SUPPORTED}")


def first_five(keys: list[str]) -> str:
    """The first five keys, and how many more there are."""
    more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
    return ", ".join(keys[:5]) + more


def assign(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Strict load with an error that names the offending keys and shapes, then `assign` (no copy)."""
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        message = f"{source}: does not match {type(model).__name__}"
        if missing:
            message += f"; missing keys: {first_five(missing)}"
        if unexpected:
            message += f"; unexpected keys: {first_five(unexpected)}"
        raise ValueError(message)
    for key, tensor in sd.items():
        if tensor.shape != want[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(want[key].shape)}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_flow(repo, dtype: torch.dtype | None = None, transformer: Path | None = None) -> Flux:
    """`transformer`: a single file to use instead of the repo's. Linears stored in fp8 become FP8Linear."""
    # diffusers' config: the only place where the RoPE split is stored
    config = repo.json("transformer/config.json")
    path = transformer or repo.transformer_file()
    if path:
        sd = read_safetensors([path], dtype, fp8=True)
        source = str(path)
    elif "transformer/config.json" in repo.files:
        paths = repo.safetensors("transformer", "diffusion_pytorch_model")
        sd = read_safetensors(paths, dtype)
        source = str(paths[0].parent)
    else:
        raise FileNotFoundError(f"{repo.model}: no FLUX transformer found; {LAYOUT_HELP}")
    if any(k.startswith(("x_embedder.", "transformer_blocks.")) for k in sd):  # diffusers names
        sd = transformer_from_diffusers(sd, source)
    axes_dim = tuple(config.get("axes_dims_rope", (16, 56, 56)))
    params = FluxParams.from_state_dict(sd, axes_dim, source=source)
    if params.in_channels not in (64, 384):  # minflux/variants.py says which model it is before this
        raise ValueError(f"{source}: a FLUX variant with {params.in_channels} input channels; supported: 64 "
                         f"(dev, schnell, Kontext) and 384 (Fill)")
    with torch.device("meta"):
        model = Flux(params)
    return assign(model, fp8_layers(model, sd, source, dtype), source)


def load_ae(repo, dtype: torch.dtype | None = None) -> AutoEncoder:
    cfg = repo.json("vae/config.json")
    scale_factor = cfg.get("scaling_factor", 0.3611)
    shift_factor = cfg.get("shift_factor", 0.1159)
    path = repo.root_file(["ae.safetensors", "ae.sft"])
    if path:
        sd = read_safetensors([path], dtype)
        source = str(path)
    elif "vae/config.json" in repo.files:
        paths = repo.safetensors("vae", "diffusion_pytorch_model")
        sd = vae_from_diffusers(read_safetensors(paths, dtype))
        source = str(paths[0].parent)
    else:
        raise FileNotFoundError(f"{repo.model}: no autoencoder found; {LAYOUT_HELP}")
    params = AutoEncoderParams.from_state_dict(sd, scale_factor=scale_factor, shift_factor=shift_factor,
                                               source=source)
    with torch.device("meta"):
        model = AutoEncoder(params)
    return assign(model, sd, source)


def load_t5(repo, dtype: torch.dtype | None = None) -> T5Encoder:
    sd = read_safetensors(repo.safetensors("text_encoder_2", "model"), dtype)
    if "encoder.embed_tokens.weight" in sd:  # a tied copy of shared.weight; some files hold only it
        sd.setdefault("shared.weight", sd.pop("encoder.embed_tokens.weight"))
    with torch.device("meta"):
        model = T5Encoder(T5Config.from_hf(repo.json("text_encoder_2/config.json")))
    return assign(model, sd, f"{repo.model}/text_encoder_2")


def load_clip(repo, dtype: torch.dtype | None = None) -> CLIPTextModel:
    sd = read_safetensors(repo.safetensors("text_encoder", "model"), dtype)
    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    with torch.device("meta"):
        model = CLIPTextModel(CLIPConfig.from_hf(repo.json("text_encoder/config.json")))
    return assign(model, sd, f"{repo.model}/text_encoder")


def t5_max_length(repo, transformer: Path | None = None) -> int:
    """T5's token limit, 512 for FLUX.1-dev and 256 for schnell (no guidance embedding), known before any
    weight is read: from the names in the header of the single file (`transformer`, else the repo's), else
    from `transformer/config.json`."""
    config = repo.json("transformer/config.json")
    path = transformer
    if not path and "guidance_embeds" not in config:
        path = repo.transformer_file()
    if not path:
        return 512 if config.get("guidance_embeds") else 256
    with open_safetensors(path) as f:
        return 512 if any("guidance_" in k for k in f.keys()) else 256  # BFL's or diffusers' names


def load_tokenizers(repo, t5_max_length: int) -> tuple[CLIPTokenizer, T5Tokenizer]:
    clip = CLIPTokenizer(repo.path("tokenizer/vocab.json"), repo.path("tokenizer/merges.txt"))
    if "tokenizer_2/tokenizer.json" in repo.files:
        t5_file = "tokenizer_2/tokenizer.json"
    else:
        t5_file = "tokenizer_2/spiece.model"
    return clip, T5Tokenizer(repo.path(t5_file), max_length=t5_max_length)


def check_repo(repo, transformer: Path | None = None):
    """Every file the pipeline needs is there; `transformer` (a file) replaces the repo's transformer."""
    if transformer is not None and not Path(transformer).is_file():
        if Path(transformer).is_dir():
            problem = "a folder; give a"
        else:
            problem = "no such file; give a local"
        raise FileNotFoundError(f"--transformer {transformer}: {problem} FLUX transformer .safetensors "
                                f"({SUPPORTED})")
    # the single files, and the folders they replace
    single = {"transformer/": transformer or repo.transformer_file(),
              "vae/": repo.root_file(["ae.safetensors", "ae.sft"])}
    needed = ["text_encoder/config.json", "text_encoder_2/config.json", "tokenizer/vocab.json",
              "tokenizer/merges.txt"]
    missing = [n for n in needed if n not in repo.files]
    for folder in ("text_encoder", "text_encoder_2"):
        if not {f"{folder}/model.safetensors", f"{folder}/model.safetensors.index.json"} & repo.files:
            missing.append(f"{folder}/model.safetensors")
    missing += missing_shards(repo, single)
    if not {"tokenizer_2/tokenizer.json", "tokenizer_2/spiece.model"} & repo.files:
        missing.append("tokenizer_2/spiece.model or tokenizer.json")
    if single["transformer/"] is None and "transformer/config.json" not in repo.files:
        missing.append("flux1-*.safetensors or transformer/")
    if single["vae/"] is None and "vae/config.json" not in repo.files:
        missing.append("ae.safetensors or vae/")
    if missing:
        raise FileNotFoundError(f"{repo.model} is not a FLUX repo: missing {', '.join(missing)}; "
                                f"{LAYOUT_HELP}")


def missing_shards(repo, single: dict[str, Path | None]) -> list[str]:
    """The shards listed by the repo's index files that it lacks, but for folders a single file replaces."""
    missing = []
    for index in sorted(n for n in repo.files if n.endswith(".safetensors.index.json")):
        folder = index[: index.rfind("/") + 1]
        if single.get(folder) is not None:
            continue
        shards = {folder + shard for shard in repo.json(index)["weight_map"].values()}
        missing += sorted(shards - repo.files)
    return missing


def parse_dtype(name: str | None) -> torch.dtype | None:
    # no fp16: T5 v1.1 and the FLUX blocks overflow in it (their activations exceed 65504)
    table = {None: None, "auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of bf16, fp32, auto")
    return table[name]


