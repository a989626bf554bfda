"""A sample.py run's settings, stored as JSON in a text chunk of every PNG it writes, and read back by
`sample.py --from-image` to run them again.

The settings are the flags as given, except RUN_ONLY (how the run goes, not what it draws); RESOLVED are
stored as used, and LOCATED local files with absolute paths, so that the run can be repeated from any
directory. Read back, the stored settings become the parser's defaults: a flag given wins over its stored
value, and over the stored value of its PAIRED partner.

A PNG may come from anyone, so what it holds is read as untrusted: it chooses what is drawn, never where or
how the run goes. Only the keys sample.py stores are read (a RUN_ONLY or unknown key is refused), each value
checked as its flag's would be, and the files and hub ids it names are printed and used only where
`trusted_files` allows them.
"""

import argparse
import json
import sys
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from minflux.hub import TOY_MODELS
from minflux.images import pixel_limit

SETTINGS_KEY = "minflux"  # the PNG text chunk holding a run's settings, as JSON
# How the run goes, not what it draws: not stored, and refused in a PNG (a prompt file is a file to read, and
# --trust-settings is the user's word, never the PNG's own).
RUN_ONLY = {"from_image", "prompt_file", "out", "device", "offload", "blocks_to_swap", "compile",
            "trust_settings"}
# Stored as used, not as given (None: a default).
RESOLVED = ("steps", "guidance", "height", "width", "lora_scale", "strength")
# may name local files: stored as absolute paths
LOCATED = ("model", "transformer", "lora", "ref", "init", "image", "mask")
HUB = ("model", "lora")  # may also name a HF hub repo or file: a download
# The first flag of a pair given drops the stored second: a new --lora, the stored --lora-scale; a new --ref,
# the stored --ref-panel; a --prompt-file, the stored prompts; a new --width or --height, the stored panel
# size (which would otherwise decide the canvas).
PAIRED = (("lora", "lora_scale"), ("ref", "ref_panel"), ("prompt_file", "prompt"),
          ("width", "panel_width"), ("width", "panel_height"),
          ("height", "panel_width"), ("height", "panel_height"))


def read_settings(path: Path) -> dict:
    """The settings sample.py stored in a PNG it wrote, or an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"--from-image {path}: no such file")
    try:
        with pixel_limit(path, "--from-image"), Image.open(path) as image:  # a bomb: refused, not opened
            text = image.info.get(SETTINGS_KEY)
    except (OSError, SyntaxError) as e:  # not an image, or a broken PNG chunk
        raise ValueError(f"--from-image {path}: cannot be read as an image ({e})") from None
    if text is None:
        raise ValueError(f"--from-image {path}: holds no sample.py settings (no {SETTINGS_KEY!r} PNG text "
                         f"chunk; sample.py writes one into every PNG it saves)")
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as e:
        message = f"--from-image {path}: its {SETTINGS_KEY!r} text chunk is not valid JSON ({e})"
        raise ValueError(message) from None
    if not isinstance(settings, dict):
        raise ValueError(f"--from-image {path}: its {SETTINGS_KEY!r} text chunk is not a JSON object")
    return settings


def typed(action: argparse.Action, value, where: str):
    """A stored (JSON) value checked and converted as argparse would its flag's: a switch takes a boolean, a
    repeatable flag a list, any other one value; null only where the flag's default is none. An error names
    `where` (the file and key) and what was expected."""
    if value is None and action.default is None:
        return None
    if action.nargs == 0:  # a store_true switch
        if not isinstance(value, bool):
            raise ValueError(f"{where} is {value!r}; expected true or false")
        return value
    if action.nargs in ("+", "*") or isinstance(action.default, list):  # nargs="+" or action="append"
        if not isinstance(value, list) or (action.nargs == "+" and not value):
            raise ValueError(f"{where} is {value!r}; expected a list of values, as the flag repeated gives")
        return [one_value(action, v, where) for v in value]
    return one_value(action, value, where)


def one_value(action: argparse.Action, value, where: str):
    """One stored value as the flag's type makes it from its text: text flags (a prompt, a path) take a
    string, numeric ones a number or its text; within the flag's range and choices."""
    text_flag = action.type in (None, Path)
    if isinstance(value, (bool, list, dict)) or value is None or (text_flag and not isinstance(value, str)):
        raise ValueError(f"{where} is {value!r}; expected {'a string' if text_flag else 'a number'}")
    try:
        converted = value if action.type is None else action.type(str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"{where} is {value!r}: {e}") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{where} is {value!r}; expected one of {', '.join(map(str, action.choices))}")
    return converted


def flags_given(quiet: argparse.ArgumentParser, argv) -> set[str]:
    """The flags given in `argv` (by dest), with the PAIRED partners they drop. `quiet` is a fresh parser of
    the same flags: with every default suppressed, it returns only the flags given."""
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(quiet.parse_args(argv)))
    for flag, partner in PAIRED:
        if flag in given:
            given.add(partner)
    return given


def stored_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace, given: set[str]) -> dict:
    """The settings stored in the PNG `args.from_image`, as `parser`'s defaults (each checked and converted as
    its flag's would be), but for the flags `given`, which win. A key sample.py does not store (RUN_ONLY, or
    unknown) is an error, and so is a file or hub id that `trusted_files` does not allow."""
    stored = read_settings(args.from_image)
    run_only = set(stored) & RUN_ONLY
    if run_only:
        raise ValueError(f"--from-image {args.from_image}: its settings set {', '.join(sorted(run_only))}, "
                         f"which a PNG may not choose (where and how a run goes, and which files it writes "
                         f"or reads its prompts from, are given on the command line only; sample.py never "
                         f"stores them)")
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    unknown = set(stored) - set(actions)
    if unknown:
        raise ValueError(f"--from-image {args.from_image}: unknown settings {', '.join(sorted(unknown))}")
    used = {k: typed(actions[k], v, f"--from-image {args.from_image}: setting {k!r}")
            for k, v in stored.items() if k not in given}
    trusted_files(used, args.from_image, args.trust_settings, parser.get_default("model"))
    return used


def named_files(settings: dict) -> list[tuple[str, str]]:
    """(key, value) of each file, folder or hub id the settings name (LOCATED), in the flags' order."""
    named = []
    for key in LOCATED:
        values = settings.get(key)
        for value in values if isinstance(values, list) else [values]:
            if value is not None:
                named.append((key, str(value)))
    return named


def untrusted(key: str, value: str, folders: list[Path]) -> str | None:
    """Why the stored `key` = `value` needs the user's word, or None: a hub id (model or LoRA: a download), or
    a local path that resolves (links and .. followed) outside `folders`."""
    path = Path(value).expanduser()
    local = path.exists() or path.is_absolute() or value.startswith((".", "~"))
    if key in HUB and not local:
        return "a download from the HF hub"
    if any(path.resolve().is_relative_to(folder) for folder in folders):
        return None
    return "outside the PNG's folder and the working folder"


def trusted_files(used: dict, png: Path, trust: bool, default_model: str):
    """Prints (stderr) every file and hub id the PNG's settings `used` name, before any is read, then refuses
    those outside the PNG's own folder and the working folder, and hub downloads, unless `trust`
    (--trust-settings). `toy` and the default --model are the program's own choices, not the PNG's."""
    named = named_files(used)
    if not named:
        return
    listed = ", ".join(f"--{key} {value}" for key, value in named)
    print(f"--from-image {png}: its settings name {listed}", file=sys.stderr)
    if trust:
        return
    folders = [png.resolve().parent, Path.cwd().resolve()]
    refused = []
    for key, value in named:
        own = key == "model" and value in (*TOY_MODELS, default_model)  # the program's choice, not the PNG's
        reason = None if own else untrusted(key, value, folders)
        if reason:
            refused.append((key, value, reason))
    if refused:
        found = "; ".join(f"--{key} {value} ({reason})" for key, value, reason in refused)
        flags = " / ".join(dict.fromkeys(f"--{key}" for key, _, _ in refused))
        raise PermissionError(f"--from-image {png}: its settings name {found}; a PNG may choose files only "
                              f"in its own folder or the working folder, and no download: give "
                              f"--trust-settings to allow these, or give {flags} yourself")


def located(value):
    """A local file or folder as an absolute path, so that --from-image finds it from any directory; anything
    else (a hub id, `toy`, None) as given; a list item by item."""
    if isinstance(value, list):
        return [located(v) for v in value]
    path = Path(str(value)).expanduser()
    if value not in (None, *TOY_MODELS) and path.exists():
        return str(path.resolve())
    return value


def settings_chunk(args: argparse.Namespace) -> PngInfo:
    """The run's settings, as given (`args.settings`) and as RESOLVED, as JSON in a PNG text chunk (read
    back by --from-image); the local files it read (LOCATED) with absolute paths."""
    settings = args.settings | {k: getattr(args, k) for k in RESOLVED}
    settings |= {k: located(settings[k]) for k in LOCATED}
    info = PngInfo()
    info.add_text(SETTINGS_KEY, json.dumps(settings, default=str))
    return info
