"""Where a run's adapters start, other than from zero: a --resume training state, checked against this run's
settings and dataset so that it continues bit for bit, or an --init-lora file."""

import hashlib
import sys
from pathlib import Path

import torch

from iclora.checkpoint import STATE_KEYS
from iclora.data import PanelSetDataset
from iclora.lora import lora_layers, remove_lora
from iclora.lora_files import load_lora

# options that change what a step computes: --resume must see the same values to continue bit for bit
# (--data's path is not one: the dataset's fingerprint checks its files, wherever the folder is and however it
# is spelled)
RESUME_MUST_MATCH = ("layout", "model", "batch_size", "grad_accum", "rank", "alpha", "lr", "warmup",
                     "grad_clip", "resolution", "caption_dropout", "guidance", "timestep_sampling", "seed",
                     "dtype", "transformer", "quantize", "panels", "ref_panel", "ema_decay", "variant")


def dataset_fingerprint(dataset: PanelSetDataset) -> dict:
    """Each image file (relative to --data) -> "<size in bytes> <SHA-1 of its bytes>", each caption file ->
    its text: --resume checks it. States saved before the hash hold the size alone, an int, and `unchanged`
    compares only the size for them."""
    found = {}
    for s in dataset.samples:
        for panel in s.panels:
            digest = hashlib.sha1(panel.read_bytes()).hexdigest()
            found[panel.relative_to(dataset.root).as_posix()] = f"{panel.stat().st_size} {digest}"
        caption_file = s.path.with_suffix(".txt") if s.path.is_file() else s.path / "caption.txt"
        found[caption_file.relative_to(dataset.root).as_posix()] = s.caption
    return found


def unchanged(saved, now: str) -> bool:
    """Whether one fingerprint entry as saved still holds now (an old state's int entry, a size: whether the
    file still has that size)."""
    if saved == now:
        return True
    if isinstance(saved, int):  # a state saved before the hash: the size alone
        return now.startswith(f"{saved} ")
    return False


def read_state(path: Path) -> dict:
    """The training state at `path`, or one clear error if there is none or it is not one."""
    if not path.exists():
        raise SystemExit(f"error: --resume: no training state at {path}")
    expected = ("expected the training state train.py writes next to --out (a dict of "
                f"{', '.join(STATE_KEYS)})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise SystemExit(f"error: --resume: {path} cannot be read ({type(error).__name__}; truncated by a "
                         f"crash or a full disk?): {expected}. Delete it to start over.") from None
    if not isinstance(state, dict) or not all(k in state for k in STATE_KEYS):
        raise SystemExit(f"error: --resume: {path} is not a training state: {expected}. Delete it to start "
                         f"over.")
    wrong = wrong_part(state)
    if wrong:
        raise SystemExit(f"error: --resume: {path}: {wrong} (edited by hand or written by another program?). "
                         f"Delete it to start over.")
    return state


def tensors(value) -> bool:
    return isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())


def wrong_part(state: dict) -> str | None:
    """What in a training state is not as train.py writes it, naming the key; None if all is."""
    step = state["step"]
    if type(step) is not int or step < 0:
        return f"'step' is {step!r}, expected a step number (an int, at least 0)"
    expected = {"lora": (tensors, "a dict of tensors"),
                "optimizer": (lambda v: isinstance(v, dict), "a dict (AdamW's state)"),
                "args": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                         "a dict of option names to str"),
                "dataset": (lambda v: isinstance(v, dict), "a dict of the dataset's files"),
                "ema": (tensors, "a dict of tensors"),
                "ref_mode": (lambda v: isinstance(v, str), "a str")}
    for key, (fits, what) in expected.items():
        if key in state and not fits(state[key]):
            return f"{key!r} is a {type(state[key]).__name__}, expected {what}"
    return None


def saved_settings(state: dict) -> dict:
    """The state's options as this train.py names them; states saved before a flag existed hold no value."""
    saved_args = {"transformer": "None", "quantize": "None", "panels": "None", "ref_panel": "[]",
                  "ema_decay": "0.0", "variant": "dev"} | state["args"]
    if saved_args.get("timestep_sampling") == "logit_normal":  # the old name of shift
        saved_args["timestep_sampling"] = "shift"
    if saved_args.get("resolution", "").isdigit():  # states saved before --resolution took a list
        saved_args["resolution"] = f"[{saved_args['resolution']}]"
    return saved_args


def load_state(path: Path, args, fingerprint: dict, ref_mode: str) -> dict:
    """The training state to resume from, checked: it is readable, and its settings and dataset are this
    run's; otherwise one clear error."""
    state = read_state(path)
    saved_args = saved_settings(state)
    changed = [k for k in RESUME_MUST_MATCH if saved_args.get(k) != str(getattr(args, k))]
    if changed:
        raise SystemExit("error: --resume with different settings than the saved run: " + ", ".join(
            f"--{k.replace('_', '-')} {saved_args.get(k)} -> {getattr(args, k)}" for k in changed))
    mode = state.get("ref_mode", "clean")  # "clean" before "ref_mode" was kept
    if args.ref_panel and mode != ref_mode:
        raise SystemExit(f"error: --resume: {path} was trained with reference treatment {mode!r} and this "
                         f"train.py trains {ref_mode!r}; train from the start without --resume (or choose "
                         f"another --out)")
    saved = state["dataset"]
    edited = {k for k in saved.keys() & fingerprint.keys() if not unchanged(saved[k], fingerprint[k])}
    changes = {"added": fingerprint.keys() - saved.keys(), "removed": saved.keys() - fingerprint.keys(),
               "edited": edited}
    if any(changes.values()):
        listed = "; ".join(f"{what}: {', '.join(sorted(names))}" for what, names in changes.items() if names)
        raise SystemExit(f"error: --resume: the dataset {args.data} changed since {path} was saved "
                         f"({listed}). Restore it, or train from the start without --resume (delete the "
                         f"state or choose another --out).")
    return state


def resume(state: dict, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, path: Path) -> int:
    """The adapters `params` and their optimizer as `state` (read from `path`) holds them; its step."""
    check_adapters(state, params, path)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["lora"][n])
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise SystemExit(f"error: --resume: {path}: 'optimizer' does not fit this run's adapters ({error}). "
                         f"Delete it to start over.") from None
    print(f"resumed from {path} at step {state['step']}", file=sys.stderr)
    return state["step"]


def check_adapters(state: dict, params: dict[str, torch.Tensor], path: Path):
    """The state's adapters (and their EMA) are this run's, by name and shape, or one clear error."""
    for key in ("lora", "ema") if "ema" in state else ("lora",):
        saved = state[key]
        for name, p in params.items():
            if name not in saved or saved[name].shape != p.shape:
                held = f"shape {tuple(saved[name].shape)}" if name in saved else "nothing"
                raise SystemExit(f"error: --resume: {path}: {key!r} does not fit this run's adapters: for "
                                 f"{name} {tuple(p.shape)} it holds {held}. Delete it to start over.")


def start_from_lora(flow, tensors: dict, path: Path, rank: int):
    """--init-lora: the file becomes adapter "init", which must cover exactly the trained layers at the same
    rank; the fresh adapter takes its A and its B (rescaled so that scaling·B·A is the file's), and the
    "init" adapter is removed."""
    load_lora(flow, tensors, name="init", source=str(path))
    fresh = lora_layers(flow, "default")
    loaded = lora_layers(flow, "init")
    if fresh.keys() != loaded.keys():
        differ = sorted(fresh.keys() ^ loaded.keys())
        raise ValueError(f"--init-lora {path}: covers other layers than this run trains ({len(loaded)} vs "
                         f"{len(fresh)}; e.g. {differ[0]})")
    for name, m in fresh.items():
        r = m.lora_A["init"].out_features
        if r != rank:
            raise ValueError(f"--init-lora {path}: {name} has rank {r}; this run trains rank {rank} (give "
                             f"--rank {r})")
        if m.lora_B["init"].bias is not None:
            raise ValueError(f"--init-lora {path}: {name} has a LoRA bias, which this trainer does not train")
        rescale = m.scaling["init"] / m.scaling["default"]
        with torch.no_grad():
            m.lora_A["default"].weight.copy_(m.lora_A["init"].weight)
            m.lora_B["default"].weight.copy_(m.lora_B["init"].weight * rescale)
    remove_lora(flow, "init")
