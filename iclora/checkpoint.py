"""A training run's saves: the LoRA file (PEFT/diffusers layout, with the run's metadata), the training state
for --resume, the numbered copies --keep-last keeps and the loss curve, all written or none."""

import math
import re
from pathlib import Path

import torch

from iclora.atomic_files import atomic_writes
from iclora.conditional_metadata import conditional_metadata
from iclora.distributed import rank
from iclora.ema import EMA
from iclora.lora_files import save_lora
from iclora.loss_log import draw_loss
from iclora.panels import grid_shape
from iclora.run import RunFiles

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
STATE_KEYS = ("step", "lora", "optimizer", "args", "dataset")  # what every training state holds


def lora_metadata(args, caption: str, panels: int | None, size: tuple[int, int], ref_mode: str) -> dict:
    """The LoRA file's metadata: its settings and validation caption; with --ref-panel, the geometry
    sample.py reads (panels of the first set's `size` (H, W))."""
    metadata = {"rank": str(args.rank), "alpha": str(args.alpha), "base_model": str(args.model),
                "caption_template": caption, "steps": str(args.steps)}
    if args.ref_panel:
        rows, cols = grid_shape(panels, args.layout)
        metadata |= conditional_metadata(args.ref_panel, panels, args.layout, ref_mode, size[0] // rows,
                                         size[1] // cols)
    return metadata


class Checkpoint:
    """Saves the adapters of `flow`, their `optimizer` and `ema` to the run's `files`, with what --resume
    checks: the options `args`, the dataset's `fingerprint` and the reference mode."""

    def __init__(self, files: RunFiles, args, fingerprint: dict, ref_mode: str, metadata: dict, flow,
                 optimizer: torch.optim.Optimizer, ema: EMA):
        self.files, self.args, self.fingerprint, self.ref_mode = files, args, fingerprint, ref_mode
        self.metadata, self.flow, self.optimizer, self.ema = metadata, flow, optimizer, ema

    def save(self, step: int, losses: list[float]):
        """The training state and the LoRA: both written to temporary files, then both renamed (by rank 0)."""
        if rank() != 0:
            return
        files, keep_last = self.files, self.args.keep_last
        adapters = {n: p.detach().cpu() for n, p in self.flow.named_parameters() if p.requires_grad}
        state = {"step": step, "lora": adapters, "optimizer": self.optimizer.state_dict(),
                 "args": {k: str(v) for k, v in vars(self.args).items()}, "dataset": self.fingerprint,
                 "ref_mode": self.ref_mode} | self.ema.state()

        def write_lora(tmp: Path):
            with self.ema.applied():
                save_lora(self.flow, tmp, metadata=self.metadata | {"step": str(step)},
                          dtype=SAVE_DTYPES[self.args.save_dtype])

        writes = {files.state: lambda tmp: torch.save(state, tmp), files.out: write_lora}
        if keep_last:
            writes[files.numbered(step)] = write_lora
        if losses:
            writes[files.curve] = lambda tmp: draw_loss(losses, tmp)
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
            prune_numbered(files.out, step, keep_last)


def prune_numbered(out: Path, step: int, keep_last: int):
    """This run's numbered copies of `out` before the last `keep_last` up to `step` go, by step number."""
    pattern = re.compile(re.escape(out.stem) + r"-step(\d+)" + re.escape(out.suffix))
    copies = []
    for path in out.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match:
            copies.append((int(match[1]), path))
    for _, old in [c for c in sorted(copies) if c[0] <= step][:-keep_last]:
        old.unlink()


def check_loss(loss: float, step: int, files: RunFiles):
    """Stops the run at a loss that is not finite, saying what is kept."""
    if math.isfinite(loss):
        return
    if files.state.exists():
        kept = f"The last good checkpoint ({files.state}, {files.out}) is intact"
    else:
        kept = "Nothing was saved (no --save-every step was reached)"
    raise SystemExit(f"error: loss is {loss} at step {step + 1}: training stopped. {kept}; try a lower --lr.")
