"""A training run's place on disk and its life: the files it writes next to --out, the lock that keeps a
second run off them, and the signals that stop it (Ctrl-C, SIGTERM, SIGHUP: the steps done are saved)."""

import contextlib
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from iclora.distributed import rank

# Ctrl-C; preemption or `timeout`; a closed terminal
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class RunFiles:
    """The files of a run, all next to its LoRA file."""
    out: Path      # the LoRA (--out)
    state: Path    # <stem>.state.pt: LoRA + optimizer + step, for --resume
    log: Path      # <stem>.loss.csv
    curve: Path    # <stem>.loss.png
    samples: Path  # <stem>_samples/: the validation images
    lock: Path     # <stem>.lock, held while the run writes the others

    def numbered(self, step: int) -> Path:
        """The copy of the LoRA saved at `step` (--keep-last): <stem>-step000250.safetensors."""
        return self.out.with_name(f"{self.out.stem}-step{step:06d}{self.out.suffix}")


def run_files(out: Path) -> RunFiles:
    endings = (".state.pt", ".loss.csv", ".loss.png", "_samples", ".lock")
    return RunFiles(out, *(out.with_name(f"{out.stem}{ending}") for ending in endings))


def take_lock(lock: Path, out: Path):
    """Creates `lock` holding this host and PID, or refuses: another run is writing `out`. A lock whose
    process is gone (same host) is taken over. Creating it also checks that --out's folder is writable."""
    here = socket.gethostname()
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            refuse_or_take_over(lock, out, here)
        except OSError as error:
            raise SystemExit(f"error: cannot write in {lock.parent} (the folder of --out {out}): "
                             f"{error.strerror}") from None
        else:
            with os.fdopen(fd, "w") as f:
                f.write(f"{here} {os.getpid()}\n")
            return


def refuse_or_take_over(lock: Path, out: Path, here: str):
    """An existing `lock`: refused while its process runs (or may run, on another host); removed if not."""
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


@contextlib.contextmanager
def holding_lock(files: RunFiles):
    """Inside the block rank 0, which alone writes the run's files, holds their lock; it is removed however
    the block ends."""
    if rank() == 0:
        files.out.parent.mkdir(parents=True, exist_ok=True)
        take_lock(files.lock, files.out)
    try:
        yield
    finally:
        if rank() == 0:
            files.lock.unlink(missing_ok=True)


def interrupt(signum, frame):
    """SIGTERM or SIGHUP before the training loop: stop like Ctrl-C (the loop itself stops between steps)."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def stopping_on_signals():
    """Inside the block SIGTERM and SIGHUP stop the run as Ctrl-C does; every stop signal's handler is
    restored after (StopSignals replaces them during the loop)."""
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


class StopSignals:
    """From its creation, the stop signals received during the training loop: the step under way finishes,
    then the run saves and stops."""

    def __init__(self):
        self.received = []
        for s in STOP_SIGNALS:
            signal.signal(s, self.note)

    def note(self, signum, frame):
        self.received.append(signum)

    def name(self) -> str:
        """The first signal received; SIGINT for a KeyboardInterrupt raised before the loop noted any."""
        return signal.Signals(self.received[0]).name if self.received else "SIGINT"
