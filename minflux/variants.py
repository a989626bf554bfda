"""Which FLUX.1 model a repo or file holds — dev (or schnell), Fill or Kontext — told before any weight loads,
and the sampling defaults that follow (BFL's cli_fill.py and diffusers' Kontext pipeline).

Fill is told by its weights: `img_in` takes 384 channels (docs: minflux/conditioning.py). Kontext has dev's
names and shapes, so it is told by the repo's `model_index.json` class (FluxKontextPipeline) or by "kontext"
in the file's or repo's name; `--variant` says it for a bare file that cannot.
"""

import re
from pathlib import Path

from .loading import COMFY_PREFIX, open_safetensors

VARIANTS = ("dev", "fill", "kontext")  # "dev" covers every text-to-image model, schnell too
DEFAULTS = {"dev": dict(guidance=3.5, steps=28),
            "fill": dict(guidance=30.0, steps=50),     # BFL's cli_fill.py
            "kontext": dict(guidance=2.5, steps=28)}   # BFL's cli_kontext; diffusers' step count
REFUSED = {448: "the ACE++ full fine-tune (Fill's 384 + 64 channels of the edit image); use FLUX.1 Fill-dev "
                "with an ACE++ LoRA instead",
           128: "FLUX.1 Canny or Depth (64 + 64 channels of the control image), which is not supported"}
INPUT_KEYS = ("img_in.weight", "x_embedder.weight")  # BFL's name, diffusers'


def input_channels(repo, transformer: Path | None = None) -> int:
    """The transformer's input channels, from a single file's header or the diffusers config."""
    path = transformer or repo.transformer_file()
    if path is None:
        return repo.json("transformer/config.json").get("in_channels", 64)
    with open_safetensors(path) as f:
        for key in f.keys():
            name = key.removeprefix(COMFY_PREFIX)
            if name in INPUT_KEYS:
                return f.get_slice(key).get_shape()[1]
    raise ValueError(f"{path}: not a FLUX transformer: no {' or '.join(INPUT_KEYS)}")


def named_kontext(repo, transformer: Path | None = None) -> bool:
    """Whether the repo's model_index.json class, its name or its transformer file's name says Kontext."""
    if repo.json("model_index.json").get("_class_name") == "FluxKontextPipeline":
        return True
    path = transformer or repo.transformer_file()
    names = [repo.model] + ([Path(path).name] if path else [])
    return any(re.search("kontext", name, re.IGNORECASE) for name in names)


def detect_variant(repo, transformer: Path | None = None, given: str | None = None) -> str:
    """"dev", "fill" or "kontext"; `given` (--variant) is checked against the weights, and wins over names."""
    channels = input_channels(repo, transformer)
    source = transformer or repo.model
    if channels in REFUSED:
        raise ValueError(f"{source}: a transformer with {channels} input channels looks like "
                         f"{REFUSED[channels]}")
    if channels not in (64, 384):
        raise ValueError(f"{source}: a transformer with {channels} input channels; expected 64 (dev, "
                         f"schnell, Kontext) or 384 (Fill)")
    found = "fill" if channels == 384 else None
    if given is not None:
        if given not in VARIANTS:
            raise ValueError(f"--variant {given}: expected one of {', '.join(VARIANTS)}")
        if (given == "fill") != (found == "fill"):
            raise ValueError(f"--variant {given} does not match {source}, whose transformer takes {channels} "
                             f"input channels (Fill takes 384, the others 64)")
        return given
    if found:
        return found
    return "kontext" if named_kontext(repo, transformer) else "dev"
