"""A training run's saves: the LoRA file (PEFT/diffusers layout, with the run's metadata), the numbered copies
--keep-last keeps and the training state for --resume, all written or none (the state last: the commit
point); then the loss curve, whose failure is only a warning."""

import math
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from iclora.atomic_files import atomic_writes, write_or_warn
from iclora.conditional_metadata import conditional_metadata
from iclora.distributed import rank
from iclora.ema import EMA
from iclora.lora_files import save_lora
from iclora.loss_log import draw_loss
from iclora.options import input_files
from iclora.panels import grid_shape
from iclora.run import RunFiles, identities, input_at, numbered_step

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
STATE_KEYS = ("step", "lora", "optimizer", "args", "dataset")  # what every training state holds


def lora_metadata(args, caption: str, panels: int | None, size: tuple[int, int], ref_mode: str) -> dict:
    """The LoRA file's metadata: its settings, base variant (dev, fill or kontext: sample.py refuses the LoRA
    on another) and validation caption; with --ref-panel, the geometry sample.py reads (panels of the first
    set's `size` (H, W)), and the reference mode Fill trains in ("noised", as the canvas)."""
    metadata = {"rank": str(args.rank), "alpha": str(args.alpha), "base_model": str(args.model),
                "base_variant": args.variant, "caption_template": caption, "steps": str(args.steps)}
    if args.ref_panel:
        rows, cols = grid_shape(panels, args.layout)
        mode = "noised" if args.variant == "fill" else ref_mode
        metadata |= conditional_metadata(args.ref_panel, panels, args.layout, mode, size[0] // rows,
                                         size[1] // cols)
    return metadata


class Checkpoint:
    """Saves the adapters of `flow`, their `optimizer` and `ema` to the run's `files`, with what --resume
    checks: the options `args`, the dataset's `fingerprint` and the reference mode."""

    def __init__(self, files: RunFiles, args, fingerprint: dict, ref_mode: str, metadata: dict, flow,
                 optimizer: torch.optim.Optimizer, ema: EMA):
        self.files = files
        self.args = args
        self.fingerprint = fingerprint
        self.ref_mode = ref_mode
        self.metadata = metadata
        self.flow = flow
        self.optimizer = optimizer
        self.ema = ema
        self.inputs = identities(input_files(args))  # never written nor pruned, whatever their names

    def write_lora(self, step: int):
        """A writer of the LoRA file at `step` (the EMA's weights when on), for atomic_writes."""
        def write(tmp: Path):
            with self.ema.applied():
                save_lora(self.flow, tmp, metadata=self.metadata | {"step": str(step)},
                          dtype=SAVE_DTYPES[self.args.save_dtype])
        return write

    def save(self, step: int, losses: list[float], lrs: list[float]):
        """The LoRA (and its numbered copy), then the training state: all written to temporary files, then
        renamed in that order by rank 0, so that the state, renamed last, is the commit point: a crash before
        it leaves the previous state, whose LoRA --resume rewrites (match_state). Then the loss curve."""
        if rank() != 0:
            return
        files = self.files
        keep_last = self.args.keep_last
        adapters = {n: p.detach().cpu() for n, p in self.flow.named_parameters() if p.requires_grad}
        state = {"step": step, "lora": adapters, "optimizer": self.optimizer.state_dict(),
                 "args": {k: str(v) for k, v in vars(self.args).items()}, "dataset": self.fingerprint,
                 "ref_mode": self.ref_mode} | self.ema.state()
        writes = {files.out: self.write_lora(step)}
        numbered = files.numbered(step)
        if keep_last and input_at(numbered, self.inputs):
            print(f"note: {numbered} not written: it is {input_at(numbered, self.inputs)}", file=sys.stderr)
        elif keep_last:
            writes[numbered] = self.write_lora(step)
        writes[files.state] = lambda tmp: torch.save(state, tmp)  # last: the commit point
        if files.state.exists():
            earlier = "Both files still hold the previous save; free space and --resume"
        else:
            earlier = "Nothing was saved before (no state to resume): free space and start again"
        try:
            atomic_writes(writes)
        except Exception as error:  # disk full, permission lost: torch and safetensors raise their own types
            raise SystemExit(f"error: could not save step {step} to {files.out}, {files.state} ({error}): "
                             f"training stopped. {earlier}.") from None
        if keep_last:
            prune_numbered(files, step, keep_last, self.inputs)
        if losses:
            write_or_warn(files.curve, lambda tmp: draw_loss(losses, lrs, tmp), "the loss curve")

    def match_state(self, state: dict | None):
        """--resume: the LoRA file made to hold the state's step. A crash between a save's renames leaves it a
        save ahead of the state (or, on a first save, missing): it is rewritten from the state (with its EMA,
        as a save writes it), with a note."""
        if state is None or rank() != 0:
            return
        step = state["step"]
        out = self.files.out
        found = lora_step(out)
        if found == str(step):
            return
        try:
            atomic_writes({out: self.write_lora(step)})
        except Exception as error:  # as in save
            raise SystemExit(f"error: could not rewrite {out} from {self.files.state} ({error})") from None
        was = "was missing" if found is None else f"held step {found}"
        print(f"note: {out} {was} (a run stopped while saving); rewrote it from {self.files.state} at step "
              f"{step}", file=sys.stderr)


def lora_step(path: Path) -> str | None:
    """The step a LoRA file's metadata records; "?" where it records none or the file cannot be read, and
    None where there is no file at all."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("step", "?")
    except Exception:  # safetensors raises its own types for a truncated or foreign file: rewritten anyway
        return "?"


def prune_numbered(files: RunFiles, step: int, keep_last: int, inputs: dict):
    """This run's numbered copies of --out before the last `keep_last` up to `step` go, by step number; a file
    the run was given as input (`inputs`, run.identities) is never one of them."""
    copies = []
    for path in files.out.parent.iterdir():
        number = numbered_step(files, path)
        if number is not None and not input_at(path, inputs):
            copies.append((number, path))
    older = [(number, path) for number, path in sorted(copies) if number <= step][:-keep_last]
    for _, path in older:
        path.unlink()


def check_loss(loss: float, step: int, files: RunFiles):
    """Stops the run at a loss that is not finite, saying what is kept."""
    if math.isfinite(loss):
        return
    if files.state.exists():
        kept = f"The last good checkpoint ({files.state}, {files.out}) is intact"
    else:
        kept = "Nothing was saved (no --save-every step was reached)"
    raise SystemExit(f"error: loss is {loss} at step {step + 1}: training stopped. {kept}; try a lower --lr.")
