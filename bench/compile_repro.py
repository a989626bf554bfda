"""Narrows the compiled-training crash on a GPU: one LoRA training step (forward + backward, checkpointing),
eager then with `compile_blocks`, for each variant in a subprocess of its own (an illegal memory access
poisons the CUDA context, so one crash must not end the others). One line per variant: ok with the max |Δ|
of the LoRA gradients against eager, or crashed with the error's last line, or timed out.

    python bench/compile_repro.py                          # every variant, in order, within --budget
    python bench/compile_repro.py --variants full separate  # some of them
    python bench/compile_repro.py --config tiny --device cpu --size 32x64 --text-tokens 8 --batch-size 1 \
        --variants smallest separate                      # the CPU smoke test

Weights are random with `tame_`'s scaled init, which keeps FLUX.1-dev's 57-block loss finite in bf16.
"""

import argparse
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's minflux and iclora
from iclora.lora import inject_lora, lora_parameters  # noqa: E402 (after sys.path.insert)
from iclora.training import flow_matching_loss, step_generator  # noqa: E402 (after sys.path.insert)
from minflux.compile import compile_blocks  # noqa: E402 (after sys.path.insert)
from minflux.layers import RMSNorm  # noqa: E402 (after sys.path.insert)
from minflux.model import CONFIGS, Flux, preset  # noqa: E402 (after sys.path.insert)

# name: (double blocks, single blocks; None = the config's), compile_blocks' keywords, extra environment.
# First the smallest model (ran on the H200), then the full one (crashed there), then what might avoid it.
VARIANTS = {
    "smallest": ((1, 1), {}, {}),
    "full": ((None, None), {}, {}),
    "separate": ((None, None), dict(qk_norm="separate"), {}),
    "eager-norm": ((None, None), dict(qk_norm="eager"), {}),
    "no-persistent-reductions": ((None, None), dict(options={"triton.persistent_reductions": False}), {}),
    "no-split-reductions": ((None, None), dict(options={"split_reductions": False}), {}),
    "no-autotune": ((None, None), dict(options={"triton.autotune_pointwise": False}), {}),
    "max-autotune-no-cudagraphs": ((None, None), dict(mode="max-autotune-no-cudagraphs"), {}),
    "double-only": ((None, 0), {}, {}),
    "single-only": ((0, None), {}, {}),
    "full-launch-blocking": ((None, None), {}, {"CUDA_LAUNCH_BLOCKING": "1"}),
}


@torch.no_grad()
def tame_(flow: nn.Module, gate: float = 0.1) -> nn.Module:
    """A random init that keeps a deep bf16 forward finite (N(0, 0.02) everywhere gives NaN at 57 blocks):
    every Linear's weight N(0, 1/in_features), so a layer keeps its input's scale, biases zero, the adaLN
    modulations' weights `gate` times that, so each block adds a small residual; RMSNorm scales one."""
    for name, module in flow.named_modules():
        if isinstance(module, nn.Linear):
            small = name.endswith("mod.lin") or name.endswith("modulation.lin")
            module.weight.normal_(0.0, module.in_features ** -0.5 * (gate if small else 1.0))
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.scale.fill_(1.0)
    return flow


def tamed_flow(config: str, blocks: tuple, device: torch.device, dtype: torch.dtype, rank: int) -> Flux:
    """A random model of `config`'s width with `blocks` (double, single; None: the config's), built on the
    device in `dtype` without a float32 copy, tamed, with rank-`rank` LoRA adapters and checkpointing."""
    p = preset(config)
    double, single = blocks
    p = replace(p, depth=p.depth if double is None else double,
                depth_single_blocks=p.depth_single_blocks if single is None else single)
    with torch.device("meta"):
        flow = Flux(p).to(dtype)
    flow = tame_(flow.to_empty(device=device)).eval().requires_grad_(False)
    torch.manual_seed(0)
    inject_lora(flow, rank=rank, alpha=float(rank))
    flow.gradient_checkpointing = True
    return flow.train()


def batch(flow: Flux, size: tuple, batch_size: int, text_tokens: int, device) -> tuple:
    """A random training batch: latents (B, 16, H/8, W/8), T5 states, CLIP vectors, all float32."""
    H, W = size
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch_size, 16, H // 8, W // 8, generator=g).to(device)
    txt = torch.randn(batch_size, text_tokens, flow.params.context_in_dim, generator=g).to(device)
    vec = torch.randn(batch_size, flow.params.vec_in_dim, generator=g).to(device)
    return x0, txt, vec


def loss_and_gradients(flow: Flux, data: tuple, step: int) -> tuple[float, torch.Tensor]:
    """The loss of one forward + backward and the LoRA gradients it leaves (then cleared)."""
    params = lora_parameters(flow)
    loss = flow_matching_loss(flow, *data, step_generator(0, step), timestep_mode="sigmoid")
    loss.backward()
    grads = torch.cat([q.grad.float().flatten() for q in params])
    for q in params:
        q.grad = None
    return loss.item(), grads


def run_variant(name: str, args) -> str:
    """One variant in this process: the eager step, then the compiled one; the line to print."""
    blocks, kwargs, _ = VARIANTS[name]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    flow = tamed_flow(args.config, blocks, device, dtype, args.rank)
    data = batch(flow, args.size, args.batch_size, args.text_tokens, device)
    eager_loss, eager = loss_and_gradients(flow, data, 0)
    compile_blocks(flow, **kwargs)
    start = time.perf_counter()
    loss, grads = loss_and_gradients(flow, data, 0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    diff = (grads - eager).abs().max().item()
    scale = eager.abs().max().item()
    return (f"ok: loss eager {eager_loss:.6g} compiled {loss:.6g}; LoRA gradients max |Δ| {diff:.3g} "
            f"(max |eager| {scale:.3g}); compiled step {time.perf_counter() - start:.1f} s")


def parse_size(text: str) -> tuple[int, int]:
    """"WxH" -> (height, width)."""
    width, height = (int(v) for v in text.lower().split("x"))
    return height, width


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="which, in this order (default: all)")
    ap.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # one, in this process
    ap.add_argument("--config", default="flux-dev", choices=list(CONFIGS), help="width (default: flux-dev)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=parse_size, default=(1536, 1024), metavar="WxH",
                    help="training canvas (default: 1024x1536, the paper's)")
    ap.add_argument("--batch-size", type=int, default=4, help="(default: 4, the paper's)")
    ap.add_argument("--text-tokens", type=int, default=512, help="(default: 512)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per variant (default: 240)")
    ap.add_argument("--budget", type=float, default=600, help="start no variant after this many seconds")
    return ap.parse_args(argv)


def child_command(name: str, argv: list[str]) -> list[str]:
    """This script run again on one variant, with the other arguments as given."""
    rest = []
    skip = False
    for arg in argv:
        if arg == "--variants":
            skip = True
        elif arg.startswith("--"):
            skip = False
        if not skip:
            rest.append(arg)
    return [sys.executable, str(Path(__file__).resolve()), *rest, "--variant", name]


def main(argv=None) -> dict[str, str]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.variant:
        print(run_variant(args.variant, args), flush=True)
        return {}
    begin = time.perf_counter()
    lines = {}
    for name in args.variants:
        if time.perf_counter() - begin > args.budget:
            lines[name] = f"skipped: past --budget {args.budget:.0f} s"
        else:
            lines[name] = in_subprocess(name, child_command(name, argv), args.timeout)
        print(f"{name}: {lines[name]}", flush=True)
    return lines


def in_subprocess(name: str, command: list[str], timeout: float) -> str:
    """The variant's line: its own "ok ..." line, or how it failed."""
    env = os.environ | VARIANTS[name][2]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - start
    ok = [line for line in done.stdout.splitlines() if line.startswith("ok:")]
    if done.returncode == 0 and ok:
        return f"{ok[-1]} ({seconds:.0f} s in all)"
    errors = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
    last = errors[-1] if errors else (done.stderr.strip().splitlines() or ["no output"])[-1]
    return f"crashed (exit {done.returncode}, {seconds:.0f} s): {last[:300]}"


if __name__ == "__main__":
    main()
