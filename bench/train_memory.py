"""GPU memory of IC-LoRA training and of FLUX.1-dev sampling, estimated without a GPU or the 24 GB of weights.

Runs the real computation on the CPU with a FLUX-dev-width model of a few blocks (random bf16 weights, fp8
with --quantize), measures its peak resident memory over what was resident before (Linux: VmHWM, reset
through /proc/self/clear_refs), and adds the exact sizes of what the full 19 + 38 blocks also hold on the GPU.
`--what train`: one optimizer step of --grad-accum micro-batches (fp32 LoRA on every block linear,
checkpointing, AdamW). `--what sample`: the peak of sample.py's three phases (T5 + CLIP encode, then they
leave; a denoising step; the VAE decode with the transformer still there). With --blocks-to-swap K the last K
blocks' frozen weights live in pinned host RAM, two of them on the GPU at a time. Not included: the CUDA
context, the cuBLAS workspace and allocator slack. Results: bench/RESULTS.md.

    python bench/train_memory.py --batch-size 1 --grad-accum 4 --quantize fp8   # the paper's 1024×1536 recipe
    python bench/train_memory.py --what sample --height 1024 --width 1024 --quantize fp8
"""

import argparse
import json
import re
import time
from dataclasses import replace

import torch
from torch import nn

from iclora.lora import inject_lora, lora_parameters
from iclora.training import flow_matching_loss, step_generator
from minflux.autoencoder import AutoEncoder, AutoEncoderParams
from minflux.clip import CLIPConfig, CLIPTextModel
from minflux.model import Flux, preset
from minflux.quantize import block_linears, quantize_fp8
from minflux.sampling import image_ids, text_ids
from minflux.t5 import T5Config, T5Encoder

GIB = 2 ** 30


def memory_gib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in GiB."""
    with open("/proc/self/status") as status:
        kilobytes = int(re.search(field + r":\s+(\d+) kB", status.read()).group(1))
    return kilobytes * 1024 / GIB


def reset_peak() -> float:
    """VmHWM := VmRSS; returns VmRSS, the baseline of the next measurement."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return memory_gib("VmRSS")


def stored_bytes(model: nn.Module, quantize: str | None, scales: bool = True, prefix: str = "") -> int:
    """Exact bytes of the model's weights whose names start with `prefix` (all by default) as a run stores
    them: bf16, or with fp8 the weight of each Linear that `quantize_fp8` quantizes in one byte plus
    (`scales`) one float32 scale per output row, which stays on the GPU when its block is swapped out."""
    fp8 = {f"{n}.weight" for n in block_linears(model)} if quantize else set()
    total = 0
    for name, p in model.named_parameters():
        if not name.startswith(prefix):
            continue
        if name in fp8:
            total += p.numel() + (4 * p.shape[0] if scales else 0)
        else:
            total += 2 * p.numel()
    return total


def flow_on_gpu(full: Flux, quantize: str | None, swap: int) -> dict:
    """The full transformer's weights on the GPU and in pinned host RAM when the last `swap` blocks are
    swapped: at most two of those (the one running and the next, copied meanwhile) are on the GPU at once."""
    blocks = [f"double_blocks.{i}." for i in range(len(full.double_blocks))]
    blocks += [f"single_blocks.{i}." for i in range(len(full.single_blocks))]
    swapped = []  # bytes of each swapped block, in running order
    if swap:
        swapped = [stored_bytes(full, quantize, False, block) for block in blocks[len(blocks) - swap:]]
    pairs = [a + b for a, b in zip(swapped, swapped[1:], strict=False)]  # each swapped block and the next
    resident = max(pairs, default=sum(swapped))
    base = stored_bytes(full, quantize)
    return dict(base_weights_gib=base / GIB, swapped_out_gib=sum(swapped) / GIB,
                swap_buffers_gib=resident / GIB, host_swap_gib=sum(swapped) / GIB,
                flow_on_gpu_gib=(base - sum(swapped) + resident) / GIB)


def build(double: int, single: int, quantize: str | None) -> Flux:
    """Frozen flux-dev-width blocks (`double` + `single`) with random bf16 weights, fp8 with `quantize`."""
    with torch.device("meta"):
        flux = Flux(replace(preset("flux-dev"), depth=double, depth_single_blocks=single))
    flux.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for t in flux.parameters():
            t.normal_(0, 0.02)
    flux.requires_grad_(False)
    return quantize_fp8(flux) if quantize else flux


def full_model() -> Flux:
    with torch.device("meta"):
        return Flux(preset("flux-dev"))


def train_step(args) -> dict:
    B = args.batch_size
    L = args.text_tokens
    p = preset("flux-dev")
    tokens = L + (args.height // 16) * (args.width // 16)
    flux = build(args.double, args.single, args.quantize)
    inject_lora(flux, rank=args.rank, alpha=float(args.rank))
    flux.gradient_checkpointing = True
    params = lora_parameters(flux)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    # A zero step creates AdamW's moments, which stay resident between steps from a run's second step on.
    for q in params:
        q.grad = torch.zeros_like(q)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    batches = []  # they count in the baseline: a real run moves each batch over
    for _ in range(args.grad_accum):
        x0 = torch.randn(B, 16, args.height // 8, args.width // 8)
        batches.append((x0, torch.randn(B, L, 4096), torch.randn(B, 768)))
    before = reset_peak()
    start = time.perf_counter()
    for x0, txt, vec in batches:
        (flow_matching_loss(flux, x0, txt, vec, step_generator(0, 0)) / args.grad_accum).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    step_peak = memory_gib("VmHWM") - before

    # the full model: exact sizes of what the few-block run did not hold
    full = full_model()
    flow = flow_on_gpu(full, args.quantize, args.blocks_to_swap)
    inject_lora(full, rank=args.rank, alpha=float(args.rank))
    lora_count = sum(q.numel() for q in lora_parameters(full))
    lora_run = sum(q.numel() for q in params)
    missing_blocks = (p.depth - args.double) + (p.depth_single_blocks - args.single)
    parts = dict(measured_step_peak_gib=step_peak, flow_on_gpu_gib=flow["flow_on_gpu_gib"],
                 # fp32 weights and AdamW's two moments
                 adapters_and_adamw_gib=lora_count * 3 * 4 / GIB,
                 # fp32 gradients of the blocks that did not run
                 other_blocks_lora_gradients_gib=(lora_count - lora_run) * 4 / GIB,
                 # their checkpointed bf16 inputs
                 other_blocks_checkpoints_gib=missing_blocks * B * tokens * p.hidden_size * 2 / GIB)
    return dict(tokens=tokens, blocks_run=[args.double, args.single], step_seconds_cpu=seconds,
                full_lora_params=lora_count, lora_params_run=lora_run, **(flow | parts),
                estimated_full_peak_gib=sum(parts.values()))


@torch.no_grad()
def sample_step(args) -> dict:
    L = args.text_tokens
    H = args.height
    W = args.width
    tokens = L + (H // 16) * (W // 16)
    # The VAE runs in bf16 with --quantize (on a GPU all that is not fp8 is bf16), else in its stored fp32.
    vae_dtype = torch.bfloat16 if args.quantize else torch.float32
    vae_bytes = 2 if args.quantize else 4
    flux = build(args.double, args.single, args.quantize)
    x = torch.randn(1, tokens - L, 64, dtype=torch.bfloat16)
    txt = torch.randn(1, L, 4096, dtype=torch.bfloat16)
    before = reset_peak()
    flux(x, image_ids(1, H, W), txt, text_ids(1, L), torch.ones(1, dtype=torch.bfloat16),
         torch.randn(1, 768, dtype=torch.bfloat16), guidance=torch.full((1,), 3.5, dtype=torch.bfloat16))
    forward_peak = memory_gib("VmHWM") - before
    del flux

    with torch.device("meta"):
        ae = AutoEncoder(AutoEncoderParams())
        t5 = T5Encoder(T5Config())
        clip = CLIPTextModel(CLIPConfig())
    ae.to_empty(device="cpu").to(vae_dtype)
    for t in ae.parameters():
        t.normal_(0, 0.02)
    z = torch.randn(1, 16, H // 8, W // 8, dtype=vae_dtype)
    before = reset_peak()
    ae.decode(z)
    decode_peak = memory_gib("VmHWM") - before

    flow = flow_on_gpu(full_model(), args.quantize, args.blocks_to_swap)
    ae_gib = sum(t.numel() for t in ae.parameters()) * vae_bytes / GIB
    phases = dict(encode_phase_gib=(stored_bytes(t5, args.quantize) + stored_bytes(clip, None)) / GIB,
                  denoise_phase_gib=flow["flow_on_gpu_gib"] + forward_peak,
                  decode_phase_gib=flow["flow_on_gpu_gib"] + ae_gib + decode_peak)
    return dict(tokens=tokens, blocks_run=[args.double, args.single], **flow,
                measured_forward_peak_gib=forward_peak, measured_decode_peak_gib=decode_peak, **phases,
                estimated_full_peak_gib=max(phases.values()))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", default="train", choices=["train", "sample"],
                    help="a training step (default) or sampling (encode, one denoising step, decode)")
    ap.add_argument("--quantize", choices=["fp8"],
                    help="frozen transformer (and T5) Linear weights in fp8, as train.py/sample.py "
                         "--quantize fp8 (default: bf16)")
    ap.add_argument("--blocks-to-swap", type=int, default=0,
                    help="K: the last K of the 57 blocks live in host RAM, as --blocks-to-swap K "
                         "(default: 0)")
    ap.add_argument("--batch-size", type=int, default=4, help="images per micro-batch (training; default: 4)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    ap.add_argument("--width", type=int, default=1024, help="joined image width in pixels (default: 1024)")
    ap.add_argument("--height", type=int, default=1536,
                    help="joined image height in pixels (default: 1536, a 3-panel film storyboard)")
    ap.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (default: 512, FLUX.1-dev's)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16, the paper's)")
    ap.add_argument("--double", type=int, default=1, help="double-stream blocks actually run (default: 1)")
    ap.add_argument("--single", type=int, default=1, help="single-stream blocks actually run (default: 1)")
    args = ap.parse_args(argv)
    if not 0 <= args.blocks_to_swap <= 57:
        ap.error(f"--blocks-to-swap {args.blocks_to_swap}: FLUX.1 has 19 + 38 = 57 blocks")
    settings = dict(what=args.what, quantize=args.quantize, blocks_to_swap=args.blocks_to_swap,
                    width=args.width, height=args.height)
    if args.what == "train":
        settings |= dict(batch_size=args.batch_size, grad_accum=args.grad_accum, rank=args.rank)
    result = settings | (train_step(args) if args.what == "train" else sample_step(args))
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}))
    return result


if __name__ == "__main__":
    main()
