"""train.py's options beyond argparse: the --config file under the flags, the checks of option pairs, and the
settings a --val-prompt carries inline (as ai-toolkit and kohya users write them)."""

import argparse
import json
import math
import os
import re
from pathlib import Path

from iclora.training import step_generator
from minflux.hub import TOY_MODEL, TOY_MODELS, TOY_VARIANTS
from minflux.sampling import check_size

VAL_SEED = 42  # the noise of every validation image, so that they differ only by the training they show
# the inline settings of a --val-prompt (kohya's --d seed and --l guidance)
VAL_OPTIONS = {"w": "width", "h": "height", "seed": "seed", "d": "seed", "g": "guidance", "l": "guidance",
               "s": "steps"}


def above_zero(text: str) -> float:
    """An argparse type: a finite float above 0."""
    if not 0 < float(text) < math.inf:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return float(text)


def timestep_mode(text: str) -> str:
    """An argparse type for --timestep-sampling: `logit_normal` is the old name of `shift`."""
    return "shift" if text == "logit_normal" else text


def lora_file(text: str) -> Path:
    """An argparse type: a file path (the run's other files go next to it), not a folder."""
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; name the LoRA file, e.g. "
                                         f"{Path(text) / 'lora.safetensors'}")
    return Path(text)


def parse_with_config(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """The flags of `argv`; with --config, the JSON file's values (keys as the flags, with _) where a flag is
    not given. A repeatable flag given replaces the file's list, not extends it."""
    args = p.parse_args(argv)
    if not args.config:
        return args
    config = read_config(p, args.config)
    unknown = set(config) - set(vars(args))
    if unknown:
        p.error(f"{args.config}: unknown options {', '.join(sorted(unknown))}")
    actions = {a.dest: a for a in p._actions}
    p.set_defaults(**{k: config_value(p, actions[k], v, f"{args.config}: {k!r}") for k, v in config.items()})
    given = args
    args = p.parse_args(argv)
    for k, v in vars(given).items():
        if isinstance(v, list) and v:
            setattr(args, k, v)
    return args


def read_config(p: argparse.ArgumentParser, path: Path) -> dict:
    """The --config file's JSON object, or `p.error` naming the file (and where its JSON breaks)."""
    try:
        config = json.loads(path.read_text())
    except OSError as error:
        p.error(f"--config {path}: cannot be read: {error.strerror}")
    except UnicodeDecodeError:
        p.error(f"--config {path}: not a text file (expected a JSON object of option values)")
    except json.JSONDecodeError as error:
        p.error(f"--config {path}: not valid JSON: {error.msg} at line {error.lineno} column {error.colno}")
    if not isinstance(config, dict):
        p.error(f"--config {path}: expected a JSON object of option values ({{\"steps\": 500, ...}}), got a "
                f"{type(config).__name__}")
    return config


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
    values = value if isinstance(value, list) else [value]
    items = []
    for v in values:
        try:
            items.append(action.type(str(v)) if action.type else str(v))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            p.error(f"{where}: {v!r}: {error}")
        if action.choices and items[-1] not in action.choices:
            p.error(f"{where}: {v!r} is not one of {', '.join(map(str, action.choices))}")
    return items if many else items[0]


def check_options(p: argparse.ArgumentParser, args: argparse.Namespace):
    """The checks no single flag's type makes: each failure is `p.error`, before anything loads."""
    if args.data is None:
        p.error("--data is required (or set \"data\" in the --config file)")
    if args.out.resolve().is_relative_to(args.data.resolve()):
        p.error(f"--out {args.out} is inside --data {args.data}: its loss curve and samples would become "
                f"training images on the next run; write it outside the dataset")
    check_seed(p, args.seed, args.steps)
    if args.ema_decay >= 1:
        p.error(f"--ema-decay {args.ema_decay}: must be below 1 (1 would never move from the initial LoRA)")
    if args.blocks_to_swap and not args.checkpointing:
        p.error("--blocks-to-swap needs --checkpointing: without it autograd keeps every block's weights "
                "until the backward pass, so nothing would be saved")
    if args.fsdp and "WORLD_SIZE" not in os.environ:
        p.error("--fsdp shards the base over torchrun's processes: start the run with torchrun "
                "--nproc_per_node N train.py ... (see docs/training.md, Several GPUs)")
    if args.fsdp and args.blocks_to_swap:
        p.error("--fsdp and --blocks-to-swap do not compose (both would own the blocks' weights); choose "
                "one: --fsdp divides the base over N GPUs, --blocks-to-swap keeps part of it in CPU RAM")


def check_seed(p: argparse.ArgumentParser, seed: int, steps: int):
    """--seed (at least 0, as numpy's data order needs) also seeds every step's torch generator, which takes
    seeds below 2^64: refused now if the last step's would not, rather than at that step."""
    try:
        step_generator(seed, steps)
    except (ValueError, RuntimeError):
        p.error(f"--seed {seed}: too large for the generator of each step, which is seeded with seed × "
                f"1,000,003 + step below 2^64; use a seed below 2^32, as most tools do")


def input_files(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """The files the run reads that exist, each with the flag that names it: --init-lora, --config,
    --transformer, every file in --data and in a local --model folder. run.check_outputs makes sure that
    none of them is written or deleted."""
    named = [(f"{flag} {path}", path) for flag, path in (("--init-lora", args.init_lora),
                                                          ("--config", args.config),
                                                          ("--transformer", args.transformer)) if path]
    model = TOY_MODEL if args.model in TOY_MODELS else Path(str(args.model))
    if args.model in TOY_VARIANTS:  # its transformer file lies outside toy/model
        named.append((f"--model {args.model}'s transformer", TOY_VARIANTS[args.model]))
    for flag, folder in (("--data", args.data), ("--model", model)):
        for parent, _, names in os.walk(folder):  # nothing for a hub id
            named.extend((f"{Path(parent) / name}, a file of {flag} {folder}", Path(parent) / name)
                         for name in names)
    return [(what, path) for what, path in named if path.exists()]


def check_data_folder(data: Path):
    """--data exists: on a fresh clone, a dataset named in the README is not there yet."""
    if not data.exists():
        raise ValueError(f"dataset folder {data} does not exist; sets/README.md shows how to lay one out")


def parse_val_prompt(text: str, height: int, width: int, steps: int) -> dict:
    """`a caption --w 1024 --h 1536 --seed 3 --g 3.5 --s 20` -> the caption and its settings; the ones it does
    not give are the first set's size, VAL_SEED, the base's sampling guidance (None here: Validation reads it
    off the model, dev 3.5, Fill 30, Kontext 2.5) and --sample-steps."""
    caption, *options = re.split(r"\s+--(?=[a-z]+\s)", " " + text.strip())
    found = dict(caption=caption.strip(), height=height, width=width, seed=VAL_SEED, guidance=None,
                 steps=steps)
    for option in options:
        name, _, value = option.partition(" ")
        if name not in VAL_OPTIONS:
            raise ValueError(f"--val-prompt {text[:40]!r}: unknown option --{name}; use --w, --h, --seed "
                             f"(--d), --g (--l) or --s")
        kind = float if VAL_OPTIONS[name] == "guidance" else int
        try:
            found[VAL_OPTIONS[name]] = kind(value.strip())
        except ValueError:
            raise ValueError(f"--val-prompt {text[:40]!r}: --{name} {value.strip()!r} is not a "
                             f"number") from None
    stray = re.search(r"(?:^|\s)(--[A-Za-z]\S*)", found["caption"])  # --W 64, --seed=3, a trailing --s
    if stray:
        raise ValueError(f"--val-prompt {text[:40]!r}: {stray[1]!r} is not a setting with its value (they "
                         f"follow the caption in lower case, as '--s 20'): use --w, --h, --seed (--d), --g "
                         f"(--l) or --s")
    if found["steps"] < 1 or (found["guidance"] is not None and not math.isfinite(found["guidance"])):
        raise ValueError(f"--val-prompt {text[:40]!r}: --s must be at least 1 and --g a finite number")
    check_size(found["height"], found["width"])
    return found


def validation_prompts(args: argparse.Namespace, size: tuple[int, int], caption: str) -> list[dict]:
    """Each --val-prompt with its settings, or else the first training `caption` as written; the default size
    is the first set's, `size` (H, W), which a conditional LoRA's validation images must keep."""
    val = [parse_val_prompt(p, *size, args.sample_steps) for p in args.val_prompt]
    if not val:
        val = [parse_val_prompt("", *size, args.sample_steps) | {"caption": caption}]
    odd = [v["caption"] for v in val if (v["height"], v["width"]) != size]
    if args.ref_panel and odd:
        raise ValueError(f"--val-prompt {odd[0][:40]!r}: with --ref-panel, validation images take the first "
                         f"set's size, {size[1]}x{size[0]}; drop its --w/--h")
    return val
