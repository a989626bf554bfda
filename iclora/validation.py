"""A training run's validation images: each --val-prompt sampled with the weights of the step (the EMA's
when on), side by side in `<stem>_samples/step000250.png`. A conditional LoRA's are given the first set's
reference panels, as `sample.py --ref` gives them (on Fill and Kontext, its condition, at its size: iclora/
edit_training.py). A failure to write them (disk full) is a warning, and
training goes on: the steps are saved by the checkpoints, not by these images."""

from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from iclora.atomic_files import write_or_warn
from iclora.distributed import rank
from iclora.edit_training import stack_conditions
from iclora.ema import EMA
from iclora.references import pin_references
from iclora.training import EncodedSet
from minflux.pipeline import to_pil
from minflux.sampling import get_noise
from minflux.variants import DEFAULTS


class Validation:
    """`prompts`: options.validation_prompts's; `shown`: the encoded set whose reference panels condition
    them (None: a plain LoRA), at `size` (H, W)."""

    def __init__(self, pipe, prompts: list[dict], size: tuple[int, int], shown: EncodedSet | None,
                 ref_mode: str, folder: Path):
        self.pipe = pipe
        self.prompts = prompts
        self.folder = folder
        self.txt, self.vec = pipe.encode_prompts([v["caption"] for v in prompts])
        self.hooks = [None] * len(prompts)
        self.ids = [None] * len(prompts)
        self.sizes = [(v["height"], v["width"]) for v in prompts]
        self.cond = None
        if shown is not None and shown.cond is not None:  # Fill, Kontext: the first set's condition, its size
            self.cond = stack_conditions([shown.cond], pipe.device)
            self.sizes = [tuple(8 * side for side in shown.latents.shape[1:])] * len(prompts)
        elif shown is not None:
            for i, v in enumerate(prompts):
                noise = get_noise(1, *size, v["seed"])
                times = pipe.schedule(*size, v["steps"])
                self.hooks[i] = pin_references(shown.ref_latents[None], shown.ref_mask, noise, times,
                                               mode=ref_mode)
                self.ids[i] = shown.ids[None]

    def __call__(self, flow, ema: EMA, step: int):
        """This step's images: every rank samples them (under --fsdp each holds a part of every block), and
        rank 0 writes them."""
        flow.eval()
        images = []
        with ema.applied():
            for i, v in enumerate(tqdm(self.prompts, desc=f"validation images, step {step}", leave=False,
                                       disable=rank() > 0)):
                guidance = guidance_of(v, self.pipe.variant)
                latents = self.pipe.sample(self.txt[i : i + 1], self.vec[i : i + 1], self.sizes[i],
                                           steps=v["steps"], guidance=guidance, seed=v["seed"],
                                           progress=False, after_step=self.hooks[i], img_ids=self.ids[i],
                                           cond=self.cond)
                images.append(to_pil(self.pipe.decode(latents))[0])
        flow.train()
        if rank() == 0:
            write_or_warn(self.folder / f"step{step:06d}.png",
                          lambda tmp: side_by_side(images).save(tmp, format="PNG"), "the validation images")


def guidance_of(v: dict, variant: str) -> float:
    """A validation prompt's --g, or its base's sampling default (dev 3.5, Fill 30, Kontext 2.5)."""
    return DEFAULTS[variant]["guidance"] if v["guidance"] is None else v["guidance"]


def side_by_side(images: list[Image.Image], gap: int = 4) -> Image.Image:
    """The images in one row on grey, top-aligned."""
    width = sum(i.width for i in images) + gap * (len(images) - 1)
    row = Image.new("RGB", (width, max(i.height for i in images)), "grey")
    for i, image in enumerate(images):
        row.paste(image, (sum(j.width + gap for j in images[:i]), 0))
    return row
