"""Finding and loading the official FLUX.1 weights: a HF repo id or a local folder in the HF repo layout.

The repo (`black-forest-labs/FLUX.1-dev`) holds the transformer and autoencoder twice: as BFL single files at
the root (`flux1-dev.safetensors`, `ae.safetensors`; our native names) and as diffusers folders
(`transformer/`, `vae/`, converted by `minflux.convert`). The BFL files are preferred when both exist. The
text encoders come from `text_encoder/` (CLIP-L) and `text_encoder_2/` (T5-XXL, sharded), the tokenizers
from `tokenizer/` and `tokenizer_2/`.

Models are built on the meta device and their parameters *assigned* from memory-mapped safetensors, so a
12B model never exists twice in RAM. Tensors keep their stored dtype unless a dtype is asked for.
"""

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .autoencoder import AutoEncoder, AutoEncoderParams
from .clip import CLIPConfig, CLIPTextModel
from .convert import transformer_from_diffusers, vae_from_diffusers
from .model import Flux, FluxParams
from .t5 import T5Config, T5Encoder
from .tokenizers import CLIPTokenizer, T5Tokenizer

TOY_MODEL = Path(__file__).resolve().parents[1] / "toy" / "model"
LAYOUT_HELP = ("a FLUX repo has flux1-*.safetensors + ae.safetensors at its root, or transformer/ and vae/ "
               "folders, plus text_encoder/, text_encoder_2/, tokenizer/ and tokenizer_2/")
# The errors a command-line script reports as one line, "error: <message>": ours name the file, key or flag at
# fault and what was expected, so a stack trace would add nothing.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, ConnectionError)
TOY_HINT = " To try everything without the real weights, use --model toy (a 12 MB FLUX that ships in toy/model)."


class Repo:
    """The files of a local folder or a HF hub repo; hub files are downloaded on first use (and cached)."""

    def __init__(self, model: str):
        self.model = model
        if model == "toy":  # the tiny FLUX trained on toy scenes that ships in the repo (toy/model)
            model = str(TOY_MODEL)
            if not TOY_MODEL.is_dir():
                raise FileNotFoundError(f"the toy model is not at {TOY_MODEL} (it ships with a clone of the "
                                        f"repository once built by toy/train_base.py)")
        if Path(model).is_dir():
            self.root = Path(model)
            self.files = {p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()}
        elif Path(model).exists() or model.count("/") != 1:
            raise ValueError(f"{model!r} is neither a folder nor a HF repo id like black-forest-labs/FLUX.1-dev")
        else:
            self.root = None
            try:
                self.files = set(self.hub(lambda hub: hub.list_repo_files(model)))
            except ConnectionError:  # offline: use the copy in the HF cache, if there is one
                self.root = Path(self.hub(lambda hub: hub.snapshot_download(model, local_files_only=True)))
                self.files = {p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()}

    def path(self, name: str) -> Path:
        if self.root is not None:
            return self.root / name
        return Path(self.hub(lambda hub: hub.hf_hub_download(self.model, name)))

    def hub(self, fn):
        """hub_call for the base model: when it cannot be had, the error also says how to go on without it."""
        try:
            return hub_call(self.model, fn)
        except (PermissionError, ConnectionError) as e:
            raise type(e)(f"{e}.{TOY_HINT}") from None

    def json(self, name: str) -> dict:
        return json.loads(self.path(name).read_text()) if name in self.files else {}

    def safetensors(self, folder: str, stem: str) -> list[Path]:
        """`folder/stem.safetensors`, or all the shards listed by `folder/stem.safetensors.index.json`."""
        index = f"{folder}/{stem}.safetensors.index.json"
        if index in self.files:
            shards = sorted(set(self.json(index)["weight_map"].values()))
            return [self.path(f"{folder}/{shard}") for shard in shards]
        if f"{folder}/{stem}.safetensors" in self.files:
            return [self.path(f"{folder}/{stem}.safetensors")]
        raise FileNotFoundError(f"{self.model}: no {folder}/{stem}.safetensors (or its index); {LAYOUT_HELP}")

    def root_file(self, names: list[str]) -> Path | None:
        found = [n for n in names if n in self.files]
        return self.path(found[0]) if found else None

    def transformer_file(self) -> Path | None:
        """The BFL single file at the root: flux1-<variant>.safetensors (older releases used .sft)."""
        names = sorted(f for f in self.files if "/" not in f and f.startswith("flux1") and f.endswith((".safetensors", ".sft")))
        official = [n for n in names if re.fullmatch(r"flux1-[a-z]+\.(safetensors|sft)", n)]
        if len(official or names) > 1:
            raise ValueError(f"{self.model}: several transformer files ({', '.join(official or names)}); "
                             f"point --model at a folder that holds one")
        return self.root_file(official or names)


def hub_call(model: str, fn):
    """Runs a huggingface_hub call, turning its errors into one clear sentence."""
    import huggingface_hub as hub
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)

    try:
        return fn(hub)
    except GatedRepoError as e:
        raise PermissionError(
            f"{model} is a gated repo: accept its license on huggingface.co/{model} with your account, then set "
            f"HF_TOKEN (or run `hf auth login`). ({type(e).__name__})") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{model}: no such HF repo (or it is private and no token was given)") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise ConnectionError(f"{model}: not in the HF cache and the hub cannot be reached (offline?)") from None
    except HfHubHTTPError as e:
        raise ConnectionError(f"{model}: the HF hub answered with an error: {e}") from None
    except (FileNotFoundError, ValueError, PermissionError):  # the caller's own, clear errors
        raise
    except Exception as e:  # network failures (connection refused, DNS, timeouts) come in the HTTP client's types
        raise ConnectionError(f"{model}: cannot reach the HF hub ({type(e).__name__}: {e})") from None


def read_safetensors(paths: list[Path], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    sd = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if t.dtype.itemsize == 1 and t.is_floating_point():
                        raise ValueError(f"{path}: {key} is stored in {t.dtype}; quantized checkpoints are not "
                                         f"supported, use the official bf16 files")
                    sd[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: cannot read this safetensors file (truncated or corrupt download?): {e}") from None
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


def load_flow(repo: Repo, dtype: torch.dtype | None = None) -> Flux:
    rope = repo.json("transformer/config.json")
    rope_kw = {"axes_dim": tuple(rope.get("axes_dims_rope", (16, 56, 56)))}
    if path := repo.transformer_file():
        sd, source = read_safetensors([path], dtype), str(path)
    elif "transformer/config.json" in repo.files:
        paths = repo.safetensors("transformer", "diffusion_pytorch_model")
        sd, source = transformer_from_diffusers(read_safetensors(paths, dtype), rope), str(paths[0].parent)
    else:
        raise FileNotFoundError(f"{repo.model}: no FLUX transformer found; {LAYOUT_HELP}")
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()}  # ComfyUI-style repacks
    params = FluxParams.from_state_dict(sd, **rope_kw)
    if params.in_channels != 64:
        raise ValueError(f"{source}: a FLUX variant with {params.in_channels} input channels (Fill, Canny or Depth); "
                         f"only the text-to-image models (64 channels) are supported")
    with torch.device("meta"):
        model = Flux(params)
    return assign(model, sd, source)


def load_ae(repo: Repo, dtype: torch.dtype | None = None) -> AutoEncoder:
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
        model = AutoEncoder(AutoEncoderParams.from_state_dict(sd, **factors))
    return assign(model, sd, source)


def load_t5(repo: Repo, dtype: torch.dtype | None = None) -> T5Encoder:
    sd = read_safetensors(repo.safetensors("text_encoder_2", "model"), dtype)
    embed = sd.pop("encoder.embed_tokens.weight", None)  # a tied copy of shared.weight; some files hold only it
    if embed is not None:
        sd.setdefault("shared.weight", embed)
    with torch.device("meta"):
        model = T5Encoder(T5Config.from_hf(repo.json("text_encoder_2/config.json")))
    return assign(model, sd, f"{repo.model}/text_encoder_2")


def load_clip(repo: Repo, dtype: torch.dtype | None = None) -> CLIPTextModel:
    sd = read_safetensors(repo.safetensors("text_encoder", "model"), dtype)
    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    with torch.device("meta"):
        model = CLIPTextModel(CLIPConfig.from_hf(repo.json("text_encoder/config.json")))
    return assign(model, sd, f"{repo.model}/text_encoder")


def load_tokenizers(repo: Repo, t5_max_length: int) -> tuple[CLIPTokenizer, T5Tokenizer]:
    clip = CLIPTokenizer(repo.path("tokenizer/vocab.json"), repo.path("tokenizer/merges.txt"))
    t5_file = "tokenizer_2/tokenizer.json" if "tokenizer_2/tokenizer.json" in repo.files else "tokenizer_2/spiece.model"
    return clip, T5Tokenizer(repo.path(t5_file), max_length=t5_max_length)


def check_repo(repo: Repo):
    has_flow = repo.transformer_file() is not None or "transformer/config.json" in repo.files
    has_ae = repo.root_file(["ae.safetensors", "ae.sft"]) is not None or "vae/config.json" in repo.files
    needed = ["text_encoder/config.json", "text_encoder_2/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"]
    missing = [n for n in needed if n not in repo.files]
    for folder, stem in (("text_encoder", "model"), ("text_encoder_2", "model")):
        if not {f"{folder}/{stem}.safetensors", f"{folder}/{stem}.safetensors.index.json"} & repo.files:
            missing.append(f"{folder}/{stem}.safetensors")
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


def check_device(name: str) -> torch.device:
    """A torch device that exists here, checked before anything is loaded."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this torch has no CUDA GPU available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available here; use --device cpu")
    return device
