"""Train the toy FLUX that ships in toy/model/: FLUX.1-dev's code and file layout at a few MB, trained from
scratch on toy/world.py scenes in minutes on a laptop CPU, then loaded and scored through minflux.pipeline.

    python toy/train_base.py                       # the shipped run: rewrites toy/model/
    python toy/train_base.py --out /tmp/toy --scenes 32 --ae-steps 2 --flow-steps 3 --eval-prompts 1
                                                   # a smoke run

Stages, in main's order: scenes; tokenizers (toy/train_tokenizers.py); random, frozen text encoders; an
autoencoder; the flow transformer; the repo in FLUX.1-dev's layout (toy/hf_files.py), evaluated, with a
README. Deterministic for a given --seed and --threads. Shape letters: N scenes, B batch, Lt text tokens, Li
image tokens, C width.
"""

import argparse
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
from iclora.training import TIMESTEP_MODES, flow_matching_loss, step_generator  # noqa: E402 (after sys.path.insert)
from minflux import layers  # noqa: E402 (after sys.path.insert)
from minflux.autoencoder import AutoEncoder, AutoEncoderParams  # noqa: E402 (after sys.path.insert)
from minflux.clip import CLIPConfig, CLIPTextModel  # noqa: E402 (after sys.path.insert)
from minflux.model import Flux, FluxParams  # noqa: E402 (after sys.path.insert)
from minflux.pipeline import load_pipeline  # noqa: E402 (after sys.path.insert)
from minflux.sampling import image_ids, text_ids  # noqa: E402 (after sys.path.insert)
from minflux.t5 import T5Config, T5Encoder, relative_position_bucket  # noqa: E402 (after sys.path.insert)
from minflux.tokenizers import CLIPTokenizer, T5Tokenizer  # noqa: E402 (after sys.path.insert)
from toy.hf_files import T5_LENGTH, write_json, write_weights_and_configs  # noqa: E402 (after sys.path.insert)
from toy.train_tokenizers import (  # noqa: E402 (after sys.path.insert)
    check_tokenizers,
    tokenizer_corpus,
    train_clip_tokenizer,
    train_t5_tokenizer,
)
from toy.world import (  # noqa: E402 (after sys.path.insert)
    Scene,
    Shape,
    caption,
    caption_match,
    random_scene,
    render,
    set_caption,
)

DEMO_SCENE = Scene("blue", (Shape("circle", "red", "large", "center"),))
DEMO_PROMPT = caption(DEMO_SCENE)  # "a large red circle at the center, on a blue background"
README_TEMPLATE = Path(__file__).with_name("model_readme.md")  # the written repo's README.md
SCORE_TEMPLATE = Path(__file__).with_name("model_readme_score.md")  # its "How good it is" after an evaluation


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "toy" / "model",
                   help="folder to write the model repo into; replaced as a whole at the end "
                        "(default: toy/model)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the scenes, inits, batches and noise (default: 0)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads; results are bit-for-bit repeatable for a fixed count "
                        "(default: 2)")
    g = p.add_argument_group("data")
    g.add_argument("--scenes", type=int, default=4000, help="training scenes (default: 4000)")
    g.add_argument("--max-shapes", type=int, default=2, help="each scene has 1..N shapes (default: 2)")
    g.add_argument("--size", type=int, default=64,
                   help="image side in pixels, a multiple of 16 (default: 64)")
    g.add_argument("--task-captions", type=int, default=1000,
                   help="recolour-task joint captions added to the tokenizer corpus (default: 1000)")
    g = p.add_argument_group("text encoders (random, frozen)")
    g.add_argument("--t5-width", type=int, default=64,
                   help="T5 d_model = the flow's context_in_dim (default: 64)")
    g.add_argument("--t5-layers", type=int, default=2, help="T5 encoder blocks (default: 2)")
    g.add_argument("--t5-reach", type=int, default=3,
                   help="T5 attention reaches this many tokens to each side per layer (default: 3)")
    g.add_argument("--clip-width", type=int, default=64,
                   help="CLIP hidden size = the flow's vec_in_dim (default: 64)")
    g.add_argument("--clip-layers", type=int, default=2, help="CLIP encoder layers (default: 2)")
    g = p.add_argument_group("autoencoder")
    g.add_argument("--ae-steps", type=int, default=1200, help="autoencoder optimizer steps (default: 1200)")
    g.add_argument("--ae-batch", type=int, default=8, help="autoencoder batch size (default: 8)")
    g.add_argument("--ae-lr", type=float, default=1e-3,
                   help="autoencoder peak AdamW learning rate (default: 1e-3)")
    g.add_argument("--shape-weight", type=float, default=10.0,
                   help="extra loss weight of pixels that differ from the background (default: 10)")
    g.add_argument("--kl", type=float, default=1e-4,
                   help="weight of the KL term (per latent element) against the per-pixel L1 + L2 "
                        "(default: 1e-4)")
    g = p.add_argument_group("flow transformer")
    g.add_argument("--hidden", type=int, default=128, help="hidden size (default: 128)")
    g.add_argument("--heads", type=int, default=4,
                   help="attention heads; head dim = hidden / heads (default: 4)")
    g.add_argument("--depth", type=int, default=2, help="double-stream blocks (default: 2)")
    g.add_argument("--single", type=int, default=2, help="single-stream blocks (default: 2)")
    g.add_argument("--flow-steps", type=int, default=5000, help="flow optimizer steps (default: 5000)")
    g.add_argument("--flow-batch", type=int, default=32, help="flow batch size (default: 32)")
    g.add_argument("--flow-lr", type=float, default=1e-3, help="peak AdamW learning rate (default: 1e-3)")
    g.add_argument("--warmup", type=int, default=200, help="linear warm-up steps (default: 200)")
    g.add_argument("--ema", type=float, default=0.999,
                   help="EMA decay of the shipped weights (default: 0.999)")
    g.add_argument("--guidance-range", type=float, nargs=2, default=(1.0, 5.0), metavar=("LOW", "HIGH"),
                   help="the guidance input is drawn uniformly from this range each step (default: 1 5)")
    g.add_argument("--timesteps", default="shift", choices=TIMESTEP_MODES,
                   help="how t is drawn, as train.py --timestep-sampling (default: shift)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-prompts", type=int, default=20,
                   help="held-out scenes generated from the written repo and scored with caption_match; "
                        "0 = none (default: 20)")
    g.add_argument("--eval-steps", type=int, default=20,
                   help="sampling steps for the evaluation (default: 20)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- scenes


def renders(scenes: list[Scene], size: int) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1]."""
    pixels = np.stack([np.asarray(render(scene, size)) for scene in scenes])              # (N, H, W, 3) uint8
    return torch.from_numpy(rearrange(pixels, "n h w c -> n c h w").copy()).float() / 127.5 - 1


def make_scenes(count: int, max_shapes: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Renders of `count` random scenes and their captions."""
    rng = random.Random(seed)
    scenes = [random_scene(rng, max_shapes) for _ in range(count)]
    return renders(scenes, size), [caption(s) for s in scenes]


def eval_scenes(count: int, max_shapes: int, seed: int, seen: set[str]) -> list[Scene]:
    """Held-out scenes for the score, none with a caption in `seen` (the training captions): DEMO_SCENE first,
    then scenes from a seed of their own."""
    rng = random.Random(f"eval-{seed}")
    scenes = [DEMO_SCENE][:count]
    while len(scenes) < count:
        scene = random_scene(rng, max_shapes)
        if caption(scene) not in seen:
            scenes.append(scene)
    return scenes


# ------------------------------------------------------------------------------------------- text encoders
# Random and frozen: the captions are exact, short and drawn from ~40 words, so a fixed random encoder that
# keeps each token's identity and its neighbours is all the flow model needs; training the encoders too
# would cost CPU time for little gain.


def t5_config(vocab_size: int, args) -> T5Config:
    """16 buckets: distances 0..3 on each side get a bucket of their own, farther ones share log buckets."""
    return T5Config(vocab_size=vocab_size, d_model=args.t5_width, d_kv=args.t5_width // 4,
                    d_ff=2 * args.t5_width, num_layers=args.t5_layers, num_heads=4,
                    relative_attention_num_buckets=16, relative_attention_max_distance=32)


def banded_t5(cfg: T5Config, reach: int, seed: int) -> T5Encoder:
    """A random T5 whose position bias closes (-1e4) every bucket that holds a distance beyond `reach`, so
    each layer mixes a token only with its near neighbours. With random biases over all 512 positions,
    attention spreads almost evenly over the ~490 pads and a colour word hardly knows whether "circle" or
    "background" follows it; the band keeps that local word order. It also makes the outputs of content tokens
    independent of the padding, and all pads far from both the caption and the end of the sequence exactly
    equal, which encode_captions merges."""
    torch.manual_seed(seed)
    t5 = T5Encoder(cfg)
    distances = torch.arange(-cfg.relative_attention_max_distance, cfg.relative_attention_max_distance + 1)
    buckets = relative_position_bucket(distances, cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance)
    far = buckets[distances.abs() > reach].unique()
    if torch.isin(far, buckets[distances.abs() <= reach]).any():
        raise ValueError(f"--t5-reach {reach}: a T5 bucket holds distances on both sides of the band")
    with torch.no_grad():
        t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight[far] = -1e4
    return t5.eval().requires_grad_(False)


def clip_config(vocab_size: int, args) -> CLIPConfig:
    """eos_token_id 2 as FLUX's file (pooling at the largest id: <|endoftext|> is the last one)."""
    return CLIPConfig(vocab_size=vocab_size, hidden_size=args.clip_width,
                      intermediate_size=2 * args.clip_width, num_hidden_layers=args.clip_layers,
                      num_attention_heads=4)


def random_clip(cfg: CLIPConfig, seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(cfg).eval().requires_grad_(False)


@torch.no_grad()
def encode_captions(t5: T5Encoder, clip: CLIPTextModel, repo: Path, captions: list[str], reach: int,
                    batch: int = 256):
    """T5 states cut to the tokens that differ, with a log-count bias per kept token; CLIP pooled vectors.

    T5 runs on all 512 tokens, as in the pipeline. Position p of a caption with content (incl. </s>) in [0, c)
    is a pad whose receptive field [p - R, p + R] (R = reach x layers) holds only pads when c + R <= p < 512 -
    R: all those rows are the same vector. Kept: [0, K) with K = max c + R, one row for the run [K, 512 - R)
    with a bias of log(its length), and the last R rows. Returns txt (N, Lt, C) with Lt = K + 1 + R, bias
    (Lt,), vec (N, C)."""
    t5_tok = T5Tokenizer(repo / "tokenizer_2" / "spiece.model", max_length=T5_LENGTH)
    clip_tok = CLIPTokenizer(repo / "tokenizer" / "vocab.json", repo / "tokenizer" / "merges.txt")
    R = reach * len(t5.encoder.block)
    ids = t5_tok(captions)                                                               # (N, 512)
    K = int((ids > 0).sum(1).max()) + R
    if K + 1 + R >= T5_LENGTH:
        raise ValueError(f"captions of up to {K - R} T5 tokens leave no pad run to merge")
    keep = torch.cat([torch.arange(K + 1), torch.arange(T5_LENGTH - R, T5_LENGTH)])
    txt = []
    vec = []
    spread = 0.0  # the largest difference between two of the merged pads
    for i in tqdm(range(0, len(captions), batch), desc="encoding captions"):
        states = t5(ids[i : i + batch])                                                  # (B, 512, C)
        run = states[:, K : T5_LENGTH - R]                                               # (B, 512 - R - K, C)
        spread = max(spread, (run - run[:, :1]).abs().max().item())
        txt.append(states[:, keep])
        vec.append(clip(clip_tok(captions[i : i + batch])))                              # (B, C)
    if spread > 1e-5:
        raise RuntimeError(f"the merged T5 pads differ by {spread:.2e}: is the position bias banded?")
    bias = torch.zeros(len(keep))
    bias[K] = math.log(T5_LENGTH - R - K)
    return torch.cat(txt), bias, torch.cat(vec)


# -------------------------------------------------------------------------------------------- autoencoder


def ae_params() -> AutoEncoderParams:
    """z_channels 16 and 8x downsampling as FLUX's, so latents pack the same way. ch 32 with ch_mult (2, 1, 1,
    2): 64 channels at full and at latent resolution, where the encoder's and the decoder's last GroupNorm (32
    groups) sit. With one channel per group those norms erase each channel's mean over the image, i.e. the
    background colour, which (1, 1, 1, 1) then has to smuggle through zero-padding effects and learns many
    times slower; two channels per group keep their difference."""
    return AutoEncoderParams(resolution=64, ch=32, ch_mult=(2, 1, 1, 2), num_res_blocks=1, z_channels=16)


def train_autoencoder(images: torch.Tensor, args) -> tuple[AutoEncoder, dict]:
    """VAE training: the decoder sees mean + std * noise; the loss is (L1 + L2) per pixel plus kl times the KL
    per latent element.

    Three things make it train in minutes: every residual branch starts at zero (the second conv of each
    resnet block and the attention output; SkipInit, De & Smith 2020), so the network starts as a short stack
    of plain convs; the log-variance starts at -6 (std 0.05), so the start is a plain autoencoder and the KL
    term lets the noise grow only where the decoder can afford it; and pixels that differ from the background
    (the corner pixel, never covered) weigh --shape-weight times more, since shapes cover ~5-15% of a scene
    and are otherwise learnt last. The convs run in channels_last memory, faster on the CPU (docs/notes.md).
    """
    torch.manual_seed(args.seed + 1)
    ae = AutoEncoder(ae_params())
    with torch.no_grad():
        for name, module in ae.named_modules():
            if name.endswith(("conv2", "proj_out")):
                module.weight.zero_()
                module.bias.zero_()
        ae.encoder.conv_out.bias[ae.params.z_channels :] = -6.0
    ae = ae.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(ae.parameters(), lr=args.ae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 2)
    log = {}
    bar = tqdm(range(args.ae_steps), desc="autoencoder")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = args.ae_lr * warmup_cosine(step, args.ae_steps, min(50, args.ae_steps // 10))
        x = images[torch.randint(len(images), (args.ae_batch,), generator=g)]            # (B, 3, H, W)
        x = x.contiguous(memory_format=torch.channels_last)
        weight = 1 + args.shape_weight * (x != x[:, :, :1, :1]).any(1, keepdim=True).float()  # (B, 1, H, W)
        mean, logvar = ae.encoder(x).chunk(2, dim=1)                                     # (B, 16, h, w) each
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        err = ae.decoder(z) - x                                                          # (B, 3, H, W)
        rec = ((err.abs() + err.pow(2)) * weight).mean() / weight.mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = rec + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log = {"l1": err.abs().mean().item(), "l2": err.pow(2).mean().item(), "kl": kl.item()}
        bar.set_postfix({k: f"{v:.4f}" for k, v in log.items()})
    return ae.to(memory_format=torch.contiguous_format).eval().requires_grad_(False), log


@torch.no_grad()
def set_latent_factors(ae: AutoEncoder, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Sets shift = mean and scale = 1 / std of the latent means over all scenes, and returns the
    normalized latents."""
    ae.params.scale_factor = 1.0  # encode the raw latent means first
    ae.params.shift_factor = 0.0
    z = []
    for i in tqdm(range(0, len(images), batch), desc="latents"):
        z.append(ae.encode(images[i : i + batch]))
    z = torch.cat(z)                                                                     # (N, 16, h, w)
    ae.params.shift_factor = z.mean().item()
    ae.params.scale_factor = 1.0 / z.std().item()
    return (z - ae.params.shift_factor) * ae.params.scale_factor                         # (N, 16, h, w)


# ------------------------------------------------------------------------------------------------------ flow


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@contextmanager
def merged_pad_attention(text_bias: torch.Tensor):
    """While active, every FLUX attention adds text_bias (Lt,) to the logits of the first Lt keys (the text
    tokens) and 0 to the image keys: the blocks call minflux.layers.attention by its module name, so it is
    swapped for biased_attention, then put back. The pipeline feeds T5 512 tokens; to train on ~40 instead,
    the run of equal far pads is merged into one token whose logit gets + log(count) ("proportional
    attention", Token Merging, Bolya et al. 2023): softmax weighs it count times, which is exactly the
    full-length attention (check_merged_attention compares the two)."""
    reference = layers.attention

    def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         pe: torch.Tensor) -> torch.Tensor:
        # minflux.layers.attention plus an additive mask (1, L): text_bias on the text keys, 0 on the image's
        q, k = layers.apply_rope(q, pe), layers.apply_rope(k, pe)                     # (B, L, H, D)
        q, k, v = (rearrange(t, "b l h d -> b h l d") for t in (q, k, v))
        bias = torch.nn.functional.pad(text_bias.to(q), (0, k.shape[2] - len(text_bias)))[None]  # (1, L)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, L, D)
        return rearrange(x, "b h l d -> b l (h d)")                                   # (B, L, C)

    layers.attention = biased_attention
    try:
        yield
    finally:
        layers.attention = reference


def flow_params(args) -> FluxParams:
    head = args.hidden // args.heads
    rows = 2 * (3 * head // 8 // 2)  # image rows and columns get 3/8 of the head each (FLUX: 56 of 128)
    return FluxParams(in_channels=64, out_channels=64, vec_in_dim=args.clip_width,
                      context_in_dim=args.t5_width, hidden_size=args.hidden, mlp_ratio=4.0,
                      num_heads=args.heads, depth=args.depth, depth_single_blocks=args.single,
                      axes_dim=(head - 2 * rows, rows, rows), guidance_embed=True)


def adaln_zero_(flow: Flux):
    """Zero the modulation and output projections: every block starts as the identity, the output as 0."""
    with torch.no_grad():
        for name, module in flow.named_modules():
            projection = name.endswith(("mod.lin", "modulation.lin")) or name.startswith("final_layer")
            if isinstance(module, torch.nn.Linear) and projection:
                module.weight.zero_()
                module.bias.zero_()


@torch.no_grad()
def check_merged_attention(params: FluxParams, t5: T5Encoder, clip: CLIPTextModel, repo: Path,
                           captions: list[str], reach: int, seed: int) -> float:
    """Max abs difference between a random flow's output on the merged text and on all 512 T5 tokens."""
    torch.manual_seed(seed)
    flow = Flux(params).eval()  # default init: nonzero everywhere
    txt, bias, vec = encode_captions(t5, clip, repo, captions, reach)
    t5_tok = T5Tokenizer(repo / "tokenizer_2" / "spiece.model", max_length=T5_LENGTH)
    full = t5(t5_tok(captions))                                                        # (B, 512, C)
    B = len(captions)
    x = torch.randn(B, 16, 64)                                                         # (B, Li, 64): 64x64 px
    inputs = dict(img=x, img_ids=image_ids(B, 64, 64), timesteps=torch.full((B,), 0.7), y=vec,
                  guidance=torch.full((B,), 3.5))
    want = flow(txt=full, txt_ids=text_ids(B, T5_LENGTH), **inputs)                    # (B, Li, 64)
    with merged_pad_attention(bias):
        got = flow(txt=txt, txt_ids=text_ids(B, txt.shape[1]), **inputs)
    return (got - want).abs().max().item()


def train_flow(latents, txt, bias, vec, args) -> tuple[Flux, dict]:
    """Flow matching on cached latents (N, 16, h, w), merged T5 states (N, Lt, C) + their bias (Lt,), CLIP
    vectors (N, C); returns the EMA weights (the shipped ones) and the loss summary.

    iclora.training.flow_matching_loss (t = 1 noise, x_t = (1 - t) x0 + t eps, target eps - x0), AdamW with
    warm-up and cosine decay, gradient clipping at 1, an EMA of the weights, adaLN-Zero init (DiT, Peebles &
    Xie 2023). The distilled-guidance input is drawn uniformly from --guidance-range each step and so carries
    no meaning: any value in that range (IC-LoRA's 1.0 in training, the sampler's 3.5) gives the same images.
    """
    torch.manual_seed(args.seed + 3)
    flow = Flux(flow_params(args))
    adaln_zero_(flow)
    ema = Flux(flow.params)
    ema.load_state_dict(flow.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(flow.parameters(), lr=args.flow_lr, weight_decay=0.0)
    low, high = args.guidance_range
    flow.train()
    losses = []
    bar = tqdm(range(args.flow_steps), desc="flow")
    with merged_pad_attention(bias):
        for step in bar:
            g = step_generator(args.seed, step)
            for group in opt.param_groups:
                group["lr"] = args.flow_lr * warmup_cosine(step, args.flow_steps, args.warmup)
            idx = torch.randint(len(latents), (args.flow_batch,), generator=g)
            guidance = low + (high - low) * torch.rand((), generator=g).item()
            loss = flow_matching_loss(flow, latents[idx], txt[idx], vec[idx], g, guidance, args.timesteps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 1.0)
            opt.step()
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), flow.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    log = {"loss_last100": float(np.mean(losses[-100:])), "loss_first100": float(np.mean(losses[:100]))}
    return ema.eval(), log


# ------------------------------------------------------------------------------------- evaluation and README


def score_captions(repo: Path, scenes: list[Scene], size: int, steps: int,
                   guidance: float) -> tuple[list[float], list[Image.Image]]:
    """caption_match of each scene and the images generated from the captions through minflux.pipeline (seed
    0, one batch, so image i starts from row i of seed 0's noise)."""
    pipe = load_pipeline(str(repo))
    images = pipe.generate([caption(s) for s in scenes], width=size, height=size, steps=steps,
                           guidance=guidance, seed=0, progress=False)
    return [caption_match(image, scene) for image, scene in zip(images, scenes, strict=True)], images


def samples_sheet(scenes: list[Scene], images: list[Image.Image], size: int) -> Image.Image:
    """The renders on top, the generated images below."""
    sheet = Image.new("RGB", (size * len(scenes), 2 * size), "gray")
    for i, (scene, image) in enumerate(zip(scenes, images, strict=True)):
        sheet.paste(render(scene, size), (i * size, 0))
        sheet.paste(image, (i * size, size))
    return sheet


@torch.no_grad()
def reconstruction_match(ae: AutoEncoder, images: torch.Tensor, scenes: list[Scene]) -> float:
    """Mean caption_match of the decoded latent means: about the best the flow model can reach."""
    out = ae.decode(ae.encode(images))
    scores = [caption_match(image, scene) for image, scene in zip(to_images(out), scenes, strict=True)]
    return float(np.mean(scores))


def to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(rearrange(p, "c h w -> h w c").numpy()) for p in pixels]


def time_demo_prompt(repo: Path, size: int, steps: int) -> float:
    """Seconds to load the repo and draw DEMO_PROMPT, the way a user would."""
    t0 = time.perf_counter()
    load_pipeline(str(repo)).generate([DEMO_PROMPT], width=size, height=size, steps=steps, progress=False)
    return time.perf_counter() - t0


def readme(args, argv, info: dict) -> str:
    """The written repo's README.md: README_TEMPLATE filled in from the arguments and the run's info."""
    flags = argv if argv is not None else sys.argv[1:]
    command = "python toy/train_base.py" + "".join(f" {flag}" for flag in flags)
    example = set_caption(Scene("red", (Shape("circle", "blue", "large", "center"),)))
    stage_times = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in info["times"].items())
    return README_TEMPLATE.read_text(encoding="utf-8").format(
        args=args, info=info, a=info["ae_params"], demo_prompt=DEMO_PROMPT, example=example,
        axes_dim=list(info["axes_dim"]), guidance_range=list(args.guidance_range),
        score=score_text(args, info), command=command, minutes=info["total_s"] / 60, stage_times=stage_times)


def score_text(args, info: dict) -> str:
    """The README's "How good it is": SCORE_TEMPLATE filled in, or a line saying there was no evaluation."""
    count = len(info["scores"])
    if not count:
        return "Not evaluated (--eval-prompts 0)."
    template = SCORE_TEMPLATE.read_text(encoding="utf-8").removesuffix("\n")
    return template.format(args=args, info=info, count=count, side=f"{args.size}x{args.size}",
                           mean=np.mean(info["scores"]), mean_g1=np.mean(info["scores_g1"]),
                           demo_prompt=DEMO_PROMPT)


@contextmanager
def timed(times: dict[str, float], name: str):
    """Adds the seconds the block took to times[name]."""
    t0 = time.perf_counter()
    yield
    times[name] = time.perf_counter() - t0


def swap_in(tmp: Path, out: Path):
    """Replaces the folder `out` by `tmp`, a sibling, so `out` is never half written."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def make_tokenizers(repo: Path, captions: list[str], args) -> tuple[int, int]:
    """Stage 2: both tokenizers trained on the captions (+ recolour-task captions) and checked with the
    pipeline's own tokenizer classes. Returns the T5 and CLIP vocabulary sizes."""
    corpus = tokenizer_corpus(captions, args.task_captions, args.seed)
    t5_vocab = train_t5_tokenizer(repo / "tokenizer_2", corpus, args.seed)
    clip_vocab = train_clip_tokenizer(repo / "tokenizer", corpus)
    lengths = check_tokenizers(repo, corpus)
    print(f"tokenizers: T5 {t5_vocab} ids, CLIP {clip_vocab} tokens; a text is {lengths['t5']:.1f} T5 / "
          f"{lengths['clip']:.1f} CLIP tokens on average; every corpus text round-trips", file=sys.stderr)
    return t5_vocab, clip_vocab


def text_encoders(repo: Path, captions: list[str], t5_vocab: int, clip_vocab: int,
                  args) -> tuple[T5Encoder, CLIPTextModel, float]:
    """Stage 3: the random, frozen T5 and CLIP, and the largest difference that merging the far pads makes
    to a random flow's output (checked against the 512-token forward)."""
    t5 = banded_t5(t5_config(t5_vocab, args), args.t5_reach, args.seed + 4)
    clip = random_clip(clip_config(clip_vocab, args), args.seed + 5)
    diff = check_merged_attention(flow_params(args), t5, clip, repo, captions[:4], args.t5_reach,
                                  args.seed + 6)
    if diff > 1e-4:
        raise RuntimeError(f"merged-pad attention differs from the 512-token forward by {diff:.2e}")
    return t5, clip, diff


def evaluate(repo: Path, ae: AutoEncoder, scenes: list[Scene], args) -> dict:
    """Stage 6: the written repo's caption_match on held-out scenes at guidance 3.5 and 1.0, the autoencoder's
    ceiling and the time to draw the demo prompt; samples.png. Empty scores when there are no scenes."""
    if not scenes:
        return {"scores": [], "scores_g1": [], "recon": float("nan"), "draw_s": float("nan")}
    scores, generated = score_captions(repo, scenes, args.size, args.eval_steps, guidance=3.5)
    scores_g1, _ = score_captions(repo, scenes, args.size, args.eval_steps, guidance=1.0)
    samples_sheet(scenes, generated, args.size).save(repo / "samples.png")
    recon = reconstruction_match(ae, renders(scenes, args.size), scenes)
    draw_s = time_demo_prompt(repo, args.size, args.eval_steps)
    print(f"caption_match over {len(scenes)} held-out scenes: {np.mean(scores):.3f} at guidance 3.5, "
          f"{np.mean(scores_g1):.3f} at 1.0 (autoencoder ceiling {recon:.3f})", file=sys.stderr)
    return {"scores": scores, "scores_g1": scores_g1, "recon": recon, "draw_s": draw_s}


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def write_readme_and_log(repo: Path, args, argv, info: dict, scenes: list[Scene]):
    """Stage 7: README.md, and train_log.json with the info (less the two objects), the held-out
    captions and the arguments."""
    (repo / "README.md").write_text(readme(args, argv, info))
    log = {k: v for k, v in info.items() if k not in ("axes_dim", "ae_params")}
    write_json(repo / "train_log.json", log | {"eval_captions": [caption(s) for s in scenes],
                                                "args": {k: str(v) for k, v in vars(args).items()}})


def main(argv=None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.size % 16 or args.size < 32:
        raise SystemExit(f"--size must be a multiple of 16 and at least 32, got {args.size}")
    begin = time.perf_counter()
    times = {}
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    with timed(times, "data+tokenizers"):  # 1. scenes, 2. tokenizers
        images, captions = make_scenes(args.scenes, args.max_shapes, args.size, args.seed)    # (N, 3, H, W)
        t5_vocab, clip_vocab = make_tokenizers(tmp, captions, args)
    with timed(times, "text"):  # 3. text encoders, then every caption encoded once
        t5, clip, diff = text_encoders(tmp, captions, t5_vocab, clip_vocab, args)
        txt, bias, vec = encode_captions(t5, clip, tmp, captions, args.t5_reach)   # (N, Lt, C), (Lt,), (N, C)
    print(f"text: {txt.shape[1]} of {T5_LENGTH} T5 tokens kept, the run of far pads merged "
          f"(max diff to the full forward {diff:.1e})", file=sys.stderr)
    with timed(times, "autoencoder"):  # 4. autoencoder, then the latent shift and scale
        ae, ae_log = train_autoencoder(images, args)
        latents = set_latent_factors(ae, images)                                         # (N, 16, h, w)
    with timed(times, "flow"):  # 5. flow transformer
        flow, flow_log = train_flow(latents, txt, bias, vec, args)
    with timed(times, "write+eval"):  # 6. the repo in a temporary folder, evaluated on held-out scenes
        write_weights_and_configs(tmp, flow, ae, t5, clip)
        scenes = eval_scenes(args.eval_prompts, args.max_shapes, args.seed, set(captions))
        evaluation = evaluate(tmp, ae, scenes, args)

    # 7. The README and the log, then the folder swapped in.
    params = {"flow": parameter_count(flow), "ae": parameter_count(ae), "clip": parameter_count(clip),
              "t5": parameter_count(t5)}
    info = dict(size_mb=sum(f.stat().st_size for f in tmp.rglob("*.safetensors")) / 2**20,
                axes_dim=flow.params.axes_dim, ae_params=ae.params, params=params, clip_vocab=clip_vocab,
                t5_vocab=t5_vocab, **evaluation, scenes=args.scenes, ae=ae_log, flow=flow_log, times=times,
                total_s=time.perf_counter() - begin)
    write_readme_and_log(tmp, args, argv, info, scenes)
    swap_in(tmp, args.out)
    print(f"wrote {args.out} ({info['size_mb']:.1f} MB of weights) in {info['total_s'] / 60:.1f} min",
          file=sys.stderr)
    return args.out


if __name__ == "__main__":
    main()
