"""Files written whole or not at all: each is written to a temporary file beside it, then renamed into
place, so a crash or a full disk never leaves a half-written LoRA or training state.
"""

import os
from pathlib import Path


def atomic_write(path: Path, write):
    """Calls `write(tmp)` for a temporary file beside `path`, then renames it to `path`."""
    atomic_writes({path: write})


def atomic_writes(writes: dict):
    """Each `write(tmp)` of {path: write} to a temporary file beside its path; only when all succeeded are
    they renamed, so a failed write (disk full) leaves every file as it was."""
    tmps = {path: path.with_name(f".{path.name}.tmp") for path in writes}
    try:
        for path, write in writes.items():
            write(tmps[path])
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
