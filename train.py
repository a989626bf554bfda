"""Train an In-Context LoRA for FLUX.1-dev on a folder of panel sets (arXiv 2410.23775).

    python train.py --data sets/home_decor                       # the paper's settings, writes
    out.safetensors
    python train.py --data sets/home_decor --config my_run.json  # values from a JSON file, flags override
    them
    python train.py --model toy --data sets/toy_recolour         # the 12 MB toy FLUX, a few CPU minutes
    torchrun --nproc_per_node 4 train.py --data sets/home_decor  # 4 GPUs, data parallel (+ --fsdp: the base
    sharded)

Reads top to bottom: options -> data -> model -> encode the sets once -> LoRA -> training loop -> save. Writes
next to --out: the LoRA (PEFT/diffusers layout, loads in diffusers and ComfyUI), `<stem>.state.pt` (LoRA +
optimizer + step, for --resume), `<stem>.loss.csv` and `<stem>_samples/` (validation images), and holds
`<stem>.lock` while it runs. Ctrl-C, SIGTERM and SIGHUP save the steps done so far; --resume continues from
there. With --ref-panel K the LoRA is conditional: panel K is given (as `sample.py --ref` gives it) and the
loss is on the other panels only; the LoRA file's metadata records the geometry, which sample.py then reads.
"""

import argparse
import contextlib
import csv
import hashlib
import itertools
import json
import math
import os
import re
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from iclora.data import PanelSetDataset, batches_by_bucket
from iclora.distributed import gathered, init_distributed, part, rank, shard, sum_gradients
from iclora.lora import inject_lora, lora_layers, remove_lora
from iclora.atomic_files import atomic_writes
from iclora.lora_files import conditional_metadata, load_lora, read_lora_file, save_lora
from iclora.panels import LAYOUTS, grid_shape
from iclora.references import pin_references
from iclora.training import (TIMESTEP_MODES, EncodedSet, check_captions, check_reference_panels, collate,
                             encode_sets, step_generator, training_loss)
from minflux.block_swap import BlockSwap
from minflux.compile import compile_blocks
from minflux.cli import USER_ERRORS, check_device, ranged
from minflux.pipeline import load_pipeline, load_t5_tokenizer, to_pil
from minflux.quantize import quantize_fp8
from minflux.sampling import check_size, get_noise

# The defaults that depend on the model: the paper's and its authors' trainer's for FLUX.1-dev; for --model
# toy, a run of a few CPU minutes (no gradient checkpointing: the toy is tiny; resolution 96 keeps the 128x64
# toy sets at their size).
MODEL_DEFAULTS = {"flux": dict(steps=5000, lr=1e-4, resolution=[512, 768, 1024, 1280, 1536], checkpointing=True,
                               timestep_sampling="sigmoid", ema_decay=0.99, save_dtype="fp16"),
                  "toy": dict(steps=1000, lr=1e-3, resolution=[96], checkpointing=False, timestep_sampling="shift",
                              ema_decay=0.0, save_dtype="fp32")}
# options that change what a step computes: --resume must see the same values to continue bit for bit
# (--data's path is not one: the dataset's fingerprint checks its files, wherever the folder is and however it
# is spelled)
RESUME_MUST_MATCH = ("layout", "model", "batch_size", "grad_accum", "rank", "alpha", "lr", "warmup",
                     "grad_clip", "resolution", "caption_dropout", "guidance", "timestep_sampling", "seed", "dtype",
                     "transformer", "quantize", "panels", "ref_panel", "ema_decay")
# how a --ref-panel LoRA sees its reference tokens (iclora/references.py); measured on the toy tasks, see
# README
REF_MODE = "moved"
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
VAL_SEED = 42  # the noise of every validation image, so that they differ only by the training they show
STATE_KEYS = ("step", "lora", "optimizer", "args", "dataset")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C; preemption, `timeout`; a closed terminal


def above_zero(text: str) -> float:
    """An argparse type: a finite float above 0."""
    if not 0 < float(text) < math.inf:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return float(text)


def lora_file(text: str) -> Path:
    """An argparse type: a file path (the run's other files go next to it), not a folder."""
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; name the LoRA file, e.g. "
                                         f"{Path(text) / 'lora.safetensors'}")
    return Path(text)


def parse_args(argv=None) -> argparse.Namespace:
    flux, toy = MODEL_DEFAULTS["flux"], MODEL_DEFAULTS["toy"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="JSON file of option values (keys as the flags, with _); "
                                               "flags given on the command line override it")
    p.add_argument("--data", type=Path, help="dataset folder: joined images with same-named .txt captions, or one "
                                             "sub-folder of panels + caption.txt per set (see README)")
    p.add_argument("--layout", default="row", choices=LAYOUTS,
                   help="how panels in sub-folders are joined, and how the --panels of joined images sit "
                        "(default: row)")
    p.add_argument("--panels", type=ranged(int, 1),
                   help="panels in each joined image, so that their edges stay on the token grid and --ref-panel "
                        "can find them (default: unknown; set folders know their panels)")
    p.add_argument("--ref-panel", type=ranged(int, 1), action="append", default=[],
                   help="1-based panel given as input (repeatable), as `sample.py --ref` gives it: the loss is on "
                        "the other panels only, and the LoRA's metadata records the geometry (default: none, a "
                        "plain text-to-set IC-LoRA)")
    p.add_argument("--model", default="black-forest-labs/FLUX.1-dev",
                   help="HF repo id or local folder in the HF repo layout, or `toy` for the 12 MB toy FLUX in "
                        "toy/model, which also changes the defaults marked 'toy' (default: %(default)s)")
    p.add_argument("--transformer", type=Path,
                   help="a local transformer .safetensors (BFL or diffusers key names, or a ComfyUI checkpoint whose "
                        "model.diffusion_model.* is read) used instead of --model's: "
                        "bf16, fp32, an fp8 plain cast or ComfyUI scaled fp8, detected from its tensors; the LoRA "
                        "then trains on its (dequantized) weights; VAE, text encoders and tokenizers come from "
                        "--model (default: the --model's own)")
    p.add_argument("--quantize", choices=["fp8"],
                   help="fp8: store the weight of every Linear in the transformer's and T5's blocks in float8 "
                        "e4m3fn with one float32 scale per row (1 byte a weight instead of bf16's 2: the paper's "
                        "recipe then needs about 17 GiB instead of 28, computed; see README); the embedders, norms, "
                        "biases, CLIP and the VAE stay in the base dtype, compute too (weights dequantized per "
                        "layer), and the LoRA adapters and optimizer stay fp32 (default: none)")
    p.add_argument("--out", type=lora_file, default=Path("out.safetensors"),
                   help="LoRA file, not a folder, outside --data; its other files are written next to it "
                        "(default: out.safetensors)")
    p.add_argument("--steps", type=ranged(int, 1), help=f"optimizer steps (default: {flux['steps']}, the paper's; "
                                                          f"toy: {toy['steps']})")
    p.add_argument("--batch-size", type=ranged(int, 1), default=4, help="examples per step (default: 4, the paper's)")
    p.add_argument("--grad-accum", type=ranged(int, 1), default=1,
                   help="micro-batches of --batch-size per optimizer step (default: 1)")
    p.add_argument("--rank", type=ranged(int, 1), default=16, help="LoRA rank (default: 16, the paper's)")
    p.add_argument("--init-lora", type=Path, help="start the adapters from this LoRA file (any layout sample.py "
                                                  "loads) instead of from zero: it must cover the same layers at "
                                                  "the same --rank; its delta is kept whatever --alpha is (A as in "
                                                  "the file, B divided by --alpha/--rank)")
    p.add_argument("--alpha", type=above_zero, default=16.0, help="LoRA alpha, above 0; the update is scaled by "
                                                                  "alpha/rank (0 would train nothing) (default: 16)")
    p.add_argument("--lr", type=ranged(float, 1e-12), help=f"AdamW learning rate (default: {flux['lr']}; toy: "
                                                           f"{toy['lr']})")
    p.add_argument("--warmup", type=ranged(int, 0), default=100,
                   help="linear warm-up steps (default: 100, ours; the authors' trainer has none)")
    p.add_argument("--ema-decay", type=ranged(float, 0, 1),
                   help="exponential moving average of the LoRA weights, updated after every step: the saved LoRA "
                        "and the validation images use it, as the authors' trainer does; 0 = off, the raw weights "
                        f"(default: {flux['ema_decay']}, the authors'; toy: {toy['ema_decay']}, not yet measured on "
                        "the toy task)")
    p.add_argument("--grad-clip", type=ranged(float, 0), default=1.0,
                   help="max gradient norm, the gradients scaled down to it when over; 0 = no clipping "
                        "(default: 1.0)")
    p.add_argument("--resolution", type=ranged(int, 16), nargs="+",
                   help="one or more target areas, each as the side of a square: every set is trained at each, in "
                        "the aspect bucket of about that many pixels squared (sides multiples of 16 per panel), "
                        "never upscaled: where a bucket is larger than the set, the set's own size, panel sides "
                        "rounded down to 16 (default: " + " ".join(map(str, flux["resolution"])) + ", the authors'; "
                        f"toy: {toy['resolution'][0]})"),
    p.add_argument("--caption-dropout", type=ranged(float, 0, 1), default=0.05,
                   help="probability a caption is replaced by the empty one (default: 0.05)")
    p.add_argument("--guidance", type=float, default=1.0, help="distilled-guidance input during training "
                                                               "(default: 1.0)")
    p.add_argument("--timestep-sampling", type=lambda s: "shift" if s == "logit_normal" else s,
                   choices=TIMESTEP_MODES,
                   help="how the training t is drawn: sigmoid = sigmoid(randn), the authors' recipe (median t 0.5); "
                        "shift = the same, then moved toward noise by FLUX's resolution shift as the sampler's "
                        "schedule is (kohya's flux_shift; median t 0.76 at 1024²; `logit_normal` is its old name); "
                        f"uniform (default: {flux['timestep_sampling']}; toy: {toy['timestep_sampling']})")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction,
                   help="gradient checkpointing per block: much less memory, ~30%% slower (default: on; toy: off)")
    p.add_argument("--blocks-to-swap", type=ranged(int, 0, 57), default=0, metavar="K",
                   help="keep the frozen weights of the last K of the 19 double + 38 single blocks (single blocks "
                        "first) in CPU RAM and copy each to the GPU just before it runs, forward and in the backward "
                        "pass's recomputation: saves K blocks' weights (bf16: 0.68 GB a double block, 0.28 GB a "
                        "single one) for a slower step (PCIe copies). Needs --checkpointing (default: 0)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block's forward (regional: one compiled graph per block "
                        "class, compiled at the first step and again at a new image size and for validation "
                        "sampling); the same training within float rounding; composes with the LoRA, "
                        "--checkpointing, --quantize and --blocks-to-swap. Full-size FLUX.1-dev training crashed in "
                        "its first compiled backward on an H200 with torch 2.11 (bench/RESULTS.md) (default: off)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the frozen base over the ranks with FSDP2, block by block, so that "
                        "each GPU holds 1/N of its weights (gathering a block's just before it runs); the adapters "
                        "stay whole and are all-reduced as in plain data parallel (default: off, every rank holds "
                        "the whole base)")
    p.add_argument("--save-every", type=ranged(int, 1), default=250,
                   help="write LoRA + training state every N steps (default: 250)")
    p.add_argument("--save-dtype", choices=["fp16", "bf16", "fp32"],
                   help=f"dtype of the LoRA files; a value beyond fp16's range is written in bf16 with a warning, "
                        f"never as inf (default: {flux['save_dtype']}, as the released IC-LoRAs; toy: "
                        f"{toy['save_dtype']}); the training state keeps fp32")
    p.add_argument("--keep-last", type=ranged(int, 0), default=4,
                   help="also write each save as <stem>-step000250.safetensors and keep the last N of them; the "
                        "unnumbered --out file is always the latest; 0 = no numbered copies (default: 4)")
    p.add_argument("--sample-every", type=ranged(int, 0), default=250,
                   help="validation images every N steps; 0 = never (default: 250)")
    p.add_argument("--val-prompt", action="append", default=[],
                   help="validation prompt, repeatable, with optional inline settings as in ai-toolkit and kohya: "
                        "\"a caption --w 1024 --h 1536 --seed 3 --g 3.5 --s 20\" (--d and --l also mean seed and "
                        "guidance); unset ones: the first set's size, seed 42, guidance 3.5, --sample-steps. Each "
                        "--sample-every, and before the first step, the images go side by side into "
                        "<stem>_samples/step000250.png (default: the first training caption)")
    p.add_argument("--strict-captions", action="store_true", help="refuse captions and --val-prompt's longer "
                   "than T5 reads (512 tokens for dev, 256 for schnell) instead of warning that their end is cut")
    p.add_argument("--sample-steps", type=ranged(int, 1), default=20,
                   help="steps for validation images (default: 20)")
    p.add_argument("--seed", type=int, default=42, help="seed for data order, noise, t and dropout (default: 42)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                   help="base-model dtype (default: bf16 on GPU, the stored dtype on CPU); the LoRA's parameters "
                        "and optimizer state are fp32, its arithmetic in this dtype")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out stem>.state.pt (bit for bit on CPU; on a GPU, nondeterministic kernels "
                        "such as attention's backward can add tiny differences)")
    args = p.parse_args(argv)
    if args.config:
        config = json.loads(args.config.read_text())
        if unknown := set(config) - set(vars(args)):
            p.error(f"{args.config}: unknown options {', '.join(sorted(unknown))}")
        actions = {a.dest: a for a in p._actions}
        p.set_defaults(**{k: config_value(p, actions[k], v, f"{args.config}: {k!r}") for k, v in config.items()})
        given, args = args, p.parse_args(argv)
        for k in [k for k, v in vars(given).items() if isinstance(v, list) and v]:  # a repeated flag given replaces
            setattr(args, k, getattr(given, k))                              # the file's list, not extends it
    for k, v in MODEL_DEFAULTS["toy" if args.model == "toy" else "flux"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.resolution = sorted(set(args.resolution))  # ascending, each once
    if args.data is None:
        p.error("--data is required (or set \"data\" in the --config file)")
    if args.out.resolve().is_relative_to(args.data.resolve()):
        p.error(f"--out {args.out} is inside --data {args.data}: its loss curve and samples would become training "
                f"images on the next run; write it outside the dataset")
    if args.ema_decay >= 1:
        p.error(f"--ema-decay {args.ema_decay}: must be below 1 (1 would never move from the initial LoRA)")
    if args.blocks_to_swap and not args.checkpointing:
        p.error("--blocks-to-swap needs --checkpointing: without it autograd keeps every block's weights until the "
                "backward pass, so nothing would be saved")
    if args.fsdp and "WORLD_SIZE" not in os.environ:
        p.error("--fsdp shards the base over torchrun's processes: start the run with torchrun --nproc_per_node N "
                "train.py ... (see README)")
    if args.fsdp and args.blocks_to_swap:
        p.error("--fsdp and --blocks-to-swap do not compose (both would own the blocks' weights); choose one: "
                "--fsdp divides the base over N GPUs, --blocks-to-swap keeps part of it in CPU RAM")
    return args


def config_value(p: argparse.ArgumentParser, action: argparse.Action, value, where: str):
    """A --config value checked and converted as its flag's would be: true or false for a boolean flag; for a
    repeatable one (or one of several values) a list or a single value, each item through the flag's type."""
    if value is None:
        return None
    if action.nargs == 0:  # --checkpointing, --compile, --resume, ...
        if not isinstance(value, bool):
            p.error(f"{where}: {value!r} is not true or false")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.default, list)
    if isinstance(value, list) and not many:
        p.error(f"{where}: takes one value, not a list")
    items = []
    for v in value if isinstance(value, list) else [value]:
        try:
            items.append(action.type(str(v)) if action.type else str(v))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            p.error(f"{where}: {v!r}: {error}")
        if action.choices and items[-1] not in action.choices:
            p.error(f"{where}: {v!r} is not one of {', '.join(map(str, action.choices))}")
    return items if many else items[0]


def take_lock(lock: Path, out: Path):
    """Creates `lock` holding this host and PID, or refuses: another run is writing `out`. A lock whose
    process is gone (same host) is taken over. Creating it also checks that --out's folder is writable."""
    here = socket.gethostname()
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            host, _, pid = lock.read_text().strip().rpartition(" ")
            if host != here or not pid.isdigit():
                raise SystemExit(f"error: {lock} says a run on {host or '?'} (pid {pid or '?'}) is writing {out}. "
                                 f"If it is not running, delete {lock}; or choose another --out.") from None
            try:
                os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
                raise SystemExit(f"error: another run (pid {pid}) is writing {out} (lock {lock}); wait for it, "
                                 f"stop it, or choose another --out")
            except ProcessLookupError:
                print(f"note: taking over {lock}, left by pid {pid}, which is no longer running", file=sys.stderr)
                lock.unlink(missing_ok=True)
            except PermissionError:  # it exists, owned by another user
                raise SystemExit(f"error: another user's run (pid {pid}) is writing {out} (lock {lock})") from None
        except OSError as error:
            raise SystemExit(f"error: cannot write in {lock.parent} (the folder of --out {out}): "
                             f"{error.strerror}") from None
        else:
            with os.fdopen(fd, "w") as f:
                f.write(f"{here} {os.getpid()}\n")
            return


def dataset_fingerprint(dataset: PanelSetDataset) -> dict:
    """Each image file (relative to --data) -> "<size in bytes> <SHA-1 of its bytes>", each caption file ->
    its text:
    --resume checks it. (States saved before the hash hold the size alone, an int: `unchanged` compares
    that.)"""
    found = {}
    for s in dataset.samples:
        for panel in s.panels:
            found[panel.relative_to(dataset.root).as_posix()] = (f"{panel.stat().st_size} "
                                                                 f"{hashlib.sha1(panel.read_bytes()).hexdigest()}")
        caption_file = s.path.with_suffix(".txt") if s.path.is_file() else s.path / "caption.txt"
        found[caption_file.relative_to(dataset.root).as_posix()] = s.caption
    return found


def unchanged(saved, now: str) -> bool:
    """One fingerprint entry as saved against its value now; an old state's int entry (a size) checks the
    size."""
    return saved == now or isinstance(saved, int) and now.startswith(f"{saved} ")


def load_state(path: Path, args: argparse.Namespace, fingerprint: dict) -> dict:
    """The training state to resume from, checked: readable, same settings, same dataset; else one clear
    error."""
    if not path.exists():
        raise SystemExit(f"error: --resume: no training state at {path}")
    expected = f"expected the training state train.py writes next to --out (a dict of {', '.join(STATE_KEYS)})"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise SystemExit(f"error: --resume: {path} cannot be read ({type(error).__name__}; truncated by a crash "
                         f"or a full disk?): {expected}. Delete it to start over.") from None
    if not isinstance(state, dict) or not all(k in state for k in STATE_KEYS):
        raise SystemExit(f"error: --resume: {path} is not a training state: {expected}. Delete it to start over.")
    # states saved before these flags existed: no value
    saved_args = {"transformer": "None", "quantize": "None", "panels": "None", "ref_panel": "[]",
                  "ema_decay": "0.0"} | state["args"]
    if saved_args.get("timestep_sampling") == "logit_normal":  # the old name of shift
        saved_args["timestep_sampling"] = "shift"
    if saved_args.get("resolution", "").isdigit():  # states saved before --resolution took a list
        saved_args["resolution"] = f"[{saved_args['resolution']}]"
    if changed := [k for k in RESUME_MUST_MATCH if saved_args.get(k) != str(getattr(args, k))]:
        raise SystemExit("error: --resume with different settings than the saved run: " + ", ".join(
            f"--{k.replace('_', '-')} {saved_args.get(k)} -> {getattr(args, k)}" for k in changed))
    if args.ref_panel and (mode := state.get("ref_mode", "clean")) != REF_MODE:  # "clean" before "ref_mode" was kept
        raise SystemExit(f"error: --resume: {path} was trained with reference treatment {mode!r} and this train.py "
                         f"trains {REF_MODE!r}; train from the start without --resume (or choose another --out)")
    saved = state["dataset"]
    changes = {"added": fingerprint.keys() - saved.keys(), "removed": saved.keys() - fingerprint.keys(),
               "edited": {k for k in saved.keys() & fingerprint.keys() if not unchanged(saved[k], fingerprint[k])}}
    if any(changes.values()):
        raise SystemExit(f"error: --resume: the dataset {args.data} changed since {path} was saved (" + "; ".join(
            f"{what}: {', '.join(sorted(names))}" for what, names in changes.items() if names) + "). Restore it, "
            "or train from the start without --resume (delete the state or choose another --out).")
    return state


@contextlib.contextmanager
def holding(params: dict[str, torch.Tensor], values: dict[str, torch.Tensor] | None):
    """Inside the block the parameters hold `values` (the EMA weights; None: their own), their own again
    after."""
    own = {n: p.detach().clone() for n, p in params.items()} if values is not None else {}
    with torch.no_grad():
        for n, v in values.items() if values is not None else ():
            params[n].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, v in own.items():
                params[n].copy_(v)


# the inline settings of a --val-prompt, as ai-toolkit and kohya users write them (kohya's --d seed and --l
# guidance)
VAL_OPTIONS = {"w": "width", "h": "height", "seed": "seed", "d": "seed", "g": "guidance", "l": "guidance", "s": "steps"}


def parse_val_prompt(text: str, height: int, width: int, steps: int) -> dict:
    """`a caption --w 1024 --h 1536 --seed 3 --g 3.5 --s 20` -> the caption and its settings; the ones it does
    not give are the first set's size, VAL_SEED, guidance 3.5 and --sample-steps."""
    caption, *options = re.split(r"\s+--(?=[a-z]+\s)", " " + text.strip())
    found = dict(caption=caption.strip(), height=height, width=width, seed=VAL_SEED, guidance=3.5, steps=steps)
    for option in options:
        name, _, value = option.partition(" ")
        if name not in VAL_OPTIONS:
            raise ValueError(f"--val-prompt {text[:40]!r}: unknown option --{name}; use --w, --h, --seed (--d), "
                             f"--g (--l) or --s")
        kind = float if VAL_OPTIONS[name] == "guidance" else int
        try:
            found[VAL_OPTIONS[name]] = kind(value.strip())
        except ValueError:
            raise ValueError(f"--val-prompt {text[:40]!r}: --{name} {value.strip()!r} is not a number") from None
    if stray := re.search(r"(?:^|\s)(--[A-Za-z]\S*)", found["caption"]):  # --W 64, --seed=3, a trailing --s
        raise ValueError(f"--val-prompt {text[:40]!r}: {stray[1]!r} is not a setting with its value (they follow "
                         f"the caption in lower case, as '--s 20'): use --w, --h, --seed (--d), --g (--l) or --s")
    if found["steps"] < 1 or not math.isfinite(found["guidance"]):
        raise ValueError(f"--val-prompt {text[:40]!r}: --s must be at least 1 and --g a finite number")
    check_size(found["height"], found["width"])
    return found


def side_by_side(images: list[Image.Image], gap: int = 4) -> Image.Image:
    """The images in one row on grey, top-aligned."""
    row = Image.new("RGB", (sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images)),
                    "grey")
    for i, image in enumerate(images):
        row.paste(image, (sum(j.width + gap for j in images[:i]), 0))
    return row


def draw_loss(losses: list[float], path, width: int = 640, height: int = 320):
    """The loss of every step (grey) and its moving average (blue) as a PNG, drawn with pillow."""
    losses = losses * 2 if len(losses) == 1 else losses  # a line needs two points
    decay = min(0.98, max(0.0, 1 - 10 / len(losses)))  # a window of about a tenth of the run, at most ~50 steps
    smooth, average = [], 0.0
    for i, v in enumerate(losses, 1):
        average = decay * average + (1 - decay) * v
        smooth.append(average / (1 - decay**i))  # bias-corrected, as Adam's moments: no pull toward the zero start
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 60, 24, width - 12, height - 28
    low, high = min(losses), max(losses)
    to_xy = lambda i, v: (left + (right - left) * i / max(1, len(losses) - 1),  # noqa: E731
                          bottom - (bottom - top) * (v - low) / ((high - low) or 1))
    draw.rectangle((left, top, right, bottom), outline="black")
    draw.line([to_xy(i, v) for i, v in enumerate(losses)], fill=(190, 190, 190))
    draw.line([to_xy(i, v) for i, v in enumerate(smooth)], fill=(30, 90, 200), width=2)
    for text, xy in ((f"{high:.3g}", (4, top - 6)), (f"{low:.3g}", (4, bottom - 6)), ("step 1", (left, bottom + 6)),
                     (f"step {len(losses)}", (right - 60, bottom + 6)), ("loss (blue: moving average)", (left, 4))):
        draw.text(xy, text, fill="black")
    image.save(path, format="PNG")


def start_from_lora(flow, tensors: dict, path: Path, rank: int):
    """--init-lora: the file becomes adapter "init", which must cover exactly the trained layers at the same
    rank; the fresh adapter takes its A and its B (rescaled so that scaling·B·A is the file's), and "init"
    goes."""
    load_lora(flow, tensors, name="init", source=str(path))
    fresh, loaded = lora_layers(flow, "default"), lora_layers(flow, "init")
    if fresh.keys() != loaded.keys():
        differ = sorted(fresh.keys() ^ loaded.keys())
        raise ValueError(f"--init-lora {path}: covers other layers than this run trains ({len(loaded)} vs "
                         f"{len(fresh)}; e.g. {differ[0]})")
    for name, m in fresh.items():
        if (r := m.lora_A["init"].out_features) != rank:
            raise ValueError(f"--init-lora {path}: {name} has rank {r}; this run trains rank {rank} (give --rank {r})")
        if m.lora_B["init"].bias is not None:
            raise ValueError(f"--init-lora {path}: {name} has a LoRA bias, which this trainer does not train")
        with torch.no_grad():
            m.lora_A["default"].weight.copy_(m.lora_A["init"].weight)
            m.lora_B["default"].weight.copy_(m.lora_B["init"].weight * (m.scaling["init"] / m.scaling["default"]))
    remove_lora(flow, "init")


def wait_for_rank0():
    """Under torchrun, the other ranks wait here until rank 0 has written its files."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def interrupt(signum, frame):
    """SIGTERM or SIGHUP before the training loop: stop like Ctrl-C (the loop itself stops between steps)."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None) -> Path:
    """Runs `train` holding `<out stem>.lock`, which is removed however the run ends."""
    args = parse_args(argv)
    args.device = init_distributed(args.device)  # under torchrun: this rank joins the others; its GPU is cuda:LOCAL_RANK
    lock = args.out.with_name(f"{args.out.stem}.lock")
    if rank() == 0:  # rank 0 alone writes the files of --out
        args.out.parent.mkdir(parents=True, exist_ok=True)
        take_lock(lock, args.out)
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    signal.signal(signal.SIGTERM, interrupt), signal.signal(signal.SIGHUP, interrupt)
    try:
        return train(args)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if rank() == 0:
            lock.unlink(missing_ok=True)


def train(args: argparse.Namespace) -> Path:
    out = args.out
    state_path, log_path = out.with_name(f"{out.stem}.state.pt"), out.with_name(f"{out.stem}.loss.csv")
    curve_path = out.with_name(f"{out.stem}.loss.png")
    samples_dir = out.with_name(f"{out.stem}_samples")
    if state_path.exists() and not args.resume:  # a finished or stopped run: its LoRA, state and log would be lost
        raise SystemExit(f"error: {state_path} exists: --resume to continue it, another --out, or delete it")
    check_device(args.device)

    # 1. Data: every image and caption is checked now, not at step 3,000; and a --resume's state against them.
    dataset = PanelSetDataset(args.data, resolution=args.resolution, layout=args.layout, panels=args.panels)
    panels = check_reference_panels(dataset, args.ref_panel) if args.ref_panel else None
    per_set = len(dataset.resolutions)
    print(f"{len(dataset) // per_set} training sets from {args.data}, {len(dataset)} samples: each at resolution "
          f"{', '.join(map(str, dataset.resolutions))} (at its own size where that is smaller)", file=sys.stderr)
    fingerprint = dataset_fingerprint(dataset)
    # --resume: rank 0 reads the state (only its machine holds --out's folder) and every rank gets a copy
    state = gathered([load_state(state_path, args, fingerprint)] if rank() == 0 else [])[0] if args.resume else None
    init_lora = read_lora_file(args.init_lora) if args.init_lora else None  # read (and so checked) now
    first = dataset.samples[per_set - 1].bucket  # the first set's largest (H, W): the validation images' default
    val = [parse_val_prompt(p, *first, args.sample_steps) for p in args.val_prompt] or [  # the caption as written
        parse_val_prompt("", *first, args.sample_steps) | {"caption": dataset.samples[0].caption}]
    if args.ref_panel and (odd := [v["caption"] for v in val if (v["height"], v["width"]) != first]):
        raise ValueError(f"--val-prompt {odd[0][:40]!r}: with --ref-panel, validation images take the first set's "
                         f"size, {first[1]}x{first[0]}; drop its --w/--h")

    # Captions T5 would cut are reported now, from the tokenizer alone, before any weight loads.
    check_captions(load_t5_tokenizer(str(args.model), args.transformer), dataset,
                   [v["caption"] for v in val] if args.val_prompt else [], args.strict_captions)

    # 2. Model; 3. encode every set and caption once, then the text encoders leave the device.
    dtype = args.dtype or ("bf16" if torch.device(args.device).type == "cuda" else None)
    pipe = load_pipeline(str(args.model), args.device, dtype, transformer=args.transformer)
    if args.quantize == "fp8":  # on the CPU, before T5 encodes and before the LoRA wraps the flow's Linears
        quantize_fp8(pipe.t5), quantize_fp8(pipe.flow)
    sets = gathered(encode_sets(pipe, dataset, args.ref_panel, REF_MODE, part(len(dataset))))  # each rank: its part
    empty = EncodedSet(None, *(x[0].cpu() for x in pipe.encode_prompts([""])))     # for caption dropout
    val_txt, val_vec = pipe.encode_prompts([v["caption"] for v in val])
    shown = sets[per_set - 1]  # with --ref-panel, validation is conditioned on the first set's, at its largest size
    for v in val:
        noise, times = get_noise(1, *first, v["seed"]), pipe.schedule(*first, v["steps"])
        v["hook"], v["ids"] = (pin_references(shown.ref_latents[None], shown.ref_mask, noise, times, mode=REF_MODE),
                               shown.ids[None]) if args.ref_panel else (None, None)
    pipe.t5.to("cpu"), pipe.clip.to("cpu")

    # 4. A LoRA on the frozen base: only the adapters train, in float32. Swapped blocks (--blocks-to-swap) are
    # set up while the flow is still on the CPU, so that their weights never land on the device whole.
    inject_lora(pipe.flow, rank=args.rank, alpha=args.alpha, seed=args.seed)
    if init_lora:
        start_from_lora(pipe.flow, init_lora, args.init_lora, args.rank)
    pipe.flow.gradient_checkpointing = args.checkpointing
    BlockSwap(pipe.flow, args.blocks_to_swap, args.device)
    if args.fsdp:  # on the CPU still: each rank's 1/N of the frozen weights goes to its device
        base = sum(p.numel() for p in pipe.flow.parameters() if not p.requires_grad)
        shard(pipe.flow)
        held = sum(p.to_local().numel() for p in pipe.flow.parameters() if not p.requires_grad)
        print(f"--fsdp: rank {rank()} holds {held:,} of the base's {base:,} weights", file=sys.stderr)
    if args.compile:
        if torch.device(args.device).type == "cuda":
            warnings.warn("--compile: compiled training crashed on an H200 with torch 2.11 (an illegal memory access "
                          "in an inductor kernel, bench/RESULTS.md); if it fails, train without --compile")
        compile_blocks(pipe.flow)
    flow = pipe.on_device(pipe.flow)
    named = {n: p for n, p in flow.named_parameters() if p.requires_grad}  # the adapters
    params = list(named.values())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    metadata = {"rank": str(args.rank), "alpha": str(args.alpha), "base_model": str(args.model),
                "caption_template": val[0]["caption"], "steps": str(args.steps)}
    if args.ref_panel:
        rows, cols = grid_shape(panels, args.layout)
        metadata |= conditional_metadata(args.ref_panel, panels, args.layout, REF_MODE, first[0] // rows,
                                         first[1] // cols)
    start, log_rows = 0, []
    if state:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state["lora"][n])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        if log_path.exists():  # the rows up to the saved step; later ones belong to the run that was lost
            with open(log_path, newline="") as f:
                log_rows = [r for r in csv.reader(f) if r and r[0].isdigit() and int(r[0]) <= start]
        print(f"resumed from {state_path} at step {start}", file=sys.stderr)

    # --ema-decay: the moving average of the adapters, what is saved and sampled; the state keeps it and the
    # raw ones
    ema = None
    if args.ema_decay:
        ema = {n: (state["ema"][n] if state else p.detach()).to(p.device, copy=True) for n, p in named.items()}

    def save(step: int):
        """The training state and the LoRA: both written to temporary files, then both renamed (by rank 0)."""
        if rank() != 0:
            return
        state = {"step": step, "lora": {n: p.detach().cpu() for n, p in named.items()},
                 "optimizer": optimizer.state_dict(), "args": {k: str(v) for k, v in vars(args).items()},
                 "dataset": fingerprint, "ref_mode": REF_MODE} \
            | ({"ema": {n: v.cpu() for n, v in ema.items()}} if ema else {})

        def write_lora(tmp):
            with holding(named, ema):
                save_lora(flow, tmp, metadata=metadata | {"step": str(step)}, dtype=SAVE_DTYPES[args.save_dtype])

        numbered = out.with_name(f"{out.stem}-step{step:06d}{out.suffix}")
        earlier = "Both files still hold the previous save; free space and --resume" if state_path.exists() else \
            "Nothing was saved before (no state to resume): free space and start again"
        try:
            atomic_writes({state_path: lambda tmp: torch.save(state, tmp), out: write_lora}
                          | ({numbered: write_lora} if args.keep_last else {})
                          | ({curve_path: lambda tmp: draw_loss(losses, tmp)} if losses else {}))
        except Exception as error:  # disk full, permission lost: torch and safetensors raise their own types
            raise SystemExit(f"error: could not save step {step} to {out}, {state_path} ({error}): training "
                             f"stopped. {earlier}.") from None
        if args.keep_last:  # this run's numbered copies before the last --keep-last go, by step number
            pattern = re.compile(re.escape(out.stem) + r"-step(\d+)" + re.escape(out.suffix))
            copies = sorted((int(m[1]), p) for p in out.parent.iterdir() if (m := pattern.fullmatch(p.name)))
            for _, old in [c for c in copies if c[0] <= step][:-args.keep_last]:
                old.unlink()

    def validate(step: int):
        """The validation images of this step (with the EMA weights), side by side:
        <stem>_samples/step000250.png. Every rank samples (under --fsdp each holds a part of every block);
        rank 0 writes."""
        flow.eval()
        with holding(named, ema):
            images = [to_pil(pipe.decode(pipe.sample(val_txt[i : i + 1], val_vec[i : i + 1], v["height"], v["width"],
                                                     v["steps"], v["guidance"], v["seed"], False, v["hook"],
                                                     v["ids"])))[0]
                      for i, v in enumerate(val)]
        flow.train()
        if rank() == 0:
            samples_dir.mkdir(exist_ok=True)
            side_by_side(images).save(samples_dir / f"step{step:06d}.png")

    # 5. The loop. The data order is a pure function of the seed: epoch e is batches_by_bucket(seed + e).
    order = itertools.chain.from_iterable(batches_by_bucket(dataset, args.batch_size, args.seed + epoch)
                                          for epoch in itertools.count())
    batches = itertools.islice(order, start * args.grad_accum, None)  # on resume, skip the batches already seen
    done = start  # optimizer steps applied
    stop = []  # signals received during the loop: the step under way finishes, then the run saves and stops
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: stop.append(signum))
    with open(log_path if rank() == 0 else os.devnull, "w", newline="") as log:
        writer = csv.writer(log)
        writer.writerows([["step", "loss", "lr", "seconds"], *log_rows])
        losses = [float(r[1]) for r in log_rows]  # for the loss curve drawn at each save
        if args.sample_every and start == 0:
            validate(0)  # the base model before any step: the baseline the others are seen against
        flow.train()
        begin = time.perf_counter() - (float(log_rows[-1][3]) if log_rows else 0.0)  # --resume: the clock goes on
        try:
            bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="training", disable=rank() > 0)
            for step in bar:
                if any(gathered([bool(stop)])):  # torchrun signals every rank: all stop at the same step
                    raise KeyboardInterrupt
                g = step_generator(args.seed, step)
                lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))  # linear warm-up, then constant
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = 0.0
                for _ in range(args.grad_accum):
                    # every rank collates the whole micro-batch (its draws), and computes the loss of its part
                    batch = next(batches)
                    x0, txt, vec, refs = collate([sets[i] for i in batch], empty, args.caption_dropout, g,
                                                 args.device, REF_MODE)
                    loss = training_loss(flow, x0, txt, vec, g, args.guidance, args.timestep_sampling, refs,
                                         part(len(batch)))
                    (loss / args.grad_accum).backward()
                    loss_sum += loss.item()
                loss_sum = sum_gradients(params, loss_sum)  # under torchrun: the ranks' parts added up
                if not math.isfinite(loss_sum):
                    kept = f"The last good checkpoint ({state_path}, {out}) is intact" if state_path.exists() else \
                        "Nothing was saved (no --save-every step was reached)"
                    raise SystemExit(f"error: loss is {loss_sum} at step {step + 1}: training stopped. {kept}; try a "
                                     f"lower --lr.")
                if args.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
                optimizer.step()
                if ema:  # ema ← decay·ema + (1 − decay)·weights
                    with torch.no_grad():
                        for n, p in named.items():
                            ema[n].lerp_(p, 1 - args.ema_decay)
                done = step + 1
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss_sum / args.grad_accum)
                writer.writerow([done, f"{loss_sum / args.grad_accum:.6f}", f"{lr:.3g}",
                                 f"{time.perf_counter() - begin:.2f}"])
                bar.set_postfix(loss=f"{loss_sum / args.grad_accum:.4f}")
                log.flush()  # every row on disk at once: `tail -f` shows the run
                if done % args.save_every == 0 or done == args.steps:
                    save(done)
                if args.sample_every and done % args.sample_every == 0:
                    validate(done)
        except KeyboardInterrupt:
            save(done)
            wait_for_rank0()
            raise SystemExit(f"interrupted ({signal.Signals(stop[0]).name if stop else 'SIGINT'}): saved the LoRA "
                             f"and training state at step {done} to {out}, {state_path}; --resume continues")
    if start >= args.steps:
        save(start)
    wait_for_rank0()
    if rank() == 0:
        print(out)
    return out


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        raise SystemExit("interrupted before training started: nothing was saved")
    finally:
        if torch.distributed.is_initialized():  # under torchrun
            torch.distributed.destroy_process_group()
