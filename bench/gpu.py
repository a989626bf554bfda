"""GPU speed at full FLUX.1-dev size, random weights, in one short run; results in bench/RESULTS.md.

    python bench/gpu.py                  # every section within --budget; `--only image compile-train` some
    python bench/gpu.py --config tiny --device cpu --sizes 32x32 --train-size 32x64 --text-tokens 8   # smoke

sample: a denoising step (batch 1, 512 text tokens) at each --sizes, ours eager and `--compile`d against
diffusers' FluxTransformer2DModel eager and compiled the same way (each block's forward; diffusers is
optional, e.g. `pip install --no-deps diffusers==0.42.1`); train: a LoRA step at the paper's settings (rank
16, batch 4, 1024x1536, checkpointing), eager, compiled, and with --blocks-to-swap; fp8: both with
`quantize_fp8`. Variants alternate call by call (median of --repeats after --warmup); compiled ones run on
a GPU only, and --eager skips them. Peak memory is measured, FLOPs computed (`forward_flops`). Writes --out
(JSON) and a markdown table beside it (.md).
"""

import argparse
import gc
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's minflux, and bench.py
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling scripts, also when loaded by a test
import gpu_sections  # noqa: E402 (after sys.path.insert)
import image_models  # noqa: E402 (after sys.path.insert)

import bench  # noqa: E402 (after sys.path.insert)
from iclora.lora import inject_lora, lora_parameters  # noqa: E402 (after sys.path.insert)
from iclora.training import flow_matching_loss, step_generator  # noqa: E402 (after sys.path.insert)
from minflux.block_swap import BlockSwap  # noqa: E402 (after sys.path.insert)
from minflux.compile import compile_blocks  # noqa: E402 (after sys.path.insert)
from minflux.model import CONFIGS, FluxParams  # noqa: E402 (after sys.path.insert)
from minflux.quantize import quantize_fp8, set_fp8_compute  # noqa: E402 (after sys.path.insert)
from minflux.sampling import image_ids, text_ids  # noqa: E402 (after sys.path.insert)

GIB = 2**30
START = time.perf_counter()
# dense bf16 tensor-core peak, TFLOP/s (vendor data sheets, without sparsity); other GPUs: null
PEAK_BF16 = {"H200": 989, "H100 SXM": 989, "A100": 312}
ROW_FIELDS = ("section", "variant", "size", "batch", "s_per_step", "peak_gib", "tflops", "fraction_of_peak",
              "mfu", "warmup_s", "skipped")
FLOPS_COUNTED = ("matrix products of the forward (block linears, attention, input/output projections), "
                 "2 FLOPs a multiply-add; training x(3 + 1): forward, backward, checkpointing's "
                 "recomputation")
NOT_COMPILED = "compiled variants run on a GPU, without --eager"
NO_REFERENCE = "diffusers is not installed, or --no-reference"
# name: estimated seconds at FLUX.1-dev size on an H200 (model build, compiling, the timed calls; from the run
# in bench/RESULTS.md), in the order a short GPU window should measure them
SECTIONS = {"sample": 60, "fp8": 90, "image": 150, "compile-train": 120, "train": 150, "overheads": 200}


def say(message: str):
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


def free(device: torch.device):
    """Drops compiled code and unreferenced models before the next section builds its own."""
    torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compiles(device: torch.device, args) -> bool:
    """Whether the compiled variants run: not with --eager, and on a GPU only (compiling diffusers on a
    CPU takes minutes)."""
    return device.type == "cuda" and not args.eager


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and ("HBM3" in name or "SXM" in name):  # "NVIDIA H100 80GB HBM3" is the SXM part
        name = "H100 SXM"
    for key, tflops in PEAK_BF16.items():
        if key in name:
            return tflops
    return None


def forward_flops(p: FluxParams, batch: int, image_tokens: int, text_tokens: int) -> float:
    """Matrix-product FLOPs of one transformer forward (2 per multiply-add). Per token, a double block's two
    streams and a single block both do 2·C·(4C + 2F) (qkv 3C², out C², MLP 2·C·F); attention adds 4·L²·C per
    block (q·kᵀ and p·v over all heads); plus the input and output projections. The modulations and embedders
    act once per image and are left out (< 0.1%), and so are LoRA adapters (~1%). A training step counts 3
    forwards (forward and backward: the usual convention, though a frozen base needs no weight gradients) + 1
    (checkpointing's recomputation); MFU = that / s / the GPU's dense bf16 peak."""
    C = p.hidden_size
    L = image_tokens + text_tokens
    Li = image_tokens
    F = int(p.hidden_size * p.mlp_ratio)
    per_block = 2 * L * C * (4 * C + 2 * F) + 4 * L * L * C
    io = 2 * Li * p.in_channels * C + 2 * text_tokens * p.context_in_dim * C + 2 * Li * C * p.out_channels
    return batch * ((p.depth + p.depth_single_blocks) * per_block + io)


def parse_size(text: str) -> tuple[int, int]:
    """"WxH" -> (height, width), multiples of 16."""
    width, height = (int(v) for v in text.lower().split("x"))
    if width % 16 or height % 16:
        raise argparse.ArgumentTypeError(f"{text}: width and height must be multiples of 16")
    return height, width


class Compiled:
    """A model's compiled block forwards, switched on and off so that eager and compiled calls alternate."""

    def __init__(self, blocks: list, forwards: list):
        self.blocks = blocks
        self.forwards = forwards
        self.use(False)

    def use(self, on: bool):
        for block, forward in zip(self.blocks, self.forwards, strict=True):
            if on:
                block.forward = forward
            else:
                block.__dict__.pop("forward", None)  # back to the class's forward: eager


def ours_compiled(flow) -> Compiled:
    """What --compile does (`compile_blocks`), its compiled forwards taken over to be switched."""
    compile_blocks(flow)
    blocks = [*flow.double_blocks, *flow.single_blocks]
    return Compiled(blocks, [b.__dict__["forward"] for b in blocks])


def diffusers_compiled(ref) -> Compiled:
    """diffusers' blocks compiled the same way: each block's forward."""
    blocks = [*ref.transformer_blocks, *ref.single_transformer_blocks]
    return Compiled(blocks, [torch.compile(b.forward) for b in blocks])


def switch(fast: dict[str, Compiled | None], chosen: str | None):
    """Compiled forwards on for the model named `chosen` only (None: every model eager)."""
    for name, compiled in fast.items():
        if compiled:
            compiled.use(name == chosen)


def use_compiled(fast: Compiled | None, on: bool):
    if fast is not None:
        fast.use(on)


def measure(variants: dict, args, device, weights: dict | None = None) -> dict:
    """variants: name -> (set_up(), call()) run alternately; name -> dict(s_per_step, peak_gib, warmup_s). The
    warm-up of a compiled variant is mostly its compile time. Peak: torch.cuda.max_memory_allocated during the
    calls; with `weights` (name -> bytes: two models resident, which share tensors), that model's weights plus
    the most a call allocated over what was resident before it."""
    out = {}
    for name, (set_up, call) in variants.items():  # warm-up (the first compiled call compiles)
        set_up()
        start = time.perf_counter()
        for _ in range(args.warmup):
            bench.timed_ms(call, device)
        out[name] = dict(times=[], peak=0, warmup_s=time.perf_counter() - start)
        say(f"  {name}: warm-up {out[name]['warmup_s']:.1f} s")
    for _ in range(args.repeats):
        for name, (set_up, call) in variants.items():
            set_up()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device) if weights else 0
            out[name]["times"].append(bench.timed_ms(call, device) / 1000)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) - before + (weights or {}).get(name, 0)
                out[name]["peak"] = max(out[name]["peak"], peak)
    result = {}
    for name, r in out.items():
        peak = r["peak"] / GIB if device.type == "cuda" else None
        result[name] = dict(s_per_step=statistics.median(r["times"]), peak_gib=peak, warmup_s=r["warmup_s"])
        peak_text = f", peak {peak:.2f} GiB" if peak else ""
        say(f"  {name}: {result[name]['s_per_step']:.4f} s/step{peak_text}")
    return result


def row(section, variant, size, batch, flops=None, peak=None, training=False, skipped=None, **timing) -> dict:
    s = timing.get("s_per_step")
    tflops = flops / s / 1e12 if s and flops else None
    r = dict(section=section, variant=variant, size=f"{size[1]}x{size[0]}", batch=batch, s_per_step=s,
             peak_gib=timing.get("peak_gib"), tflops=tflops, fraction_of_peak=None, mfu=None,
             warmup_s=timing.get("warmup_s"), skipped=skipped)
    if tflops and peak:
        r["mfu" if training else "fraction_of_peak"] = tflops / peak
    return r


def weights_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def sample_rows(args, device, dtype, peak, ours, ref, sizes, section="sample") -> list[dict]:
    """One denoising step at each size: ours (and diffusers' when given) eager and, on a GPU, compiled."""
    rows = []
    for size in sizes:
        rows += sample_size_rows(args, device, dtype, peak, ours, ref, size, section)
    return rows


def sample_size_rows(args, device, dtype, peak, ours, ref, size: tuple[int, int], section: str) -> list[dict]:
    """sample_rows at one (height, width)."""
    H, W = size
    gpu = compiles(device, args)
    torch.compiler.reset()  # static shapes for this size, as a run of sample.py has
    Li = (H // 16) * (W // 16)
    say(f"{section} {W}x{H}: {Li} image tokens")
    img, iid, txt, tid, t, y, g = step_inputs(args, ours.params, size, device, dtype)

    def step(v):  # the Euler update of sampling.denoise
        return (img.float() - 0.04 * v.float()).to(dtype)

    def ours_step():
        return step(ours(img, iid, txt, tid, t, y, g))

    def diffusers_step():
        return step(ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                        img_ids=iid[0], txt_ids=tid[0], guidance=g).sample)

    fast = {"ours": ours_compiled(ours) if gpu else None}
    models = {"ours": ours_step}
    if ref is not None:
        fast["diffusers"] = diffusers_compiled(ref) if gpu else None
        models["diffusers"] = diffusers_step
    variants = {}
    own = {}  # each variant's model's weights
    modes = (False, True) if gpu else (False,)  # compiled or not: torch.compile only on a GPU
    for name, call in models.items():
        for compiled in modes:
            key = f"{name} {'compiled' if compiled else 'eager'}"
            variants[key] = (partial(switch, fast, name if compiled else None), call)
            own[key] = weights_bytes(ours if name == "ours" else ref)
    with torch.no_grad():  # as sample.py's denoise
        timings = measure(variants, args, device, own)
    flops = forward_flops(ours.params, 1, Li, args.text_tokens)  # batch 1
    rows = size_rows(section, list(models), timings, size, 1, flops, peak)
    switch(fast, None)
    return rows


def size_rows(section: str, models: list[str], timings: dict, size, batch: int, flops: float,
              peak) -> list[dict]:
    """A row for each model, eager and compiled: its timing, or why it was skipped. The sample section also
    lists diffusers when it did not run."""
    names = list(models)
    if section == "sample" and "diffusers" not in names:
        names.append("diffusers")
    rows = []
    for name in names:
        for kind in ("eager", "compiled"):
            key = f"{name} {kind}"
            if key in timings:
                rows.append(row(section, key, size, batch, flops, peak, **timings[key]))
            elif name in models:
                rows.append(row(section, key, size, batch, skipped=NOT_COMPILED))
            else:
                rows.append(row(section, key, size, batch, skipped=NO_REFERENCE))
    return rows


def train_rows(args, device, dtype, peak, flow, swap: bool, section="train") -> list[dict]:
    """A LoRA training step as train.py runs it, eager and (on a GPU) compiled; with `swap`, then the faster
    of the two with the last --blocks-to-swap blocks swapped (installed last: it is not taken out again)."""
    torch.compiler.reset()
    H, W = args.train_size
    B = args.batch_size
    Lt = args.text_tokens
    p = flow.params
    gpu = compiles(device, args)
    say(f"{section} {W}x{H}, batch {B}, rank {args.rank}, checkpointing")
    inject_lora(flow, rank=args.rank, alpha=float(args.rank))
    flow.gradient_checkpointing = True
    params = lora_parameters(flow)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    x0 = torch.randn(B, 16, H // 8, W // 8, device=device)
    txt = torch.randn(B, Lt, p.context_in_dim, device=device)
    vec = torch.randn(B, p.vec_in_dim, device=device)
    flow.train()

    def step():
        loss = flow_matching_loss(flow, x0, txt, vec, step_generator(0, 0), timestep_mode="sigmoid")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    fast = ours_compiled(flow) if gpu else None
    modes = ["eager", "compiled"] if gpu else ["eager"]
    variants = {mode: (partial(use_compiled, fast, mode == "compiled"), step) for mode in modes}
    timings = measure(variants, args, device)
    if swap:
        K = min(args.blocks_to_swap, len(flow.double_blocks) + len(flow.single_blocks))
        BlockSwap(flow, K, device)
        swapped = {f"{modes[-1]}, blocks-to-swap {K}": (partial(use_compiled, fast, gpu), step)}
        timings |= measure(swapped, args, device)
    flops = (3 + 1) * forward_flops(p, B, (H // 16) * (W // 16), Lt)  # forward + backward, + recomputation
    rows = [row(section, name, (H, W), B, flops, peak, training=True, **t) for name, t in timings.items()]
    if not gpu:
        rows.append(row(section, "compiled", (H, W), B, skipped=NOT_COMPILED))
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(SECTIONS), nargs="+",
                    help=f"run these sections (default: all, in this order: {', '.join(SECTIONS)})")
    ap.add_argument("--budget", type=float, default=480,
                    help="start no section whose estimate would end past this many seconds (default: 480)")
    ap.add_argument("--steps", type=int, default=28, help="denoising steps of the whole image (default: 28)")
    ap.add_argument("--qk-norm", default="fused", choices=["fused", "separate", "eager"],
                    help="compile_blocks' qk_norm in the compile-train section (default: fused)")
    ap.add_argument("--config", default="flux-dev", choices=list(CONFIGS),
                    help="transformer size, random weights (default: flux-dev; tiny for the CPU smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--sizes", type=parse_size, nargs="+", default=[(1024, 1024)],
                    metavar="WxH", help="sampling canvases; the first one for image and overheads "
                                        "(default: 1024x1024)")
    ap.add_argument("--train-size", type=parse_size, default=(1536, 1024), metavar="WxH",
                    help="training canvas (default: 1024x1536, the paper's three-panel film storyboard)")
    ap.add_argument("--batch-size", type=int, default=4, help="training batch (default: 4, the paper's)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16, the paper's)")
    ap.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (default: 512, FLUX.1-dev's)")
    ap.add_argument("--blocks-to-swap", type=int, default=10, metavar="K",
                    help="K for the training variant with block swap (default: 10)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per variant first (default: 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per variant (default: 3)")
    ap.add_argument("--eager", action="store_true", help="skip the compiled variants")
    ap.add_argument("--no-reference", action="store_true", help="sample section without diffusers")
    ap.add_argument("--out", type=Path, default=Path("bench/gpu.json"),
                    help="JSON file; the markdown table goes next to it with .md (default: bench/gpu.json)")
    return ap.parse_args(argv)


def cell(value, spec: str) -> str:
    """A table cell: the value formatted, or a dash for None."""
    return "–" if value is None else format(value, spec)


def table(result: dict) -> str:
    """The rows as a markdown table under a line that says where and how they were measured."""
    m = result["meta"]
    head = (f"{m['device_name']}, torch {m['torch']}, diffusers {m['diffusers'] or 'absent'}, "
            f"config {m['config']}, {m['dtype']}; "
            f"dense bf16 peak {m['peak_bf16_tflops'] or 'unknown'} TFLOP/s. `{m['command']}`\n\n")
    lines = ["| section | variant | size | batch | s/step | peak GiB | TFLOP/s | of peak / MFU | warm-up s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        use = r["mfu"] if r["mfu"] is not None else r["fraction_of_peak"]
        start = f"| {r['section']} | {r['variant']} | {r['size']} | {r['batch']} | "
        if r["skipped"]:
            lines.append(start + f"skipped: {r['skipped']} | | | | |")
        else:
            lines.append(start + f"{cell(r['s_per_step'], '.4g')} | {cell(r['peak_gib'], '.2f')} | "
                         f"{cell(r['tflops'], '.4g')} | {cell(use, '.1%')} | {cell(r['warmup_s'], '.1f')} |")
    return head + "\n".join(lines) + "\n"


def diffusers_version() -> str | None:
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers.__version__


def build_model(args, device: torch.device, dtype: torch.dtype, reference: bool):
    """bench.build's random transformer (ours, and diffusers' with the same weights when `reference`)."""
    return bench.build(argparse.Namespace(config=args.config, no_reference=not reference), device, dtype)


def run_sections(args, device: torch.device, dtype: torch.dtype, peak, sections: list[str],
                 reference: bool, checks: dict) -> list[dict]:
    """The rows of each section in SECTIONS' order, one model at a time; a section whose estimate would end
    past --budget is skipped (estimates at FLUX.1-dev size only)."""
    rows = []
    for name in sections:
        estimate = SECTIONS[name] if args.config == "flux-dev" else 0
        elapsed = time.perf_counter() - START
        if elapsed + estimate > args.budget:
            say(f"{name}: skipped, {elapsed:.0f} s + ~{estimate} s would pass --budget {args.budget:.0f} s")
            rows.append(row(name, "all", args.sizes[0], 1, skipped=f"past --budget {args.budget:.0f} s"))
            continue
        say(f"{name}: estimated {estimate} s, {elapsed:.0f} s so far")
        free(device)
        rows += SECTION_RUNS[name](args, device, dtype, peak, reference, checks)
    return rows


def bf16_steps(args, device, dtype, peak, reference, checks) -> list[dict]:
    ours, ref = build_model(args, device, dtype, reference)
    return sample_rows(args, device, dtype, peak, ours, ref, args.sizes)


def fp8_steps(args, device, dtype, peak, reference, checks) -> list[dict]:
    """A denoising step with fp8 weights, dequantized for each matmul (--fp8-compute off); then with fp8
    matmuls (torch._scaled_mm) forced on."""
    ours = quantize_fp8(build_model(args, device, dtype, False)[0])
    say(set_fp8_compute(ours, "off", device))
    rows = sample_rows(args, device, dtype, peak, ours, None, args.sizes[:1], section="fp8 sample")
    say(set_fp8_compute(ours, "on", device))
    return rows + sample_rows(args, device, dtype, peak, ours, None, args.sizes[:1], "fp8-compute sample")


def whole_image(args, device, dtype, peak, reference, checks) -> list[dict]:
    """One image at --sizes' first size and --steps steps, token ids to pixels, ours and diffusers', eager and
    (on a GPU) with the transformer blocks compiled."""
    pipes = image_models.pipelines(args.config, device, dtype, reference)
    calls = gpu_sections.whole_image_variants(pipes, args.sizes[0], args.steps, args.text_tokens, device)
    gpu = compiles(device, args)
    fast = {"ours": ours_compiled(pipes[0].flow) if gpu else None}
    if pipes[1] is not None:
        fast["diffusers"] = diffusers_compiled(pipes[1].transformer) if gpu else None
    variants = {}
    for name, call in calls.items():
        for compiled in (False, True) if gpu else (False,):
            key = f"{name} {'compiled' if compiled else 'eager'}"
            variants[key] = (partial(switch, fast, name if compiled else None), call)
    with torch.no_grad():
        timings = measure(variants, args, device)
    switch(fast, None)
    names = list(calls) + ([] if "diffusers" in calls else ["diffusers"])
    rows = []
    for name in names:
        for kind in ("eager", "compiled"):
            key = f"{name} {kind}"
            skipped = NOT_COMPILED if name in calls else NO_REFERENCE
            timing = timings.get(key, {})
            rows.append(row("image", f"{key}, {args.steps} steps", args.sizes[0], 1,
                            skipped=None if timing else skipped, **timing))
    return rows


def compile_train(args, device, dtype, peak, reference, checks) -> list[dict]:
    """Compiled training against eager (gpu_sections.compiled_training_check); on the CPU only when named
    with --only (compiling there takes minutes)."""
    if args.eager or not (compiles(device, args) or "compile-train" in (args.only or [])):
        return [row("compile-train", "compiled vs eager", args.train_size, args.batch_size,
                    skipped=NOT_COMPILED)]
    check = gpu_sections.compiled_training_check(args, device, dtype, args.qk_norm)
    checks["compile-train"] = check
    say(f"  compile-train: {json.dumps(check)}")
    steps = check["steps"]
    return [row("compile-train", f"eager, {steps} steps", args.train_size, args.batch_size,
                s_per_step=check["eager_s"] / steps),
            row("compile-train", f"compiled ({args.qk_norm}), {steps} steps incl. compiling", args.train_size,
                args.batch_size, s_per_step=check["compiled_s_with_compiling"] / steps)]


def training(args, device, dtype, peak, reference, checks) -> list[dict]:
    """The LoRA training step in bf16, then with fp8 weights dequantized per matmul, then with fp8 matmuls
    (--fp8-compute on: the forward in fp8, the input gradient from the dequantized weight)."""
    rows = train_rows(args, device, dtype, peak, build_model(args, device, dtype, False)[0], swap=True)
    free(device)  # the bf16 model (its block swap hooks hold it in a cycle)
    ours = quantize_fp8(build_model(args, device, dtype, False)[0])
    rows += train_rows(args, device, dtype, peak, ours, swap=True, section="fp8 train")
    free(device)
    ours = quantize_fp8(build_model(args, device, dtype, False)[0])
    say(set_fp8_compute(ours, "on", device))
    return rows + train_rows(args, device, dtype, peak, ours, swap=False, section="fp8-compute train")


def overheads(args, device, dtype, peak, reference, checks) -> list[dict]:
    """A denoising step under each torch.compile mode (CUDA graphs: reduce-overhead) and each SDPA backend,
    and the VAE decode; compiled variants on a GPU only."""
    ours = build_model(args, device, dtype, False)[0]
    step = sample_step(args, ours, device, dtype)
    variants, skipped = gpu_sections.attention_variants(step, device)
    fast = {}  # mode -> its compiled forwards; switched on for its own variant only
    eager = partial(switch, fast, None)
    variants = {name: (eager, call) for name, call in variants.items()}
    blocks = [*ours.double_blocks, *ours.single_blocks]
    for mode in gpu_sections.OVERHEAD_MODES if compiles(device, args) else ():
        fast[mode] = Compiled(blocks, gpu_sections.mode_forwards(ours, mode))
        variants[f"step, compiled {mode}"] = (partial(switch, fast, mode), step)
    ae = image_models.autoencoders(args.config, device, dtype, False)[0]
    for name, call in gpu_sections.vae_decode_variants(ae, args.sizes[0], device, dtype,
                                                       compiles(device, args)).items():
        variants[name] = (eager, call)
    with torch.no_grad():
        timings = measure(variants, args, device)
    rows = [row("overheads", name, args.sizes[0], 1, **t) for name, t in timings.items()]
    return rows + [row("overheads", name, args.sizes[0], 1, skipped=why) for name, why in skipped.items()]


def step_inputs(args, p: FluxParams, size: tuple[int, int], device, dtype) -> tuple:
    """A denoising step's random inputs at `size` (H, W), batch 1, in the flow's argument order: img, img_ids,
    txt, txt_ids, timesteps, y, guidance."""
    H, W = size
    Li = (H // 16) * (W // 16)
    img = torch.randn(1, Li, p.in_channels, device=device, dtype=dtype)
    txt = torch.randn(1, args.text_tokens, p.context_in_dim, device=device, dtype=dtype)
    y = torch.randn(1, p.vec_in_dim, device=device, dtype=dtype)
    iid = image_ids(1, H, W).to(device)
    tid = text_ids(1, args.text_tokens).to(device)
    t = torch.full((1,), 0.7, device=device, dtype=dtype)
    g = torch.full((1,), 3.5, device=device, dtype=dtype)
    return img, iid, txt, tid, t, y, g


def sample_step(args, flow, device, dtype):
    """One denoising step's call at --sizes' first size, as sample_size_rows times it."""
    return partial(flow, *step_inputs(args, flow.params, args.sizes[0], device, dtype))


SECTION_RUNS = {"sample": bf16_steps, "fp8": fp8_steps, "image": whole_image, "compile-train": compile_train,
                "train": training, "overheads": overheads}


def main(argv=None) -> dict:
    args = parse_args(argv)
    begin = time.perf_counter()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = peak_tflops(device)
    version = diffusers_version()
    sections = [name for name in SECTIONS if name in (args.only or SECTIONS)]
    meta = dict(device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, diffusers=version, config=args.config,
                dtype=str(dtype).removeprefix("torch."), peak_bf16_tflops=peak,
                command=" ".join(["python bench/gpu.py", *(sys.argv[1:] if argv is None else argv)]),
                sections=sections, text_tokens=args.text_tokens, rank=args.rank, warmup=args.warmup,
                repeats=args.repeats, flops_counted=FLOPS_COUNTED)
    say(json.dumps(meta))
    torch.manual_seed(0)
    checks = {}
    rows = run_sections(args, device, dtype, peak, sections, version is not None and not args.no_reference,
                        checks)
    result = dict(meta=meta | {"seconds": round(time.perf_counter() - begin, 1)}, rows=rows, checks=checks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(table(result))
    print(table(result))
    say(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
