"""Where a model's files come from, and what a script tells its user when they cannot be had.

`Repo` lists the files of a local folder in the HF repo layout, or of a HF hub repo (downloaded on first use
into the HF cache); `minflux.loading` builds the models from them. `hub_call` turns the hub's errors into one
sentence that the scripts print as `error: <message>` (minflux/user_input.py).
"""

import functools
import json
import re
import sys
from pathlib import Path

# what a model folder holds, said by every error about a file not found there (here and in minflux/loading.py)
LAYOUT_HELP = ("a FLUX repo has flux1-*.safetensors + ae.safetensors at its root, or transformer/ and vae/ "
               "folders, plus text_encoder/, text_encoder_2/, tokenizer/ and tokenizer_2/")
TOY_MODEL = Path(__file__).resolve().parents[1] / "toy" / "model"
TOY_HINT = (" To try everything without the real weights, use --model toy (a 12 MB FLUX that ships in "
            "toy/model).")
# The toy Fill and Kontext: toy/model's files, but for the transformer, made by toy/train_variants.py.
TOY_VARIANTS = {"toy-fill": TOY_MODEL.parent / "variants" / "flux1-fill-toy.safetensors",
                "toy-kontext": TOY_MODEL.parent / "variants" / "flux1-kontext-toy.safetensors"}
TOY_MODELS = ("toy", *TOY_VARIANTS)  # the names --model takes for the toys


def folder_files(root: Path) -> set[str]:
    """The paths, relative to `root` and with forward slashes, of every file under it."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


class Repo:
    """The files of a local folder or a HF hub repo; hub files are downloaded on first use (and cached)."""

    def __init__(self, model: str):
        self.model = model
        self.elsewhere = {}  # name in the repo -> the file that stands for it (the toy variants' transformer)
        if model in TOY_MODELS:  # the tiny FLUX trained on toy scenes that ships in the repo (toy/model)
            model = str(TOY_MODEL)
            if not TOY_MODEL.is_dir():
                raise FileNotFoundError(f"the toy model is not at {TOY_MODEL} (it ships with a clone of the "
                                        f"repository once built by toy/train_base.py)")
        if Path(model).is_dir():
            self.root = Path(model)
            self.files = folder_files(self.root)
            if self.model in TOY_VARIANTS:
                self.use_toy_variant(TOY_VARIANTS[self.model])
        elif Path(model).exists() or model.count("/") != 1 or model.startswith(("/", ".", "~")):
            raise ValueError(f"{model!r} is neither a folder nor a HF repo id like "
                             f"black-forest-labs/FLUX.1-dev")
        else:
            self.root = None
            from huggingface_hub.constants import HF_HUB_ETAG_TIMEOUT

            try:  # one request with a timeout: list_repo_files retries a dead connection for 25 s
                info = self.hub(lambda hub: hub.model_info(model, timeout=HF_HUB_ETAG_TIMEOUT))
                self.files = {sibling.rfilename for sibling in info.siblings}
            except ConnectionError:  # offline: use the copy in the HF cache, if there is one
                self.root = Path(self.hub(lambda hub: hub.snapshot_download(model, local_files_only=True)))
                self.files = folder_files(self.root)

    def use_toy_variant(self, path: Path):
        """toy/model's files with its transformer file replaced by the toy variant's `path`."""
        if not path.is_file():
            raise FileNotFoundError(f"--model {self.model}: its transformer {path} is not there; it is built "
                                    f"from toy/model by `python toy/train_variants.py`")
        self.files = self.files - {"flux1-dev.safetensors"} | {path.name}
        self.elsewhere[path.name] = path

    def path(self, name: str) -> Path:
        if name in self.elsewhere:
            return self.elsewhere[name]
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

    @functools.cache  # noqa: B019 (once per Repo, so its note prints once; a script holds one Repo for its run)
    def transformer_file(self) -> Path | None:
        """The BFL single file at the root: flux1-<variant>.safetensors (older releases used .sft)."""
        names = sorted(f for f in self.files if re.fullmatch(r"flux1[^/]*\.(safetensors|sft)", f))
        official = [n for n in names if re.fullmatch(r"flux1-[a-z]+\.(safetensors|sft)", n)]
        if len(official or names) > 1:
            raise ValueError(f"{self.model}: several transformer files ({', '.join(official or names)}); "
                             f"choose one with --transformer FILE")
        others = sorted(set(names) - set(official)) if official else []
        if others:
            print(f"note: {self.model}: using {official[0]}, not {', '.join(others)}; to use another, give "
                  f"--transformer FILE", file=sys.stderr)
        return self.root_file(official or names)


def hub_call(model: str, fn):
    """Runs a huggingface_hub call, turning its errors into one clear sentence."""
    import huggingface_hub as hub
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    try:
        return fn(hub)
    except GatedRepoError as e:
        raise PermissionError(
            f"{model} is a gated repo: accept its license on huggingface.co/{model} with your account, then "
            f"set HF_TOKEN (or run `hf auth login`). ({type(e).__name__})") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{model}: no such HF repo "
                                f"(or it is private and no token was given)") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise ConnectionError(f"{model}: not in the HF cache "
                              f"and the hub cannot be reached (offline?)") from None
    except HfHubHTTPError as e:
        raise ConnectionError(f"{model}: the HF hub answered with an error: {e}") from None
    except (FileNotFoundError, ValueError, PermissionError):  # the caller's own, clear errors
        raise
    # network failures (connection refused, DNS, timeouts) come in the HTTP client's own types
    except Exception as e:
        raise ConnectionError(f"{model}: cannot reach the HF hub ({type(e).__name__}: {e})") from None
