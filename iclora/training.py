"""Flow-matching LoRA training, the pieces `train.py` strings together (In-Context LoRA, arXiv 2410.23775 §3).

The ordinary rectified-flow objective on joined panel images, with the project's one convention, t = 1 noise:
    x_t = (1 − t)·x0 + t·ε,   the model is trained to predict v = ε − x0   (mean squared error).
t is drawn logit-normal (SD3 §3.1; `sigmoid`, the authors' recipe), optionally shifted toward noise as the
sampler's schedule is for that image size (`shift`), or uniform. Every random draw of step s comes from a
generator seeded with (seed, s), so that a resumed run continues bit for bit without stored RNG state. A
conditional IC-LoRA (`--ref-panel K`) gives the model its reference panels' tokens as sampling with `--ref`
gives them (iclora/references.py, same function) and takes the loss on the other panels' tokens only; on a
Fill or Kontext base, the model's extra input, a Condition, comes along (iclora/edit_training.py).

Shape letters: B batch, Li image tokens, Lt text tokens, c latent channels, h/w latent height/width.
"""

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from iclora.edit_training import condition_rows, edit_set, stack_conditions
from iclora.panels import panel_boxes, split_panels
from iclora.references import image_positions, reference_latents, reference_tokens
from minflux.conditioning import Condition, conditioned
from minflux.module_tree import compute_dtype
from minflux.pipeline import to_pil
from minflux.sampling import add_noise, image_ids, pack, shift_mu, text_ids, time_shift


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


@dataclass
class References:
    """The reference panels of a batch (`train.py --ref-panel`): the model sees their tokens as sampling with
    `--ref` gives them (iclora/references.py), and the loss leaves them out."""
    latents: Tensor            # (B, Li, 4c) packed latents of the reference panels
    ref_mask: Tensor           # (B, Li) or (Li,) True on the reference tokens
    mode: str = "noised"       # REF_MODES: what the model sees there
    ids: Tensor | None = None  # (B, Li, 3) the tokens' positions in this mode, if not the canvas's


def draw_noise_and_times(x0: Tensor, g: torch.Generator, timestep_mode: str) -> tuple[Tensor, Tensor]:
    """ε (B, Li, 4c) and t (B,) for packed latents x0, drawn from g in this order."""
    noise = torch.randn(x0.shape, generator=g).to(x0)                             # (B, Li, 4c)
    t = sample_timesteps(x0.shape[0], x0.shape[1], g, timestep_mode).to(x0)       # (B,)
    return noise, t


def predict_velocity(flow, x_t: Tensor, t: Tensor, img_ids: Tensor, txt: Tensor, vec: Tensor,
                     guidance: float, cond: Condition | None = None) -> Tensor:
    """The flow's v (B, Li, 4c) for x_t (B, Li, 4c) at t (B,), computed in the flow's dtype, given `cond`
    (Fill's channels or Kontext's context: minflux/conditioning.py)."""
    B = x_t.shape[0]
    dtype = compute_dtype(flow)
    device = x_t.device
    guidance = torch.full((B,), guidance, dtype=dtype, device=device)             # (B,)
    flow = conditioned(flow, cond)
    return flow(x_t.to(dtype), img_ids.to(device), txt.to(dtype), text_ids(B, txt.shape[1]).to(device),
                timesteps=t.to(dtype), y=vec.to(dtype), guidance=guidance)


def flow_matching_loss(flow, x0: Tensor, txt: Tensor, vec: Tensor, g: torch.Generator, guidance: float = 1.0,
                       timestep_mode: str = "shift", cond: Condition | None = None) -> Tensor:
    """MSE between the predicted and the true velocity ε − x0 at a random point t of the noise-data line
    (with `cond`, a Fill or Kontext base's input)."""
    B, _, h, w = x0.shape
    x0 = pack(x0)                                                                 # (B, Li, 4c)
    noise, t = draw_noise_and_times(x0, g, timestep_mode)                         # (B, Li, 4c), (B,)
    x_t = add_noise(x0, noise, t[:, None, None])                                  # (B, Li, 4c)
    v = predict_velocity(flow, x_t, t, image_ids(B, 8 * h, 8 * w), txt, vec, guidance, cond)
    return (v.float() - (noise - x0).float()).square().mean()


def training_loss(flow, x0: Tensor, txt: Tensor, vec: Tensor, g: torch.Generator, guidance: float = 1.0,
                  timestep_mode: str = "shift", refs: References | None = None,
                  rows: slice = slice(None), cond: Condition | None = None) -> Tensor:
    """The same objective as flow_matching_loss, with three options train.py uses. With `refs`, their tokens
    become reference_tokens before the forward and the MSE is over the other tokens, at `refs.ids` if given.
    With `rows` (iclora/distributed.py), every draw is made for the whole batch and the loss is that of these
    examples only, as their share of the batch's. `cond` is a Fill or Kontext base's input."""
    B, _, h, w = x0.shape
    x0 = pack(x0)                                                                 # (B, Li, 4c)
    noise, t = draw_noise_and_times(x0, g, timestep_mode)                         # (B, Li, 4c), (B,)
    in_loss = torch.ones_like(x0, dtype=torch.bool)                               # (B, Li, 4c)
    if refs is not None:
        in_loss = (~refs.ref_mask).to(x0.device).expand(B, x0.shape[1])          # (B, Li)
        in_loss = in_loss[..., None].expand_as(x0)                                # (B, Li, 4c)
    count = in_loss.sum()  # the whole batch's, whatever `rows` is
    img_ids = image_ids(B, 8 * h, 8 * w) if refs is None or refs.ids is None else refs.ids    # (B, Li, 3)
    # from here on, only this process's rows of the batch (B is their number)
    x0 = x0[rows]                                                                 # (B, Li, 4c)
    noise = noise[rows]                                                           # (B, Li, 4c)
    t = t[rows]                                                                   # (B,)
    txt = txt[rows]                                                               # (B, Lt, 4096)
    vec = vec[rows]                                                               # (B, 768)
    in_loss = in_loss[rows]                                                       # (B, Li, 4c)
    img_ids = img_ids[rows]                                                       # (B, Li, 3)
    x_t = add_noise(x0, noise, t[:, None, None])                                  # (B, Li, 4c)
    if refs is not None:
        given = reference_tokens(refs.latents[rows].to(x0), noise, t[:, None, None], refs.mode)
        x_t = torch.where(in_loss, x_t, given)
    v = predict_velocity(flow, x_t, t, img_ids, txt, vec, guidance, condition_rows(cond, rows))  # (B, Li, 4c)
    return (v.float() - (noise - x0).float())[in_loss].square().sum() / count


@dataclass
class EncodedSet:
    """One training set as the flow sees it, encoded once so the VAE and text encoders can leave the GPU."""
    latents: Tensor  # (c, h, w) the joined image
    txt: Tensor      # (Lt, 4096) T5 states of its caption
    vec: Tensor      # (768,) CLIP pooled
    # with `train.py --ref-panel`:
    ref_latents: Tensor | None = None  # (Li, 4c) packed latents of the reference panels
    ref_mask: Tensor | None = None     # (Li,) True on the reference tokens
    ids: Tensor | None = None          # (Li, 3) the tokens' positions in this mode (image_positions)
    cond: Condition | None = None      # on a Fill or Kontext base (iclora/edit_training.py), unbatched


@torch.no_grad()
def encode_sets(pipe, dataset, ref_panels: list[int] = (), ref_mode: str = "noised",
                part: slice = slice(None), variant: str = "dev") -> list[EncodedSet]:
    """Each sample's latents and caption states (of the samples `part` of the list only), each (set, bucket)
    and each caption encoded once; with 1-based `ref_panels`, its reference panels, cut from the resized set,
    encoded by reference_latents (as `sample.py --ref` encodes a reference image), ref_mask and the tokens'
    positions in `ref_mode`; on a Fill or Kontext base (`variant`), their inputs instead (edit_set)."""
    encoded = []
    by_sample = {}   # (set path, bucket) -> its EncodedSet
    by_caption = {}  # caption -> its T5 states and CLIP vector
    for i in tqdm(range(len(dataset))[part], desc="encoding images and captions"):
        key = (dataset.samples[i].path, dataset.samples[i].bucket)
        if key in by_sample:
            encoded.append(by_sample[key])
            continue
        item = dataset[i]
        caption = item["caption"]
        if caption not in by_caption:  # a caption is encoded once, whatever its number of buckets
            by_caption[caption] = [x[0].cpu() for x in pipe.encode_prompts([caption])]  # (Lt, 4096), (768,)
        txt, vec = by_caption[caption]
        if variant != "dev":  # Fill's or Kontext's inputs (iclora/edit_training.py)
            n = dataset.samples[i].count
            e = edit_set(pipe, item["image"], n, dataset.layout, ref_panels, variant)
            by_sample[key] = EncodedSet(e.latents, txt, vec, e.ref_latents, e.ref_mask, e.ids, e.cond)
            encoded.append(by_sample[key])
            continue
        latents = pipe.encode_image(item["image"][None])[0].cpu()                 # (c, h, w)
        ref_latents = None
        ref_mask = None
        ids = None
        if ref_panels:
            H, W = item["bucket"]
            n = dataset.samples[i].count
            panels = split_panels(to_pil(item["image"][None])[0], n, dataset.layout)
            boxes = panel_boxes(H, W, n, dataset.layout)
            given = [k - 1 for k in ref_panels]                                   # 0-based
            ref_latents, ref_mask = reference_latents(pipe, [(panels[k], boxes[k]) for k in given], H, W)
            ref_latents = ref_latents[0]                                          # (Li, 4c), ref_mask (Li,)
            ids = image_positions(H, W, n, dataset.layout, given, ref_mode)[0]    # (Li, 3)
        encoded_set = EncodedSet(latents, txt, vec, ref_latents, ref_mask, ids)
        by_sample[key] = encoded_set
        encoded.append(encoded_set)
    return encoded


def collate(sets: list[EncodedSet], empty: EncodedSet, dropout: float, g: torch.Generator, device,
            ref_mode: str = "noised") -> tuple[Tensor, Tensor, Tensor, References | None, Condition | None]:
    """Stacks a batch: latents, caption states, pooled vectors, its References (in `ref_mode`, but a Fill
    base's, given "noised" as the canvas is; None without reference panels) and its Fill or Kontext
    Condition (None on dev). Each caption is replaced by the empty caption with probability `dropout`."""
    drop = (torch.rand(len(sets), generator=g) < dropout).tolist()
    texts = [empty if d else s for d, s in zip(drop, sets, strict=True)]
    refs = None
    cond = stack_conditions([s.cond for s in sets], device)
    if sets[0].ref_latents is not None:
        ref_latents = torch.stack([s.ref_latents for s in sets]).to(device)      # (B, Li, 4c)
        ref_mask = torch.stack([s.ref_mask for s in sets]).to(device)            # (B, Li)
        ids = torch.stack([s.ids for s in sets]).to(device)                      # (B, Li, 3)
        refs = References(ref_latents, ref_mask, ref_mode if cond is None else "noised", ids)
    return (torch.stack([s.latents for s in sets]).to(device), torch.stack([s.txt for s in texts]).to(device),
            torch.stack([s.vec for s in texts]).to(device), refs, cond)
