"""Fill and Kontext IC-LoRA training inputs (issue #23): what `train.py --ref-panel K` gives the flow when the
base is FLUX.1 Fill or FLUX.1 Kontext instead of dev; the models' inputs are minflux/conditioning.py's.

- Fill (the ACE++ / catvton recipe): the image is the whole joined set; the condition is the set with the
  panels to make blanked (pixels 0 in [-1, 1], as diffusers' Fill pipeline blanks them) and the mask, 1 over
  those panels. Every token is noised at t; a reference token's clean point is the condition's own latent
  (what sampling is given), and the loss is on the masked panels' tokens.
- Kontext: panel K alone, at its panel size, is the context (its tokens after the image's, first position
  axis 1); the image is the other panels joined in the layout, and the loss is on all of its tokens.
Shape letters: B batch, Li image tokens, Lc context tokens, c latent channels (16), H/W pixels, A axes (3).
"""

import sys
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from iclora.conditional_metadata import check_lora_variant
from iclora.panels import join_panels, panel_boxes, split_panels
from minflux.conditioning import Condition, context_ids, fill_channels
from minflux.hub import Repo
from minflux.pipeline import from_pil, to_pil
from minflux.sampling import image_ids, pack
from minflux.variants import detect_variant

# --guidance's default while training, per base: dev's is the trainers' 1.0 (kohya, ai-toolkit), and Kontext
# is dev's model; Fill's is the 30 it samples at (BFL's cli_fill.py; ACE++ trained at 50). See
# docs/fill-and-kontext.md
TRAINING_GUIDANCE = {"dev": 1.0, "fill": 30.0, "kontext": 1.0}


def prepare_variant(args):
    """Sets args.variant (dev, fill or kontext, told from the transformer's header and the repo: minflux/
    variants.py) and args.guidance's default for it, and checks the options it needs and --init-lora's
    recorded base, before any weight loads."""
    args.variant = detect_variant(Repo(str(args.model)), args.transformer, args.variant)
    if args.guidance is None:
        args.guidance = TRAINING_GUIDANCE[args.variant]
    if args.variant != "dev" and not args.ref_panel:
        given = "the panels the others are painted from" if args.variant == "fill" else "the context"
        raise ValueError(f"--model {args.model} is FLUX.1 {args.variant.capitalize()}: its LoRA is trained "
                         f"with --ref-panel K, {given}; for a text-to-set IC-LoRA train on FLUX.1-dev")
    if args.variant == "kontext" and len(args.ref_panel) > 1:
        raise ValueError(f"--ref-panel {' --ref-panel '.join(map(str, args.ref_panel))}: a Kontext LoRA "
                         f"takes one panel as its context; give one --ref-panel")
    if args.init_lora:  # a LoRA train.py recorded for another base is refused, as sample.py refuses it
        note = check_lora_variant(args.init_lora, args.variant)
        if note:
            print(note, file=sys.stderr)


@dataclass
class EditSet:
    """One set's training inputs on Fill or Kontext, the fields of iclora/training.py's EncodedSet."""
    latents: Tensor                    # (c, h, w) the image to make: Fill the whole set, Kontext the others
    cond: Condition                    # unbatched: channels (Li, 320), or tokens (Lc, 4c) and ids (Lc, A)
    ref_latents: Tensor | None = None  # Fill: (Li, 4c) the condition's latents, the references' clean point
    ref_mask: Tensor | None = None     # Fill: (Li,) True on the reference tokens, out of the loss
    ids: Tensor | None = None          # Fill: (Li, A) the canvas's positions


@torch.no_grad()
def edit_set(pipe, image: Tensor, n: int, layout: str, ref_panels: list[int], variant: str) -> EditSet:
    """The inputs of a set `image` (3, H, W) in [-1, 1] of n panels whose 1-based `ref_panels` are given."""
    if variant == "fill":
        return fill_inputs(pipe, image, n, layout, ref_panels)
    if variant == "kontext":
        return kontext_inputs(pipe, image, n, layout, ref_panels[0])
    raise ValueError(f"no Fill or Kontext inputs for a {variant!r} base")


def fill_inputs(pipe, image: Tensor, n: int, layout: str, ref_panels: list[int]) -> EditSet:
    """Fill's: the mask is 1 over every panel but the references (a grid's unused cells are given, as black
    as the joined image has them), the condition the set with those panels blanked."""
    H, W = image.shape[1:]
    mask = torch.zeros(1, 1, H, W)                                                # (1, 1, H, W) 1 = paint
    for k, (left, top, right, bottom) in enumerate(panel_boxes(H, W, n, layout)):
        if k + 1 not in ref_panels:
            mask[..., top:bottom, left:right] = 1
    latents = pipe.encode_image(image[None]).cpu()                                # (1, c, h, w)
    masked = pipe.encode_image(image[None] * (1 - mask)).cpu()                    # (1, c, h, w)
    channels = fill_channels(masked, mask)                                        # (1, Li, 320)
    ref_mask = rearrange(mask[0, 0, ::16, ::16] == 0, "h w -> (h w)")             # (Li,)
    return EditSet(latents[0], Condition(channels=channels[0]), pack(masked)[0], ref_mask,
                   image_ids(1, H, W)[0])


def kontext_inputs(pipe, image: Tensor, n: int, layout: str, ref_panel: int) -> EditSet:
    """Kontext's: the 1-based `ref_panel` is the context at its own (panel) size, the other panels joined in
    the layout the image to make."""
    panels = split_panels(to_pil(image[None])[0], n, layout)
    context = panels[ref_panel - 1]
    target = join_panels([p for k, p in enumerate(panels) if k != ref_panel - 1], layout)
    latents = pipe.encode_image(from_pil(target, target.height, target.width)).cpu()         # (1, c, h, w)
    tokens = pack(pipe.encode_image(from_pil(context, context.height, context.width)).cpu())  # (1, Lc, 4c)
    ids = context_ids(1, context.height, context.width)                           # (1, Lc, A)
    return EditSet(latents[0], Condition(tokens=tokens[0], token_ids=ids[0]))


def stack_conditions(conds: list[Condition | None], device) -> Condition | None:
    """A batch's Condition from its sets' (None for dev's sets)."""
    if conds[0] is None:
        return None
    channels = stacked([c.channels for c in conds], device)                     # (B, Li, 320)
    tokens = stacked([c.tokens for c in conds], device)                         # (B, Lc, 4c)
    token_ids = stacked([c.token_ids for c in conds], device)                   # (B, Lc, A)
    return Condition(channels, tokens, token_ids)


def stacked(tensors: list[Tensor | None], device) -> Tensor | None:
    return None if tensors[0] is None else torch.stack(tensors).to(device)


def condition_rows(cond: Condition | None, rows: slice) -> Condition | None:
    """The condition of a batch's `rows` (iclora/distributed.py's part)."""
    if cond is None:
        return None
    channels = None if cond.channels is None else cond.channels[rows]
    tokens = None if cond.tokens is None else cond.tokens[rows]
    token_ids = None if cond.token_ids is None else cond.token_ids[rows]
    return Condition(channels, tokens, token_ids)
