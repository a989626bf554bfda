"""Benchmarks minflux against diffusers on identical random weights and inputs, side by side in one run.

    python bench.py --config mid                      # transformer forward, CPU, prints JSON
    python bench.py --config flux-dev --device cuda --dtype bf16 --what sample --steps 4
    python bench.py --config mid --what train         # LoRA training step vs diffusers + peft

Timings are medians over `--repeats` runs, ours and the reference interleaved so that both see the same
machine state. Without diffusers installed only our numbers are printed.
"""

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from functools import partial

import torch

from minflux.convert import transformer_from_diffusers
from minflux.model import CONFIGS, Flux, FluxParams, preset
from minflux.sampling import denoise, get_schedule, image_ids, text_ids

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="mid", choices=list(CONFIGS), help="transformer size (default: mid)")
    p.add_argument("--what", default="forward", choices=["forward", "sample", "train"],
                   help="forward: one transformer forward; sample: --steps Euler steps; train: one LoRA "
                        "training step (forward, backward, AdamW) against diffusers + peft "
                        "(default: forward)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank for --what train (default: 16)")
    p.add_argument("--checkpointing", action="store_true",
                   help="gradient checkpointing in both (--what train)")
    p.add_argument("--image-tokens", type=int, default=512, help="packed image tokens (default: 512)")
    p.add_argument("--text-tokens", type=int, default=64, help="T5 tokens (default: 64)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size (default: 1)")
    p.add_argument("--steps", type=int, default=4, help="Euler steps for --what sample (default: 4)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per implementation (default: 10)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="weights and inputs (default: fp32)")
    p.add_argument("--no-reference", action="store_true", help="time minflux only")
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return 1000 * (time.perf_counter() - start)


def build(args, device, dtype):
    """Ours and (if available) diffusers' transformer with the same weights."""
    p = preset(args.config)
    ref = None
    if not args.no_reference:
        try:
            from diffusers import FluxTransformer2DModel
        except ImportError:
            print("diffusers is not installed: timing minflux only")
        else:
            torch.set_default_dtype(dtype)  # built directly in the benchmark dtype (full size fp32: 48 GB)
            with torch.device(device):
                ref = FluxTransformer2DModel(
                    patch_size=1, in_channels=p.in_channels, num_layers=p.depth,
                    num_single_layers=p.depth_single_blocks,
                    attention_head_dim=p.hidden_size // p.num_heads, num_attention_heads=p.num_heads,
                    joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim,
                    guidance_embeds=p.guidance_embed, axes_dims_rope=p.axes_dim).eval()
            torch.set_default_dtype(torch.float32)
    with torch.device("meta"):
        ours = Flux(p)
    if ref is not None:
        ours.load_state_dict(transformer_from_diffusers(ref.state_dict()), assign=True)
    else:
        ours = ours.to_empty(device=device).to(dtype)
        for t in ours.parameters():
            torch.nn.init.normal_(t, std=0.02)
    return ours.eval(), ref


def add_lora(args, ours, ref):
    """The authors' target set on both: every linear of the double and single blocks, rank r, alpha r."""
    from iclora.lora import inject_lora, lora_parameters

    inject_lora(ours, rank=args.rank, alpha=args.rank)
    ours.gradient_checkpointing = args.checkpointing
    opt_ours = torch.optim.AdamW(lora_parameters(ours), lr=1e-4)
    opt_ref = None
    if ref is not None:
        from peft import LoraConfig

        names = set()
        for name, module in ref.named_modules():
            if isinstance(module, torch.nn.Linear) and "transformer_blocks" in name:
                names.add(name)
        ref.requires_grad_(False)
        ref.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights=True,
                                   target_modules=sorted(names)))
        if args.checkpointing:
            ref.enable_gradient_checkpointing()
        ref.train()
        opt_ref = torch.optim.AdamW([q for q in ref.parameters() if q.requires_grad], lr=1e-4)
    ours.train()
    return opt_ours, opt_ref


@dataclass
class Inputs:
    """One random batch, the same for both implementations."""

    img: torch.Tensor  # (B, Li, in_channels) packed image tokens
    txt: torch.Tensor  # (B, Lt, context_in_dim) T5 states
    y: torch.Tensor  # (B, vec_in_dim) CLIP pooled vector
    target: torch.Tensor  # (B, Li, out_channels) what the training step regresses to
    img_ids: torch.Tensor  # (B, Li, 3)
    txt_ids: torch.Tensor  # (B, Lt, 3)
    t: torch.Tensor  # (B,) timestep 0.7
    g: torch.Tensor  # (B,) guidance 3.5


def random_inputs(args, p: FluxParams, device: torch.device, dtype: torch.dtype) -> Inputs:
    """Random inputs, the --image-tokens tokens laid out on the most square grid of exactly that many."""
    B = args.batch_size
    Li = args.image_tokens
    Lt = args.text_tokens
    rows = max(r for r in range(1, int(Li ** 0.5) + 1) if Li % r == 0)
    width = 16 * (Li // rows)
    height = 16 * rows
    img = torch.randn(B, Li, p.in_channels, device=device, dtype=dtype)
    txt = torch.randn(B, Lt, p.context_in_dim, device=device, dtype=dtype)
    y = torch.randn(B, p.vec_in_dim, device=device, dtype=dtype)
    target = torch.randn(B, Li, p.out_channels, device=device, dtype=dtype)
    return Inputs(img=img, txt=txt, y=y, target=target, img_ids=image_ids(B, height, width).to(device),
                  txt_ids=text_ids(B, Lt).to(device), t=torch.full((B,), 0.7, device=device, dtype=dtype),
                  g=torch.full((B,), 3.5, device=device, dtype=dtype))


def train_step(model_fn, target: torch.Tensor, optimizer) -> torch.Tensor:
    """One step on a mean squared error against target."""
    loss = (model_fn().float() - target.float()).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def run_minflux(args, ours: Flux, x: Inputs, timesteps: list[float], optimizer):
    """The --what workload on our transformer."""
    def forward():
        return ours(x.img, x.img_ids, x.txt, x.txt_ids, x.t, x.y, x.g)
    if args.what == "forward":
        return forward()
    if args.what == "train":
        return train_step(forward, x.target, optimizer)
    return denoise(ours, x.img, x.img_ids, x.txt, x.txt_ids, x.y, timesteps, 3.5, progress=False)


def reference_forward(ref, x: Inputs, hidden: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """diffusers' transformer on the same inputs (its ids without the batch dimension)."""
    guidance = x.g if ref.config.guidance_embeds else None
    return ref(hidden_states=hidden, encoder_hidden_states=x.txt, pooled_projections=x.y, timestep=timestep,
               img_ids=x.img_ids[0], txt_ids=x.txt_ids[0], guidance=guidance).sample


def run_reference(args, ref, x: Inputs, timesteps: list[float], optimizer):
    """The --what workload on diffusers' transformer; sampling is the same Euler loop as denoise."""
    if args.what == "forward":
        return reference_forward(ref, x, x.img, x.t)
    if args.what == "train":
        return train_step(partial(reference_forward, ref, x, x.img, x.t), x.target, optimizer)
    hidden = x.img
    for t0, t1 in zip(timesteps[:-1], timesteps[1:], strict=True):
        t_now = torch.full((len(hidden),), t0, device=hidden.device, dtype=hidden.dtype)
        v = reference_forward(ref, x, hidden, t_now)
        hidden = (hidden.float() + (t1 - t0) * v.float()).to(hidden.dtype)
    return hidden


def time_runs(runs: dict, args, device: torch.device) -> tuple[dict[str, list[float]], float | None]:
    """Milliseconds of each run after one warm-up, interleaved so that all see the same machine state, and
    the largest difference between the two outputs (None when training or without a reference)."""
    grad = torch.enable_grad() if args.what == "train" else torch.inference_mode()
    max_abs_diff = None
    with grad:
        for fn in runs.values():  # warm-up
            fn()
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(timed_ms(fn, device))
        if "diffusers" in runs and args.what != "train":
            max_abs_diff = (runs["minflux"]().float() - runs["diffusers"]().float()).abs().max().item()
    return times, max_abs_diff


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    ours, ref = build(args, device, dtype)
    inputs = random_inputs(args, ours.params, device, dtype)
    timesteps = get_schedule(args.steps, args.image_tokens)
    opt_ours = None
    opt_ref = None
    if args.what == "train":
        opt_ours, opt_ref = add_lora(args, ours, ref)
    runs = {"minflux": partial(run_minflux, args, ours, inputs, timesteps, opt_ours)}
    if ref is not None:
        runs["diffusers"] = partial(run_reference, args, ref, inputs, timesteps, opt_ref)

    result = {"what": args.what, "config": args.config, "device": str(device), "dtype": args.dtype,
              "batch_size": args.batch_size, "image_tokens": args.image_tokens,
              "text_tokens": args.text_tokens, "threads": torch.get_num_threads(),
              "params": sum(q.numel() for q in ours.parameters())}
    if args.what == "train":
        result |= {"rank": args.rank, "checkpointing": args.checkpointing}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # from here on: the workload, with both models resident
    times, max_abs_diff = time_runs(runs, args, device)
    if max_abs_diff is not None:
        result["max_abs_diff"] = max_abs_diff
    ms = {name: statistics.median(t) for name, t in times.items()}
    result |= {f"{name}_ms": round(m, 2) for name, m in ms.items()}
    if ref is not None:
        result["ratio"] = round(ms["minflux"] / ms["diffusers"], 3)
    if device.type == "cuda":
        result["peak_memory_gb_both_models"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
