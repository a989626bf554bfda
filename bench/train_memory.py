"""Peak memory of one IC-LoRA training step at the paper's settings, without the GPU or the 24 GB of weights.

Runs one real training step (loss, backward, AdamW) of a FLUX-dev-width model with only a few blocks: bf16 base,
fp32 rank-16 LoRA on every block linear, gradient checkpointing per block. It measures the step's peak resident
memory over the model, LoRA and AdamW state resident before it (Linux: VmHWM, reset via /proc/self/clear_refs),
then adds the exact sizes the full 19 + 38 blocks would also hold: the whole bf16 base, every adapter's weights
and AdamW moments, and the missing blocks' LoRA gradients and checkpointed inputs. Not included: the CUDA context
and cuBLAS workspace (~0.5–1 GiB), allocator slack, train.py's VAE (0.16 GiB); `bench.py --what train` measures
on a GPU directly.

    python bench/train_memory.py                      # batch 4, 1024×1536 (a 3-panel film storyboard), 1+1 blocks
    python bench/train_memory.py --batch-size 1 --double 2 --single 2
"""

import argparse
import json
import re
import time
from dataclasses import replace

import torch

from iclora.lora import inject_lora, lora_parameters
from iclora.training import flow_matching_loss, step_generator
from minflux.model import Flux, preset

GIB = 2 ** 30


def memory_gib(field: str) -> float:
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024 / GIB


def build(double: int, single: int, rank: int):
    """A flux-dev-width model with `double` + `single` blocks: bf16 random weights, frozen, a LoRA on every block
    linear."""
    with torch.device("meta"):
        flux = Flux(replace(preset("flux-dev"), depth=double, depth_single_blocks=single))
    flux.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for t in flux.parameters():
            t.normal_(0, 0.02)
    inject_lora(flux, rank=rank, alpha=float(rank))  # also freezes every base parameter
    flux.gradient_checkpointing = True
    return flux


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=4, help="images per step (default: 4, the paper's)")
    ap.add_argument("--width", type=int, default=1024, help="joined image width in pixels (default: 1024)")
    ap.add_argument("--height", type=int, default=1536, help="joined image height in pixels (default: 1536)")
    ap.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (default: 512, FLUX.1-dev's)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16, the paper's)")
    ap.add_argument("--double", type=int, default=1, help="double-stream blocks actually run (default: 1)")
    ap.add_argument("--single", type=int, default=1, help="single-stream blocks actually run (default: 1)")
    args = ap.parse_args(argv)
    B, L = args.batch_size, args.text_tokens
    tokens = L + (args.height // 16) * (args.width // 16)

    flux = build(args.double, args.single, args.rank)
    params = lora_parameters(flux)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for q in params:  # a zero step creates AdamW's moments, resident between steps from the second step of a run on
        q.grad = torch.zeros_like(q)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    before = memory_gib("VmRSS")  # the step's batch counts in it: a real run moves each batch to the GPU
    x0 = torch.randn(B, 16, args.height // 8, args.width // 8)
    txt, vec = torch.randn(B, L, 4096), torch.randn(B, 768)
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    flow_matching_loss(flux, x0, txt, vec, step_generator(0, 0)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    step_peak = memory_gib("VmHWM") - before  # activations and the run blocks' LoRA gradients

    # the full model: exact sizes of what the few-block run did not hold
    p = preset("flux-dev")
    with torch.device("meta"):
        full = Flux(p)
    inject_lora(full, rank=args.rank, alpha=float(args.rank))
    lora_count, lora_run = sum(q.numel() for q in lora_parameters(full)), sum(q.numel() for q in params)
    base_gib = (sum(q.numel() for q in full.parameters()) - lora_count) * 2 / GIB                    # bf16
    adapters_gib = lora_count * 3 * 4 / GIB                    # fp32 weights and AdamW's two moments, all blocks
    gradients_gib = (lora_count - lora_run) * 4 / GIB          # fp32, the blocks that did not run
    missing_blocks = (p.depth - args.double) + (p.depth_single_blocks - args.single)
    checkpoints_gib = missing_blocks * B * tokens * p.hidden_size * 2 / GIB  # each block's bf16 input (B, L+N, C)
    result = dict(batch_size=B, width=args.width, height=args.height, tokens=tokens, rank=args.rank,
                  blocks_run=[args.double, args.single], step_seconds_cpu=seconds, measured_step_peak_gib=step_peak,
                  full_base_bf16_gib=base_gib, full_lora_params=lora_count, lora_params_run=lora_run,
                  adapters_and_adamw_gib=adapters_gib, other_blocks_lora_gradients_gib=gradients_gib,
                  other_blocks_checkpoints_gib=checkpoints_gib,
                  estimated_full_peak_gib=step_peak + base_gib + adapters_gib + gradients_gib + checkpoints_gib)
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}))
    return result


if __name__ == "__main__":
    main()
