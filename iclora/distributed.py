"""train.py on the processes `torchrun` starts: data parallel, and with `--fsdp` the frozen base sharded block
by block over the ranks (FSDP2). Each rank draws the values of the whole micro-batch and computes its `part`'s
share of the loss (iclora/training.py), so the gradients summed over the ranks are one process's. Only the
adapters communicate; they stay whole on every rank.

Without torchrun there is one rank, and nothing here communicates.
"""

import itertools
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard


def init_distributed(device: str) -> str:
    """This rank's device; under torchrun, joins the ranks first, once (gloo for CPU tensors and objects,
    NCCL for CUDA's)."""
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    if "LOCAL_RANK" in os.environ and torch.device(device).type == "cuda":
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def part(n: int) -> slice:
    """This rank's contiguous share of n items (shares differ by at most one; a rank may get none)."""
    return slice(rank() * n // world(), (rank() + 1) * n // world())


def gathered(items: list) -> list:
    """Every rank's `items` joined in rank order, on every rank (pickled, through gloo on the CPU)."""
    parts = [items] * world()
    if world() > 1:
        dist.all_gather_object(parts, items)
    return list(itertools.chain.from_iterable(parts))


def sum_gradients(params: list[torch.Tensor], loss: float) -> float:
    """Adds up the ranks' gradients of `params` (the adapters) and their `loss`, in one flat all-reduce."""
    if world() == 1:
        return loss
    flat = torch.cat([p.grad.flatten() for p in params] + [torch.tensor([loss], device=params[0].device)])
    dist.all_reduce(flat)
    parts = flat.split([p.numel() for p in params] + [1])  # the last: the loss
    for p, g in zip(params, parts, strict=False):
        p.grad = g.view_as(p)
    return flat[-1].item()


def shard(flow: torch.nn.Module) -> tuple[int, int]:
    """--fsdp: the frozen weights of each block, then the rest, split over the ranks; the adapters stay
    whole. The number of frozen weights this rank holds, and of all."""
    base = sum(p.numel() for p in flow.parameters() if not p.requires_grad)
    adapters = {p for p in flow.parameters() if p.requires_grad}
    for module in [*flow.double_blocks, *flow.single_blocks, flow]:
        fully_shard(module, ignored_params=adapters)
    held = sum(p.to_local().numel() for p in flow.parameters() if not p.requires_grad)
    return held, base


def read_on_rank0(read, *args):
    """read(*args) on rank 0 alone (only its machine holds --out's folder); every rank gets a copy."""
    return gathered([read(*args)] if rank() == 0 else [])[0]


def wait_for_rank0():
    """Under torchrun, the other ranks wait here until rank 0 has written its files."""
    if dist.is_initialized():
        dist.barrier()
