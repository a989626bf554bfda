"""Files written whole or not at all: each is written to a temporary file beside it, then renamed into
place, so a crash or a full disk never leaves a half-written LoRA or training state.
"""

import os
import sys
from pathlib import Path


def atomic_write(path: Path, write):
    """Calls `write(tmp)` for a temporary file beside `path`, then renames it to `path`."""
    atomic_writes({path: write})


def atomic_writes(writes: dict):
    """Each `write(tmp)` of {path: write} to a temporary file beside its path (`.<name>.tmp`); only when all
    succeeded are they renamed, in the order given, so a failed write (disk full) leaves every file as it was,
    and a crash between two renames leaves the last ones as they were (the last is the commit point). A kill
    leaves the temporary files, which the next run removes (run.remove_stale_temporaries)."""
    tmps = {path: path.with_name(f".{path.name}.tmp") for path in writes}
    try:
        for path, write in writes.items():
            write(tmps[path])
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def write_or_warn(path: Path, write, what: str):
    """`write(tmp)` to `path` atomically, in a folder created if need be; a failure (disk full) is a warning
    naming `what` and `path`, for files whose loss costs no training: the caller goes on."""
    try:
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, write)
    except OSError as error:
        print(f"warning: could not write {what} {path} ({error.strerror or error}); training goes on",
              file=sys.stderr)
