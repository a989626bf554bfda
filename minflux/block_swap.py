"""Block swap: the last K transformer blocks keep their frozen weights in CPU memory and visit the device only
while they run, so the device holds K blocks' weights less (kohya's `--blocks_to_swap`; our K counts blocks).

A forward pre-hook on a swapped block puts device copies of its weights into the block as NEW Parameter
objects (autograd keeps the copies it saved until the block's backward is done), and a forward hook puts back
empty placeholders. On CUDA the homes are pinned and a side stream copies the next block while the current one
computes (the previous one while gradient checkpointing recomputes the blocks in reverse during backward). On
a CPU the same path copies each home into a fresh tensor. Trainable parameters (LoRA adapters) and buffers are
never swapped.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Slot:
    """One swapped parameter: where it sits (module, attribute), its value's CPU home, and the idle
    placeholder: 0 elements on the device, so `flow.to(...)` moves only the placeholder, never the home."""
    module: nn.Module
    name: str
    home: Tensor
    placeholder: nn.Parameter


class BlockSwap:
    """Installs itself on `flow` (best while the flow is still on the CPU, and after every LoRA merge or
    removal: it holds on to the modules as they are): the last `count` of its 19 + 38 blocks, single-stream
    blocks first, are swapped; copies go to `device` (or wherever `flow.to` later sends the placeholders). Two
    swapped blocks are on the device at a time, the running one and the prefetched one (three for a moment
    when a checkpointed recomputation stopped early and the next load copies without a prefetch)."""

    def __init__(self, flow: nn.Module, count: int, device: str | torch.device):
        blocks = [*flow.double_blocks, *flow.single_blocks]
        if not 0 <= count <= len(blocks):
            double, single = len(flow.double_blocks), len(flow.single_blocks)
            raise ValueError(f"blocks to swap must be between 0 and {len(blocks)} "
                             f"(the model's {double} double + {single} single blocks), not {count}")
        device = torch.device(device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and count else None
        self.blocks = blocks[len(blocks) - count :]
        self.slots: list[list[Slot]] = []
        for i, block in enumerate(self.blocks):
            self.slots.append(self.swap_out(block, device))
            block.register_forward_pre_hook(lambda module, args, i=i: self.load(i))
            block.register_forward_hook(lambda module, args, out, i=i: self.release(i))
        self.loaded: set[int] = set()  # blocks whose slots hold their copies
        self.prefetched: tuple[int, list[Tensor], torch.cuda.Event | None] | None = None
        self.last = -1  # the block run last
        self.direction = 1  # which way the run goes: 1 forward, -1 backward

    @staticmethod
    def swap_out(block: nn.Module, device: torch.device) -> list[Slot]:
        """Moves the block's frozen parameters to their CPU homes (pinned when CUDA is there) and leaves an
        empty placeholder on `device` in their place."""
        slots = []
        for module in block.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.requires_grad:
                    continue
                home = p.detach().cpu()
                if torch.cuda.is_available():
                    home = home.pin_memory()
                placeholder = nn.Parameter(torch.empty(0, dtype=p.dtype, device=device), requires_grad=False)
                slots.append(Slot(module, name, home, placeholder))
                setattr(module, name, placeholder)
        return slots

    def copy(self, i: int) -> tuple[list[Tensor], torch.cuda.Event | None]:
        """Fresh copies of block i's weights where its placeholders are; on CUDA, made on the side stream,
        with the event that marks them ready."""
        slots = self.slots[i]
        side = self.stream if slots and slots[0].placeholder.is_cuda else None
        with torch.cuda.stream(side) if side else nullcontext():
            copies = [s.home.to(s.placeholder.device, s.placeholder.dtype, non_blocking=True, copy=True)
                      for s in slots]
            return copies, side.record_event() if side else None

    def load(self, i: int):
        """Before block i runs: its copies go into its slots, any other loaded block is let go (a checkpointed
        recomputation may stop before the forward hook, which leaves the block loaded until the next load),
        and the next block in the run's direction is fetched."""
        if self.prefetched and self.prefetched[0] == i:
            _, copies, ready = self.prefetched
            self.prefetched = None
        else:
            copies, ready = self.copy(i)
        if ready is not None:
            compute = torch.cuda.current_stream(copies[0].device)
            compute.wait_event(ready)
            for c in copies:  # allocated on the side stream, used on this one: not reused before it is done
                c.record_stream(compute)
        for s, c in zip(self.slots[i], copies, strict=True):
            setattr(s.module, s.name, nn.Parameter(c, requires_grad=False))
        for j in self.loaded - {i}:
            self.release(j)
        self.loaded.add(i)
        if not torch.is_grad_enabled():  # sampling: always forward, and the next pass starts again at block 0
            self.direction = 1
        elif self.last == i:
            # the same block twice: the run turned (forward to backward's recomputation, or back)
            self.direction = -self.direction
        else:  # backward's recomputation runs the blocks in reverse; anything else starts a new pass
            self.direction = -1 if self.last == i + 1 else 1
        self.last = i
        following = i + self.direction
        if not torch.is_grad_enabled() and following == len(self.blocks) and i:
            following = 0
        if self.prefetched and self.prefetched[0] != following:
            self.prefetched = None
        if 0 <= following < len(self.blocks) and not self.prefetched:
            self.prefetched = (following, *self.copy(following))

    def release(self, i: int):
        """After block i ran, its placeholders go back: its copies live on only while autograd needs them."""
        for s in self.slots[i]:
            setattr(s.module, s.name, s.placeholder)
        self.loaded.discard(i)
