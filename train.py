"""Train an In-Context LoRA for FLUX.1-dev on a folder of panel sets (arXiv 2410.23775).

    python train.py --data sets/home_decor                       # the paper's settings: out.safetensors
    python train.py --data sets/home_decor --config my_run.json  # values from a JSON file; flags win
    python train.py --model toy --data sets/toy_recolour         # the 12 MB toy FLUX, a few CPU minutes
    torchrun --nproc_per_node 4 train.py --data sets/home_decor  # 4 GPUs, data parallel (--fsdp: shards)

Reads top to bottom: options -> data -> model -> encode the sets once -> LoRA -> training loop -> save. The
LoRA loads in diffusers and ComfyUI; next to it go `<stem>.state.pt` (for --resume), `<stem>.loss.csv` and
`<stem>_samples/`. Ctrl-C, SIGTERM and SIGHUP save the steps done so far. With --ref-panel K the LoRA is
conditional: panel K is given, as `sample.py --ref` gives it (docs/training.md, docs/conditional.md).
"""

import argparse
import itertools
import math
import sys
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from iclora.checkpoint import Checkpoint, check_loss, lora_metadata
from iclora.data import PanelSetDataset, batches_by_bucket, check_captions, check_reference_panels
from iclora.distributed import (
    gathered,
    init_distributed,
    part,
    rank,
    read_on_rank0,
    shard,
    sum_gradients,
    wait_for_rank0,
)
from iclora.edit_training import TRAINING_GUIDANCE, prepare_variant
from iclora.ema import EMA
from iclora.lora import inject_lora
from iclora.lora_files import read_lora_file
from iclora.loss_log import LossLog
from iclora.options import (
    above_zero,
    check_data_folder,
    check_options,
    input_files,
    lora_file,
    parse_with_config,
    timestep_mode,
    validation_prompts,
)
from iclora.panels import LAYOUTS
from iclora.resume import dataset_fingerprint, load_state, resume, start_from_lora
from iclora.run import StopSignals, check_outputs, finished, holding_lock, run_files, stopping_on_signals
from iclora.training import (
    TIMESTEP_MODES,
    EncodedSet,
    collate,
    encode_sets,
    step_generator,
    training_loss,
)
from iclora.validation import Validation
from minflux.block_swap import BlockSwap
from minflux.compile import compile_blocks
from minflux.hub import TOY_MODELS
from minflux.pipeline import load_pipeline, load_t5_tokenizer
from minflux.quantize import FP8_MODES, apply_fp8, fp8_path
from minflux.user_input import USER_ERRORS, check_device, ranged
from minflux.variants import VARIANTS

# The defaults that depend on the model: the paper's and its authors' trainer's for FLUX.1-dev; for --model
# toy, a run of a few CPU minutes (no gradient checkpointing: the toy is tiny; resolution 96 keeps the 128x64
# toy sets at their size).
MODEL_DEFAULTS = {"flux": dict(steps=5000, lr=1e-4, resolution=[512, 768, 1024, 1280, 1536],
                               checkpointing=True, timestep_sampling="sigmoid", ema_decay=0.99,
                               save_dtype="fp16"),
                  "toy": dict(steps=1000, lr=1e-3, resolution=[96], checkpointing=False,
                              timestep_sampling="shift", ema_decay=0.0, save_dtype="fp32")}
# how a --ref-panel LoRA sees its reference tokens (iclora/references.py); measured on the toy tasks
# (docs/conditional.md)
REF_MODE = "moved"


def build_parser() -> argparse.ArgumentParser:
    """The flags in groups, the ones most people need first, each explained in one sentence (docs/training.md
    explains them in full). They are added in their historical order, the order of the training state's."""
    flux = MODEL_DEFAULTS["flux"]
    toy = MODEL_DEFAULTS["toy"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="python train.py --data FOLDER [--model M] [--out FILE] [options]",
                                epilog="Every option in detail: docs/training.md, Options in detail.")
    most = p.add_argument_group("the options most people need")
    lora = p.add_argument_group("LoRA and panels")
    training = p.add_argument_group("training")
    memory = p.add_argument_group("memory and speed")
    output = p.add_argument_group("output and logging")
    advanced = p.add_argument_group("advanced")
    most.add_argument("--config", type=Path, metavar="FILE",
                      help="JSON file of option values, keys as the flags with _, which flags given override "
                           "(default: none)")
    most.add_argument("--data", type=Path, metavar="FOLDER",
                      help="dataset folder: joined images with same-named .txt captions, or a folder of "
                           "panels and caption.txt per set (sets/README.md)")
    lora.add_argument("--layout", default="row", choices=LAYOUTS,
                      help="how the panels of a set folder are joined, and how those of a joined image sit "
                           "(default: row)")
    lora.add_argument("--panels", type=ranged(int, 1), metavar="N",
                      help="panels in each joined image, so that --ref-panel finds them (default: unknown; "
                           "set folders know theirs)")
    most.add_argument("--ref-panel", type=ranged(int, 1), action="append", default=[], metavar="K",
                      help="1-based panel given as input, as sample.py --ref gives it, which makes the LoRA "
                           "conditional (default: none)")
    most.add_argument("--model", default="black-forest-labs/FLUX.1-dev", metavar="M",
                      help="HF repo id, a local folder in the HF repo layout, or `toy` for the 12 MB toy "
                           "FLUX and its defaults (default: %(default)s)")
    memory.add_argument("--transformer", type=Path, metavar="FILE",
                        help="a local transformer .safetensors (BFL, diffusers or ComfyUI; bf16, fp32 or "
                             "fp8) to train on instead of --model's (default: --model's own)")
    advanced.add_argument("--variant", choices=VARIANTS,
                          help="the base: dev, fill (it paints the panels not given by --ref-panel) or "
                               "kontext (the --ref-panel is its context) (default: told from the files)")
    memory.add_argument("--quantize", choices=["fp8"],
                        help="store the weights of the transformer's and T5's blocks in fp8, half of bf16's "
                             "memory (default: none)")
    memory.add_argument("--fp8-compute", choices=FP8_MODES, default="auto",
                        help="how fp8 layers multiply: in fp8 (on), with their weights dequantized (off), or "
                             "in fp8 on CUDA capability 9.0 and up only (auto) (default: %(default)s)")
    most.add_argument("--out", type=lora_file, default=Path("out.safetensors"), metavar="FILE",
                      help="the LoRA file, outside --data, with its state, loss log and samples next to it "
                           "(default: out.safetensors)")
    most.add_argument("--steps", type=ranged(int, 1), metavar="N",
                      help=f"optimizer steps (default: {flux['steps']}, the paper's; toy: {toy['steps']})")
    training.add_argument("--batch-size", type=ranged(int, 1), default=4, metavar="N",
                          help="examples per step (default: 4, the paper's)")
    training.add_argument("--grad-accum", type=ranged(int, 1), default=1, metavar="N",
                          help="micro-batches of --batch-size per optimizer step (default: 1)")
    lora.add_argument("--rank", type=ranged(int, 1), default=16, metavar="R",
                      help="LoRA rank (default: 16, the paper's)")
    lora.add_argument("--init-lora", type=Path, metavar="FILE",
                      help="start the adapters from this LoRA file, of the same layers and --rank, instead "
                           "of from zero (default: none)")
    lora.add_argument("--alpha", type=above_zero, default=16.0, metavar="A",
                      help="LoRA alpha, above 0, the update being scaled by alpha/rank (default: 16)")
    training.add_argument("--lr", type=ranged(float, 1e-12),
                          help=f"AdamW learning rate (default: {flux['lr']}; toy: {toy['lr']})")
    training.add_argument("--warmup", type=ranged(int, 0), default=100, metavar="N",
                          help="linear warm-up steps (default: 100, ours; the authors' trainer has none)")
    training.add_argument("--ema-decay", type=ranged(float, 0, 1), metavar="D",
                          help=f"decay of the moving average of the LoRA weights that is saved and sampled, "
                               f"0 = off (default: {flux['ema_decay']}, the authors'; toy: "
                               f"{toy['ema_decay']})")
    training.add_argument("--grad-clip", type=ranged(float, 0), default=1.0, metavar="NORM",
                          help="max gradient norm, 0 = no clipping (default: 1.0)")
    training.add_argument("--resolution", type=ranged(int, 16), nargs="+", metavar="SIDE",
                          help="target areas as square sides, every set trained at each, never upscaled "
                               "(default: " + " ".join(map(str, flux["resolution"]))
                               + f", the authors'; toy: {toy['resolution'][0]})")
    advanced.add_argument("--caption-dropout", type=ranged(float, 0, 1), default=0.05, metavar="P",
                          help="probability a caption is replaced by the empty one (default: 0.05)")
    advanced.add_argument("--guidance", type=ranged(float, -math.inf), metavar="G",
                          help="distilled-guidance input during training, a finite number (default: "
                               + ", ".join(f"{g} on {v}" for v, g in TRAINING_GUIDANCE.items()) + ")")
    advanced.add_argument("--timestep-sampling", type=timestep_mode, choices=TIMESTEP_MODES,
                          help=f"how the training t is drawn (default: {flux['timestep_sampling']}, the "
                               f"authors'; toy: {toy['timestep_sampling']})")
    memory.add_argument("--checkpointing", action=argparse.BooleanOptionalAction,
                        help="gradient checkpointing per block, much less memory for about 30%% more time "
                             "(default: on; toy: off)")
    memory.add_argument("--blocks-to-swap", type=ranged(int, 0, 57), default=0, metavar="K",
                        help="keep the frozen weights of the last K of the 57 blocks in CPU RAM, each copied "
                             "to the GPU as it runs, with --checkpointing (default: 0)")
    memory.add_argument("--compile", action="store_true",
                        help="torch.compile each transformer block's forward, for speed on a GPU "
                             "(default: off)")
    memory.add_argument("--fsdp", action="store_true",
                        help="under torchrun, shard the frozen base so that each GPU holds 1/N of it "
                             "(default: off)")
    output.add_argument("--save-every", type=ranged(int, 1), default=250, metavar="N",
                        help="write the LoRA and the training state every N steps (default: 250)")
    output.add_argument("--save-dtype", choices=["fp16", "bf16", "fp32"],
                        help=f"dtype of the LoRA files, the training state keeping fp32 (default: "
                             f"{flux['save_dtype']}, as the released IC-LoRAs; toy: {toy['save_dtype']})")
    output.add_argument("--keep-last", type=ranged(int, 0), default=4, metavar="N",
                        help="also keep the last N saves as <stem>-step000250.safetensors, 0 = none "
                             "(default: 4)")
    output.add_argument("--sample-every", type=ranged(int, 0), default=250, metavar="N",
                        help="validation images every N steps into <stem>_samples/, 0 = never (default: 250)")
    output.add_argument("--val-prompt", action="append", default=[], metavar="TEXT",
                        help="validation prompt, repeatable, with optional settings as in \"a caption --w "
                             "1024 --seed 3\" (default: the first training caption)")
    advanced.add_argument("--strict-captions", action="store_true",
                          help="refuse captions longer than T5 reads instead of warning that their end is "
                               "cut (default: off)")
    output.add_argument("--sample-steps", type=ranged(int, 1), default=20, metavar="N",
                        help="steps for validation images (default: 20)")
    training.add_argument("--seed", type=ranged(int, 0), default=42,
                          help="seed for data order, noise, t and dropout, at least 0 (default: 42)")
    memory.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    memory.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                        help="base-model dtype, the LoRA's parameters staying fp32 (default: bf16 on GPU, "
                             "the stored dtype on CPU)")
    most.add_argument("--resume", action="store_true",
                      help="continue from <out stem>.state.pt, bit for bit on the CPU (default: off)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, over the --config file's values, over the model's defaults; checked."""
    p = build_parser()
    args = parse_with_config(p, argv)
    for k, v in MODEL_DEFAULTS["toy" if args.model in TOY_MODELS else "flux"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.resolution = sorted(set(args.resolution))  # ascending, each once
    check_options(p, args)
    return args


def main(argv=None) -> Path:
    """Runs `train` holding `<out stem>.lock`, which is removed however the run ends."""
    args = parse_args(argv)
    check_data_folder(args.data)
    check_outputs(run_files(args.out), input_files(args))  # no input is overwritten, before anything loads
    # under torchrun: this rank joins the others; its GPU is cuda:LOCAL_RANK
    args.device = init_distributed(args.device)
    check_device(args.device)
    fp8_path(args.fp8_compute, args.device)  # --fp8-compute on: refused now where the device cannot run it
    with holding_lock(run_files(args.out)), stopping_on_signals():
        return train(args)


def train(args: argparse.Namespace) -> Path:  # noqa: C901 (the recipe reads top to bottom; tools/reading_path.py holds it to 20)
    files = run_files(args.out)
    if files.state.exists() and not args.resume:  # a finished or stopped run: its files would be lost
        raise SystemExit(f"error: {files.state} exists: --resume to continue it, another --out, or delete it")

    # 1. Data: every image and caption is checked now, not at step 3,000; and a --resume's state against them.
    dataset = PanelSetDataset(args.data, resolution=args.resolution, layout=args.layout, panels=args.panels)
    panels = check_reference_panels(dataset, args.ref_panel) if args.ref_panel else None
    per_set = len(dataset.resolutions)
    print(f"{len(dataset) // per_set} training sets from {args.data}, {len(dataset)} samples: each at "
          f"resolution {', '.join(map(str, dataset.resolutions))} (at its own size where that is smaller)",
          file=sys.stderr)
    fingerprint = dataset_fingerprint(dataset)
    init_lora = read_lora_file(args.init_lora) if args.init_lora else None  # read (and so checked) now
    val_size = dataset.samples[per_set - 1].bucket  # the first set's largest (H, W): validation images' size
    val_prompts = validation_prompts(args, val_size, dataset.samples[0].caption)
    # Captions T5 would cut are reported now, from the tokenizer alone, before any weight loads.
    check_captions(load_t5_tokenizer(str(args.model), args.transformer), dataset,
                   [v["caption"] for v in val_prompts] if args.val_prompt else [], args.strict_captions)
    prepare_variant(args)  # the base's variant (dev, Fill, Kontext), its --guidance and what it needs
    state = read_on_rank0(load_state, files.state, args, fingerprint, REF_MODE) if args.resume else None

    # 2. Model; 3. encode every set and caption once, then the text encoders leave the device.
    dtype = args.dtype or ("bf16" if torch.device(args.device).type == "cuda" else None)
    pipe = load_pipeline(str(args.model), args.device, dtype, transformer=args.transformer,
                         variant=args.variant)
    # --quantize and --fp8-compute on the CPU, before T5 encodes and before the LoRA wraps the flow's Linears
    apply_fp8(pipe.flow, pipe.t5, args.quantize, args.fp8_compute, args.device)
    # each rank encodes its part of the samples, and every rank gets them all
    sets = gathered(encode_sets(pipe, dataset, args.ref_panel, REF_MODE, part(len(dataset)), args.variant))
    empty_txt, empty_vec = pipe.encode_prompts([""])
    empty = EncodedSet(None, empty_txt[0].cpu(), empty_vec[0].cpu())  # for caption dropout
    val_refs = sets[per_set - 1] if args.ref_panel else None  # --ref-panel: the first set's, largest
    validate = Validation(pipe, val_prompts, val_size, val_refs, REF_MODE, files.samples)
    pipe.t5.to("cpu")
    pipe.clip.to("cpu")

    # 4. A LoRA on the frozen base: only the adapters train, in float32. Swapped blocks (--blocks-to-swap) are
    # set up while the flow is still on the CPU, so that their weights never land on the device whole.
    inject_lora(pipe.flow, rank=args.rank, alpha=args.alpha, seed=args.seed)
    if init_lora:
        start_from_lora(pipe.flow, init_lora, args.init_lora, args.rank)
    pipe.flow.gradient_checkpointing = args.checkpointing
    BlockSwap(pipe.flow, args.blocks_to_swap, args.device)
    if args.fsdp:  # on the CPU still: each rank's 1/N of the frozen weights goes to its device
        held, base = shard(pipe.flow)
        print(f"--fsdp: rank {rank()} holds {held:,} of the base's {base:,} weights", file=sys.stderr)
    if args.compile:
        if torch.device(args.device).type == "cuda":
            warnings.warn("--compile: compiled training crashed on an H200 with torch 2.11 (an illegal "
                          "memory access in an inductor kernel, bench/RESULTS.md); if it fails, train "
                          "without --compile", stacklevel=2)
        compile_blocks(pipe.flow)
    flow = pipe.on_device(pipe.flow)
    adapters = {n: p for n, p in flow.named_parameters() if p.requires_grad}
    params = list(adapters.values())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    start = resume(state, adapters, optimizer, files.state) if state else 0
    ema = EMA(adapters, args.ema_decay, state)  # saved and sampled; the state keeps it and the raw weights
    metadata = lora_metadata(args, val_prompts[0]["caption"], panels, val_size, REF_MODE)
    checkpoint = Checkpoint(files, args, fingerprint, REF_MODE, metadata, flow, optimizer, ema)
    checkpoint.match_state(state)  # --resume after a crash between the LoRA's save and the state's: repaired
    log = LossLog(files.log, start)

    # 5. The loop. The data order is a pure function of the seed: epoch e is batches_by_bucket(seed + e).
    order = itertools.chain.from_iterable(batches_by_bucket(dataset, args.batch_size, args.seed + epoch)
                                          for epoch in itertools.count())
    batches = itertools.islice(order, start * args.grad_accum, None)  # on resume, skip the batches seen
    done = start  # optimizer steps applied
    stop = StopSignals()
    with log:
        if args.sample_every and start == 0:
            validate(flow, ema, 0)  # the base model before any step: the baseline the others are seen against
        flow.train()
        log.start_clock()  # on --resume the clock goes on
        try:
            bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="training",
                       disable=rank() > 0)
            for step in bar:
                if any(gathered([bool(stop.received)])):  # torchrun signals every rank: all stop at one step
                    raise KeyboardInterrupt
                g = step_generator(args.seed, step)
                lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))  # linear warm-up, then constant
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = 0.0
                for _ in range(args.grad_accum):
                    # every rank collates the whole micro-batch (its draws), and computes the loss of its part
                    batch = next(batches)
                    x0, txt, vec, refs, cond = collate([sets[i] for i in batch], empty, args.caption_dropout,
                                                       g, args.device, REF_MODE)
                    loss = training_loss(flow, x0, txt, vec, g, args.guidance, args.timestep_sampling, refs,
                                         part(len(batch)), cond)
                    (loss / args.grad_accum).backward()
                    loss_sum += loss.item()
                loss_sum = sum_gradients(params, loss_sum)  # under torchrun: the ranks' parts added up
                check_loss(loss_sum, step, files)
                if args.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
                optimizer.step()
                ema.update()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                log.add(done, loss_sum / args.grad_accum, lr)
                bar.set_postfix(loss=f"{loss_sum / args.grad_accum:.4f}")
                if done % args.save_every == 0 or done == args.steps:
                    checkpoint.save(done, log.losses, log.lrs)
                if args.sample_every and done % args.sample_every == 0:
                    validate(flow, ema, done)
        except KeyboardInterrupt:
            checkpoint.save(done, log.losses, log.lrs)
            wait_for_rank0()
            raise SystemExit(f"interrupted ({stop.name()}): saved the LoRA and training state at step {done} "
                             f"to {args.out}, {files.state}; --resume continues") from None
    if start >= args.steps:
        checkpoint.save(start, log.losses, log.lrs)
    wait_for_rank0()
    finished(args, files, done, log.losses, dataset.samples[per_set - 1], val_prompts[0]["caption"])
    return args.out


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted before training started: nothing was saved") from None
    finally:
        if torch.distributed.is_initialized():  # under torchrun
            torch.distributed.destroy_process_group()
