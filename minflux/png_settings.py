"""A sample.py run's settings, stored as JSON in a text chunk of every PNG it writes, and read back by
`sample.py --from-image` to run them again.

The settings are the flags as given, except RUN_ONLY (how the run goes, not what it draws); RESOLVED are
stored as used, and LOCATED local files with absolute paths, so that the run can be repeated from any
directory. Read back, the stored settings become the parser's defaults: a flag given wins over its stored
value, and over the stored value of its PAIRED partner.
"""

import argparse
import json
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

SETTINGS_KEY = "minflux"  # the PNG text chunk holding a run's settings, as JSON
# How the run goes, not what it draws: not stored.
RUN_ONLY = {"from_image", "prompt_file", "out", "device", "offload", "blocks_to_swap", "compile"}
# Stored as used, not as given (None: a default).
RESOLVED = ("steps", "height", "width", "lora_scale", "strength")
LOCATED = ("model", "transformer", "lora", "ref", "init")  # may name local files: stored as absolute paths
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
        with Image.open(path) as image:
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


def as_flag(value, kind):
    """A stored (JSON) value as argparse gives the flag: a string for argparse to convert and check, as it
    does a flag's (the elements of a list converted here); None, booleans and untyped values as they are."""
    if isinstance(value, list):
        if kind is None:
            return value
        return [kind(str(v)) for v in value]
    if kind is None or value is None or isinstance(value, bool):
        return value
    return str(value)


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
    """The settings stored in the PNG `args.from_image`, as `parser`'s defaults (each as argparse gives its
    flag), but for the flags `given`, which win; a setting `parser` does not know is an error."""
    stored = read_settings(args.from_image)
    unknown = set(stored) - set(vars(args)) - RUN_ONLY
    if unknown:
        raise ValueError(f"--from-image {args.from_image}: unknown settings {', '.join(sorted(unknown))}")
    types = {action.dest: action.type for action in parser._actions}
    return {k: as_flag(v, types[k]) for k, v in stored.items() if k not in given}


def located(value):
    """A local file or folder as an absolute path, so that --from-image finds it from any directory; anything
    else (a hub id, `toy`, None) as given; a list item by item."""
    if isinstance(value, list):
        return [located(v) for v in value]
    path = Path(str(value)).expanduser()
    if value not in (None, "toy") and path.exists():
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
