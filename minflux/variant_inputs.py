"""sample.py's inputs for FLUX.1 Fill and Kontext: the model's variant, told from its files before any weight
loads (minflux/variants.py); --image, --mask, --ref and --init checked against it; and what the sampler takes
from them (minflux/conditioning.py). Fill's image, or the panel set its --ref fill, is the start of the
schedule as --init's image is (diffusers' first draw), and its mask the extra channels; Kontext's --image is
the context. docs/fill-and-kontext.md has the why of each rule.
"""

from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor

from .conditioning import (
    Condition,
    context_size,
    fill_condition,
    fill_mask,
    fill_panels,
    kontext_condition,
    output_size,
)
from .hub import TOY_MODELS, Repo
from .images import read_image
from .loading import check_repo
from .sampling import check_size
from .variants import DEFAULTS, detect_variant


@dataclass
class EditInputs:
    """The variant of a sample.py run and its inputs; for dev only `repo` and `variant` matter."""
    repo: Repo
    variant: str
    height: int
    width: int
    init: Image.Image | None = None   # Fill: the image to paint, height×width; else --init's
    refs: list = field(default_factory=list)  # the references to pin (Fill's are in its image: none)
    mask: Tensor | None = None        # (1, 1, H, W) Fill: 1 = paint
    context: Image.Image | None = None  # Kontext: the context image
    context_hw: tuple[int, int] = (0, 0)  # Kontext: the size it is resized to
    kontext: Condition | None = None  # Kontext: its tokens, encoded on first use

    def condition(self, pipe, pixels: Tensor | None, g: torch.Generator) -> Condition | None:
        """The Condition of one seed: Fill draws it from `g` (the third draw); Kontext has one for all."""
        if self.variant == "fill":
            return fill_condition(pipe, pixels, self.mask, g)
        if self.variant == "kontext" and self.kontext is None:
            self.kontext = kontext_condition(pipe, self.context, *self.context_hw)
        return self.kontext


def check_flags(args, variant: str, refs: list, init):
    """Which of --image, --mask, --ref, --init and --strength the variant takes (ValueError otherwise)."""
    model = f"--model {args.model}" + (f" (--transformer {args.transformer})" if args.transformer else "")
    name = {"dev": "a text-to-image model (dev or schnell)", "fill": "FLUX.1 Fill",
            "kontext": "FLUX.1 Kontext"}[variant]
    if args.context_size and variant != "kontext":
        raise ValueError(f"--context-size is for a FLUX.1 Kontext model's context image; {model} is {name}")
    if args.mask and variant != "fill":
        raise ValueError(f"--mask is for a FLUX.1 Fill model; {model} is {name}")
    if args.image and variant == "dev":
        raise ValueError(f"--image is Fill's image to paint or Kontext's context; {model} is {name} (for "
                         f"image-to-image give --init; for a Fill or Kontext file that cannot say so, "
                         f"--variant)")
    if variant == "dev":
        return
    if init is not None:
        raise ValueError(f"--init is for text-to-image models; {model} is {name}: give the image with "
                         f"--image")
    if variant == "kontext" and (not args.image or refs or args.strength is not None):
        raise ValueError(f"{model} is {name}: give one context image with --image (no --ref, no --strength)")
    if variant == "fill" and bool(args.image) != bool(args.mask):
        raise ValueError(f"{model} is {name}: give both --image IMG and --mask MASK (white = paint)")
    if variant == "fill" and bool(args.image) == bool(refs):
        raise ValueError(f"{model} is {name}: give either --image IMG --mask MASK, or a panel set (--panels "
                         f"N) with --ref images, whose other panels it paints")


def edit_inputs(args, refs: list, init, height: int, width: int) -> EditInputs:
    """The run's variant (checked against --variant) and its inputs, read and checked before any weight
    loads. Sets the unset --guidance and --steps to the variant's defaults, and, without a size flag, the
    output size from the --image: Fill's own size floored to 16, Kontext's aspect at the native area."""
    repo = Repo(args.model)
    check_repo(repo, args.transformer)
    variant = detect_variant(repo, args.transformer, args.variant)
    check_flags(args, variant, refs, init)
    args.guidance = DEFAULTS[variant]["guidance"] if args.guidance is None else args.guidance
    if args.steps is None and variant != "dev":  # dev's depend on schnell: Pipeline.schedule
        args.steps = DEFAULTS[variant]["steps"]
    image = read_image(args.image, "--image") if args.image else None  # none for dev (check_flags)
    if image is not None and not args.sized:
        native = 64 if args.model in TOY_MODELS else 1024
        if variant == "fill":
            height, width = image.height // 16 * 16, image.width // 16 * 16
        else:
            height, width = output_size(image.height, image.width, native * native)
        check_size(height, width)
    args.height, args.width = height, width  # stored as used
    if variant == "dev":
        return EditInputs(repo, variant, height, width, init, refs)
    if variant == "kontext":
        own = args.context_size or ("own" if args.model in TOY_MODELS else "preferred")
        context_hw = context_size(image.height, image.width, own)
        check_size(*context_hw)
        return EditInputs(repo, variant, height, width, context=image, context_hw=context_hw)
    if image is None:  # the panel set: the references in their panels, the others painted
        image, mask = fill_panels(refs, height, width)
    else:
        mask = read_mask(args.mask, image)
    image = image.resize((width, height), Image.Resampling.LANCZOS)
    args.strength = 1.0 if args.strength is None else args.strength
    return EditInputs(repo, variant, height, width, image, [], fill_mask(mask, height, width))


def read_mask(path, image: Image.Image) -> Image.Image:
    """--mask: an image of the --image's size (any mode that converts to greyscale; white = paint)."""
    mask = read_image(path, "--mask")
    if mask.size != image.size:
        raise ValueError(f"--mask {path}: {mask.width}×{mask.height} px (W×H), but the --image is "
                         f"{image.width}×{image.height}; give a mask of the image's size")
    return mask
