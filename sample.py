"""Generate images with FLUX.1 (dev or schnell): text to image, with LoRAs, In-Context LoRA panel sets,
reference panels and image-to-image. `main` is BFL's cli.py recipe in order, then one block per option.

    python sample.py --prompt "a red fox in the snow, watercolor" --width 1024 --height 768
    python sample.py --model black-forest-labs/FLUX.1-schnell --prompt-file prompts.txt --num-images 2
    python sample.py --lora ali-vilab/In-Context-LoRA/film-storyboard.safetensors --panels 3 --layout column
    \\
        --panel-width 1024 --panel-height 512 --prompt "[MOVIE-SHOTS] ... [SCENE-1] ... [SCENE-2] ...
        [SCENE-3] ..."
    python sample.py --lora out.safetensors --panels 2 --panel-width 512 --panel-height 512 --ref photo.png \\
        --prompt "a product shot and its poster" --panel-prompt "the photo" --panel-prompt "the poster" --seed
        1 2 3
    python sample.py --lora sketch2render.safetensors --ref sketch.png --prompt "..."   # a conditional
    IC-LoRA
    python sample.py --init photo.png --strength 0.6 --prompt "the same street in winter"
    python sample.py --prompt "a portrait" --negative-prompt "blurry, text" --true-cfg 4   # true CFG, 2
    passes a step
    python sample.py --from-image out.png --seed 5 --out again.png   # out.png's settings, another seed
Every PNG written carries the run's settings as JSON (text chunk "minflux"), read back by --from-image. A
conditional IC-LoRA (`train.py --ref-panel`) records its panels, layout, reference panels and trained panel
size; with --ref they are taken from it.
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from iclora.conditional_metadata import read_conditional_metadata
from iclora.data import load_rgb
from iclora.lora import fold_lora
from iclora.lora_files import load_lora, read_lora_file
from iclora.panels import LAYOUTS, canvas_size, joint_caption, panel_boxes, panel_size, split_panels
from iclora.references import image_positions, pin_references, reference_latents, reference_panels
from minflux.block_swap import BlockSwap
from minflux.compile import compile_blocks
from minflux.cli import USER_ERRORS, check_device, ranged
from minflux.hub import hub_call
from minflux.pipeline import from_pil, load_pipeline, to_pil
from minflux.quantize import FP8Linear, quantize_fp8
from minflux.sampling import add_noise, check_size, denoise, get_noise, img2img_start, pack, text_ids, unpack
from minflux.tokenizers import overlong

TOY_SIZE = 64  # the toy model draws 64×64 scenes (per panel)
SETTINGS_KEY = "minflux"  # the PNG text chunk holding a run's settings, as JSON
RUN_ONLY = {"from_image", "prompt_file", "out", "device", "offload", "blocks_to_swap", "compile"}  # how, not what
RESOLVED = ("steps", "height", "width", "lora_scale", "strength")  # stored as used, not as given (None: a default)
LOCATED = ("model", "transformer", "lora", "ref", "init")  # may name local files: stored as absolute paths
# With --from-image, the first flag of a pair given drops the stored second (a new --lora, the old
# --lora-scale; a new --width or --height, the stored panel size, which would otherwise decide the canvas).
PAIRED = (("lora", "lora_scale"), ("ref", "ref_panel"), ("prompt_file", "prompt"), *(
    (side, panel_side) for side in ("width", "height") for panel_side in ("panel_width", "panel_height")))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-image", type=Path, metavar="PNG",
                   help="run again with the settings stored in a PNG that sample.py wrote (its \"minflux\" text "
                        "chunk: the whole run, every prompt and seed); flags given as well replace the stored ones, "
                        "a --lora also the stored --lora-scale, a --ref the --ref-panel, a --prompt-file the prompts. "
                        "--out, --device, --offload and --blocks-to-swap are not stored (default: none)")
    p.add_argument("--model", default="black-forest-labs/FLUX.1-dev",
                   help="HF repo id (downloads only the files needed; honours HF_TOKEN and the HF cache), a local "
                        "folder in the HF repo layout, or `toy`: the 12 MB toy FLUX in toy/model, which draws "
                        f"{TOY_SIZE}x{TOY_SIZE} scenes (per panel) by default (default: %(default)s)")
    p.add_argument("--prompt", action="append", default=[],
                   help="text prompt; repeat the flag for several prompts. With --panel-prompt it is the summary of "
                        "the whole set; without, it is used unchanged")
    p.add_argument("--prompt-file", type=Path, help="a text file with one prompt per line (blank lines skipped)")
    p.add_argument("--width", type=int, help="image width in pixels, a multiple of 16 (default: 1024; toy: 64)")
    p.add_argument("--height", type=int, help="image height in pixels, a multiple of 16 (default: 1024; toy: 64)")
    p.add_argument("--steps", type=ranged(int, 1), help="sampling steps (default: 28 for dev, 4 for schnell)")
    p.add_argument("--guidance", type=float, default=3.5,
                   help="distilled guidance strength fed to FLUX.1-dev; ignored by schnell (default: 3.5)")
    p.add_argument("--negative-prompt", metavar="TEXT",
                   help="what the image should not show, for true classifier-free guidance (--true-cfg): each step "
                        "runs the model on the prompt and on this text, both with the distilled --guidance, as "
                        "diffusers' FluxPipeline negative_prompt; twice the time per step (default: none)")
    p.add_argument("--true-cfg", type=ranged(float, 1), default=1.0, metavar="S",
                   help="scale S of true classifier-free guidance, v = v_neg + S·(v_pos − v_neg), as diffusers' "
                        "true_cfg_scale; applies when S > 1, and then needs a --negative-prompt (1 = off, one "
                        "model pass per step) (default: 1.0)")
    p.add_argument("--seed", type=ranged(int, -2**63, 2**64 - 1), nargs="+", default=[0],
                   help="noise seed(s), one run per seed (--seed 1 2 3); image i of a run uses the same draw as "
                        "diffusers with generator.manual_seed(seed) (default: 0)")
    p.add_argument("--num-images", type=ranged(int, 1), default=1, help="images per prompt and seed (default: 1)")
    p.add_argument("--out", type=Path, default=Path("out.png"),
                   help="output file; with several images an index is appended: out-0.png, out-1.png, ...; "
                        "panels get -panel1, -panel2, ...: out-panel1.png or out-0-panel1.png; its extension is the "
                        "format, and only .png keeps the settings for --from-image (default: out.png)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                   help="cast all weights to this dtype (default: keep each file's stored dtype, but fp16 "
                        "becomes bf16; no fp16: T5 and the FLUX blocks overflow in it)")
    p.add_argument("--transformer", type=Path,
                   help="a local transformer .safetensors (BFL or diffusers key names, or a ComfyUI checkpoint "
                        "whose model.diffusion_model.* is read) used instead of the one in --model: bf16, fp32, an fp8 "
                        "plain cast (flux1-dev-fp8) or ComfyUI scaled fp8, detected from its tensors; the VAE, text "
                        "encoders and tokenizers still come from --model (default: the --model's own)")
    p.add_argument("--quantize", choices=["fp8"],
                   help="fp8: store the weight of every Linear in the transformer's and T5's blocks in float8 "
                        "e4m3fn with one float32 scale per row (1 byte a weight instead of bf16's 2: FLUX.1-dev "
                        "sampling at 1024² then needs about 14 GiB instead of 26, computed); the embedders, norms, "
                        "biases, CLIP and the VAE stay unquantized, in bf16 on a GPU unless --dtype says otherwise, "
                        "and compute runs in that dtype (weights are dequantized layer by layer). --lora files are "
                        "merged into the full-precision weights before quantizing (with --no-merge they are kept "
                        "as adapters on the fp8 layers) (default: none)")
    p.add_argument("--offload", action="store_true",
                   help="keep models in CPU RAM and move each to the GPU only while it runs (T5 -> CLIP -> "
                        "transformer -> VAE); FLUX.1-dev then fits a 40 GB card in bf16")
    p.add_argument("--blocks-to-swap", type=ranged(int, 0, 57), default=0, metavar="K",
                   help="keep the weights of the last K of the transformer's 19 double + 38 single blocks (single "
                        "blocks first) in CPU RAM and copy each to the GPU just before it runs: saves K blocks' "
                        "weights (bf16: 0.68 GB a double block, 0.28 GB a single one) for a slower step (PCIe "
                        "copies); combines with --offload (default: 0)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block's forward (regional: the 19 double blocks share one "
                        "compiled graph, the 38 single blocks another, so two blocks are compiled, by the first "
                        "step), for speed on a GPU (bench/gpu.py measures it); the same image within float rounding "
                        "(default: off)")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora", action="append", default=[],
                   help="a LoRA file (PEFT/diffusers, kohya, BFL or XLabs layout): a local path or "
                        "owner/repo/file.safetensors on the HF hub, e.g. "
                        "ali-vilab/In-Context-LoRA/film-storyboard.safetensors; repeat for several")
    g.add_argument("--lora-scale", type=float, action="append", default=[],
                   help="multiplier of each --lora, one per --lora in the same order (default: 1.0 for all)")
    g.add_argument("--no-merge", action="store_true",
                   help="keep the LoRAs as separate adapters instead of adding them into the weights "
                        "(slower per step; merging is the default)")

    g = p.add_argument_group("panel sets (In-Context LoRA)")
    g.add_argument("--panels", type=ranged(int, 1),
                   help="number of panels on the canvas (default: 1; with --ref, a conditional LoRA's)")
    g.add_argument("--layout", choices=LAYOUTS, help="panels side by side, stacked, or in a grid of ceil(sqrt(N)) "
                                                     "columns (default: row; with --ref, a conditional LoRA's)")
    g.add_argument("--panel-width", type=int,
                   help="width of each panel, a multiple of 16; with --panel-height it sets the canvas size, "
                        "overriding --width/--height (default: --width split evenly among the columns)")
    g.add_argument("--panel-height", type=int,
                   help="height of each panel, a multiple of 16 (default: --height split evenly among the rows)")
    g.add_argument("--panel-prompt", action="append", default=[],
                   help="description of one panel, one flag per panel in order; joined with --prompt into "
                        "\"This N-panel image shows <prompt>; [IMAGE1] <panel 1>; [IMAGE2] <panel 2>; ...\"")
    g.add_argument("--ref", type=Path, action="append", default=[],
                   help="reference image that fixes a panel (the i-th --ref fixes panel i, or see --ref-panel); "
                        "cover-resized and center-cropped to the panel size")
    g.add_argument("--ref-panel", type=int, action="append", default=[],
                   help="1-based panel fixed by each --ref, one per --ref in the same order (default: panel i for "
                        "the i-th --ref; with a conditional LoRA, its reference panels)")
    g.add_argument("--ref-strength", type=ranged(float, 0, 1), default=1.0,
                   help="s in [0, 1]: after each step the reference panel's latents become (1 - s)·x + s·x_ref(t); "
                        "1 pins them to the reference, 0 ignores it (default: 1.0)")
    g.add_argument("--ref-stop", type=ranged(float, 0, 1), default=0.0,
                   help="F in [0, 1]: leave the reference panels to the model for the last round(F·steps) steps, "
                        "to smooth the seams (default: 0, pinned through the last step)")

    g = p.add_argument_group("image-to-image")
    g.add_argument("--init", type=Path,
                   help="start from this image (cover-resized and center-cropped to the canvas) instead of noise; "
                        "a seed gives diffusers' FluxImg2ImgPipeline's image")
    g.add_argument("--strength", type=ranged(float, 0, 1),
                   help="how much of the schedule to run from --init: 0 returns the image, 1 ignores it "
                        "(diffusers' rule; default: 0.6)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.from_image:  # the stored settings become the defaults; the flags given (seen with no defaults) win
        quiet = build_parser()
        for action in quiet._actions:
            action.default = argparse.SUPPRESS
        given = set(vars(quiet.parse_args(argv)))
        given |= {partner for flag, partner in PAIRED if flag in given}
        stored = read_settings(args.from_image)
        if unknown := set(stored) - set(vars(args)) - RUN_ONLY:
            raise ValueError(f"--from-image {args.from_image}: unknown settings {', '.join(sorted(unknown))}")
        types = {action.dest: action.type for action in p._actions}
        p.set_defaults(**{k: as_flag(v, types[k]) for k, v in stored.items() if k not in given})
        args = p.parse_args(argv)
    if args.strength is not None and args.init is None:
        p.error("--strength needs an --init image")
    if args.lora_scale and len(args.lora_scale) != len(args.lora):
        p.error(f"{len(args.lora_scale)} --lora-scale value(s) for {len(args.lora)} --lora file(s); "
                f"give one per --lora, or none for 1.0")
    if args.true_cfg > 1 and args.negative_prompt is None:
        p.error(f"--true-cfg {args.true_cfg} needs a --negative-prompt (diffusers would ignore it silently; "
                f"--negative-prompt \"\" is an empty one)")
    if args.negative_prompt is not None and args.true_cfg == 1:
        warnings.warn("--negative-prompt has no effect at --true-cfg 1 (off); give --true-cfg > 1, e.g. 4")
    if args.out.suffix.lower() not in Image.registered_extensions():
        p.error(f"--out {args.out}: give a file name with an image extension (.png keeps the settings; "
                f".jpg, .webp, ... do not)")
    if args.out.suffix.lower() != ".png":
        warnings.warn(f"--out {args.out}: the settings (for --from-image) are stored only in .png files")
    if args.prompt_file:  # its lines join the prompts, so that the stored settings hold every prompt
        args.prompt = [*args.prompt, *(line.strip() for line in args.prompt_file.read_text().splitlines()
                                       if line.strip())]
    if args.quantize and args.dtype is None and torch.device(args.device).type == "cuda":
        args.dtype = "bf16"  # the rest of the model with the fp8 weights, not the VAE file's fp32
    args.settings = {k: v for k, v in vars(args).items() if k not in RUN_ONLY}  # as given; main adds RESOLVED
    args.sized = any(v is not None for v in (args.width, args.height, args.panel_width, args.panel_height))
    args.ref_mode = "noised"  # how references are pinned (iclora/references.py); a conditional LoRA may say "clean"
    if args.model == "toy" and not args.sized:
        args.panel_width = args.panel_height = TOY_SIZE
    side = TOY_SIZE if args.model == "toy" else 1024
    args.width, args.height = args.width or side, args.height or side
    if args.init and args.strength is None:
        args.strength = 0.6
    args.lora_scale = args.lora_scale or [1.0] * len(args.lora)
    return args


def read_settings(path: Path) -> dict:
    """The settings sample.py stored in a PNG it wrote, or an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"--from-image {path}: no such file")
    try:
        with Image.open(path) as image:
            text = image.info.get(SETTINGS_KEY)
    except (OSError, SyntaxError) as e:  # not an image, or a broken PNG chunk
        raise ValueError(f"--from-image {path}: cannot be read as an image ({e})") from None
    if text is None:
        raise ValueError(f"--from-image {path}: holds no sample.py settings (no {SETTINGS_KEY!r} PNG text chunk; "
                         f"sample.py writes one into every PNG it saves)")
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--from-image {path}: its {SETTINGS_KEY!r} text chunk is not valid JSON ({e})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"--from-image {path}: its {SETTINGS_KEY!r} text chunk is not a JSON object")
    return settings


def as_flag(value, kind):
    """A stored (JSON) value as argparse gives the flag: a string for argparse to convert and check, as it
    does a flag's (the elements of a list converted here); None, booleans and untyped values as they are."""
    if isinstance(value, list):
        return [kind(str(v)) if kind else v for v in value]
    return str(value) if kind and value is not None and not isinstance(value, bool) else value


def located(value):
    """A local file or folder as an absolute path, so that --from-image finds it from any directory; anything
    else (a hub id, `toy`, None) as given; a list item by item."""
    if isinstance(value, list):
        return [located(v) for v in value]
    path = Path(str(value)).expanduser()
    return str(path.resolve()) if value not in (None, "toy") and path.exists() else value


def settings_chunk(args) -> PngInfo:
    """The run's settings, as given and as RESOLVED, as JSON in a PNG text chunk (read back by --from-image);
    the local files it read (LOCATED) with absolute paths."""
    settings = args.settings | {k: getattr(args, k) for k in RESOLVED}
    info = PngInfo()
    info.add_text(SETTINGS_KEY, json.dumps(settings | {k: located(settings[k]) for k in LOCATED}, default=str))
    return info


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


def take_geometry(args, meta: dict, source: Path):
    """--ref with a conditional IC-LoRA: --panels, --layout and --ref-panel from its metadata (a different
    value given is an error), the panel size from the flags or else the trained size, and its reference
    treatment."""
    if len(args.ref) != len(meta["ref_panels"]):
        raise ValueError(f"the conditional LoRA {source.name} takes {len(meta['ref_panels'])} reference image(s), "
                         f"for panel(s) {meta['ref_panels']}; got {len(args.ref)} --ref")
    for flag, key, value in (("--panels", "panels", args.panels), ("--layout", "layout", args.layout),
                             ("--ref-panel", "ref_panels", args.ref_panel or None)):
        if value is not None and value != meta[key]:
            raise ValueError(f"{flag} {value} does not match the conditional LoRA {source.name}, trained with "
                             f"{flag} {meta[key]}; leave {flag} out to use the LoRA's")
    args.panels, args.layout, args.ref_panel, args.ref_mode = (meta["panels"], meta["layout"], meta["ref_panels"],
                                                               meta["ref_mode"])
    if not args.sized:
        args.panel_height, args.panel_width = meta["panel_height"], meta["panel_width"]


def read_prompts(args) -> list[str]:
    """The prompts (--prompt-file's included), each made into a joint caption when there are
    --panel-prompt's."""
    if args.panel_prompt and len(args.panel_prompt) != args.panels:
        raise ValueError(f"{len(args.panel_prompt)} --panel-prompt(s) for --panels {args.panels}; give one per panel")
    return [joint_caption(p, args.panel_prompt) for p in args.prompt or [None]]


def canvas(args) -> tuple[int, int]:
    """(height, width) of the canvas: --height/--width, or the panels' (given, or the canvas split) joined."""
    if args.panel_width is None and args.panel_height is None:
        check_size(args.height, args.width)
        if args.panels == 1:
            return args.height, args.width
        return canvas_size(args.panels, args.layout, *panel_size(args.panels, args.layout, args.height, args.width))
    if args.panel_width is None or args.panel_height is None:
        raise ValueError("give both --panel-width and --panel-height (or neither, to split --width/--height)")
    return canvas_size(args.panels, args.layout, args.panel_height, args.panel_width)


def resolve_lora(spec: str) -> Path:
    """A local LoRA file, or `owner/repo/path/in/repo.safetensors` downloaded from the HF hub (into its
    cache)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    parts = spec.split("/")
    if path.exists() or path.is_absolute() or spec.startswith((".", "~")) or len(parts) < 3 or Path(parts[0]).exists():
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
        return load_rgb(path)
    except OSError as error:  # PIL's UnidentifiedImageError, a truncated file
        raise ValueError(f"{flag} {path}: not a readable image ({error})") from None


def output_paths(out: Path, n: int, panels: int, source: Path | None = None) -> list[list[Path]]:
    """Per image: [joined image, panel 1, ..., panel N] (panel files only for N >= 2); none may be `source`,
    the
    --from-image file."""
    stems = [out.stem] if n == 1 else [f"{out.stem}-{i}" for i in range(n)]
    files = [[out.with_name(f"{stem}{out.suffix}")]
             + [out.with_name(f"{stem}-panel{k}{out.suffix}") for k in range(1, panels + 1) if panels > 1]
             for stem in stems]
    if source and source.resolve() in {path.resolve() for paths in files for path in paths}:
        raise ValueError(f"--out {out} would overwrite the --from-image file {source}; give another --out")
    return files


def add_loras(flow, loras: list, scales: list[float], merge: bool):
    """Each LoRA as adapter `lora<i>`, merged into the weights for good (`fold_lora`) if `merge`."""
    for i, ((path, tensors), scale) in enumerate(zip(loras, scales)):
        layers = load_lora(flow, tensors, name=f"lora{i}", multiplier=scale, source=str(path))
        if merge:
            fold_lora(flow, f"lora{i}")
        print(f"LoRA {path.name}: {len(layers)} layers, scale {scale}, {'merged' if merge else 'adapter'}",
              file=sys.stderr)


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    # Everything that needs no model is read (and so checked) first.
    check_device(args.device)
    loras = [(path, read_lora_file(path)) for path in map(resolve_lora, args.lora)]
    conditional = [(path, meta) for path, _ in loras if (meta := read_conditional_metadata(path))]
    if conditional and not args.ref:
        warnings.warn(f"{conditional[0][0].name} is a conditional IC-LoRA (trained with reference panel(s) "
                      f"{conditional[0][1]['ref_panels']} given): give its input image with --ref; from the caption "
                      f"alone it never learned to draw the set")
        conditional = []
    geometry = lambda meta: [meta[k] for k in ("panels", "layout", "ref_panels", "ref_mode")]  # noqa: E731
    if clash := [(path, meta) for path, meta in conditional if geometry(meta) != geometry(conditional[0][1])]:
        raise ValueError(f"the conditional LoRAs {conditional[0][0].name} and {clash[0][0].name} were trained with "
                         f"other panels, layout, reference panels or treatment: {geometry(conditional[0][1])} and "
                         f"{geometry(clash[0][1])}; use one of them")
    if conditional:
        take_geometry(args, conditional[0][1], conditional[0][0])
    args.panels, args.layout = args.panels or 1, args.layout or "row"
    prompts = [p for p in read_prompts(args) for _ in range(args.num_images)]
    height, width = args.height, args.width = canvas(args)  # stored as used
    files = output_paths(args.out, len(prompts) * len(args.seed), args.panels, args.from_image)
    boxes = panel_boxes(height, width, args.panels, args.layout)
    given = reference_panels(len(args.ref), args.ref_panel, args.panels)  # 0-based panel of each --ref
    refs = [(read_image(path, "--ref"), boxes[k]) for path, k in zip(args.ref, given)]
    init = read_image(args.init, "--init") if args.init else None

    # 1. Load the models (T5, CLIP, the flow transformer, the autoencoder) to the CPU, then the LoRAs: merged
    # into the full-precision weights, then --quantize; adapters (--no-merge, or an fp8 file) go on the final
    # layers.
    pipe = load_pipeline(args.model, args.device, args.dtype, args.offload, args.transformer)
    fp8_file = any(isinstance(m, FP8Linear) for m in pipe.flow.modules())
    if fp8_file and loras and not args.no_merge:
        print("note: the transformer file holds fp8 weights, which a LoRA is never merged into: the LoRAs are applied "
              "as adapters on the dequantized weights", file=sys.stderr)
    merge = not args.no_merge and not fp8_file
    if merge:
        add_loras(pipe.flow, loras, args.lora_scale, merge)
    if args.quantize == "fp8":
        quantize_fp8(pipe.flow), quantize_fp8(pipe.t5)
    if not merge:
        add_loras(pipe.flow, loras, args.lora_scale, merge)
    BlockSwap(pipe.flow, args.blocks_to_swap, args.device)  # last: before the flow first goes to the device
    if args.compile:  # after every change to the blocks' layers
        compile_blocks(pipe.flow)

    # 2. Tokenize and encode the prompts; 3. the schedule of times from 1 (noise) to 0 for this size.
    # With --true-cfg, the negative prompt too, once (`true_cfg` runs the flow on both at every step).
    texts = [(f"prompt {p[:40]!r}", p) for p in dict.fromkeys(prompts)]
    for message in overlong(pipe.t5_tokenizer, texts + [("--negative-prompt", args.negative_prompt or "")]):
        warnings.warn(message)
    txt, vec = pipe.encode_prompts(prompts)                                         # (B, Lt, 4096), (B, 768)
    B, Lt = txt.shape[:2]
    negative = [x.expand(B, *x.shape[1:]) for x in pipe.encode_prompts([args.negative_prompt])] \
        if args.true_cfg > 1 else None                                         # encoded once, for every image
    pipe.t5.to("cpu"), pipe.clip.to("cpu")  # the text encoders leave the device before the transformer comes
    timesteps = pipe.schedule(height, width, args.steps)
    args.steps = len(timesteps) - 1  # stored as used

    # --init (image-to-image, SDEdit): start part-way down the schedule from the image noised to that time.
    if init is not None:
        init_pixels = from_pil(init, height, width)                                 # (1, 3, H, W)
        timesteps = timesteps[img2img_start(len(timesteps) - 1, args.strength):]

    # --ref (reference panels, paper §4.2): their latents, pinned after every step by `after_step`.
    if refs:
        known, mask = reference_latents(pipe, refs, height, width)                  # (1, Li, 4c), (Li,)

    images = []
    for seed in args.seed:
        # 4. Noise, packed into 2×2 patches; 5. Euler steps of the flow; 6. unpack, decode to pixels. With
        # --init, as diffusers' FluxImg2ImgPipeline: the seed's generator samples the init's latent Gaussian,
        # then the noise.
        g = torch.Generator().manual_seed(seed)
        init_latents = None if init is None else pipe.encode_image(init_pixels, g).cpu()  # (1, c, h, w)
        noise = get_noise(B, height, width, seed, g)                                # (B, c, h, w) at t = 1
        x = noise if init is None else add_noise(init_latents, noise, timesteps[0])
        after_step = None
        if refs:
            after_step = pin_references(known, mask, noise, timesteps, args.ref_strength, args.ref_stop,
                                        args.ref_mode)
        x = pack(x).to(pipe.device, pipe.dtype)                                     # (B, Li, 4c)
        flow = true_cfg(pipe.on_device(pipe.flow), negative, args.true_cfg)
        img_ids = image_positions(height, width, args.panels, args.layout, given, args.ref_mode)  # (1, Li, 3)
        x = denoise(flow, x, img_ids.expand(B, -1, -1), txt, text_ids(B, Lt), vec, timesteps, args.guidance,
                    after_step)                                                     # (B, Li, 4c) at t = 0
        images += to_pil(pipe.decode(unpack(x, height, width)))

    # 7. Save each image, and each of its panels, all with the run's settings.
    chunk = settings_chunk(args)
    for image, paths in zip(images, files):
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        panels = split_panels(image, args.panels, args.layout) if args.panels > 1 else []
        for picture, path in zip([image, *panels], paths):
            picture.save(path, pnginfo=chunk)
            print(path)
    return [path for paths in files for path in paths]

if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as e:
        raise SystemExit(f"error: {e}")
