"""Make the toy FLUX.1 Fill and FLUX.1 Kontext from the toy FLUX.1-dev (toy/model/), each by a short CPU
fine-tune, the way BFL made theirs from dev (issue #23; the inputs are minflux/conditioning.py's):

    python toy/train_variants.py     # the shipped run: toy/variants/flux1-{fill,kontext}-toy.safetensors
    python toy/train_variants.py --out /tmp/v --examples 64 --steps 3 --eval 2 --eval-steps 2   # a smoke run

Fill: img_in widened from 64 to 384 input channels, the 320 new columns zero (at step 0 it is the dev toy),
trained to inpaint scenes under random boxes, halves and whole-image masks. Kontext: dev's shapes, trained on
edit pairs (context scene -> edited scene, captioned as the edited one) with the context's tokens after the
image's at positions (1, row, col). Both: iclora/training.py's flow-matching objective through `conditioned`.
Only the transformer is written (BFL's key names); encoders, VAE and tokenizers stay toy/model's.
Deterministic for --seed and --threads. Shape letters: N examples, B batch, Li image tokens, Lc context
tokens, c latent channels, H/W pixels.
"""

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
from iclora.training import TIMESTEP_MODES, flow_matching_loss, step_generator  # noqa: E402 (after sys.path.insert)
from minflux.conditioning import Condition, context_ids, fill_channels  # noqa: E402 (after sys.path.insert)
from minflux.model import Flux  # noqa: E402 (after sys.path.insert)
from minflux.pipeline import Pipeline, load_pipeline, to_pil  # noqa: E402 (after sys.path.insert)
from minflux.sampling import pack  # noqa: E402 (after sys.path.insert)
from minflux.variants import DEFAULTS  # noqa: E402 (after sys.path.insert)
from toy.hf_files import save_weights  # noqa: E402 (after sys.path.insert)
from toy.train_base import encode_captions, merged_pad_attention, renders, timed, warmup_cosine  # noqa: E402 (after sys.path.insert)
from toy.world import CELLS, COLOURS, KINDS, SIZES, Scene, Shape, caption, caption_match, random_scene, snap  # noqa: E402 (after sys.path.insert)

VARIANTS = ("fill", "kontext")
FILES = {"fill": "flux1-fill-toy.safetensors", "kontext": "flux1-kontext-toy.safetensors"}
EXTRA_CHANNELS = 320  # Fill's: 64 of the masked image's latent + 256 of the pixel mask
EDITS = ("recolour", "move", "add or remove", "background")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "toy" / "model",
                   help="the toy FLUX.1-dev repo to start from (default: toy/model)")
    p.add_argument("--out", type=Path, default=ROOT / "toy" / "variants",
                   help="folder for the transformer files, sample sheets and log (default: toy/variants)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="which models to make (default: both)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, batches and noise (default: 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; the files are bit-for-bit repeatable for a fixed count "
                        "(default: 1, the same files on any machine)")
    p.add_argument("--examples", type=int, default=1000,
                   help="training examples per model: scenes with a mask, or edit pairs (default: 1000)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64, the toy's)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per model (default: 600)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: 1e-3)")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps (default: 50)")
    p.add_argument("--new-input-lr", type=float, default=5.0,
                   help="Fill's img_in (whose 320 new columns start at zero) learns this many times faster "
                        "(default: 5)")
    p.add_argument("--timesteps", default="shift", choices=TIMESTEP_MODES,
                   help="how t is drawn, as train.py's --timestep-sampling (default: shift)")
    p.add_argument("--fill-guidance", type=float, nargs=2, default=(1.0, 50.0), metavar=("LOW", "HIGH"),
                   help="Fill's guidance input is drawn uniformly from this range each step; it covers BFL's "
                        "sampling default 30 and ACE++'s training value 50 (default: 1 50)")
    p.add_argument("--kontext-guidance", type=float, nargs=2, default=(1.0, 5.0), metavar=("LOW", "HIGH"),
                   help="the same for Kontext, as the dev toy was trained (default: 1 5)")
    p.add_argument("--eval", type=int, default=16, help="held-out examples scored and drawn (default: 16)")
    p.add_argument("--eval-steps", type=int, default=20,
                   help="sampling steps of the evaluation (default: 20)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------ data


def random_mask(rng: random.Random, size: int) -> torch.Tensor:
    """A (1, H, W) pixel mask, 1 = paint: a random box (half of the draws), a half of the image (the IC-LoRA
    use: one panel given, the other painted), or the whole image (text to image)."""
    mask = torch.zeros(1, size, size)
    kind = rng.choices(("box", "half", "all"), weights=(0.5, 0.35, 0.15))[0]
    if kind == "all":
        mask[:] = 1
    elif kind == "half":
        half = size // 2
        region = rng.choice(((slice(None), slice(half, None)), (slice(None), slice(None, half)),
                             (slice(half, None), slice(None)), (slice(None, half), slice(None))))
        mask[0][region] = 1
    else:
        height, width = rng.randint(size // 4, 3 * size // 4), rng.randint(size // 4, 3 * size // 4)
        top, left = rng.randint(0, size - height), rng.randint(0, size - width)
        mask[0, top : top + height, left : left + width] = 1
    return mask


def edit_scene(scene: Scene, rng: random.Random) -> Scene:
    """One edit of EDITS: recolour a shape, move it to an empty cell, add a shape to a one-shape scene or
    remove one of two (the dev toy knows 1-2 shapes), or change the background to a colour no shape has."""
    shapes = list(scene.shapes)
    i = rng.randrange(len(shapes))
    free = [cell for cell in CELLS if cell not in {s.cell for s in shapes}]
    edit = rng.choice(EDITS)
    if edit == "recolour":
        colours = [c for c in COLOURS if c not in (scene.background, shapes[i].colour)]
        shapes[i] = dataclasses.replace(shapes[i], colour=rng.choice(colours))
    elif edit == "move":
        shapes[i] = dataclasses.replace(shapes[i], cell=rng.choice(free))
    elif edit == "add or remove" and len(shapes) == 1:
        colours = [c for c in COLOURS if c != scene.background]
        new = Shape(rng.choice(KINDS), rng.choice(colours), rng.choice(tuple(SIZES)), rng.choice(free))
        shapes.append(new)
    elif edit == "add or remove":
        del shapes[i]
    else:
        used = {scene.background} | {s.colour for s in shapes}
        return Scene(rng.choice([c for c in COLOURS if c not in used]), tuple(shapes))
    return Scene(scene.background, tuple(shapes))


@dataclass
class Examples:
    """What one variant trains or is scored on: the images to generate and what conditions each."""
    variant: str
    targets: list[Scene]
    latents: torch.Tensor   # (N, c, H/8, W/8) the images to generate
    extra: torch.Tensor     # (N, Li, 320) Fill's fill_channels, or (N, Lc, 4c) Kontext's context tokens
    given: torch.Tensor     # (N, 3, H, W) what the model is given: the masked image, or the context
    mask: torch.Tensor | None = None  # (N, 1, H, W) Fill's pixel mask

    def condition(self, rows: torch.Tensor | slice = slice(None)) -> Condition:
        if self.variant == "fill":
            return Condition(channels=self.extra[rows])
        H = 8 * self.latents.shape[2]
        W = 8 * self.latents.shape[3]
        return Condition(tokens=self.extra[rows], token_ids=context_ids(1, H, W))  # (B, Lc, 4c), (1, Lc, A)


@torch.no_grad()
def encode(pipe: Pipeline, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """VAE latent means (N, c, H/8, W/8) of pixels (N, 3, H, W) in [-1, 1], as BFL's ae.encode."""
    return torch.cat([pipe.encode_image(images[i : i + batch]) for i in range(0, len(images), batch)])


def make_examples(pipe: Pipeline, variant: str, count: int, size: int, seed: str) -> Examples:
    """Fill: scenes, each with a random_mask; the condition is fill_channels of the latents of the scene with
    the masked area set to 0 (grey) and of the mask. Kontext: scenes and an edit of each; the condition is the
    scene's packed latents, the image to generate is the edited scene."""
    rng = random.Random(f"{variant}-{seed}")
    scenes = [random_scene(rng, 2) for _ in range(count)]
    if variant == "fill":
        masks = torch.stack([random_mask(rng, size) for _ in scenes])             # (N, 1, H, W)
        images = renders(scenes, size)                                             # (N, 3, H, W)
        masked = images * (1 - masks)                                              # (N, 3, H, W)
        extra = fill_channels(encode(pipe, masked), masks)                         # (N, Li, 320)
        return Examples(variant, scenes, encode(pipe, images), extra, masked, masks)
    targets = [edit_scene(scene, rng) for scene in scenes]
    contexts = renders(scenes, size)                                               # (N, 3, H, W)
    extra = pack(encode(pipe, contexts))                                           # (N, Lc, 4c)
    return Examples(variant, targets, encode(pipe, renders(targets, size)), extra, contexts)


# ---------------------------------------------------------------------------------------------- fine-tuning


def start_from_dev(dev: Flux, variant: str) -> Flux:
    """A trainable copy of the dev toy; for Fill with img_in widened by EXTRA_CHANNELS zero columns, so that
    the new inputs add nothing until training moves them."""
    state = dict(dev.state_dict())
    params = dev.params
    if variant == "fill":
        weight = state["img_in.weight"]                                            # (C, 64)
        state["img_in.weight"] = torch.cat([weight, weight.new_zeros(len(weight), EXTRA_CHANNELS)], dim=1)
        params = dataclasses.replace(params, in_channels=weight.shape[1] + EXTRA_CHANNELS)
    flow = Flux(params)
    flow.load_state_dict(state)
    return flow.float().train().requires_grad_(True)


def fine_tune(flow: Flux, data: Examples, text: tuple, args, seed: int, guidance_range) -> dict:
    """AdamW with warm-up and cosine decay (Fill's img_in --new-input-lr times faster), gradient clipping at
    1; every draw of step s from step_generator(seed, s). `text`: encode_captions' (txt, bias, vec)."""
    txt, bias, vec = text
    fast = args.new_input_lr if data.variant == "fill" else 1.0
    rest = [p for name, p in flow.named_parameters() if not name.startswith("img_in.")]
    groups = [{"params": rest, "scale": 1.0}, {"params": list(flow.img_in.parameters()), "scale": fast}]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    low, high = guidance_range
    losses = []
    bar = tqdm(range(args.steps), desc=data.variant)
    with merged_pad_attention(bias):
        for step in bar:
            g = step_generator(seed, step)
            for group in opt.param_groups:
                group["lr"] = args.lr * group["scale"] * warmup_cosine(step, args.steps, args.warmup)
            rows = torch.randint(len(data.latents), (args.batch,), generator=g)
            guidance = low + (high - low) * torch.rand((), generator=g).item()
            loss = flow_matching_loss(flow, data.latents[rows], txt[rows], vec[rows], g, guidance,
                                      args.timesteps, data.condition(rows))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    flow.eval().requires_grad_(False)
    return {"loss_first100": float(np.mean(losses[:100])), "loss_last100": float(np.mean(losses[-100:]))}


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def draw(pipe: Pipeline, flow: Flux, cond: Condition | None, captions: list[str], size: int, steps: int,
         guidance: float, seed: int = 0) -> list[Image.Image]:
    """size×size images of the captions, sampled by Pipeline.sample with `flow` in place of the pipeline's own
    (the dev toy's encoders and autoencoder), given `cond`."""
    txt, vec = pipe.encode_prompts(captions)                                       # (B, Lt, C), (B, C)
    latents = dataclasses.replace(pipe, flow=flow).sample(txt, vec, (size, size), steps, guidance, seed,
                                                          progress=False, cond=cond)
    return to_pil(pipe.decode(latents))


def palette_agreement(image: Image.Image, target: Image.Image, where: np.ndarray | None = None) -> float:
    """The fraction of pixels (of `where`, (H, W) bool, if given) whose nearest palette colour is the
    target's."""
    same = snap(image)[0] == snap(target)[0]                                       # (H, W)
    return float(same[where].mean() if where is not None else same.mean())


def score(images: list[Image.Image], data: Examples, size: int) -> dict:
    """caption_match against the scene to generate, and palette_agreement with its render: over the given
    (unmasked) pixels for Fill, over all pixels for Kontext."""
    matches = []
    agreement = []
    for i, image in enumerate(images):
        target = to_pil(renders([data.targets[i]], size))[0]
        where = None if data.mask is None else data.mask[i, 0].numpy() < 0.5
        matches.append(caption_match(image, data.targets[i]))
        agreement.append(palette_agreement(image, target, where) if where is None or where.any() else 1.0)
    return {"caption_match": round(float(np.mean(matches)), 3), "pixels": round(float(np.mean(agreement)), 3)}


def sheet(rows: list[list[Image.Image]], columns: int = 8) -> Image.Image:
    """The first `columns` images of each row, a 4-pixel grey gap between them."""
    size = rows[0][0].width
    gap = 4
    out = Image.new("RGB", (columns * (size + gap) - gap, len(rows) * (size + gap) - gap), "gray")
    for j, row in enumerate(rows):
        for i, image in enumerate(row[:columns]):
            out.paste(image, (i * (size + gap), j * (size + gap)))
    return out


def evaluate(pipe: Pipeline, flow: Flux, data: Examples, args) -> tuple[dict, Image.Image]:
    """Scores of the dev toy from the caption alone and of the variant with its condition, same noise, at the
    variant's sampling guidance (minflux/variants.py); the sheet: what the model is given, the target, dev,
    the variant."""
    captions = [caption(scene) for scene in data.targets]
    guidance = DEFAULTS[data.variant]["guidance"]
    base = draw(pipe, pipe.flow, None, captions, args.size, args.eval_steps, guidance)
    made = draw(pipe, flow, data.condition(), captions, args.size, args.eval_steps, guidance)
    scores = {"dev, from the caption": score(base, data, args.size),
              data.variant: score(made, data, args.size)}
    targets = to_pil(renders(data.targets, args.size))
    return scores, sheet([to_pil(data.given), targets, base, made])


# ------------------------------------------------------------------------------------------------------ main


def make_variant(pipe: Pipeline, variant: str, args) -> dict:
    """Trains one variant, writes its transformer file (replaced whole) and sample sheet; returns its log."""
    times = {}
    cpu = time.process_time()  # CPU seconds: the wall-clock ones count the other programs on a shared CPU
    reach = int(json.loads((args.model / "train_log.json").read_text())["args"]["t5_reach"])
    with timed(times, "data"):
        data = make_examples(pipe, variant, args.examples, args.size, str(args.seed))
        captions = [caption(scene) for scene in data.targets]
        text = encode_captions(pipe.t5, pipe.clip, args.model, captions, reach)    # (N, Lt, C), (Lt,), (N, C)
    with timed(times, "train"):
        torch.manual_seed(args.seed)
        flow = start_from_dev(pipe.flow, variant)
        guidance_range = args.fill_guidance if variant == "fill" else args.kontext_guidance
        losses = fine_tune(flow, data, text, args, args.seed + VARIANTS.index(variant), guidance_range)
    path = args.out / FILES[variant]
    tmp = path.with_name(f".{path.name}.tmp")
    save_weights(tmp, flow.state_dict())
    os.replace(tmp, path)
    with timed(times, "eval"):
        held_out = make_examples(pipe, variant, args.eval, args.size, f"eval-{args.seed}")
        scores, picture = evaluate(pipe, flow, held_out, args)
    picture.save(args.out / f"{variant}-samples.png")
    print(f"{variant}: wrote {path}; {scores}; {times}", file=sys.stderr)
    return {"losses": losses, "scores": scores, "seconds": {k: round(v, 1) for k, v in times.items()},
            "cpu_seconds": round(time.process_time() - cpu, 1)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.size % 16 or args.size < 32:
        raise ValueError(f"--size must be a multiple of 16 and at least 32, got {args.size}")
    pipe = load_pipeline(str(args.model))
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "train_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}  # keeps the other variant's entry
    for variant in args.variants:
        log[variant] = make_variant(pipe, variant, args)
        log[variant]["args"] = {k: str(v) for k, v in vars(args).items()}
    log_path.write_text(json.dumps(log, indent=2) + "\n")
    return log


if __name__ == "__main__":
    main()
