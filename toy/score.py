r"""Score the toy In-Context LoRA tasks "recolour" and "blind_recolour": generate held-out two-panel sets with
the toy FLUX, with and without a LoRA, read every panel back with toy.world.analyse, and report the scores.

    python toy/score.py --lora out.safetensors                   # base vs LoRA on 20 held-out sets
    python toy/score.py --lora out.safetensors --sheet sets.png  # ... and a picture: targets, base, LoRA
    python toy/score.py --lora blind.safetensors --task blind_recolour  # captions that do not describe it

`evaluate` generates each set in two modes (arXiv 2410.23775 §4): "text" from the caption alone, "ref" with
the left panel given (as a `train.py --ref-panel` LoRA's metadata says); "ceiling" is what exact target
latents would score. On toy Fill and toy Kontext (--model toy-fill, toy-kontext) only "ref" runs, the left
panel given as each base takes it (docs/fill-and-kontext.md). Scenes have their own seed (--scenes-seed), not
make_sets.py's; a set gets the same noise (--seed) with and without the LoRA, on every base.
Shape letters: B sets, Li image tokens, Lc context tokens, c latent channels.
"""

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from iclora.conditional_metadata import check_lora_variant, read_conditional_metadata  # noqa: E402 (after sys.path.insert)
from iclora.lora_files import load_lora  # noqa: E402 (after sys.path.insert)
from iclora.panels import join_panels  # noqa: E402 (after sys.path.insert)
from iclora.references import image_positions, pin_references, reference_latents  # noqa: E402 (after sys.path.insert)
from minflux.conditioning import (  # noqa: E402 (after sys.path.insert)
    Condition,
    fill_condition,
    fill_mask,
    fill_panels,
    kontext_condition,
)
from minflux.hub import Repo  # noqa: E402 (after sys.path.insert)
from minflux.pipeline import Pipeline, from_pil, load_pipeline, to_pil  # noqa: E402 (after sys.path.insert)
from minflux.quantize import FP8_MODES, apply_fp8  # noqa: E402 (after sys.path.insert)
from minflux.sampling import get_noise  # noqa: E402 (after sys.path.insert)
from minflux.user_input import USER_ERRORS  # noqa: E402 (after sys.path.insert)
from minflux.variants import DEFAULTS, detect_variant  # noqa: E402 (after sys.path.insert)
from toy.world import TASKS, Scene, panel_consistency, random_scene, recolour, render  # noqa: E402 (after sys.path.insert)

SCORES = ("caption_left", "caption_right", "rule")
Scores = dict[str, float]  # SCORES' means over the sets


def held_out_scenes(count: int, seed: int, max_shapes: int = 2) -> list[Scene]:
    rng = random.Random(f"held-out-{seed}")
    return [random_scene(rng, max_shapes) for _ in range(count)]


def generate_sets(pipe: Pipeline, scenes: list[Scene], size: int, steps: int, seed: int, reference: bool,
                  task: str = "recolour", ref_mode: str = "noised",
                  progress: bool = False) -> list[Image.Image]:
    """One joined (2·size)×size set per scene, captioned as `task` does, all from one noise draw of `seed`;
    with `reference`, the left panel is the scene's render, pinned at every step in `ref_mode`
    (iclora/references.py). `progress`: a bar of the steps on stderr."""
    width, height = 2 * size, size
    txt, vec = pipe.encode_prompts([TASKS[task](scene) for scene in scenes])
    noise = get_noise(len(scenes), height, width, seed)                                     # (B, c, h, w)
    timesteps = pipe.schedule(height, width, steps)
    hook = None
    if reference:
        left = (0, 0, size, size)
        per_scene = [reference_latents(pipe, [(render(s, size), left)], height, width) for s in scenes]
        ref_latents = torch.cat([scene_latents for scene_latents, _ in per_scene])         # (B, Li, 4c)
        ref_mask = per_scene[0][1]                                                          # (Li,)
        hook = pin_references(ref_latents, ref_mask, noise, timesteps, mode=ref_mode)
    given = [0] if reference else []
    ids = image_positions(height, width, 2, "row", given, ref_mode)                       # (1, Li, 3)
    guidance = DEFAULTS["dev"]["guidance"]  # 3.5
    latents = pipe.sample(txt, vec, (height, width), steps, guidance, seed, progress=progress,
                          after_step=hook, img_ids=ids)
    return to_pil(pipe.decode(latents))


def edit_sets(pipe: Pipeline, scenes: list[Scene], size: int, steps: int, seed: int, task: str = "recolour",
              progress: bool = False) -> list[Image.Image]:
    """generate_sets' ref mode on a Fill or Kontext base, the left panel given as `sample.py` gives it
    (minflux/variant_inputs.py), at the base's own guidance (Fill 30, Kontext 2.5): Fill paints the right
    panel of the two-panel canvas; Kontext makes a size×size panel from the render, joined after it. The
    noise is one draw of `seed`, as generate_sets'."""
    height, width = (size, 2 * size) if pipe.variant == "fill" else (size, size)
    txt, vec = pipe.encode_prompts([TASKS[task](scene) for scene in scenes])
    cond = edit_condition(pipe, scenes, size, seed)
    latents = pipe.sample(txt, vec, (height, width), steps, DEFAULTS[pipe.variant]["guidance"], seed,
                          progress=progress, cond=cond)
    images = to_pil(pipe.decode(latents))
    if pipe.variant == "fill":
        return images
    joined = []
    for scene, image in zip(scenes, images, strict=True):  # Kontext: [the given render | the generated panel]
        joined.append(join_panels([render(scene, size), image], "row"))
    return joined


def edit_condition(pipe: Pipeline, scenes: list[Scene], size: int, seed: int) -> Condition:
    """The scenes' renders as the left panel, a batch's Condition (minflux/conditioning.py). Fill: the
    canvas and mask of `sample.py --panels 2 --ref` (fill_panels), the masked image's latents drawn from a
    generator of `seed`; Kontext: the render as the context, at its own size (the toys' --context-size)."""
    g = torch.Generator().manual_seed(seed)
    channels, tokens, token_ids = [], [], []
    for scene in scenes:
        left = render(scene, size)
        if pipe.variant == "fill":
            image, mask = fill_panels([(left, (0, 0, size, size))], size, 2 * size)
            pixels = from_pil(image, size, 2 * size)                                # (1, 3, H, W)
            cond = fill_condition(pipe, pixels, fill_mask(mask, size, 2 * size), g)
            channels.append(cond.channels)                                          # (1, Li, 320)
        else:
            cond = kontext_condition(pipe, left, size, size)
            tokens.append(cond.tokens)                                              # (1, Lc, 4c)
            token_ids.append(cond.token_ids)                                        # (1, Lc, A)
    if pipe.variant == "fill":
        return Condition(channels=torch.cat(channels))                              # (B, Li, 320)
    return Condition(tokens=torch.cat(tokens), token_ids=torch.cat(token_ids))     # (B, Lc, 4c), (B, Lc, A)


def mean_scores(images: list[Image.Image], scenes: list[Scene], given_size: int | None = None) -> Scores:
    """Mean panel_consistency; with `given_size`, the left panels were given: renders of that size."""
    per_set = []
    for image, scene in zip(images, scenes, strict=True):
        given = render(scene, given_size) if given_size else None
        per_set.append(panel_consistency(image, scene, given))
    means = {}
    for k in SCORES:
        means[k] = round(sum(s[k] for s in per_set) / len(per_set), 4)
    return means


def evaluate(pipe: Pipeline, scenes: list[Scene], size: int = 64, steps: int = 20, seed: int = 0,
             task: str = "recolour", ref_mode: str = "noised",
             label: str | None = None) -> tuple[dict[str, Scores | None], dict[str, list[Image.Image]]]:
    """Scores and images of both modes, {"text": {...}, "ref": {...}}. text: from the joint caption alone;
    scores: caption match of the left and right panels, and the rule (the right panel is the left one, as it
    was generated, recoloured). ref: the left panel is the scene's render, pinned SDEdit-style as `sample.py
    --ref` does, so only the right panel is generated; scores: caption match of the right panel and the rule
    against the given left panel (the render, not its copy decoded with the generated canvas). On a Fill or
    Kontext base (pipe.variant) ref mode gives the left panel as that base takes it (edit_sets) and text
    mode, which has no reference, is None. With a `label` (the model's name), each mode's progress goes to
    stderr: a line, then a bar of the steps."""
    modes = ("text", "ref") if pipe.variant == "dev" else ("ref",)
    images = {}
    for mode in modes:
        if label:
            print(f"{label}, {mode} mode: {len(scenes)} sets, {steps} steps", file=sys.stderr)
        if pipe.variant != "dev":
            images[mode] = edit_sets(pipe, scenes, size, steps, seed, task, progress=label is not None)
        else:
            images[mode] = generate_sets(pipe, scenes, size, steps, seed, mode == "ref", task, ref_mode,
                                         progress=label is not None)
    scores = {"text": None, "ref": mean_scores(images["ref"], scenes, size)}
    if "text" in images:
        scores["text"] = mean_scores(images["text"], scenes)
    del scores["ref"]["caption_left"]  # the given panel, not generated
    return scores, images


@torch.no_grad()
def ceiling(pipe: Pipeline, scenes: list[Scene], size: int = 64) -> float:
    """The ref-mode rule of the exact targets: each set drawn perfectly, through the autoencoder (encoded,
    then decoded as generated sets are) and scored as `evaluate` scores ref mode."""
    targets = []
    for scene in scenes:
        target = join_panels([render(scene, size), render(recolour(scene), size)], "row")
        targets.append(from_pil(target, size, 2 * size))                       # (1, 3, H, W)
    images = to_pil(pipe.decode(pipe.encode_image(torch.cat(targets))))
    return mean_scores(images, scenes, size)["rule"]


def contact_sheet(scenes: list[Scene], rows: list[list[Image.Image]], size: int,
                  columns: int = 8) -> Image.Image:
    """The first `columns` sets: their targets (renders of both panels) on top, then one row per list of
    images."""
    targets = []
    for scene in scenes[:columns]:
        joined = Image.new("RGB", (2 * size, size))
        joined.paste(render(scene, size), (0, 0))
        joined.paste(render(recolour(scene), size), (size, 0))
        targets.append(joined)
    rows = [targets] + [row[:columns] for row in rows]
    gap = 4
    sheet = Image.new("RGB", (len(targets) * (2 * size + gap) - gap, len(rows) * (size + gap) - gap), "gray")
    for j, row in enumerate(rows):
        for i, image in enumerate(row):
            sheet.paste(image, (i * (2 * size + gap), j * (size + gap)))
    return sheet


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", type=Path, help="the IC-LoRA to score (without: the base model alone)")
    p.add_argument("--task", default="recolour", choices=TASKS,
                   help="the captions of the held-out sets: recolour describes both panels, blind_recolour "
                        "neither (default: recolour)")
    p.add_argument("--model", default="toy",
                   help="the base model: toy, toy-fill or toy-kontext (a Fill or Kontext base runs ref mode "
                        "only) (default: toy)")
    p.add_argument("--quantize", choices=["fp8"],
                   help="fp8: the transformer's and T5's Linear weights in float8 e4m3fn (per-row scales), "
                        "as sample.py --quantize; the LoRA is then an adapter on the fp8 layers "
                        "(default: none)")
    p.add_argument("--fp8-compute", choices=FP8_MODES, default="auto",
                   help="with --quantize fp8: multiply in fp8 (on), dequantize (off), or as sample.py's auto "
                        "(default: auto)")
    p.add_argument("--count", type=int, default=20, help="held-out sets (default: 20)")
    p.add_argument("--scenes-seed", type=int, default=1000,
                   help="seed of the held-out scenes (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    p.add_argument("--size", type=int, default=64, help="panel side in pixels (default: 64, the toy model's)")
    p.add_argument("--sheet", type=Path,
                   help="also save a picture: targets, base and LoRA sets, text then ref mode")
    args = p.parse_args(argv)
    if args.count < 1 or args.steps < 1:
        p.error("--count and --steps must be at least 1")
    if args.size < 16 or args.size % 16:
        p.error(f"--size {args.size}: a panel side must be a positive multiple of 16 (whole latent tokens)")
    if args.lora and not args.lora.is_file():
        p.error(f"--lora {args.lora}: no such file")
    args.ref_mode = "noised"  # the reference treatment, for ref mode
    meta = read_conditional_metadata(args.lora) if args.lora else None
    if meta:  # a conditional LoRA: its geometry must be the toy tasks', its treatment is used
        geometry = (meta["panels"], meta["layout"], meta["ref_panels"])
        if geometry != (2, "row", [1]):
            p.error(f"--lora {args.lora}: a conditional LoRA of {meta['panels']} panels in a "
                    f"{meta['layout']}, reference panel(s) {meta['ref_panels']}; the toy tasks score "
                    f"2 panels in a row, the left given")
        args.ref_mode = meta["ref_mode"]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    repo = Repo(args.model)
    variant = detect_variant(repo, None, None)  # dev, fill or kontext, before any weight loads
    note = check_lora_variant(args.lora, variant) if args.lora else None  # refuses another base's LoRA
    if note:
        print(note, file=sys.stderr)
    pipe = load_pipeline(repo, variant=variant)
    apply_fp8(pipe.flow, pipe.t5, args.quantize, args.fp8_compute, pipe.device)
    scenes = held_out_scenes(args.count, args.scenes_seed)
    names = ["base", "lora"] if args.lora else ["base"]
    results = {}
    rows = []  # (name, mode, images)
    for name in names:
        ref_mode = "noised"
        if name == "lora":
            load_lora(pipe.flow, str(args.lora), name="recolour")
            ref_mode = args.ref_mode
        results[name], images = evaluate(pipe, scenes, args.size, args.steps, args.seed, args.task, ref_mode,
                                         label=name)
        for mode in images:
            rows.append((name, mode, images[mode]))
    print(f"ceiling: the {len(scenes)} targets through the autoencoder", file=sys.stderr)
    results["ceiling"] = {"ref": {"rule": ceiling(pipe, scenes, args.size)}}
    print(json.dumps(results, indent=1))
    if args.sheet:
        order = sorted(rows, key=lambda r: r[1] != "text")  # text rows first, then ref rows
        contact_sheet(scenes, [images for _, _, images in order], args.size).save(args.sheet)
        print(f"{args.sheet}: targets, then " + ", ".join(f"{n} ({m})" for n, m, _ in order), file=sys.stderr)
    return results


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
