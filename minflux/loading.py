"""Building the FLUX.1 models from the official files, found through a `minflux.hub.Repo`.

The transformer and the autoencoder come as BFL single files at the repo's root (`flux1-dev.safetensors`,
`ae.safetensors`: our native names, preferred) or as diffusers folders (`transformer/`, `vae/`, converted by
`minflux.convert`); CLIP-L from `text_encoder/`, T5-XXL from `text_encoder_2/` (sharded), the tokenizers from
`tokenizer/` and `tokenizer_2/`. Models are built on the meta device and their parameters *assigned* from
memory-mapped safetensors, so a 12B model never exists twice in RAM; tensors keep their stored dtype unless
asked, but fp16 becomes bf16 (T5's and FLUX's activations overflow fp16). A transformer single file (BFL or
diffusers names, or a ComfyUI checkpoint's `model.diffusion_model.*`) may hold fp8 Linear weights (plain
casts, ComfyUI scaled fp8): those layers are built as `minflux.quantize.FP8Linear` and keep the file's fp8
values; NF4 and int8 are refused.
"""

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .autoencoder import AutoEncoder, AutoEncoderParams
from .clip import CLIPConfig, CLIPTextModel
from .convert import transformer_from_diffusers, vae_from_diffusers
from .model import Flux, FluxParams
from .quantize import fp8_layers, is_fp8
from .t5 import T5Config, T5Encoder
from .tokenizers import CLIPTokenizer, T5Tokenizer

LAYOUT_HELP = ("a FLUX repo has flux1-*.safetensors + ae.safetensors at its root, or transformer/ and vae/ "
               "folders, plus text_encoder/, text_encoder_2/, tokenizer/ and tokenizer_2/")


SUPPORTED = "bf16/fp32 official files, and for the transformer fp8 plain casts or ComfyUI scaled fp8"


@contextmanager
def open_safetensors(path, problem: str = "unreadable safetensors file (truncated or corrupt download?)"):
    """safe_open(path), any failure to read it a ValueError `<path>: <problem>: <why>`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: {problem}: {e}") from None


def read_safetensors(paths: list, dtype: torch.dtype | None = None, fp8: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of the files, floats cast to `dtype` (None: fp16 to bf16, others kept); fp8 tensors are
    kept as stored where `fp8` allows them. Of a ComfyUI checkpoint only `model.diffusion_model.*` is read,
    without prefix."""
    sd = {}
    for path in paths:
        with open_safetensors(path) as f:
            keys = [k for k in f.keys() if k.startswith("model.diffusion_model.")] or f.keys()
            for key in keys:
                t = f.get_tensor(key)
                if is_fp8(t) and not fp8:
                    raise ValueError(f"{path}: {key} is stored in {t.dtype}; fp8 is read for the transformer's "
                                     f"single file only; supported: {SUPPORTED}")
                if t.dtype.itemsize == 1 and not is_fp8(t) and t.dtype != torch.bool:
                    looks = ("bitsandbytes NF4/FP4 (4-bit values packed in bytes)" if t.dtype == torch.uint8
                             else "int8 quantization (bitsandbytes LLM.int8, quanto, ...)")
                    raise ValueError(f"{path}: {key} is stored in {t.dtype}, which looks like {looks}: "
                                     f"that format is not supported; supported: {SUPPORTED}")
                keep = is_fp8(t) or key.endswith(".scale_weight") or not t.is_floating_point()  # fp8 and scales
                cast = dtype or {torch.float16: torch.bfloat16}.get(t.dtype, t.dtype)
                sd[key.removeprefix("model.diffusion_model.")] = t if keep else t.to(cast)
    return sd


def assign(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Strict load with an error that names the offending keys and shapes, then `assign` (no copy)."""
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        few = lambda keys: ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        raise ValueError(f"{source}: does not match {type(model).__name__}"
                         + (f"; missing keys: {few(missing)}" if missing else "")
                         + (f"; unexpected keys: {few(unexpected)}" if unexpected else ""))
    for key, tensor in sd.items():
        if tensor.shape != want[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, expected {tuple(want[key].shape)}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_flow(repo, dtype: torch.dtype | None = None, transformer: Path | None = None) -> Flux:
    """`transformer`: a single file to use instead of the repo's. Linears stored in fp8 become FP8Linear."""
    config = repo.json("transformer/config.json")  # diffusers' config: the only place the RoPE split is stored
    if path := transformer or repo.transformer_file():
        sd, source = read_safetensors([path], dtype, fp8=True), str(path)
    elif "transformer/config.json" in repo.files:
        paths = repo.safetensors("transformer", "diffusion_pytorch_model")
        sd, source = read_safetensors(paths, dtype), str(paths[0].parent)
    else:
        raise FileNotFoundError(f"{repo.model}: no FLUX transformer found; {LAYOUT_HELP}")
    if any(k.startswith(("x_embedder.", "transformer_blocks.")) for k in sd):  # diffusers names
        sd = transformer_from_diffusers(sd, source)
    params = FluxParams.from_state_dict(sd, tuple(config.get("axes_dims_rope", (16, 56, 56))), source=source)
    if params.in_channels != 64:
        raise ValueError(f"{source}: a FLUX variant with {params.in_channels} input channels (Fill, Canny or Depth); "
                         f"only the text-to-image models (64 channels) are supported")
    with torch.device("meta"):
        model = Flux(params)
    return assign(model, fp8_layers(model, sd, source, dtype), source)


def load_ae(repo, dtype: torch.dtype | None = None) -> AutoEncoder:
    cfg = repo.json("vae/config.json")
    factors = dict(scale_factor=cfg.get("scaling_factor", 0.3611), shift_factor=cfg.get("shift_factor", 0.1159))
    if path := repo.root_file(["ae.safetensors", "ae.sft"]):
        sd, source = read_safetensors([path], dtype), str(path)
    elif "vae/config.json" in repo.files:
        paths = repo.safetensors("vae", "diffusion_pytorch_model")
        sd, source = vae_from_diffusers(read_safetensors(paths, dtype)), str(paths[0].parent)
    else:
        raise FileNotFoundError(f"{repo.model}: no autoencoder found; {LAYOUT_HELP}")
    with torch.device("meta"):
        model = AutoEncoder(AutoEncoderParams.from_state_dict(sd, **factors, source=source))
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
    """T5's token limit, 512 for FLUX.1-dev, 256 for schnell (no guidance embedding), known before any weight
    is read: from the names in the single file's header (`transformer`, else the repo's), else
    `transformer/config.json`."""
    config = repo.json("transformer/config.json")
    if not (path := transformer) and ("guidance_embeds" in config or not (path := repo.transformer_file())):
        return 512 if config.get("guidance_embeds") else 256
    with open_safetensors(path) as f:
        return 512 if any("guidance_" in k for k in f.keys()) else 256  # BFL's or diffusers' names


def load_tokenizers(repo, t5_max_length: int) -> tuple[CLIPTokenizer, T5Tokenizer]:
    clip = CLIPTokenizer(repo.path("tokenizer/vocab.json"), repo.path("tokenizer/merges.txt"))
    t5_file = "tokenizer_2/tokenizer.json" if "tokenizer_2/tokenizer.json" in repo.files else "tokenizer_2/spiece.model"
    return clip, T5Tokenizer(repo.path(t5_file), max_length=t5_max_length)


def check_repo(repo, transformer: Path | None = None):
    """Every file the pipeline needs is there; `transformer` (a file) replaces the repo's transformer."""
    if transformer is not None and not Path(transformer).is_file():
        raise FileNotFoundError(f"--transformer {transformer}: " + ("a folder; give a" if Path(transformer).is_dir()
                                else "no such file; give a local") + f" FLUX transformer .safetensors ({SUPPORTED})")
    single = {"transformer/": transformer or repo.transformer_file(),  # single files, and the folders they replace
              "vae/": repo.root_file(["ae.safetensors", "ae.sft"])}
    has_flow = single["transformer/"] is not None or "transformer/config.json" in repo.files
    has_ae = single["vae/"] is not None or "vae/config.json" in repo.files
    needed = ["text_encoder/config.json", "text_encoder_2/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"]
    missing = [n for n in needed if n not in repo.files]
    missing += [f"{folder}/model.safetensors" for folder in ("text_encoder", "text_encoder_2")
                if not {f"{folder}/model.safetensors", f"{folder}/model.safetensors.index.json"} & repo.files]
    for index in sorted(n for n in repo.files if n.endswith(".safetensors.index.json")):  # the shards to be read
        if single.get(folder := index[:index.rfind("/") + 1]) is None:  # not a folder a single file replaces
            missing += sorted({folder + shard for shard in repo.json(index)["weight_map"].values()} - repo.files)
    if not {"tokenizer_2/tokenizer.json", "tokenizer_2/spiece.model"} & repo.files:
        missing.append("tokenizer_2/spiece.model or tokenizer.json")
    missing += [] if has_flow else ["flux1-*.safetensors or transformer/"]
    missing += [] if has_ae else ["ae.safetensors or vae/"]
    if missing:
        raise FileNotFoundError(f"{repo.model} is not a FLUX repo: missing {', '.join(missing)}; {LAYOUT_HELP}")


def parse_dtype(name: str | None) -> torch.dtype | None:
    # no fp16: T5 v1.1 and the FLUX blocks overflow in it (their activations exceed 65504)
    table = {None: None, "auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of bf16, fp32, auto")
    return table[name]


