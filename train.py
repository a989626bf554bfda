"""Train an In-Context LoRA for FLUX.1-dev on a folder of panel sets (arXiv 2410.23775).

    python train.py --data sets/home_decor                       # the paper's settings, writes out.safetensors
    python train.py --data sets/home_decor --config my_run.json  # values from a JSON file, flags override them

Reads top to bottom: arguments -> data -> model -> cache latents and captions -> LoRA -> training loop -> save.
Writes next to --out: the LoRA (PEFT/diffusers layout, loads in diffusers and ComfyUI), `<stem>.state.pt`
(LoRA + optimizer + step, for --resume), `<stem>.loss.csv` and `<stem>_samples/` (validation images).
"""

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from iclora.data import PanelSetDataset, batches_by_bucket
from iclora.lora import inject_lora, lora_parameters
from iclora.lora_files import save_lora
from iclora.training import (Example, atomic_save, cache_examples, collate, flow_matching_loss, is_finite, lr_at,
                             step_generator)
from minflux.hub import USER_ERRORS, check_device
from minflux.pipeline import load_pipeline, to_pil


# Defaults left open on the command line: the paper's for FLUX.1-dev; for --model toy, a run of a few CPU minutes.
DEFAULTS = {"steps": 5000, "lr": 1e-4, "resolution": 1024, "save_every": 250, "sample_every": 250,
            "no_checkpointing": False}
TOY_DEFAULTS = {"steps": 1000, "lr": 1e-3, "resolution": 96, "save_every": 250, "sample_every": 250,
                "no_checkpointing": True}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="JSON file of option values (keys as the flags, with _); "
                                               "flags given on the command line override it")
    p.add_argument("--data", type=Path, help="dataset folder: joined images with same-named .txt captions, or one "
                                             "sub-folder of panels + caption.txt per set (see README)")
    p.add_argument("--layout", default="row", choices=["row", "column", "grid"],
                   help="how panels in sub-folders are joined (default: row)")
    p.add_argument("--model", default="black-forest-labs/FLUX.1-dev",
                   help="HF repo id or local folder in the HF repo layout, or `toy` for the 12 MB toy FLUX in "
                        "toy/model, which also changes the defaults marked 'toy' (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("out.safetensors"), help="LoRA file (default: out.safetensors)")
    p.add_argument("--steps", type=int,
                   help=f"optimizer steps (default: 5000, the paper's; toy: {TOY_DEFAULTS['steps']})")
    p.add_argument("--batch-size", type=int, default=4, help="examples per step (default: 4, the paper's)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16, the paper's)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha/rank "
                                                             "(default: 16)")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate (default: 1e-4; toy: {TOY_DEFAULTS['lr']})")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default: 100)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (default: 1.0)")
    p.add_argument("--resolution", type=int,
                   help="target area as the side of a square: images go to aspect buckets of about this many "
                        "pixels squared, sides multiples of 16 (default: 1024; toy: "
                        f"{TOY_DEFAULTS['resolution']}, which keeps the 128x64 toy sets at their size)")
    p.add_argument("--caption-dropout", type=float, default=0.05, help="probability a caption is replaced by the "
                                                                       "empty one (default: 0.05)")
    p.add_argument("--guidance", type=float, default=1.0, help="distilled-guidance input during training "
                                                               "(default: 1.0)")
    p.add_argument("--timestep-sampling", default="logit_normal", choices=["logit_normal", "uniform"],
                   help="how t is drawn before FLUX's resolution shift (default: logit_normal)")
    p.add_argument("--no-checkpointing", action="store_true", default=None,
                   help="disable gradient checkpointing (faster, much more memory; toy: off by default, it is tiny)")
    p.add_argument("--save-every", type=int, help="write LoRA + training state every N steps (default: 250; toy: "
                                                  f"{TOY_DEFAULTS['save_every']})")
    p.add_argument("--sample-every", type=int, help="validation images every N steps; 0 = never (default: 250; "
                                                    f"toy: {TOY_DEFAULTS['sample_every']})")
    p.add_argument("--val-prompt", action="append", default=[], help="validation prompt (repeatable; default: the "
                                                                     "first training caption)")
    p.add_argument("--sample-steps", type=int, default=20, help="steps for validation images (default: 20)")
    p.add_argument("--seed", type=int, default=42, help="seed for data order, noise, t and dropout (default: 42)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                   help="base-model dtype (default: bf16 on GPU, the stored dtype on CPU); LoRA and optimizer "
                        "are fp32")
    p.add_argument("--resume", action="store_true", help="continue from <out stem>.state.pt, bit-for-bit")
    args = p.parse_args(argv)
    if args.config:
        config = json.loads(args.config.read_text())
        if unknown := set(config) - set(vars(args)):
            p.error(f"{args.config}: unknown options {', '.join(sorted(unknown))}")
        p.set_defaults(**{k: Path(v) if k in ("data", "out") else v for k, v in config.items()})
        args = p.parse_args(argv)
    for k, v in (TOY_DEFAULTS if args.model == "toy" else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.data is None:
        p.error("--data is required (or set \"data\" in the --config file)")
    for flag in ("steps", "batch_size", "grad_accum", "rank", "save_every", "sample_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.sample_every < 0 or args.warmup < 0 or not 0 <= args.caption_dropout <= 1 or args.lr <= 0:
        p.error("--sample-every and --warmup must be >= 0, --caption-dropout in [0, 1], --lr > 0")
    return args


# options that change what a step computes: a resumed run must use the same values to continue bit-for-bit
RESUME_MUST_MATCH = ("data", "layout", "model", "batch_size", "grad_accum", "rank", "alpha", "lr", "warmup",
                     "grad_clip", "resolution", "caption_dropout", "guidance", "timestep_sampling", "seed", "dtype")


def main(argv=None) -> Path:
    args = parse_args(argv)
    out = args.out
    state_path, log_path = out.with_name(f"{out.stem}.state.pt"), out.with_name(f"{out.stem}.loss.csv")
    samples_dir = out.with_name(f"{out.stem}_samples")
    out.parent.mkdir(parents=True, exist_ok=True)

    check_device(args.device)
    # 1. Data: every image and caption is checked now, not at step 3,000.
    dataset = PanelSetDataset(args.data, resolution=args.resolution, layout=args.layout)
    print(f"{len(dataset)} training sets from {args.data}", file=sys.stderr)

    # 2. Model, then 3. encode everything once; the text encoders leave the device.
    dtype = args.dtype or ("bf16" if torch.device(args.device).type == "cuda" else None)
    pipe = load_pipeline(str(args.model), args.device, dtype)
    examples = cache_examples(pipe, dataset)
    empty = Example(None, *(x[0].cpu() for x in pipe.encode_prompts([""])))
    val_prompts = args.val_prompt or [dataset[0]["caption"]]
    val_txt, val_vec = pipe.encode_prompts(val_prompts)
    pipe.t5.to("cpu"), pipe.clip.to("cpu")
    flow = pipe.flow

    # 4. LoRA on the frozen base; only the adapters train (in fp32).
    inject_lora(flow, rank=args.rank, alpha=args.alpha, seed=args.seed)
    params = lora_parameters(flow)
    flow.gradient_checkpointing = not args.no_checkpointing
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    named = {n: p for n, p in flow.named_parameters() if p.requires_grad}
    start = 0
    if args.resume:
        if not state_path.exists():
            raise SystemExit(f"error: --resume: no training state at {state_path}")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        saved = state["args"]
        if changed := [k for k in RESUME_MUST_MATCH if saved.get(k) != str(getattr(args, k))]:
            raise SystemExit("error: --resume with different settings than the saved run: " + ", ".join(
                f"--{k.replace('_', '-')} {saved.get(k)} -> {getattr(args, k)}" for k in changed))
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state["lora"][n])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        print(f"resumed from {state_path} at step {start}", file=sys.stderr)
    metadata = {"rank": str(args.rank), "alpha": str(args.alpha), "base_model": str(args.model),
                "caption_template": val_prompts[0], "steps": str(args.steps)}

    def save(step: int):
        atomic_save({"step": step, "lora": {n: p.detach().cpu() for n, p in named.items()},
                     "optimizer": optimizer.state_dict(), "args": {k: str(v) for k, v in vars(args).items()}},
                    state_path)
        save_lora(flow, out, metadata=metadata | {"step": str(step)})

    def sample_images(step: int):
        flow.eval()
        W, H = 8 * examples[0].latents.shape[-1], 8 * examples[0].latents.shape[-2]
        for i in range(len(val_prompts)):
            latents = pipe.sample(val_txt[i : i + 1], val_vec[i : i + 1], W, H, args.sample_steps, 3.5, seed=42,
                                  progress=False)
            samples_dir.mkdir(exist_ok=True)
            to_pil(pipe.decode(latents))[0].save(samples_dir / f"step{step:06d}-{i}.png")
        flow.train()

    epochs: list[list[list[int]]] = []  # the data order: epoch e is batches_by_bucket(seed + e)

    def batch(i: int) -> list[int]:
        order = [b for epoch in epochs for b in epoch]
        while len(order) <= i:
            epochs.append(list(batches_by_bucket(dataset, args.batch_size, args.seed + len(epochs))))
            order += epochs[-1]
        return order[i]

    # 5. The loop.
    rows = []  # on resume: the rows up to the saved step (later ones were lost with the run that wrote them)
    if args.resume and log_path.exists():
        rows = [r for r in csv.reader(log_path.open()) if r and r[0].isdigit() and int(r[0]) <= start]
    log = open(log_path, "w", newline="")
    writer = csv.writer(log)
    writer.writerows([["step", "loss", "lr", "seconds"], *rows])
    flow.train()
    begin, done = time.perf_counter(), start  # done: optimizer steps applied so far
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="training")
    try:
        for step in bar:
            g = step_generator(args.seed, step)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args.lr, args.warmup)
            total = 0.0
            for micro in range(args.grad_accum):
                x0, txt, vec = collate([examples[i] for i in batch(step * args.grad_accum + micro)], empty,
                                       args.caption_dropout, g, args.device)
                loss = flow_matching_loss(flow, x0, txt, vec, g, args.guidance, args.timestep_sampling)
                if not is_finite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}: training stopped. The last good "
                                             f"checkpoint ({state_path}, {out}) is intact; try a lower --lr.")
                (loss / args.grad_accum).backward()
                total += loss.item() / args.grad_accum
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            writer.writerow([step + 1, f"{total:.6f}", f"{optimizer.param_groups[0]['lr']:.3g}",
                             f"{time.perf_counter() - begin:.2f}"])
            bar.set_postfix(loss=f"{total:.4f}")
            if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                save(step + 1)
                log.flush()
            if args.sample_every and (step + 1) % args.sample_every == 0:
                sample_images(step + 1)
    except KeyboardInterrupt:
        save(done)
        raise SystemExit(f"interrupted: saved the LoRA and training state at step {done} to {out}, {state_path}")
    except FloatingPointError as e:
        raise SystemExit(f"error: {e}")
    finally:
        log.close()
    if start >= args.steps:
        save(args.steps)
    print(out)
    return out


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as e:
        raise SystemExit(f"error: {e}")
