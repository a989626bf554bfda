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

import torch

from minflux.convert import transformer_from_diffusers
from minflux.model import CONFIGS, Flux, preset
from minflux.sampling import denoise, get_schedule, image_ids, text_ids


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="mid", choices=list(CONFIGS), help="transformer size (default: mid)")
    p.add_argument("--what", default="forward", choices=["forward", "sample", "train"],
                   help="forward: one transformer forward; sample: --steps Euler steps; train: one LoRA training "
                        "step (forward, backward, AdamW) against diffusers + peft (default: forward)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank for --what train (default: 16)")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both (--what train)")
    p.add_argument("--image-tokens", type=int, default=512, help="packed image tokens (default: 512)")
    p.add_argument("--text-tokens", type=int, default=64, help="T5 tokens (default: 64)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size (default: 1)")
    p.add_argument("--steps", type=int, default=4, help="Euler steps for --what sample (default: 4)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per implementation (default: 10)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and inputs (default: fp32)")
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
            torch.set_default_dtype(dtype)  # build directly in the benchmark dtype: full size in fp32 is 48 GB
            with torch.device(device):
                ref = FluxTransformer2DModel(
                    patch_size=1, in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
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

        names = {n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks" in n}
        ref.requires_grad_(False)
        ref.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights=True,
                                   target_modules=sorted(names)))
        if args.checkpointing:
            ref.enable_gradient_checkpointing()
        ref.train()
        opt_ref = torch.optim.AdamW([q for q in ref.parameters() if q.requires_grad], lr=1e-4)
    ours.train()
    return opt_ours, opt_ref


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    ours, ref = build(args, device, dtype)
    p, B, Li, Lt = ours.params, args.batch_size, args.image_tokens, args.text_tokens
    rows = max(r for r in range(1, int(Li ** 0.5) + 1) if Li % r == 0)  # the most square grid of exactly Li tokens
    width, height = 16 * (Li // rows), 16 * rows
    img = torch.randn(B, Li, p.in_channels, device=device, dtype=dtype)
    txt = torch.randn(B, Lt, p.context_in_dim, device=device, dtype=dtype)
    y = torch.randn(B, p.vec_in_dim, device=device, dtype=dtype)
    target = torch.randn(B, Li, p.out_channels, device=device, dtype=dtype)
    img_ids, txt_ids = image_ids(B, height, width).to(device), text_ids(B, Lt).to(device)
    t, g = torch.full((B,), 0.7, device=device, dtype=dtype), torch.full((B,), 3.5, device=device, dtype=dtype)
    timesteps = get_schedule(args.steps, Li)
    if args.what == "train":
        opt_ours, opt_ref = add_lora(args, ours, ref)

    def reference_model(x, timestep):
        return ref(hidden_states=x, encoder_hidden_states=txt, pooled_projections=y, timestep=timestep,
                   img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=g if p.guidance_embed else None).sample

    def train_step(model_fn, optimizer):
        loss = (model_fn().float() - target.float()).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def run_ours():
        if args.what == "forward":
            return ours(img, img_ids, txt, txt_ids, t, y, g)
        if args.what == "train":
            return train_step(lambda: ours(img, img_ids, txt, txt_ids, t, y, g), opt_ours)
        return denoise(ours, img, img_ids, txt, txt_ids, y, timesteps, 3.5, progress=False)

    def run_ref():
        if args.what == "forward":
            return reference_model(img, t)
        if args.what == "train":
            return train_step(lambda: reference_model(img, t), opt_ref)
        x = img
        for t0, t1 in zip(timesteps[:-1], timesteps[1:]):
            v = reference_model(x, torch.full((B,), t0, device=device, dtype=dtype))
            x = (x.float() + (t1 - t0) * v.float()).to(dtype)
        return x

    result = {"what": args.what, "config": args.config, "device": str(device), "dtype": args.dtype, "batch_size": B,
              "image_tokens": Li, "text_tokens": Lt, "threads": torch.get_num_threads(),
              "params": sum(q.numel() for q in ours.parameters())}
    if args.what == "train":
        result |= {"rank": args.rank, "checkpointing": args.checkpointing}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # from here on: the workload, with both models resident
    runs = {"minflux": run_ours}
    if ref is not None:
        runs["diffusers"] = run_ref
    grad = torch.enable_grad() if args.what == "train" else torch.inference_mode()
    with grad:
        for fn in runs.values():  # warm-up
            fn()
        times = {name: [] for name in runs}
        for _ in range(args.repeats):  # interleaved, so all see the same machine state
            for name, fn in runs.items():
                times[name].append(timed_ms(fn, device))
        if ref is not None and args.what != "train":
            result["max_abs_diff"] = (run_ours().float() - run_ref().float()).abs().max().item()
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
