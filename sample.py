r"""Generate images with FLUX.1 (dev, schnell, Fill or Kontext): text to image, with LoRAs, In-Context LoRA
panel sets, reference panels, image-to-image, inpainting (Fill) and editing (Kontext). `main` is BFL's cli.py
recipe in order, then one block per option.

    python sample.py --prompt "a red fox in the snow, watercolor" --width 1024 --height 768
    python sample.py --lora ali-vilab/In-Context-LoRA/film-storyboard.safetensors --panels 3 --layout column \
        --panel-width 1024 --panel-height 512 \
        --prompt "[MOVIE-SHOTS] ... [SCENE-1] ... [SCENE-2] ... [SCENE-3] ..."
    python sample.py --from-image outputs/00001.png --seed 5   # that image's settings, another seed
Without --out, each run writes the next free number in outputs/ (00001.png, 00002.png, ...), never an existing
file; every PNG carries the run's settings, read back by --from-image. With --ref, a conditional IC-LoRA (one
trained with `train.py --ref-panel`) sets the panel count, layout, reference panels and panel size.
More examples, and every flag: docs/sampling.md.
"""

import argparse
import itertools
import math
import os
import re
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image

from iclora.conditional_metadata import check_lora_variant, read_conditional_metadata, recorded_variant
from iclora.lora import fold_lora
from iclora.lora_files import check_input_channels, load_lora, read_lora_file
from iclora.panels import LAYOUTS, canvas_size, joint_caption, panel_boxes, panel_size, split_panels
from iclora.references import image_positions, pin_references, reference_latents, reference_panels
from minflux.block_swap import BlockSwap
from minflux.compile import compile_blocks
from minflux.conditioning import conditioned
from minflux.hub import TOY_MODELS, hub_call
from minflux.images import read_image
from minflux.pipeline import Pipeline, from_pil, load_pipeline, to_pil
from minflux.png_settings import RUN_ONLY, flags_given, settings_chunk, stored_defaults
from minflux.quantize import FP8_MODES, FP8Linear, apply_fp8, fp8_path
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
from minflux.variants import VARIANTS, input_channels

TOY_SIZE = 64  # the toy model draws 64×64 scenes (per panel)
OUTPUTS = Path("outputs")  # without --out, images go to the next free number here: outputs/00001.png, ...
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
    """The flags in groups, the ones most people need first, each explained in one sentence (docs/sampling.md
    explains them in full). They are added in their historical order, the order of the stored settings."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="python sample.py [--model M] [--prompt TEXT] [--lora FILE] [options]",
                                epilog="Every option in detail: docs/sampling.md, Options in detail.")
    most = p.add_argument_group("the options most people need")
    sampling = p.add_argument_group("sampling")
    memory = p.add_argument_group("memory and speed")
    sets = p.add_argument_group("LoRA and panels (In-Context LoRA)")
    edit = p.add_argument_group("Fill and Kontext (docs/fill-and-kontext.md)")
    img2img = p.add_argument_group("image-to-image")
    replay = p.add_argument_group("settings (every PNG stores its run's, to run it again)")
    replay.add_argument("--from-image", type=Path, metavar="PNG",
                        help="run again with the settings a PNG of sample.py stores, flags given replacing "
                             "the stored ones (default: none)")
    replay.add_argument("--trust-settings", action="store_true",
                        help="with --from-image, use the files and downloads its settings name outside the "
                             "PNG's and the working folder (default: refused)")
    most.add_argument("--model", default="black-forest-labs/FLUX.1-dev", metavar="M",
                      help="HF repo id, a local folder in the HF repo layout, or `toy` (`toy-fill`, "
                           "`toy-kontext`) for the 12 MB toy FLUX of toy/ (default: %(default)s)")
    most.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                      help="text prompt, repeatable, which with --panel-prompt sums up the whole set")
    sampling.add_argument("--prompt-file", type=Path, metavar="FILE",
                          help="a text file of prompts, one per line")
    most.add_argument("--width", type=SIDE, metavar="PX",
                      help=f"image width in pixels, a multiple of 16 up to {MAX_SIDE} (default: 1024; toy: "
                           f"{TOY_SIZE})")
    most.add_argument("--height", type=SIDE, metavar="PX",
                      help=f"image height in pixels, a multiple of 16 up to {MAX_SIDE} (default: 1024; toy: "
                           f"{TOY_SIZE})")
    sampling.add_argument("--steps", type=ranged(int, 1), metavar="N",
                          help="sampling steps (default: 28 for dev and Kontext, 4 for schnell, 50 for Fill)")
    sampling.add_argument("--guidance", type=finite(), metavar="G",
                          help="distilled guidance strength, which schnell ignores (default: 3.5; Fill 30, "
                               "Kontext 2.5)")
    sampling.add_argument("--negative-prompt", metavar="TEXT",
                          help="what the image should not show, used by --true-cfg (default: none)")
    sampling.add_argument("--true-cfg", type=finite(ranged(float, 1)), default=1.0, metavar="S",
                          help="true classifier-free guidance scale, above 1 with a --negative-prompt, at "
                               "twice the time per step (default: 1.0, off)")
    most.add_argument("--seed", type=ranged(int, -2**63, 2**64 - 1), nargs="+", default=[0], metavar="SEED",
                      help="noise seed(s), one run per seed, drawn as diffusers' generator.manual_seed(seed) "
                           "draws (default: 0)")
    sampling.add_argument("--num-images", type=ranged(int, 1, MAX_IMAGES), default=1, metavar="N",
                          help=f"images per prompt and seed, at most {MAX_IMAGES} (default: 1)")
    most.add_argument("--out", type=Path, metavar="FILE",
                      help="output file, replaced if it exists, with -1, -2, ... and -panel1, ... added for "
                           "several images and panels (default: the next free outputs/NNNNN.png)")
    memory.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    memory.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                        help="cast all weights to this dtype (default: each file's own, fp16 read as bf16)")
    memory.add_argument("--transformer", type=Path, metavar="FILE",
                        help="a local transformer .safetensors (BFL, diffusers or ComfyUI; bf16, fp32 or "
                             "fp8) used instead of --model's (default: --model's own)")
    memory.add_argument("--quantize", choices=["fp8"],
                        help="store the weights of the transformer's and T5's blocks in fp8, half of bf16's "
                             "memory (default: none)")
    memory.add_argument("--fp8-compute", choices=FP8_MODES, default="auto",
                        help="how fp8 layers multiply: in fp8 (on), with their weights dequantized (off), or "
                             "in fp8 on CUDA capability 9.0 and up only (auto) (default: %(default)s)")
    memory.add_argument("--offload", action="store_true",
                        help="keep the models in CPU RAM, each moved to the GPU only while it runs "
                             "(default: off)")
    memory.add_argument("--blocks-to-swap", type=ranged(int, 0, 57), default=0, metavar="K",
                        help="keep the last K of the 57 transformer blocks in CPU RAM, each copied to the "
                             "GPU as it runs (default: 0)")
    memory.add_argument("--compile", action="store_true",
                        help="torch.compile each transformer block, for speed on a GPU (default: off)")
    most.add_argument("--lora", action="append", default=[], metavar="FILE",
                      help="a LoRA file, local or owner/repo/file.safetensors on the HF hub, repeatable "
                           "(default: none)")
    sets.add_argument("--lora-scale", type=finite(), action="append", default=[], metavar="S",
                      help="multiplier of each --lora, one per --lora in order (default: 1.0)")
    sets.add_argument("--no-merge", action="store_true",
                      help="keep the LoRAs as adapters instead of merging them into the weights (default: "
                           "merged)")
    sets.add_argument("--panels", type=ranged(int, 1, MAX_PANELS), metavar="N",
                      help=f"number of panels on the canvas, at most {MAX_PANELS} (default: 1; with --ref, a "
                           f"conditional LoRA's)")
    sets.add_argument("--layout", choices=LAYOUTS,
                      help="panels in a row, a column or a grid (default: row; with --ref, a conditional "
                           "LoRA's)")
    sets.add_argument("--panel-width", type=SIDE, metavar="PX",
                      help="width of each panel, which with --panel-height sets the canvas size (default: "
                           "--width split among the columns)")
    sets.add_argument("--panel-height", type=SIDE, metavar="PX",
                      help="height of each panel (default: --height split among the rows)")
    sets.add_argument("--panel-prompt", action="append", default=[], metavar="TEXT",
                      help="description of one panel, one flag per panel in order, joined with --prompt into "
                           "the paper's caption")
    most.add_argument("--ref", type=Path, action="append", default=[], metavar="IMAGE",
                      help="reference image that fixes a panel, the i-th --ref panel i unless --ref-panel "
                           "says another (default: none)")
    sets.add_argument("--ref-panel", type=int, action="append", default=[], metavar="K",
                      help="1-based panel fixed by each --ref, in order (default: panel i for the i-th "
                           "--ref, or a conditional LoRA's)")
    sets.add_argument("--ref-strength", type=ranged(float, 0, 1), default=1.0, metavar="S",
                      help="how strongly the reference panels are pinned after each step, from 0 (ignored) "
                           "to 1 (default: 1.0)")
    sets.add_argument("--ref-stop", type=ranged(float, 0, 1), default=0.0, metavar="F",
                      help="the last fraction F of the steps, in which the reference panels are left free to "
                           "smooth the seams (default: 0)")
    edit.add_argument("--variant", choices=VARIANTS,
                      help="which FLUX.1 the transformer is, for a bare file that cannot say (default: told "
                           "from the files)")
    edit.add_argument("--image", type=Path, metavar="IMAGE",
                      help="Fill: the image to paint where --mask is white; Kontext: the context image to "
                           "edit (default: none)")
    edit.add_argument("--mask", type=Path, metavar="MASK",
                      help="Fill: the area to paint, white, of the --image's size (default: none)")
    edit.add_argument("--context-size", choices=["preferred", "own"],
                      help="Kontext: the context resized to Kontext's resolution of the closest aspect, or "
                           "its own size floored to 16 (default: preferred; toy models: own)")
    img2img.add_argument("--init", type=Path, metavar="IMAGE",
                         help="start from this image instead of noise (default: none)")
    img2img.add_argument("--strength", type=ranged(float, 0, 1), metavar="S",
                         help="how much of the schedule to run from --init (or Fill's --image), from 0 (the "
                              "image) to 1 (ignores it) (default: 0.6 with --init; Fill 1.0)")
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
    check_out(p, args.out)
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


def check_out(p: argparse.ArgumentParser, out: Path | None):
    """--out names an image file (not a folder) in a folder that exists or can be made, and that may be
    written; without --out, the same holds for the numbered file in OUTPUTS."""
    named = f"--out {out}"
    if out is None:
        out = numbered_output()
        named = f"{out} (where images go without --out)"
    elif out.suffix.lower() not in Image.registered_extensions():
        p.error(f"--out {out}: give a file name with an image extension (.png keeps the settings; .jpg, "
                f".webp, ... do not)")
    elif out.suffix.lower() != ".png":
        warnings.warn(f"--out {out}: the settings (for --from-image) are stored only in .png files",
                      stacklevel=1)
    if out.is_dir():
        raise ValueError(f"{named} is a folder; give a file name, e.g. {out / 'out.png'}")
    folder = out.absolute().parent
    while not folder.exists():  # main makes the missing folders
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{named}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{named}: the folder {folder} is not writable")


def numbered_output(folder: Path = OUTPUTS) -> Path:
    """folder/NNNNN.png, numbered one past the highest number that a name in `folder` starts with (00001.png
    in a new folder), so that a run without --out never replaces an earlier image or its panels."""
    highest = 0
    if folder.is_dir():
        for path in folder.iterdir():
            number = re.match(r"\d+", path.name)
            if number:
                highest = max(highest, int(number[0]))
    return folder / f"{highest + 1:05d}.png"


def claim_numbered_output(folder: Path = OUTPUTS) -> Path:
    """numbered_output's file, created empty at once (O_EXCL), so that two runs saving at the same moment
    never take one number: the second finds the first's file and takes the next."""
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        path = numbered_output(folder)
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return path
        except FileExistsError:
            continue


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


def conditional_lora(loras: list[Path], refs: list[Path], image: Path | None) -> tuple[Path, dict] | None:
    """The first conditional IC-LoRA among the files `loras`, with its metadata (read from the file's header
    only); None if there is none, if Fill's or Kontext's --image `image` stands for its references, or (after
    a warning) if no --ref gives its input images. Conditional LoRAs of another `geometry` are an error."""
    if image is not None:
        return None
    conditional = []
    for path in loras:
        meta = read_conditional_metadata(path)
        if meta and recorded_variant(path) != "kontext":  # a Kontext LoRA's reference is the --image
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


def check_loras(loras: list, edit, transformer: Path | None):
    """Before any weight loads: a LoRA train.py recorded for another variant, or one whose img_in part takes
    another input width (a Fill LoRA's 384 on dev), is refused; a file recording no variant gets a note."""
    channels = input_channels(edit.repo, transformer)  # from the file's header
    for path, tensors in loras:
        note = check_lora_variant(path, edit.variant)
        if note:
            print(note, file=sys.stderr)
        check_input_channels(tensors, str(path), channels)


def load_models(args, loras: list, edit) -> Pipeline:
    """The models (T5, CLIP, the flow transformer, the autoencoder) of `edit`'s repo and variant
    on the CPU, then the `loras` (path, tensors): merged into the full-precision weights before --quantize; as
    adapters (--no-merge, or an fp8 file) after it. Then --blocks-to-swap and --compile, which come after
    every change to the blocks."""
    check_loras(loras, edit, args.transformer)
    pipe = load_pipeline(edit.repo, args.device, args.dtype, args.offload, args.transformer, edit.variant)
    fp8_file = any(isinstance(m, FP8Linear) for m in pipe.flow.modules())
    if fp8_file and loras and not args.no_merge:
        print("note: the transformer file holds fp8 weights, which a LoRA is never merged into: the LoRAs "
              "are applied as adapters on the fp8 layers", file=sys.stderr)
    merge = not args.no_merge and not fp8_file
    if merge:
        add_loras(pipe.flow, loras, args.lora_scale, merge)
    apply_fp8(pipe.flow, pipe.t5, args.quantize, args.fp8_compute, args.device)  # --quantize, --fp8-compute
    if not merge:
        add_loras(pipe.flow, loras, args.lora_scale, merge)
    BlockSwap(pipe.flow, args.blocks_to_swap, args.device)  # last: before the flow first goes to the device
    if args.compile:  # after every change to the blocks' layers
        compile_blocks(pipe.flow)
    return pipe


def save_images(images: list[Image.Image], files: list[list[Path]], args) -> list[Path]:
    """Each image to its `files` (output_paths'), and each of its panels, all with the run's settings in a PNG
    text chunk; the paths written, each printed. Without --out, the number in outputs/ is taken now, so that a
    run that finished meanwhile keeps its own (claim_numbered_output)."""
    if args.out is None:
        files = output_paths(claim_numbered_output(), len(files), args.panels)
    chunk = settings_chunk(args)
    written = []
    for image, paths in zip(images, files, strict=True):
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        panels = split_panels(image, args.panels, args.layout) if args.panels > 1 else []
        for picture, path in zip([image, *panels], paths, strict=True):
            picture.save(path, pnginfo=chunk)
            print(path)
            written.append(path)
    if written[0].suffix.lower() == ".png":
        print(f"The settings of this run are stored in each PNG (its \"minflux\" text chunk); run it again "
              f"with: python sample.py --from-image {written[0]}", file=sys.stderr)
    return written


def main(argv=None) -> list[Path]:  # noqa: C901 (the recipe reads as numbered steps; tools/reading_path.py holds it to 20)
    args = parse_args(argv)
    # Everything that needs no model is read (and so checked) first.
    check_device(args.device)
    fp8_path(args.fp8_compute, args.device)  # --fp8-compute on: refused now where the device cannot run it
    lora_paths = [resolve_lora(spec) for spec in args.lora]
    conditional = conditional_lora(lora_paths, args.ref, args.image)
    if conditional:
        take_geometry(args, *conditional)
    args.panels = args.panels or 1
    args.layout = args.layout or "row"
    prompts = []
    for prompt in read_prompts(args):
        prompts += [prompt] * args.num_images
    height, width = canvas(args)  # stored as used by edit_inputs, which may change it (Fill, Kontext)
    out = args.out or numbered_output()  # without --out: numbered again when saving (save_images)
    files = output_paths(out, len(prompts) * len(args.seed), args.panels, input_files(args, lora_paths))
    boxes = panel_boxes(height, width, args.panels, args.layout)
    given = reference_panels(len(args.ref), args.ref_panel, args.panels)  # 0-based panel of each --ref
    refs = [(read_image(path, "--ref"), boxes[k]) for path, k in zip(args.ref, given, strict=True)]
    init = read_image(args.init, "--init") if args.init else None
    loras = [(path, read_lora_file(path)) for path in lora_paths]
    edit = edit_inputs(args, refs, init, height, width)  # the variant; Fill's image starts as --init's
    height, width, init, refs = edit.height, edit.width, edit.init, edit.refs

    # 1. Load the models (T5, CLIP, the flow transformer, the autoencoder), then the LoRAs (load_models).
    pipe = load_models(args, loras, edit)

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
    return save_images(images, files, args)


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
