"""Flow-matching LoRA training, the pieces `train.py` strings together (In-Context LoRA, arXiv 2410.23775 §3).

The ordinary rectified-flow objective on joined panel images, with the project's one convention (t = 1 is
noise):
    x_t = (1 − t)·x0 + t·ε,   the model is trained to predict v = ε − x0   (mean squared error).
t is drawn logit-normal (SD3 §3.1; `sigmoid`, the authors' recipe), optionally shifted toward noise as the
sampler's schedule is for that image size (`shift`), or uniform. Every random draw of step s comes from a
generator seeded with (seed, s), so a resumed run continues bit for bit without stored RNG state. A
conditional IC-LoRA (`--ref-panel K`) gives the model its reference panels' tokens as sampling with `--ref`
gives them (iclora/references.py, same function) and takes the loss on the other panels' tokens only.

Shape letters: B batch, Li image tokens, Lt text tokens, c latent channels, h/w latent height/width.
"""

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from iclora.panels import panel_boxes, split_panels
from iclora.references import image_positions, reference_latents, reference_panels, reference_tokens
from minflux.pipeline import to_pil
from minflux.module_tree import compute_dtype
from minflux.sampling import add_noise, image_ids, pack, shift_mu, text_ids, time_shift
from minflux.tokenizers import overlong


def check_captions(t5_tokenizer, dataset, val_prompts: list[str], strict: bool = False):
    """Warns of each training caption and validation prompt that T5 reads only in part; `strict` refuses
    them."""
    named = [(f"the caption of {s.path}", s.caption) for s in dataset.samples[::len(dataset.resolutions)]]
    messages = overlong(t5_tokenizer, named + [(f"--val-prompt {p[:40]!r}", p) for p in val_prompts])
    if messages and strict:
        raise ValueError("--strict-captions: " + "\n".join(messages))
    for message in messages:
        warnings.warn(message)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# sigmoid: the authors' (ai-toolkit's) logit-normal, median 0.5; shift: the same moved toward noise by FLUX's
# resolution shift for this many tokens, as the sampler's schedule (kohya's flux_shift; `logit_normal`, its
# old name, is still read); uniform: unshifted
TIMESTEP_MODES = ("sigmoid", "shift", "uniform")


def sample_timesteps(batch: int, image_tokens: int, g: torch.Generator, mode: str = "shift") -> Tensor:
    """t in (0, 1) for each example, drawn as `mode` (TIMESTEP_MODES) says."""
    mode = "shift" if mode == "logit_normal" else mode
    if mode not in TIMESTEP_MODES:
        raise ValueError(f"unknown timestep sampling {mode!r}; use one of {', '.join(TIMESTEP_MODES)}")
    if mode == "uniform":
        return torch.rand(batch, generator=g).clamp(1e-5, 1 - 1e-5)              # (B,)
    t = torch.sigmoid(torch.randn(batch, generator=g))                            # (B,)
    return time_shift(shift_mu(image_tokens), t) if mode == "shift" else t


def flow_matching_loss(flow, x0: Tensor, txt: Tensor, vec: Tensor, g: torch.Generator, guidance: float = 1.0,
                       timestep_mode: str = "shift", target_mask: Tensor | None = None,
                       known: Tensor | None = None, ref_mode: str = "noised", rows: slice = slice(None),
                       img_ids: Tensor | None = None) -> Tensor:
    """MSE between the predicted and the true velocity ε − x0 at a random point of the noise-data line. With
    `target_mask` (B, Li) or (Li,), True on the tokens to generate: the others become the reference tokens
    reference_tokens(known (B, Li, 4c), ε, t, ref_mode) before the forward, and the MSE is over the target
    tokens. `rows` (iclora/distributed.py): all draws for the whole batch, the loss of these examples as their
    share of it. `img_ids` (B, Li, 3): the tokens' positions, if not the canvas's (image_positions)."""
    B, _, h, w = x0.shape
    x0 = pack(x0)                                                                 # (B, Li, 4c)
    noise = torch.randn(x0.shape, generator=g).to(x0)
    t = sample_timesteps(B, x0.shape[1], g, timestep_mode).to(x0)                 # (B,)
    mask = torch.ones_like(x0, dtype=torch.bool) if target_mask is None else \
        target_mask.to(x0.device).expand(B, x0.shape[1])[..., None].expand_as(x0)  # (B, Li, 4c) True: in the loss
    count = mask.sum()  # the whole batch's, whatever `rows` is
    img_ids = image_ids(B, 8 * h, 8 * w) if img_ids is None else img_ids          # (B, Li, 3)
    x0, noise, t, txt, vec, mask, img_ids = (x[rows] for x in (x0, noise, t, txt, vec, mask, img_ids))
    B = x0.shape[0]  # from here on, the examples of `rows`
    x_t = add_noise(x0, noise, t[:, None, None])                                  # (B, Li, 4c)
    if target_mask is not None:
        x_t = torch.where(mask, x_t, reference_tokens(known[rows].to(x0), noise, t[:, None, None], ref_mode))
    dtype, device = compute_dtype(flow), x0.device
    v = flow(x_t.to(dtype), img_ids.to(device), txt.to(dtype), text_ids(B, txt.shape[1]).to(device),
             timesteps=t.to(dtype), y=vec.to(dtype), guidance=torch.full((B,), guidance, dtype=dtype, device=device))
    return (v.float() - (noise - x0).float())[mask].square().sum() / count


@dataclass
class EncodedSet:
    """One training set as the flow sees it, encoded once so the VAE and text encoders can leave the GPU."""
    latents: Tensor  # (c, h, w) the joined image
    txt: Tensor      # (Lt, 4096) T5 states of its caption
    vec: Tensor      # (768,) CLIP pooled
    known: Tensor | None = None   # (Li, 4c) packed latents of the reference panels (`train.py --ref-panel`)
    target: Tensor | None = None  # (Li,) True on the tokens to generate
    ids: Tensor | None = None     # (Li, 3) the tokens' positions for this reference mode (image_positions)


def check_reference_panels(dataset, ref_panels: list[int]) -> int:
    """The panel count of every set, checked before any weight loads: each set's panels are located (set
    folders, or joined images with `panels`), all sets have one count, and it holds every 1-based reference
    panel."""
    if unknown := [s.path.name for s in dataset.samples[::len(dataset.resolutions)] if s.count is None]:
        raise ValueError(f"--ref-panel needs to know where the panels are, but {dataset.root} holds joined images "
                         f"({', '.join(unknown[:3])}, ...): give --panels N (and --layout) for the panels in each")
    counts = {s.count for s in dataset.samples}
    if len(counts) > 1:
        raise ValueError(f"--ref-panel: the sets of {dataset.root} hold different numbers of panels "
                         f"({sorted(counts)}); a conditional LoRA is trained on one panel count")
    reference_panels(len(ref_panels), ref_panels, counts.pop())  # a panel that does not exist, or nothing to generate
    return dataset.samples[0].count


@torch.no_grad()
def encode_sets(pipe, dataset, ref_panels: list[int] = (), ref_mode: str = "noised",
                part: slice = slice(None)) -> list[EncodedSet]:
    """Each sample's latents and caption states (of the samples `part` of the list only), each (set, bucket)
    and each caption encoded once; with 1-based `ref_panels`, its reference panels, cut from the resized set,
    encoded by reference_latents (as `sample.py --ref` encodes a reference image), the target mask and the
    tokens' positions in `ref_mode`."""
    encoded, done = [], {}
    for i in tqdm(range(len(dataset))[part], desc="encoding images and captions"):
        if (key := (dataset.samples[i].path, dataset.samples[i].bucket)) in done:
            encoded.append(done[key])
            continue
        item = dataset[i]
        latents = pipe.encode_image(item["image"][None])[0].cpu()
        if (caption := item["caption"]) not in done:  # a caption is encoded once, whatever its number of buckets
            done[caption] = [x[0].cpu() for x in pipe.encode_prompts([caption])]   # (Lt, 4096), (768,)
        txt, vec = done[caption]
        known = target = ids = None
        if ref_panels:
            (H, W), n = item["bucket"], dataset.samples[i].count
            panels = split_panels(to_pil(item["image"][None])[0], n, dataset.layout)
            boxes = panel_boxes(H, W, n, dataset.layout)
            known, mask = reference_latents(pipe, [(panels[k - 1], boxes[k - 1]) for k in ref_panels], H, W)
            known, target = known[0], ~mask                                       # (Li, 4c), (Li,)
            ids = image_positions(H, W, n, dataset.layout, [k - 1 for k in ref_panels], ref_mode)[0]  # (Li, 3)
        encoded.append(done.setdefault(key, EncodedSet(latents, txt, vec, known, target, ids)))
    return encoded


def collate(sets: list[EncodedSet], empty: EncodedSet, dropout: float, g: torch.Generator, device) -> tuple:
    """Stacks a batch: latents, caption states, pooled vectors, and (None without reference panels) the
    reference latents, target masks and positions. Each caption is replaced by the empty caption with
    probability `dropout`."""
    drop = (torch.rand(len(sets), generator=g) < dropout).tolist()
    texts = [empty if d else s for d, s in zip(drop, sets)]
    refs = [torch.stack([getattr(s, k) for s in sets]).to(device) for k in ("known", "target", "ids")] \
        if sets[0].known is not None else [None, None, None]
    return (torch.stack([s.latents for s in sets]).to(device), torch.stack([s.txt for s in texts]).to(device),
            torch.stack([s.vec for s in texts]).to(device), *refs)
