"""A training run's place on disk and its life: the files it writes next to --out (none of them one of its
inputs), the lock that keeps a second run off them, the temporary files a killed save left, the signals
that stop it (Ctrl-C, SIGTERM, SIGHUP: the steps done are saved), and the summary that ends it."""

import contextlib
import os
import re
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from iclora.distributed import rank
from iclora.panels import canvas_size, panel_size

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
    return RunFiles(out=out,
                    state=out.with_name(f"{out.stem}.state.pt"),
                    log=out.with_name(f"{out.stem}.loss.csv"),
                    curve=out.with_name(f"{out.stem}.loss.png"),
                    samples=out.with_name(f"{out.stem}_samples"),
                    lock=out.with_name(f"{out.stem}.lock"))


def numbered_step(files: RunFiles, path: Path) -> int | None:
    """The step of `path` if it is named as one of the run's numbered copies (files.numbered), else None."""
    pattern = re.escape(files.out.stem) + r"-step(\d+)" + re.escape(files.out.suffix)
    match = re.fullmatch(pattern, path.name)
    return int(match[1]) if match and path.parent.resolve() == files.out.parent.resolve() else None


def identities(inputs: list[tuple[str, Path]]) -> dict[tuple[int, int], str]:
    """Each existing input file's (device, inode), the identity os.path.samefile compares -> its description:
    a link or another spelling of a path is the same file."""
    found = {}
    for what, path in inputs:
        with contextlib.suppress(OSError):
            st = path.stat()
            found[(st.st_dev, st.st_ino)] = what
    return found


def input_at(path: Path, inputs: dict[tuple[int, int], str]) -> str | None:
    """The description of the input file that `path` is (identities' keys), or None."""
    try:
        st = path.stat()
    except OSError:  # not there (yet): not an input
        return None
    return inputs.get((st.st_dev, st.st_ino))


def check_outputs(files: RunFiles, inputs: list[tuple[str, Path]]):
    """A ValueError if the run would write or delete one of its `inputs` ((description, path), options.
    input_files): --out itself, its state, loss log and curve, lock and samples folder must be none of them.
    A numbered copy's name may be an input (an earlier run's --init-lora out-step000250.safetensors): that
    copy is neither written nor pruned (Checkpoint)."""
    known = identities(inputs)
    named = {"LoRA": files.out, "training state": files.state, "loss log": files.log,
             "loss curve": files.curve, "lock": files.lock}
    for what, path in named.items():
        found = input_at(path, known)
        if found and path == files.out:
            raise ValueError(f"--out {path} is {found}: the run would overwrite its input; choose another "
                             f"--out")
        if found:
            raise ValueError(f"--out {files.out} writes its {what} to {path}, which is {found}: the run "
                             f"would overwrite its input; choose another --out")
    samples = files.samples.resolve()
    for what, path in inputs:
        if path.resolve().is_relative_to(samples):
            raise ValueError(f"--out {files.out} writes its validation images into {files.samples}, which "
                             f"holds {what}; choose another --out")


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
    """An existing `lock`: refused while its process runs a training (or may, on another host); removed if its
    process is gone, or if its PID now belongs to another program (reused by the OS)."""
    host, _, pid = lock.read_text().strip().rpartition(" ")
    if host != here or not pid.isdigit():
        raise SystemExit(f"error: {lock} says a run on {host or '?'} (pid {pid or '?'}) is writing {out}. "
                         f"If it is not running, delete {lock}; or choose another --out.") from None
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        other_user = False
    except ProcessLookupError:
        print(f"note: taking over {lock}, left by pid {pid}, which is no longer running", file=sys.stderr)
        lock.unlink(missing_ok=True)
        return
    except PermissionError:  # it exists, owned by another user
        other_user = True
    if not is_a_training_run(int(pid)):
        shown = " ".join(command_line(int(pid)) or [])[:80]
        print(f"note: taking over {lock}, left by pid {pid}: that PID now runs another program ({shown!r}), "
              f"not train.py, so the run that left the lock is gone", file=sys.stderr)
        lock.unlink(missing_ok=True)
        return
    if other_user:
        raise SystemExit(f"error: another user's run (pid {pid}) is writing {out} (lock {lock})")
    raise SystemExit(f"error: another run (pid {pid}) is writing {out} (lock {lock}); wait for it, stop it, "
                     f"or choose another --out")


def command_line(pid: int) -> list[str] | None:
    """The command line of process `pid` where the OS shows it (Linux's /proc/<pid>/cmdline), else None."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [word.decode(errors="replace") for word in raw.split(b"\0") if word]


def is_a_training_run(pid: int) -> bool:
    """Whether process `pid` looks like a train.py run: its command line runs train.py (`python train.py`,
    torchrun's workers) or the module (`python -m train`). This process is one (it is running train); where
    the OS does not show command lines, any live process is taken for one, as before."""
    words = command_line(pid)
    if pid == os.getpid() or words is None:
        return True
    runs_module = any(a == "-m" and b == "train" for a, b in zip(words, words[1:], strict=False))
    return runs_module or any(Path(word).name == "train.py" for word in words)  # not test_train.py


def temporary_of(name: str) -> str | None:
    """The file name a temporary file's `name` stands for (atomic_files writes `.<name>.tmp`, and
    `..<name>.tmp.tmp` where a writer inside writes atomically too), or None for other names."""
    for depth in (2, 1):
        if name.startswith("." * depth) and name.endswith(".tmp" * depth) and len(name) > 5 * depth:
            return name[depth : -4 * depth]
    return None


def remove_stale_temporaries(files: RunFiles):
    """The temporary files of a save that a killed run left beside --out and in its samples folder (a kill
    skips their removal) are removed, each with a note. Called holding the lock: no live run writes them."""
    ours = {files.out.name, files.state.name, files.log.name, files.curve.name}
    stale = []
    for path in files.out.parent.iterdir():
        target = temporary_of(path.name)
        if target and (target in ours or numbered_step(files, files.out.with_name(target)) is not None):
            stale.append(path)
    if files.samples.is_dir():
        for path in files.samples.iterdir():
            if re.fullmatch(r"step\d+\.png", temporary_of(path.name) or ""):
                stale.append(path)
    for path in stale:
        if path.is_file():
            path.unlink()
            print(f"note: removed {path}, a temporary file left by a run stopped while saving",
                  file=sys.stderr)


@contextlib.contextmanager
def holding_lock(files: RunFiles):
    """Inside the block rank 0, which alone writes the run's files, holds their lock, which is removed
    however the block ends."""
    if rank() == 0:
        try:
            files.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a file where a folder should be; no permission
            raise SystemExit(f"error: cannot create {files.out.parent}, the folder of --out {files.out}: "
                             f"{error.strerror}") from None
        take_lock(files.lock, files.out)
        remove_stale_temporaries(files)
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



def finished(args, files: RunFiles, steps: int, losses: list[float], first_set, caption: str):
    """Rank 0's last words on a finished run: on stderr, the steps, the final loss, the time since the lock
    was taken (the run's start, before any weight loaded), the files written and the sample.py command that
    uses the LoRA; on stdout, last and alone, the LoRA's path, for scripts. `first_set`: the first set's
    largest sample (iclora.data.Sample), whose size and panels the command gives with `caption`."""
    if rank() != 0:
        return
    took = ""
    with contextlib.suppress(OSError):  # no lock: train() was called without main()
        took = f" in {duration(time.time() - files.lock.stat().st_mtime)}"
    last = losses[-100:]
    loss = "no loss logged"
    if last:
        loss = f"final loss {sum(last) / len(last):.4f} (the mean of the last {len(last)} steps)"
    lines = [f"finished: {steps} steps{took}, {loss}", "wrote:"]
    files_written = written(files)
    width = max((len(shown) for shown, _ in files_written), default=0)
    lines += [f"  {shown:<{width}}  {what}" for shown, what in files_written]
    lines += ["sample with it:", f"  {sample_command(args, first_set, caption)}"]
    if getattr(args, "variant", "dev") == "kontext":
        lines.append(f"  (IMAGE: the context, as panel {args.ref_panel[0]} of the training sets)")
    elif args.ref_panel:
        lines.append(f"  (IMAGE: the picture for panel {', '.join(map(str, args.ref_panel))}, as in the "
                     f"training sets; the LoRA sets the panels and their size)")
    print("\n".join(lines), file=sys.stderr)
    print(files.out)


def duration(seconds: float) -> str:
    """1h 02m 03s, 2m 31s or 12s."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def written(files: RunFiles) -> list[tuple[str, str]]:
    """(path, what it is) of each of the run's files that exists; the numbered copies on one line."""
    found = []
    named = ((files.out, "the LoRA"), (files.state, "the training state (--resume continues from it)"),
             (files.log, "the loss of every step"), (files.curve, "the loss curve"))
    for path, what in named:
        if path.exists():
            found.append((str(path), what))
    copies = sorted(p for p in files.out.parent.iterdir() if numbered_step(files, p) is not None)
    if copies:
        shown = str(copies[0]) if len(copies) == 1 else f"{copies[0]} ... {copies[-1].name}"
        found.insert(1, (shown, f"numbered copies of the LoRA (--keep-last): {len(copies)}"))
    if files.samples.is_dir():
        count = len(list(files.samples.iterdir()))
        found.append((f"{files.samples}{os.sep}", f"validation images: {count}"))
    return found


def sample_command(args, first_set, caption: str) -> str:
    """The sample.py command that draws `caption` with the run's LoRA: a conditional one (--ref-panel) takes
    its panels and size from the file and needs a --ref IMAGE for each reference panel (a Kontext one, the
    context as --image, and the size of the panels it draws); any other one is given the first set's panels,
    layout and size."""
    command = ["python", "sample.py", "--model", str(args.model)]
    if args.transformer:
        command += ["--transformer", str(args.transformer)]
    command += ["--lora", str(args.out)]
    if getattr(args, "variant", "dev") == "kontext":  # the context is --image; the other panels are drawn
        n = first_set.count
        height, width = canvas_size(n - 1, args.layout, *panel_size(n, args.layout, *first_set.bucket))
        command += ["--image", "IMAGE", "--context-size", "own"]  # the context at its size, as trained
        command += ["--width", str(width), "--height", str(height)]
    elif args.ref_panel:
        command += ["--ref", "IMAGE"] * len(args.ref_panel)
    else:
        if first_set.count and first_set.count > 1:
            command += ["--panels", str(first_set.count), "--layout", args.layout]
        height, width = first_set.bucket
        command += ["--width", str(width), "--height", str(height)]
    return shlex.join([*command, "--prompt", caption])
