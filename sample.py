r"""Generate images with FLUX.1 (dev or schnell): text to image, with LoRAs, In-Context LoRA panel sets,
reference panels and image-to-image. `main` is BFL's cli.py recipe in order, then one block per option.

    python sample.py --prompt "a red fox in the snow, watercolor" --width 1024 --height 768
    python sample.py --lora ali-vilab/In-Context-LoRA/film-storyboard.safetensors --panels 3 --layout column \
        --panel-width 1024 --panel-height 512 \
        --prompt "[MOVIE-SHOTS] ... [SCENE-1] ... [SCENE-2] ... [SCENE-3] ..."
    python sample.py --from-image out.png --seed 5 --out again.png   # out.png's settings, another seed
Every PNG written carries the run's settings, read back by --from-image. With --ref, a conditional IC-LoRA
(one trained with `train.py --ref-panel`) sets the panel count, layout, reference panels and panel size.
More examples, and every flag: docs/sampling.md.
"""

import argparse
import itertools
import math
import os
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image

from iclora.conditional_metadata import read_conditional_metadata
from iclora.lora import fold_lora
from iclora.lora_files import load_lora, read_lora_file
from iclora.panels import LAYOUTS, canvas_size, joint_caption, panel_boxes, panel_size, split_panels
from iclora.references import image_positions, pin_references, reference_latents, reference_panels
from minflux.block_swap import BlockSwap
from minflux.compile import compile_blocks
from minflux.conditioning import conditioned
from minflux.hub import TOY_MODELS, hub_call
from minflux.images import open_rgb
from minflux.pipeline import from_pil, load_pipeline, to_pil
from minflux.png_settings import RUN_ONLY, flags_given, settings_chunk, stored_defaults
from minflux.quantize import FP8Linear, quantize_fp8
from minflux.sampling import (
    MAX_IMAGES,
    MAX_PANELS,
    MAX_SIDE,
    add_noise,
    check_size,
    denoise,
    get_noise,
    img2img_start,
    pack,
    text_ids,
    unpack,
)
from minflux.tokenizers import overlong
from minflux.user_input import USER_ERRORS, check_device, ranged
from minflux.variant_inputs import edit_inputs
from minflux.variants import VARIANTS

TOY_SIZE = 64  # the toy model draws 64×64 scenes (per panel)
SIDE = ranged(int, 16, MAX_SIDE)  # the type of the size flags: limits in minflux/sampling.py


def finite(parse=float):
    """An argparse type: `parse`'s number, refused when it is infinite or NaN (which would draw a black
    image, not fail)."""
    def parse_finite(text: str) -> float:
        value = parse(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        return value
    return parse_finite


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-image", type=Path, metavar="PNG",
                   help="run again with the settings stored in a PNG that sample.py wrote (its \"minflux\" "
                        "text chunk: the whole run, every prompt and seed); flags given as well replace the "
                        "stored ones, a --lora also the stored --lora-scale, a --ref the --ref-panel, a "
                        "--prompt-file the prompts. --out, --device, --offload and --blocks-to-swap are not "
                        "stored, and a PNG holding them is refused; the files and hub ids it names are "
                        "printed, and used only inside its folder or the working folder, or with "
                        "--trust-settings (default: none)")
    p.add_argument("--trust-settings", action="store_true",
                   help="with --from-image: use the local files outside the PNG's folder and the working "
                        "folder, and the hub downloads, that its settings name (default: refused)")
    p.add_argument("--model", default="black-forest-labs/FLUX.1-dev",
                   help="HF repo id (downloads only the files needed; honours HF_TOKEN and the HF cache), a "
                        "local folder in the HF repo layout, or `toy`: the 12 MB toy FLUX in toy/model, "
                        f"which draws {TOY_SIZE}x{TOY_SIZE} scenes (per panel) by default "
                        "(default: %(default)s)")
    p.add_argument("--prompt", action="append", default=[],
                   help="text prompt; repeat the flag for several prompts. With --panel-prompt it is the "
                        "summary of the whole set; without, it is used unchanged")
    p.add_argument("--prompt-file", type=Path, help="a text file with one prompt per line (blank lines "
                                                    "skipped)")
    p.add_argument("--width", type=SIDE, help=f"image width in pixels, a multiple of 16 up to {MAX_SIDE} "
                                              f"(default: 1024; toy: 64)")
    p.add_argument("--height", type=SIDE, help=f"image height in pixels, a multiple of 16 up to {MAX_SIDE} "
                                               f"(default: 1024; toy: 64)")
    p.add_argument("--steps", type=ranged(int, 1),
                   help="sampling steps (default: 28 for dev, 4 for schnell; Fill 50, Kontext 28)")
    p.add_argument("--guidance", type=finite(),
                   help="distilled guidance strength fed to FLUX.1-dev; ignored by schnell (default: 3.5; "
                        "Fill 30, Kontext 2.5)")
    p.add_argument("--negative-prompt", metavar="TEXT",
                   help="what the image should not show, for true classifier-free guidance (--true-cfg): "
                        "each step runs the model on the prompt and on this text, both with the distilled "
                        "--guidance, as diffusers' FluxPipeline negative_prompt; twice the time per step "
                        "(default: none)")
    p.add_argument("--true-cfg", type=finite(ranged(float, 1)), default=1.0, metavar="S",
                   help="scale S of true classifier-free guidance, v = v_neg + S·(v_pos − v_neg), as "
                        "diffusers' true_cfg_scale; applies when S > 1, and then needs a --negative-prompt "
                        "(1 = off, one model pass per step) (default: 1.0)")
    p.add_argument("--seed", type=ranged(int, -2**63, 2**64 - 1), nargs="+", default=[0],
                   help="noise seed(s), one run per seed (--seed 1 2 3); image i of a run uses the same draw "
                        "as diffusers with generator.manual_seed(seed) (default: 0)")
    p.add_argument("--num-images", type=ranged(int, 1, MAX_IMAGES), default=1,
                   help=f"images per prompt and seed, at most {MAX_IMAGES} (default: 1)")
    p.add_argument("--out", type=Path, default=Path("out.png"),
                   help="output file; with several images an index is appended: out-0.png, out-1.png, ...; "
                        "panels get -panel1, -panel2, ...: out-panel1.png or out-0-panel1.png; its extension "
                        "is the format, and only .png keeps the settings for --from-image (default: out.png)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                   help="cast all weights to this dtype (default: keep each file's stored dtype, but fp16 "
                        "becomes bf16; no fp16: T5 and the FLUX blocks overflow in it)")
    p.add_argument("--transformer", type=Path,
                   help="a local transformer .safetensors (BFL or diffusers key names, or a ComfyUI "
                        "checkpoint whose model.diffusion_model.* is read) used instead of the one in "
                        "--model: bf16, fp32, an fp8 plain cast (flux1-dev-fp8) or ComfyUI scaled fp8, "
                        "detected from its tensors; the VAE, text encoders and tokenizers still come from "
                        "--model (default: the --model's own)")
    p.add_argument("--quantize", choices=["fp8"],
                   help="fp8: store the weight of every Linear in the transformer's and T5's blocks in "
                        "float8 e4m3fn with one float32 scale per row (1 byte a weight instead of bf16's 2: "
                        "FLUX.1-dev sampling at 1024² then needs about 14 GiB instead of 26, computed); the "
                        "embedders, norms, biases, CLIP and the VAE stay unquantized, in bf16 on a GPU "
                        "unless --dtype says otherwise, and compute runs in that dtype (weights are "
                        "dequantized layer by layer). --lora files are merged into the full-precision "
                        "weights before quantizing (with --no-merge they are kept as adapters on the fp8 "
                        "layers) (default: none)")
    p.add_argument("--offload", action="store_true",
                   help="keep models in CPU RAM and move each to the GPU only while it runs (T5 -> CLIP -> "
                        "transformer -> VAE); FLUX.1-dev then fits a 40 GB card in bf16")
    p.add_argument("--blocks-to-swap", type=ranged(int, 0, 57), default=0, metavar="K",
                   help="keep the weights of the last K of the transformer's 19 double + 38 single blocks "
                        "(single blocks first) in CPU RAM and copy each to the GPU just before it runs: "
                        "saves K blocks' weights (bf16: 0.68 GB a double block, 0.28 GB a single one) for a "
                        "slower step (PCIe copies); combines with --offload (default: 0)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block's forward (regional: the 19 double blocks "
                        "share one compiled graph, the 38 single blocks another, so two blocks are compiled, "
                        "by the first step), for speed on a GPU (bench/gpu.py measures it); the same image "
                        "within float rounding (default: off)")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora", action="append", default=[],
                   help="a LoRA file (PEFT/diffusers, kohya, BFL or XLabs layout): a local path or "
                        "owner/repo/file.safetensors on the HF hub, e.g. "
                        "ali-vilab/In-Context-LoRA/film-storyboard.safetensors; repeat for several")
    g.add_argument("--lora-scale", type=finite(), action="append", default=[],
                   help="multiplier of each --lora, one per --lora in the same order (default: 1.0 for all)")
    g.add_argument("--no-merge", action="store_true",
                   help="keep the LoRAs as separate adapters instead of adding them into the weights "
                        "(slower per step; merging is the default)")

    g = p.add_argument_group("panel sets (In-Context LoRA)")
    g.add_argument("--panels", type=ranged(int, 1, MAX_PANELS),
                   help=f"number of panels on the canvas, at most {MAX_PANELS} (default: 1; with --ref, a "
                        f"conditional LoRA's)")
    g.add_argument("--layout", choices=LAYOUTS, help="panels side by side, stacked, or in a grid of "
                                                     "ceil(sqrt(N)) columns (default: row; with --ref, a "
                                                     "conditional LoRA's)")
    g.add_argument("--panel-width", type=SIDE,
                   help="width of each panel, a multiple of 16; with --panel-height it sets the canvas size, "
                        "overriding --width/--height (default: --width split evenly among the columns)")
    g.add_argument("--panel-height", type=SIDE,
                   help="height of each panel, a multiple of 16 (default: --height split evenly among the "
                        "rows)")
    g.add_argument("--panel-prompt", action="append", default=[],
                   help="description of one panel, one flag per panel in order; joined with --prompt into "
                        "\"This N-panel image shows <prompt>; [IMAGE1] <panel 1>; [IMAGE2] <panel 2>; ...\"")
    g.add_argument("--ref", type=Path, action="append", default=[],
                   help="reference image that fixes a panel (the i-th --ref fixes panel i, or see "
                        "--ref-panel); cover-resized and center-cropped to the panel size")
    g.add_argument("--ref-panel", type=int, action="append", default=[],
                   help="1-based panel fixed by each --ref, one per --ref in the same order (default: panel "
                        "i for the i-th --ref; with a conditional LoRA, its reference panels)")
    g.add_argument("--ref-strength", type=ranged(float, 0, 1), default=1.0,
                   help="s in [0, 1]: after each step the reference panel's latents become (1 - s)·x + "
                        "s·x_ref(t); 1 pins them to the reference, 0 ignores it (default: 1.0)")
    g.add_argument("--ref-stop", type=ranged(float, 0, 1), default=0.0,
                   help="F in [0, 1]: leave the reference panels to the model for the last round(F·steps) "
                        "steps, to smooth the seams (default: 0, pinned through the last step)")

    g = p.add_argument_group("Fill and Kontext (docs/fill-and-kontext.md)")
    g.add_argument("--variant", choices=VARIANTS,
                   help="which FLUX.1 the transformer is, for a bare file that cannot say: Fill is told by "
                        "its weights (384 input channels), Kontext by the repo's model_index.json or a name "
                        "holding 'kontext' (default: told from the files)")
    g.add_argument("--image", type=Path, metavar="IMG",
                   help="Fill: the image to paint, with --mask (output size: its own, floored to 16); the "
                        "unmasked pixels are not pasted back (as diffusers); --strength applies (default "
                        "1.0: from noise). Kontext: the one context image (output: its aspect at the model's "
                        "native area, 1024² (toy: 64²), unless --width/--height)")
    g.add_argument("--mask", type=Path, metavar="MASK",
                   help="Fill: the area to paint, white (binarized at half grey), of the --image's size; to "
                        "outpaint, pad the image yourself and paint the padding white. A Fill model with "
                        "--panels N and --ref images needs neither: it paints the panels not given")
    g.add_argument("--context-size", choices=["preferred", "own"],
                   help="Kontext: resize the context to the Kontext resolution of the closest aspect "
                        "(preferred), or keep its own size floored to 16 (own) (default: preferred; toy "
                        "models: own)")

    g = p.add_argument_group("image-to-image")
    g.add_argument("--init", type=Path,
                   help="start from this image (cover-resized and center-cropped to the canvas) instead of "
                        "noise; a seed gives diffusers' FluxImg2ImgPipeline's image")
    g.add_argument("--strength", type=ranged(float, 0, 1),
                   help="how much of the schedule to run from --init: 0 returns the image, 1 ignores it "
                        "(diffusers' rule; default: 0.6)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.from_image:  # the stored settings become the defaults; the flags given win
        given = flags_given(build_parser(), argv)
        p.set_defaults(**stored_defaults(p, args, given))
        args = p.parse_args(argv)
    if args.strength is not None and args.init is None and args.image is None:
        p.error("--strength needs an --init image (or a Fill model's --image)")
    if args.lora_scale and len(args.lora_scale) != len(args.lora):
        p.error(f"{len(args.lora_scale)} --lora-scale value(s) for {len(args.lora)} --lora file(s); "
                f"give one per --lora, or none for 1.0")
    if args.true_cfg > 1 and args.negative_prompt is None:
        p.error(f"--true-cfg {args.true_cfg} needs a --negative-prompt (diffusers would ignore it silently; "
                f"--negative-prompt \"\" is an empty one)")
    if args.negative_prompt is not None and args.true_cfg == 1:
        warnings.warn("--negative-prompt has no effect at --true-cfg 1 (off); give --true-cfg > 1, e.g. 4",
                      stacklevel=1)
    if args.out.suffix.lower() not in Image.registered_extensions():
        p.error(f"--out {args.out}: give a file name with an image extension (.png keeps the settings; "
                f".jpg, .webp, ... do not)")
    if args.out.suffix.lower() != ".png":
        warnings.warn(f"--out {args.out}: the settings (for --from-image) are stored only in .png files",
                      stacklevel=1)
    check_out(args.out)
    if args.prompt_file:  # its lines join the prompts, so that the stored settings hold every prompt
        args.prompt = args.prompt + read_prompt_file(args.prompt_file)
    if args.quantize and args.dtype is None and torch.device(args.device).type == "cuda":
        args.dtype = "bf16"  # the rest of the model with the fp8 weights, not the VAE file's fp32
    args.settings = {k: v for k, v in vars(args).items() if k not in RUN_ONLY}  # as given; main adds RESOLVED
    args.sized = any(v is not None for v in (args.width, args.height, args.panel_width, args.panel_height))
    # How references are pinned (iclora/references.py); a conditional LoRA may say "clean".
    args.ref_mode = "noised"
    if args.model in TOY_MODELS and not args.sized:
        args.panel_width = TOY_SIZE
        args.panel_height = TOY_SIZE
    side = TOY_SIZE if args.model in TOY_MODELS else 1024
    args.width = side if args.width is None else args.width
    args.height = side if args.height is None else args.height
    if args.init and args.strength is None:
        args.strength = 0.6
    args.lora_scale = args.lora_scale or [1.0] * len(args.lora)
    return args


def check_out(out: Path):
    """--out names a file (not a folder) in a folder that exists or can be made, and that may be written."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name, e.g. {out / 'out.png'}")
    folder = out.absolute().parent
    while not folder.exists():  # main makes the missing folders
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"--out {out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: the folder {folder} is not writable")


def read_prompt_file(path: Path) -> list[str]:
    """The prompts of a --prompt-file: its lines, stripped, blank ones skipped; it must be UTF-8 text."""
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-file {path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise ValueError(f"--prompt-file {path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {path}: not UTF-8 text ({e.reason} at byte {e.start}); give a text "
                         f"file with one prompt per line") from None
    if "\x00" in text:
        raise ValueError(f"--prompt-file {path}: a binary file (it holds NUL bytes), not text with one "
                         f"prompt per line")
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line]


def true_cfg(flow, negative: tuple[torch.Tensor, torch.Tensor] | None, scale: float):
    """The flow with true classifier-free guidance, as diffusers' FluxPipeline `true_cfg_scale`: every call
    runs it on the prompt and on the negative prompt (T5 states and CLIP vector), both with the distilled
    guidance input, and returns v_neg + scale·(v_pos − v_neg). The flow itself without a negative prompt."""
    if negative is None:
        return flow
    neg_txt, neg_vec = negative                                                   # (B, Lt, 4096), (B, 768)

    def guided(img, img_ids, txt, txt_ids, timesteps, y, guidance):
        v_pos = flow(img, img_ids, txt, txt_ids, timesteps, y, guidance)          # (B, Li, 4c)
        v_neg = flow(img, img_ids, neg_txt.to(txt), txt_ids, timesteps, neg_vec.to(y), guidance)
        return v_neg + scale * (v_pos - v_neg)
    return guided


def geometry(meta: dict) -> list:
    """What a conditional IC-LoRA fixes of its sets; two such LoRAs go together only if theirs agree."""
    return [meta[k] for k in ("panels", "layout", "ref_panels", "ref_mode")]


def conditional_lora(loras: list[Path], refs: list[Path]) -> tuple[Path, dict] | None:
    """The first conditional IC-LoRA among the files `loras`, with its metadata (read from the file's header
    only); None if there is none, or (after a warning) if no --ref gives its input images. Conditional LoRAs
    of another `geometry` are an error."""
    conditional = []
    for path in loras:
        meta = read_conditional_metadata(path)
        if meta:
            conditional.append((path, meta))
    if not conditional:
        return None
    first, first_meta = conditional[0]
    if not refs:
        warnings.warn(f"{first.name} is a conditional IC-LoRA (trained with reference panel(s) "
                      f"{first_meta['ref_panels']} given): give its input image with --ref; from the caption "
                      f"alone it never learned to draw the set", stacklevel=1)
        return None
    for path, meta in conditional[1:]:
        if geometry(meta) != geometry(first_meta):
            raise ValueError(f"the conditional LoRAs {first.name} and {path.name} were trained with other "
                             f"panels, layout, reference panels or treatment: {geometry(first_meta)} and "
                             f"{geometry(meta)}; use one of them")
    return first, first_meta


def take_geometry(args, source: Path, meta: dict):
    """--ref with a conditional IC-LoRA: --panels, --layout and --ref-panel come from its metadata (a
    different value given is an error), and so does its reference treatment; the panel size from the flags,
    or else the trained size."""
    if len(args.ref) != len(meta["ref_panels"]):
        raise ValueError(f"the conditional LoRA {source.name} takes {len(meta['ref_panels'])} reference "
                         f"image(s), for panel(s) {meta['ref_panels']}; got {len(args.ref)} --ref")
    given = (("--panels", "panels", args.panels),
             ("--layout", "layout", args.layout),
             ("--ref-panel", "ref_panels", args.ref_panel or None))
    for flag, key, value in given:
        if value is not None and value != meta[key]:
            raise ValueError(f"{flag} {value} does not match the conditional LoRA {source.name}, trained "
                             f"with {flag} {meta[key]}; leave {flag} out to use the LoRA's")
    args.panels = meta["panels"]
    args.layout = meta["layout"]
    args.ref_panel = meta["ref_panels"]
    args.ref_mode = meta["ref_mode"]
    if not args.sized:
        args.panel_height = meta["panel_height"]
        args.panel_width = meta["panel_width"]


def read_prompts(args) -> list[str]:
    """The prompts (--prompt-file's included), each made into a joint caption if there are --panel-prompts."""
    if args.panel_prompt and len(args.panel_prompt) != args.panels:
        raise ValueError(f"{len(args.panel_prompt)} --panel-prompt(s) for --panels {args.panels}; "
                         f"give one per panel")
    return [joint_caption(p, args.panel_prompt) for p in args.prompt or [None]]


def canvas(args) -> tuple[int, int]:
    """(height, width) of the canvas: --height/--width, or the panels' (given, or the canvas split) joined."""
    if args.panel_width is None and args.panel_height is None:
        check_size(args.height, args.width)
        if args.panels == 1:
            return args.height, args.width
        panel_height, panel_width = panel_size(args.panels, args.layout, args.height, args.width)
        return canvas_size(args.panels, args.layout, panel_height, panel_width)
    if args.panel_width is None or args.panel_height is None:
        raise ValueError("give both --panel-width and --panel-height (or neither, to split --width/--height)")
    height, width = canvas_size(args.panels, args.layout, args.panel_height, args.panel_width)
    if max(height, width) > MAX_SIDE:
        raise ValueError(f"{args.panels} panels of {args.panel_width}×{args.panel_height} px (W×H) in a "
                         f"{args.layout} make a {width}×{height} canvas, over the limit of {MAX_SIDE} px a "
                         f"side; give smaller panels")
    return height, width


def resolve_lora(spec: str) -> Path:
    """A local LoRA file, or `owner/repo/path/in/repo.safetensors` on the HF hub, downloaded to its cache."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    parts = spec.split("/")
    local = path.exists() or path.is_absolute() or spec.startswith((".", "~"))
    if local or len(parts) < 3 or Path(parts[0]).exists():
        raise FileNotFoundError(f"--lora {spec}: no such file; give a local .safetensors file or "
                                f"owner/repo/file.safetensors on the HF hub "
                                f"(e.g. ali-vilab/In-Context-LoRA/film-storyboard.safetensors)")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])

    def download(hub):
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            return hub.hf_hub_download(repo, filename)
        except LocalEntryNotFoundError:  # offline and not cached: hub_call says so
            raise
        except EntryNotFoundError:
            raise FileNotFoundError(f"--lora {spec}: the HF repo {repo} has no file {filename}") from None

    return Path(hub_call(repo, download))


def read_image(path: Path, flag: str):
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such image file")
    try:
        return open_rgb(path, flag)  # alpha on white; a decompression bomb or an unconvertible mode refused
    except OSError as error:  # PIL's UnidentifiedImageError, a truncated file
        raise ValueError(f"{flag} {path}: not a readable image ({error})") from None


def input_files(args, loras: list[Path]) -> list[tuple[str, Path]]:
    """(flag, path) of every file the run reads: no output may overwrite one."""
    named = [("--from-image", args.from_image), ("--prompt-file", args.prompt_file), ("--init", args.init),
             ("--transformer", args.transformer), ("--image", args.image), ("--mask", args.mask)]
    named += [("--ref", path) for path in args.ref]
    named += [("--lora", path) for path in loras]
    return [(flag, path) for flag, path in named if path is not None]


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: os.path.samefile (links and hard links) where both exist."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def output_paths(out: Path, n: int, panels: int, inputs: list[tuple[str, Path]] = ()) -> list[list[Path]]:
    """Per image: [joined image, panel 1, ..., panel N] (panel files only for N >= 2); none may be a folder
    or one of the `inputs` (flag, path), the files the run reads."""
    stems = [out.stem] if n == 1 else [f"{out.stem}-{i}" for i in range(n)]
    files = []
    for stem in stems:
        paths = [out.with_name(f"{stem}{out.suffix}")]
        if panels > 1:
            paths += [out.with_name(f"{stem}-panel{k}{out.suffix}") for k in range(1, panels + 1)]
        files.append(paths)
    for path in itertools.chain.from_iterable(files):
        if path.is_dir():
            raise ValueError(f"--out {out}: its output {path} is a folder; give another --out")
        for flag, source in inputs:
            if same_file(path, source):
                as_output = "" if path == out else f" (as its output {path.name})"
                raise ValueError(f"--out {out} would overwrite the {flag} file {source}{as_output}; give "
                                 f"another --out")
    return files


def add_loras(flow, loras: list, scales: list[float], merge: bool):
    """Each LoRA as adapter `lora<i>`, merged into the weights for good (`fold_lora`) if `merge`."""
    for i, ((path, tensors), scale) in enumerate(zip(loras, scales, strict=True)):
        layers = load_lora(flow, tensors, name=f"lora{i}", multiplier=scale, source=str(path))
        if merge:
            fold_lora(flow, f"lora{i}")
        print(f"LoRA {path.name}: {len(layers)} layers, scale {scale}, {'merged' if merge else 'adapter'}",
              file=sys.stderr)


def main(argv=None) -> list[Path]:  # noqa: C901 (the recipe reads as numbered steps; tools/reading_path.py holds it to 20)
    args = parse_args(argv)
    # Everything that needs no model is read (and so checked) first.
    check_device(args.device)
    lora_paths = [resolve_lora(spec) for spec in args.lora]
    conditional = conditional_lora(lora_paths, args.ref)
    if conditional:
        take_geometry(args, *conditional)
    args.panels = args.panels or 1
    args.layout = args.layout or "row"
    prompts = []
    for prompt in read_prompts(args):
        prompts += [prompt] * args.num_images
    height, width = canvas(args)  # stored as used by edit_inputs, which may change it (Fill, Kontext)
    files = output_paths(args.out, len(prompts) * len(args.seed), args.panels, input_files(args, lora_paths))
    boxes = panel_boxes(height, width, args.panels, args.layout)
    given = reference_panels(len(args.ref), args.ref_panel, args.panels)  # 0-based panel of each --ref
    refs = [(read_image(path, "--ref"), boxes[k]) for path, k in zip(args.ref, given, strict=True)]
    init = read_image(args.init, "--init") if args.init else None
    loras = [(path, read_lora_file(path)) for path in lora_paths]
    edit = edit_inputs(args, refs, init, height, width)  # the variant; Fill's image starts as --init's
    height, width, init, refs = edit.height, edit.width, edit.init, edit.refs

    # 1. Load the models (T5, CLIP, the flow transformer, the autoencoder) to the CPU, then the LoRAs: merged
    # into the full-precision weights before --quantize; as adapters (--no-merge, or an fp8 file) after it.
    pipe = load_pipeline(edit.repo, args.device, args.dtype, args.offload, args.transformer, edit.variant)
    fp8_file = any(isinstance(m, FP8Linear) for m in pipe.flow.modules())
    if fp8_file and loras and not args.no_merge:
        print("note: the transformer file holds fp8 weights, which a LoRA is never merged into: the LoRAs "
              "are applied as adapters on the dequantized weights", file=sys.stderr)
    merge = not args.no_merge and not fp8_file
    if merge:
        add_loras(pipe.flow, loras, args.lora_scale, merge)
    if args.quantize == "fp8":
        quantize_fp8(pipe.flow)
        quantize_fp8(pipe.t5)
    if not merge:
        add_loras(pipe.flow, loras, args.lora_scale, merge)
    BlockSwap(pipe.flow, args.blocks_to_swap, args.device)  # last: before the flow first goes to the device
    if args.compile:  # after every change to the blocks' layers
        compile_blocks(pipe.flow)

    # 2. Tokenize and encode the prompts; 3. the schedule of times from 1 (noise) to 0 for this size.
    # With --true-cfg, the negative prompt too, once (`true_cfg` runs the flow on both at every step).
    texts = [(f"prompt {p[:40]!r}", p) for p in dict.fromkeys(prompts)]
    for message in overlong(pipe.t5_tokenizer, texts + [("--negative-prompt", args.negative_prompt or "")]):
        warnings.warn(message, stacklevel=1)
    txt, vec = pipe.encode_prompts(prompts)                                         # (B, Lt, 4096), (B, 768)
    B, Lt = txt.shape[:2]
    negative = None
    if args.true_cfg > 1:  # encoded once, for every image
        neg_txt, neg_vec = pipe.encode_prompts([args.negative_prompt])              # (1, Lt, 4096), (1, 768)
        negative = (neg_txt.expand(B, -1, -1), neg_vec.expand(B, -1))
    pipe.t5.to("cpu")  # the text encoders leave the device before the transformer comes
    pipe.clip.to("cpu")
    timesteps = pipe.schedule(height, width, args.steps)
    args.steps = len(timesteps) - 1  # stored as used

    # --init (image-to-image, SDEdit): start part-way down the schedule from the image noised to that time.
    if init is not None:
        init_pixels = from_pil(init, height, width)                                 # (1, 3, H, W)
        timesteps = timesteps[img2img_start(len(timesteps) - 1, args.strength):]

    # --ref (reference panels, paper §4.2): their latents, pinned after every step by `after_step`.
    if refs:
        ref_latents, ref_mask = reference_latents(pipe, refs, height, width)        # (1, Li, 4c), (Li,)

    # The same for every seed: the flow (guided, with --true-cfg) and the tokens' positions.
    flow = true_cfg(pipe.flow, negative, args.true_cfg)
    img_ids = image_positions(height, width, args.panels, args.layout, given, args.ref_mode)  # (1, Li, 3)
    images = []
    for seed in args.seed:
        # 4. Noise, packed into 2×2 patches; 5. Euler steps of the flow; 6. unpack, decode to pixels.
        # With --init, as diffusers' FluxImg2ImgPipeline: the seed's generator draws the init's latents first.
        g = torch.Generator().manual_seed(seed)
        init_latents = None if init is None else pipe.encode_image(init_pixels, g).cpu()  # (1, c, h, w)
        noise = get_noise(B, height, width, seed, g)                                # (B, c, h, w) at t = 1
        x = noise if init is None else add_noise(init_latents, noise, timesteps[0])
        cond = edit.condition(pipe, None if init is None else init_pixels, g)  # Fill: the third draw
        after_step = None
        if refs:
            after_step = pin_references(ref_latents, ref_mask, noise, timesteps, args.ref_strength,
                                        args.ref_stop, args.ref_mode)
        x = pack(x).to(pipe.device, pipe.dtype)                                     # (B, Li, 4c)
        pipe.on_device(pipe.flow)  # the flow to the device; with --offload, the autoencoder to the CPU
        x = denoise(conditioned(flow, cond), x, img_ids.expand(B, -1, -1), txt, text_ids(B, Lt), vec,
                    timesteps, args.guidance, after_step)                           # (B, Li, 4c) at t = 0
        images += to_pil(pipe.decode(unpack(x, height, width)))

    # 7. Save each image, and each of its panels, all with the run's settings.
    chunk = settings_chunk(args)
    written = []
    for image, paths in zip(images, files, strict=True):
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        panels = split_panels(image, args.panels, args.layout) if args.panels > 1 else []
        for picture, path in zip([image, *panels], paths, strict=True):
            picture.save(path, pnginfo=chunk)
            print(path)
            written.append(path)
    return written


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
