"""Train the toy FLUX that ships in toy/model/: FLUX.1-dev's code and file layout at a few MB, trained from scratch
on toy/world.py scenes in minutes on a laptop CPU.

    python toy/train_base.py                                 # the shipped run: rewrites toy/model/
    python toy/train_base.py --out /tmp/toy --scenes 32 --ae-steps 2 --flow-steps 3 --eval-prompts 1   # smoke run

The result loads like the real model, through exactly the FLUX.1-dev code path:
    from minflux.pipeline import load_pipeline
    load_pipeline("toy/model").generate(["a large red circle at the center, on a blue background"],
                                        width=64, height=64, steps=20)

Reads top to bottom, one numbered section per piece of the repo:
 1. scenes: --scenes random 64x64 scenes of 1..--max-shapes shapes and their exact captions (toy/world.py);
 2. tokenizers trained on those captions plus the recolour task's joint captions ("[TWO-PANEL] the same scene in
    two colour schemes; [LEFT] ...; [RIGHT] ..."), so IC-LoRA captions tokenize into whole words too: a SentencePiece
    unigram model for T5 (<pad> 0, </s> 1, <unk> 2, no BOS) and a CLIP byte-level BPE (vocab.json + merges.txt);
 3. text encoders, random and FROZEN: a tiny T5 v1.1 encoder and a tiny CLIP text tower. The captions are exact,
    short and drawn from ~40 words, so a fixed random encoder that keeps each token's identity and its neighbours is
    all the flow model needs: it learns to read those features, and training the encoders as well would cost CPU
    time for little gain. One hand-set choice: T5's relative position bias is BANDED, buckets farther than
    --t5-reach tokens are closed (-1e4), so each T5 layer mixes a token only with its near neighbours. With random
    biases over all 512 positions, attention is spread almost evenly over the ~490 pads and a colour word hardly
    knows whether "circle" or "background" follows it; the band keeps that local word order. It also makes the
    outputs of content tokens independent of the padding, and all pads far from both the caption and the end of
    the sequence exactly equal, which section 5 uses;
 4. an AutoEncoder (ch 32, ch_mult 2,1,1,2, one resnet block per level; z_channels 16 and 8x downsampling as
    FLUX's, so latents pack the same way) trained as a VAE: weighted L1 + L2 reconstruction of the reparameterized
    sample plus a small KL term (--kl), see train_autoencoder for what makes it train in minutes; then the latent
    shift and scale (vae/config.json `shift_factor` / `scaling_factor`) that give the latent means zero mean and
    unit variance over the scenes;
 5. the flow transformer (FluxParams with guidance_embed=True, like dev) trained from scratch with
    iclora.training.flow_matching_loss (t = 1 noise, x_t = (1 - t) x0 + t eps, target eps - x0) on cached latents
    and text features, AdamW with warm-up and cosine decay, an EMA of the weights (the shipped ones), adaLN-Zero
    init (DiT, Peebles & Xie 2023). The distilled-guidance input is drawn uniformly from --guidance-range for each
    step and so carries no meaning: any value in that range (IC-LoRA's 1.0 in training, the sampler's 3.5) gives
    the same images. The pipeline always feeds T5 512 tokens; to train on ~40 instead, the run of identical far
    pads is merged into ONE token whose attention logit gets + log(count) ("proportional attention", Token
    Merging, Bolya et al. 2023), which is exactly the full-length attention (checked on start-up);
 6. toy/model/ in the HF layout of black-forest-labs/FLUX.1-dev (BFL root files flux1-dev.safetensors and
    ae.safetensors, text_encoder*/ and tokenizer*/ as transformers writes them, configs), written to a temporary
    folder and swapped in, plus a README with the command, time, losses and the caption_match score of
    --eval-prompts held-out scenes generated through minflux.pipeline (and samples.png, renders above them).

Deterministic for a given --seed and --threads. Shape letters: N scenes, B batch, L tokens, C channels.
"""

import argparse
import io
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import sentencepiece
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
from iclora.training import flow_matching_loss, step_generator  # noqa: E402
from minflux import layers  # noqa: E402
from minflux.autoencoder import AutoEncoder, AutoEncoderParams  # noqa: E402
from minflux.clip import CLIPConfig, CLIPTextModel  # noqa: E402
from minflux.model import Flux, FluxParams  # noqa: E402
from minflux.pipeline import load_pipeline  # noqa: E402
from minflux.sampling import image_ids, text_ids  # noqa: E402
from minflux.t5 import T5Config, T5Encoder, relative_position_bucket  # noqa: E402
from minflux.tokenizers import CLIPTokenizer, T5Tokenizer, clip_normalizer, clip_pre_tokenizer  # noqa: E402
from toy.hf_files import (CLIP_EOS, MODEL_INDEX, N_EXTRA_IDS, bytes_to_unicode,  # noqa: E402
                           write_clip_tokenizer_files, write_json, write_t5_tokenizer_files)
from toy.world import Scene, Shape, caption, caption_match, random_scene, render, set_caption  # noqa: E402

T5_LENGTH = 512  # what minflux.pipeline feeds T5 for a guidance-distilled (dev) model
ISSUE_PROMPT = "a large red circle at the center, on a blue background"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "toy" / "model",
                   help="folder to write the model repo into; replaced as a whole at the end (default: toy/model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes, inits, batches and noise (default: 0)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads; results are bit-for-bit repeatable for a fixed count (default: 2)")
    g = p.add_argument_group("data")
    g.add_argument("--scenes", type=int, default=4000, help="training scenes (default: 4000)")
    g.add_argument("--max-shapes", type=int, default=2, help="each scene has 1..N shapes (default: 2)")
    g.add_argument("--size", type=int, default=64, help="image side in pixels, a multiple of 16 (default: 64)")
    g.add_argument("--task-captions", type=int, default=1000,
                   help="recolour-task joint captions added to the tokenizer corpus (default: 1000)")
    g = p.add_argument_group("text encoders (random, frozen)")
    g.add_argument("--t5-width", type=int, default=64, help="T5 d_model = the flow's context_in_dim (default: 64)")
    g.add_argument("--t5-layers", type=int, default=2, help="T5 encoder blocks (default: 2)")
    g.add_argument("--t5-reach", type=int, default=3,
                   help="T5 attention reaches this many tokens to each side per layer (default: 3)")
    g.add_argument("--clip-width", type=int, default=64, help="CLIP hidden size = the flow's vec_in_dim (default: 64)")
    g.add_argument("--clip-layers", type=int, default=2, help="CLIP encoder layers (default: 2)")
    g = p.add_argument_group("autoencoder")
    g.add_argument("--ae-steps", type=int, default=1200, help="autoencoder optimizer steps (default: 1200)")
    g.add_argument("--ae-batch", type=int, default=8, help="autoencoder batch size (default: 8)")
    g.add_argument("--ae-lr", type=float, default=1e-3, help="autoencoder peak AdamW learning rate (default: 1e-3)")
    g.add_argument("--shape-weight", type=float, default=10.0,
                   help="extra loss weight of pixels that differ from the background (default: 10)")
    g.add_argument("--kl", type=float, default=1e-4,
                   help="weight of the KL term (per latent element) against the per-pixel L1 + L2 (default: 1e-4)")
    g = p.add_argument_group("flow transformer")
    g.add_argument("--hidden", type=int, default=128, help="hidden size (default: 128)")
    g.add_argument("--heads", type=int, default=4, help="attention heads; head dim = hidden / heads (default: 4)")
    g.add_argument("--depth", type=int, default=2, help="double-stream blocks (default: 2)")
    g.add_argument("--single", type=int, default=2, help="single-stream blocks (default: 2)")
    g.add_argument("--flow-steps", type=int, default=5000, help="flow optimizer steps (default: 5000)")
    g.add_argument("--flow-batch", type=int, default=32, help="flow batch size (default: 32)")
    g.add_argument("--flow-lr", type=float, default=1e-3, help="peak AdamW learning rate (default: 1e-3)")
    g.add_argument("--warmup", type=int, default=200, help="linear warm-up steps (default: 200)")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped weights (default: 0.999)")
    g.add_argument("--guidance-range", type=float, nargs=2, default=(1.0, 5.0), metavar=("LOW", "HIGH"),
                   help="the guidance input is drawn uniformly from this range each step (default: 1 5)")
    g.add_argument("--timesteps", default="logit_normal", choices=["logit_normal", "uniform"],
                   help="how t is drawn before FLUX's resolution shift (default: logit_normal)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-prompts", type=int, default=20,
                   help="held-out scenes generated from the written repo and scored with caption_match; 0 = none "
                        "(default: 20)")
    g.add_argument("--eval-steps", type=int, default=20, help="sampling steps for the evaluation (default: 20)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- 1. scenes
def renders(scenes: list[Scene], size: int) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1]."""
    pixels = np.stack([np.asarray(render(scene, size)) for scene in scenes])               # (N, H, W, 3) uint8
    return torch.from_numpy(rearrange(pixels, "n h w c -> n c h w").copy()).float() / 127.5 - 1


def make_scenes(count: int, max_shapes: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Renders of `count` random scenes and their captions."""
    rng = random.Random(seed)
    scenes = [random_scene(rng, max_shapes) for _ in range(count)]
    return renders(scenes, size), [caption(s) for s in scenes]


def eval_scenes(count: int, max_shapes: int, seed: int, seen: set[str]) -> list[Scene]:
    """Held-out scenes for the score, none with a caption in `seen` (the training captions): the issue's example
    first, then scenes from a seed of their own."""
    rng = random.Random(f"eval-{seed}")
    scenes = [Scene("blue", (Shape("circle", "red", "large", "center"),))][:count]
    while len(scenes) < count:
        if caption(scene := random_scene(rng, max_shapes)) not in seen:
            scenes.append(scene)
    return scenes


# ------------------------------------------------------------------------------------------------ 2. tokenizers
def tokenizer_corpus(captions: list[str], task_captions: int, seed: int) -> list[str]:
    """The training captions plus recolour-task joint captions."""
    rng = random.Random(f"task-{seed}")
    return captions + [set_caption(random_scene(rng)) for _ in range(task_captions)]


def write_t5_tokenizer(folder: Path, corpus: list[str], seed: int) -> int:
    """tokenizer_2/: spiece.model (unigram, T5's special ids) + configs. Returns the vocabulary size incl. sentinels.

    SentencePiece's seed search finds only a few dozen candidates in a language of ~40 words that always come in
    the same order, and then splits words into letters; shuffling the words of each caption (punctuation split
    off) shows every word in many contexts, and it learns one piece per word."""
    rng = random.Random(f"spm-{seed}")
    lines = []
    for text in corpus:
        words = text.replace(",", " ,").replace(";", " ;").split()
        rng.shuffle(words)
        lines.append(" ".join(words))
    lines.append(" ".join("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.:!?'\"()-"))  # no <unk>s
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="unigram", vocab_size=256,
        hard_vocab_limit=False, character_coverage=1.0, split_by_unicode_script=False, num_threads=1,
        minloglevel=2, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>")
    pieces = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    write_t5_tokenizer_files(folder, model.getvalue(), pieces)
    return pieces + N_EXTRA_IDS


def bpe_merges(corpus: list[str], min_frequency: int = 2) -> list[str]:
    """Byte-level BPE merges learnt greedily from the corpus: repeatedly merge the most frequent adjacent pair of
    symbols (a word's last symbol carries "</w>") until no pair occurs min_frequency times. Equal counts are broken
    by the pair itself, so two runs write the same merges.txt (tokenizers' BpeTrainer orders ties arbitrarily)."""
    normalizer, splitter = clip_normalizer(), clip_pre_tokenizer()  # the text pipeline of minflux's CLIPTokenizer
    counts = Counter(w for text in corpus for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    words = {w: [*w[:-1], w[-1] + "</w>"] for w in counts}
    merges = []
    while True:
        pairs = Counter()
        for w, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < min_frequency:
            break
        merges.append(best)
        for w, symbols in words.items():
            merged, i = [], 0
            while i < len(symbols):
                if tuple(symbols[i:i + 2]) == best:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            words[w] = merged
    return [" ".join(pair) for pair in merges]


def write_clip_tokenizer(folder: Path, corpus: list[str]) -> int:
    """tokenizer/: a byte-level BPE in OpenAI CLIP's files and id order (256 bytes, the same with </w>, one token per
    merge, <|startoftext|>, <|endoftext|> last) + configs. Returns the vocabulary size."""
    return len(write_clip_tokenizer_files(folder, bpe_merges(corpus)))


def check_tokenizers(repo: Path, texts: list[str]) -> dict[str, float]:
    """Every text must come back from minflux's tokenizers (as the pipeline loads them) without an unknown token,
    equal up to whitespace (CLIP also lowercases; like the real one it cuts long texts at 77 tokens, so a cut row
    must give a prefix). Returns the mean token counts."""
    t5 = T5Tokenizer(repo / "tokenizer_2" / "spiece.model", max_length=T5_LENGTH)
    clip = CLIPTokenizer(repo / "tokenizer" / "vocab.json", repo / "tokenizer" / "merges.txt")
    pieces = {i: p for p, i in t5.tokenizer.get_vocab().items()}
    clip_tokens = {i: t for t, i in json.loads((repo / "tokenizer" / "vocab.json").read_text()).items()}
    from_bytes = {c: b for b, c in bytes_to_unicode().items()}
    squash = lambda s: "".join(s.split())
    eos = clip.tokenizer.token_to_id(CLIP_EOS)
    t5_ids, clip_ids = t5(texts).tolist(), clip(texts).tolist()                          # (N, 512), (N, 77)
    for text, t5_row, clip_row in zip(texts, t5_ids, clip_ids):
        body = t5_row[: t5_row.index(1)]  # up to </s>
        back = "".join(pieces[i] for i in body).replace("▁", " ")
        if 2 in body or squash(back) != squash(text):
            raise RuntimeError(f"T5 tokenizer round trip failed: {text!r} -> {back!r}")
        body = clip_row[1 : clip_row.index(eos)]  # between <|startoftext|> and <|endoftext|>
        text_bytes = bytes(from_bytes[c] for i in body for c in clip_tokens[i].removesuffix("</w>"))
        back, full = squash(text_bytes.decode("utf-8", errors="replace")), squash(text.lower())
        if back != full and not (len(clip_row) == clip_row.index(eos) + 1 and full.startswith(back)):  # cut at 77
            raise RuntimeError(f"CLIP tokenizer round trip failed: {text!r} -> {text_bytes!r}")
    return {"t5": float(np.mean([row.index(1) + 1 for row in t5_ids])),
            "clip": float(np.mean([row.index(eos) + 1 for row in clip_ids]))}


# ------------------------------------------------------------------------------------------- 3. text encoders
def t5_config(vocab_size: int, args) -> T5Config:
    """16 buckets: distances 0..3 on each side get a bucket of their own, every farther one is in a log bucket."""
    return T5Config(vocab_size=vocab_size, d_model=args.t5_width, d_kv=args.t5_width // 4, d_ff=2 * args.t5_width,
                    num_layers=args.t5_layers, num_heads=4, relative_attention_num_buckets=16,
                    relative_attention_max_distance=32)


def banded_t5(cfg: T5Config, reach: int, seed: int) -> T5Encoder:
    """A random T5 whose position bias closes every bucket that holds a distance beyond `reach` (module docstring)."""
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
    return CLIPConfig(vocab_size=vocab_size, hidden_size=args.clip_width, intermediate_size=2 * args.clip_width,
                      num_hidden_layers=args.clip_layers, num_attention_heads=4)


def random_clip(cfg: CLIPConfig, seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(cfg).eval().requires_grad_(False)


@torch.no_grad()
def encode_captions(t5: T5Encoder, clip: CLIPTextModel, repo: Path, captions: list[str], reach: int, batch: int = 256):
    """T5 states cut to the tokens that differ + the log-count bias of each kept token, and CLIP pooled vectors.

    T5 runs on all 512 tokens, as in the pipeline. Position p of a caption with content (incl. </s>) in [0, c) is
    a pad whose receptive field [p - R, p + R] (R = reach x layers) holds only pads when c + R <= p < 512 - R: all
    those rows are the same vector. Kept: [0, K) with K = max c + R, one row for the run [K, 512 - R) with a bias
    of log(its length), and the last R rows. Returns txt (N, K + 1 + R, C), bias (K + 1 + R,), vec (N, C)."""
    t5_tok = T5Tokenizer(repo / "tokenizer_2" / "spiece.model", max_length=T5_LENGTH)
    clip_tok = CLIPTokenizer(repo / "tokenizer" / "vocab.json", repo / "tokenizer" / "merges.txt")
    R = reach * len(t5.encoder.block)
    ids = t5_tok(captions)                                                               # (N, 512)
    K = int((ids > 0).sum(1).max()) + R
    if K + 1 + R >= T5_LENGTH:
        raise ValueError(f"captions of up to {K - R} T5 tokens leave no pad run to merge")
    keep = torch.cat([torch.arange(K + 1), torch.arange(T5_LENGTH - R, T5_LENGTH)])
    txt, vec, spread = [], [], 0.0
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


# -------------------------------------------------------------------------------------------- 4. autoencoder
def ae_params() -> AutoEncoderParams:
    """ch 32 with ch_mult (2, 1, 1, 2): 64 channels at full and at latent resolution, where the encoder's and the
    decoder's last GroupNorm (32 groups) sit. With one channel per group those norms erase each channel's mean over
    the image, i.e. the background colour, which (1, 1, 1, 1) then has to smuggle through zero-padding effects and
    learns many times slower; two channels per group keep their difference."""
    return AutoEncoderParams(resolution=64, ch=32, ch_mult=(2, 1, 1, 2), num_res_blocks=1, z_channels=16)


def train_autoencoder(images: torch.Tensor, args) -> tuple[AutoEncoder, dict]:
    """VAE training: the decoder sees mean + std * noise; loss = (L1 + L2) per pixel + kl * KL per latent element.

    Three things make it train in minutes: every residual branch starts at zero (the second conv of each resnet
    block and the attention output; SkipInit, De & Smith 2020), so the network starts as a short stack of plain
    convs; the log-variance starts at -6 (std 0.05), so the start is a plain autoencoder and the KL term lets
    the noise grow only where the decoder can afford it; and pixels that differ from the background (the corner
    pixel, never covered) weigh --shape-weight times more, since shapes cover ~5-15% of a scene and are otherwise
    learnt last. channels_last memory is ~1.5x faster for these convs on CPU."""
    torch.manual_seed(args.seed + 1)
    ae = AutoEncoder(ae_params())
    with torch.no_grad():
        for name, module in ae.named_modules():
            if name.endswith(("conv2", "proj_out")):
                module.weight.zero_(), module.bias.zero_()
        ae.encoder.conv_out.bias[ae.params.z_channels :] = -6.0
    ae = ae.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(ae.parameters(), lr=args.ae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 2)
    log = {}
    bar = tqdm(range(args.ae_steps), desc="autoencoder")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = args.ae_lr * cosine(step, args.ae_steps, min(50, args.ae_steps // 10))
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
    """Sets shift = mean and scale = 1 / std of the latent means over all scenes; returns the normalized latents."""
    ae.params.scale_factor, ae.params.shift_factor = 1.0, 0.0
    z = torch.cat([ae.encode(images[i : i + batch]) for i in tqdm(range(0, len(images), batch), desc="latents")])
    ae.params.shift_factor, ae.params.scale_factor = z.mean().item(), 1.0 / z.std().item()
    return (z - ae.params.shift_factor) * ae.params.scale_factor                         # (N, 16, h, w)


@torch.no_grad()
def reconstruction_match(ae: AutoEncoder, images: torch.Tensor, scenes: list[Scene]) -> float:
    """Mean caption_match of the decoded latent means: about the best the flow model can reach."""
    out = ae.decode(ae.encode(images))
    return float(np.mean([caption_match(img, scene) for img, scene in zip(to_images(out), scenes)]))


def to_images(x: torch.Tensor) -> list[Image.Image]:
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(rearrange(p, "c h w -> h w c").numpy()) for p in pixels]


# ------------------------------------------------------------------------------------------------------ 5. flow
def cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@contextmanager
def merged_pad_attention(text_bias: torch.Tensor):
    """While active, every FLUX attention adds text_bias (Lt,) to the logits of the first Lt keys (the text tokens)
    and 0 to the image keys: a token standing for n equal ones gets log n, so softmax weighs it n times."""
    original = layers.attention

    def attention(q, k, v, pe):
        q, k = layers.apply_rope(q, pe), layers.apply_rope(k, pe)                      # (B, L, H, D)
        q, k, v = (rearrange(t, "b l h d -> b h l d") for t in (q, k, v))
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[: len(text_bias)] = text_bias                                               # (L,)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None, :])            # (B, H, L, D)
        return rearrange(x, "b h l d -> b l (h d)")                                      # (B, L, C)

    layers.attention = attention
    try:
        yield
    finally:
        layers.attention = original


def flow_params(args) -> FluxParams:
    head = args.hidden // args.heads
    rows = 2 * (3 * head // 8 // 2)  # image rows and columns get 3/8 of the head each (FLUX: 56 of 128)
    return FluxParams(in_channels=64, out_channels=64, vec_in_dim=args.clip_width, context_in_dim=args.t5_width,
                      hidden_size=args.hidden, mlp_ratio=4.0, num_heads=args.heads, depth=args.depth,
                      depth_single_blocks=args.single, axes_dim=(head - 2 * rows, rows, rows), guidance_embed=True)


def adaln_zero_(flow: Flux):
    """Zero the modulation and output projections: every block starts as the identity, the output as 0."""
    with torch.no_grad():
        for name, module in flow.named_modules():
            if isinstance(module, torch.nn.Linear) and (name.endswith("mod.lin") or name.endswith("modulation.lin")
                                                        or name.startswith("final_layer")):
                module.weight.zero_(), module.bias.zero_()


@torch.no_grad()
def check_merged_attention(params: FluxParams, t5: T5Encoder, clip: CLIPTextModel, repo: Path, captions: list[str],
                           reach: int, seed: int) -> float:
    """Max abs difference between a random flow's output on the merged text and on all 512 T5 tokens."""
    torch.manual_seed(seed)
    flow = Flux(params).eval()  # default init: nonzero everywhere
    txt, bias, vec = encode_captions(t5, clip, repo, captions, reach)
    full = t5(T5Tokenizer(repo / "tokenizer_2" / "spiece.model", max_length=T5_LENGTH)(captions))  # (B, 512, C)
    B = len(captions)
    x = torch.randn(B, 16, 64)                                                           # (B, N, 64): 64x64 px
    inputs = dict(img=x, img_ids=image_ids(B, 64, 64), timesteps=torch.full((B,), 0.7), y=vec,
                  guidance=torch.full((B,), 3.5))
    want = flow(txt=full, txt_ids=text_ids(B, T5_LENGTH), **inputs)                    # (B, N, 64)
    with merged_pad_attention(bias):
        got = flow(txt=txt, txt_ids=text_ids(B, txt.shape[1]), **inputs)
    return (got - want).abs().max().item()


def train_flow(latents, txt, bias, vec, args) -> tuple[Flux, dict]:
    """Flow matching on cached latents (N, 16, h, w), merged T5 states (N, L, C) + their bias (L,), CLIP vectors
    (N, C); returns the EMA weights and the loss summary."""
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
                group["lr"] = args.flow_lr * cosine(step, args.flow_steps, args.warmup)
            idx = torch.randint(len(latents), (args.flow_batch,), generator=g)
            guidance = low + (high - low) * torch.rand((), generator=g).item()
            loss = flow_matching_loss(flow, latents[idx], txt[idx], vec[idx], g, guidance, args.timesteps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 1.0)
            opt.step()
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), flow.parameters()):
                    e.lerp_(p, 1 - decay)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    log = {"loss_last100": float(np.mean(losses[-100:])), "loss_first100": float(np.mean(losses[:100]))}
    return ema.eval(), log


# -------------------------------------------------------------------------------------------------- 6. the repo


def save_weights(path: Path, state: dict[str, torch.Tensor]):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, path, metadata={"format": "pt"})


def write_weights_and_configs(repo: Path, flow: Flux, ae: AutoEncoder, t5: T5Encoder, clip: CLIPTextModel):
    """Everything but the tokenizers (section 2) and the README, in FLUX.1-dev's names and config fields."""
    save_weights(repo / "flux1-dev.safetensors", flow.state_dict())
    save_weights(repo / "ae.safetensors", ae.state_dict())
    save_weights(repo / "text_encoder" / "model.safetensors",
                 {f"text_model.{k}": v for k, v in clip.state_dict().items()})
    save_weights(repo / "text_encoder_2" / "model.safetensors", t5.state_dict())
    c = clip.cfg
    write_json(repo / "text_encoder" / "config.json", {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": c.eos_token_id, "hidden_act": c.hidden_act, "hidden_size": c.hidden_size,
        "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": c.intermediate_size,
        "layer_norm_eps": c.layer_norm_eps, "max_position_embeddings": c.max_position_embeddings,
        "model_type": "clip_text_model", "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers, "pad_token_id": 1, "projection_dim": c.hidden_size,
        "torch_dtype": "float32", "vocab_size": c.vocab_size})
    c = t5.cfg
    write_json(repo / "text_encoder_2" / "config.json", {
        "architectures": ["T5EncoderModel"], "classifier_dropout": 0.0, "d_ff": c.d_ff, "d_kv": c.d_kv,
        "d_model": c.d_model, "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1,
        "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
        "is_gated_act": True, "layer_norm_epsilon": c.layer_norm_epsilon, "model_type": "t5",
        "num_decoder_layers": c.num_layers, "num_heads": c.num_heads, "num_layers": c.num_layers,
        "output_past": True, "pad_token_id": 0, "relative_attention_max_distance": c.relative_attention_max_distance,
        "relative_attention_num_buckets": c.relative_attention_num_buckets, "tie_word_embeddings": False,
        "torch_dtype": "float32", "use_cache": True, "vocab_size": c.vocab_size})
    p = flow.params
    write_json(repo / "transformer" / "config.json", {
        "_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0",
        "attention_head_dim": p.hidden_size // p.num_heads, "axes_dims_rope": list(p.axes_dim),
        "guidance_embeds": p.guidance_embed, "in_channels": p.in_channels, "joint_attention_dim": p.context_in_dim,
        "num_attention_heads": p.num_heads, "num_layers": p.depth, "num_single_layers": p.depth_single_blocks,
        "patch_size": 1, "pooled_projection_dim": p.vec_in_dim})
    a = ae.params
    write_json(repo / "vae" / "config.json", {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0.dev0", "act_fn": "silu",
        "block_out_channels": [a.ch * m for m in a.ch_mult], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True, "in_channels": a.in_channels, "latent_channels": a.z_channels,
        "layers_per_block": a.num_res_blocks, "mid_block_add_attention": True, "norm_num_groups": 32,
        "out_channels": a.out_ch, "sample_size": a.resolution, "scaling_factor": a.scale_factor,
        "shift_factor": a.shift_factor, "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": False,
        "use_quant_conv": False})
    write_json(repo / "scheduler" / "scheduler_config.json", {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
        "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
        "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True})
    write_json(repo / "model_index.json", MODEL_INDEX)


def evaluate(repo: Path, scenes: list[Scene], size: int, steps: int, guidance: float) -> tuple[list[float], list]:
    """caption_match of each scene and the images generated from the captions through minflux.pipeline (seed 0,
    one batch, so image i starts from row i of seed 0's noise)."""
    pipe = load_pipeline(str(repo))
    images = pipe.generate([caption(s) for s in scenes], width=size, height=size, steps=steps, guidance=guidance,
                           seed=0, progress=False)
    return [caption_match(image, scene) for image, scene in zip(images, scenes)], images


def contact_sheet(scenes: list[Scene], images: list[Image.Image], size: int) -> Image.Image:
    """The renders on top, the generated images below."""
    sheet = Image.new("RGB", (size * len(scenes), 2 * size), "gray")
    for i, (scene, image) in enumerate(zip(scenes, images)):
        sheet.paste(render(scene, size), (i * size, 0))
        sheet.paste(image, (i * size, size))
    return sheet


def timed_issue_prompt(repo: Path, size: int, steps: int) -> float:
    """Seconds to load the repo and draw the issue's prompt, the way a user would."""
    t0 = time.perf_counter()
    load_pipeline(str(repo)).generate([ISSUE_PROMPT], width=size, height=size, steps=steps, progress=False)
    return time.perf_counter() - t0


def readme(args, argv, info: dict) -> str:
    command = "python toy/train_base.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    a, n = info["ae_params"], len(info["scores"])
    example = set_caption(Scene("red", (Shape("circle", "blue", "large", "center"),)))
    side = f"{args.size}x{args.size}"
    mean, mean_g1 = (np.mean(info["scores"]), np.mean(info["scores_g1"])) if n else (None, None)
    score = (f"""`toy.world.caption_match` (the fraction of a caption's facts that `toy.world.analyse` reads back
from the image: the background, and per shape its cell, colour, kind and size) over {n} held-out scenes (captions
never seen in training), generated at {side}, {args.eval_steps} steps, seed 0: **{mean:.3f}** at guidance 3.5
({mean_g1:.3f} at guidance 1.0); the issue's prompt "{ISSUE_PROMPT}": {info['scores'][0]:.2f}.
Chance is far lower: an image of only the right background scores 1/5 for a one-shape caption, 1/9 for two.
Decoding the autoencoder's own latents of the same scenes scores {info['recon']:.3f}, about the flow model's
ceiling.
`samples.png`: the renders of those scenes on top, the generated images below. Loading the model and drawing one
{side} image ({args.eval_steps} steps) took {info['draw_s']:.1f} s on this CPU."""
             if n else "Not evaluated (--eval-prompts 0).")
    return f"""# toy FLUX.1-dev

A FLUX.1-dev-shaped text-to-image model of {info['size_mb']:.1f} MB, trained from scratch on the procedural scenes of
`toy/world.py` (flat circles, squares and triangles in a 3x3 grid, six colours). Every file is in the layout and
key names of `black-forest-labs/FLUX.1-dev`, so it loads through exactly the code path of the real model:

```python
from minflux.pipeline import load_pipeline
pipe = load_pipeline("toy/model")
pipe.generate(["{ISSUE_PROMPT}"], width=64, height=64, steps=20)[0].save("toy.png")
```

It knows only the captions of `toy/world.py` ("a large red circle at the top left and a small blue square at the
center, on a yellow background") with 1-{args.max_shapes} shapes, at {args.size}x{args.size} pixels. Its tokenizers also
cover the recolour task's joint captions ("{example}"), which CLIP, like the real one, cuts at 77 tokens.

| file | what |
|---|---|
| flux1-dev.safetensors | flow transformer: hidden {args.hidden}, {args.heads} heads, {args.depth} double + {args.single} single blocks, axes_dim {list(info['axes_dim'])}, guidance-embedded; {info['params']['flow']:,} parameters |
| ae.safetensors | autoencoder: ch {a.ch}, ch_mult {a.ch_mult}, {a.num_res_blocks} resnet block per level, {a.z_channels} latent channels, 8x down; {info['params']['ae']:,} parameters; vae/config.json: shift_factor {a.shift_factor:.4f}, scaling_factor {a.scale_factor:.4f} |
| text_encoder/ | CLIP text tower: width {args.clip_width}, {args.clip_layers} layers, random and frozen; {info['params']['clip']:,} parameters |
| text_encoder_2/ | T5 v1.1 encoder: d_model {args.t5_width}, {args.t5_layers} blocks, random and frozen, position bias banded to +-{args.t5_reach} tokens per layer; {info['params']['t5']:,} parameters |
| tokenizer/ | CLIP byte-level BPE trained on the toy captions: {info['clip_vocab']} tokens |
| tokenizer_2/ | SentencePiece unigram trained on the toy captions: {info['t5_vocab']} ids incl. the 100 sentinels |
| train_log.json | the run's arguments, losses, times and scores |

The distilled-guidance input was drawn uniformly from {list(args.guidance_range)} in training, so it carries no meaning:
the sampler's default 3.5 and IC-LoRA training's 1.0 give the same images.

## How good it is

{score}

## How it was made

```
{command}
```

{info['scenes']} scenes (seed {args.seed}), {args.threads} CPU thread(s), {info['total_s'] / 60:.1f} minutes in all
({', '.join(f'{k} {v:.0f} s' for k, v in info['times'].items())}). Every choice is explained in the docstring of
`toy/train_base.py`. Final losses: autoencoder L1 {info['ae']['l1']:.4f}, L2 {info['ae']['l2']:.4f} (per pixel,
in [-1, 1] units), KL {info['ae']['kl']:.2f} (per latent element); flow matching
{info['flow']['loss_last100']:.4f} (mean of the last 100 steps; {info['flow']['loss_first100']:.4f} over the first 100).
"""


def main(argv=None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.size % 16 or args.size < 32:
        raise SystemExit(f"--size must be a multiple of 16 and at least 32, got {args.size}")
    begin, times = time.perf_counter(), {}
    tick = lambda name, t0: times.__setitem__(name, time.perf_counter() - t0)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    # 1. Scenes.
    t0 = time.perf_counter()
    images, captions = make_scenes(args.scenes, args.max_shapes, args.size, args.seed)

    # 2. Tokenizers, checked with the pipeline's own classes.
    corpus = tokenizer_corpus(captions, args.task_captions, args.seed)
    t5_vocab = write_t5_tokenizer(tmp / "tokenizer_2", corpus, args.seed)
    clip_vocab = write_clip_tokenizer(tmp / "tokenizer", corpus)
    lengths = check_tokenizers(tmp, corpus)
    print(f"tokenizers: T5 {t5_vocab} ids, CLIP {clip_vocab} tokens; a text is {lengths['t5']:.1f} T5 / "
          f"{lengths['clip']:.1f} CLIP tokens on average; every corpus text round-trips", file=sys.stderr)
    tick("data+tokenizers", t0)

    # 3. Text encoders (random, frozen), then every caption encoded once.
    t0 = time.perf_counter()
    t5 = banded_t5(t5_config(t5_vocab, args), args.t5_reach, args.seed + 4)
    clip = random_clip(clip_config(clip_vocab, args), args.seed + 5)
    diff = check_merged_attention(flow_params(args), t5, clip, tmp, captions[:4], args.t5_reach, args.seed + 6)
    if diff > 1e-4:
        raise RuntimeError(f"merged-pad attention differs from the 512-token forward by {diff:.2e}")
    txt, bias, vec = encode_captions(t5, clip, tmp, captions, args.t5_reach)
    print(f"text: {txt.shape[1]} of {T5_LENGTH} T5 tokens kept, the run of far pads merged "
          f"(max diff to the full forward {diff:.1e})", file=sys.stderr)
    tick("text", t0)

    # 4. Autoencoder, then the latent shift and scale.
    t0 = time.perf_counter()
    ae, ae_log = train_autoencoder(images, args)
    latents = set_latent_factors(ae, images)
    tick("autoencoder", t0)

    # 5. Flow transformer.
    t0 = time.perf_counter()
    flow, flow_log = train_flow(latents, txt, bias, vec, args)
    tick("flow", t0)

    # 6. The repo, evaluated through the pipeline, then swapped in.
    t0 = time.perf_counter()
    write_weights_and_configs(tmp, flow, ae, t5, clip)
    scenes = eval_scenes(args.eval_prompts, args.max_shapes, args.seed, set(captions))
    scores, scores_g1, recon, draw_s = [], [], float("nan"), float("nan")
    if scenes:
        scores, generated = evaluate(tmp, scenes, args.size, args.eval_steps, guidance=3.5)
        scores_g1, _ = evaluate(tmp, scenes, args.size, args.eval_steps, guidance=1.0)
        contact_sheet(scenes, generated, args.size).save(tmp / "samples.png")
        recon = reconstruction_match(ae, renders(scenes, args.size), scenes)
        draw_s = timed_issue_prompt(tmp, args.size, args.eval_steps)
        print(f"caption_match over {len(scenes)} held-out scenes: {np.mean(scores):.3f} at guidance 3.5, "
              f"{np.mean(scores_g1):.3f} at 1.0 (autoencoder ceiling {recon:.3f})", file=sys.stderr)
    tick("write+eval", t0)
    count = lambda m: sum(p.numel() for p in m.parameters())
    info = dict(size_mb=sum(f.stat().st_size for f in tmp.rglob("*.safetensors")) / 2**20,
                axes_dim=flow.params.axes_dim, ae_params=ae.params,
                params=dict(flow=count(flow), ae=count(ae), clip=count(clip), t5=count(t5)),
                clip_vocab=clip_vocab, t5_vocab=t5_vocab, scores=scores, scores_g1=scores_g1, recon=recon,
                draw_s=draw_s, scenes=args.scenes, ae=ae_log, flow=flow_log, times=times,
                total_s=time.perf_counter() - begin)
    (tmp / "README.md").write_text(readme(args, argv, info))
    log = {k: v for k, v in info.items() if k not in ("axes_dim", "ae_params")}
    write_json(tmp / "train_log.json", log | {"eval_captions": [caption(s) for s in scenes],
                                               "args": {k: str(v) for k, v in vars(args).items()}})
    old = args.out.with_name(f".{args.out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if args.out.exists():
        os.replace(args.out, old)
    os.replace(tmp, args.out)
    shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {args.out} ({info['size_mb']:.1f} MB of weights) in {info['total_s'] / 60:.1f} min",
          file=sys.stderr)
    return args.out


if __name__ == "__main__":
    main()
