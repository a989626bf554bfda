"""The toy FLUX shipped in toy/model/: it loads through the FLUX.1-dev code path, is a few MB, draws a
recognisable scene on CPU in seconds, its tokenizers and text encoders are what transformers reads from the
same folders, and toy/train_base.py rebuilds such a repo end to end, deterministically."""

import math
import random

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from minflux import layers
from minflux.model import Flux
from minflux.pipeline import load_pipeline
from minflux.sampling import image_ids, text_ids
from toy import train_base
from toy.train_base import DEMO_PROMPT, DEMO_SCENE
from toy.world import caption_match, random_scene, set_caption

MODEL = train_base.ROOT / "toy" / "model"
# one fact of five may be wrong; measured 1.0 for seeds 0-9 but 8 (0.8), at guidance 3.5 and 1
MIN_DEMO_MATCH = 0.8
TINY_RUN = ["--scenes", "32", "--task-captions", "20", "--ae-steps", "2", "--flow-steps", "3",
            "--eval-prompts", "1", "--eval-steps", "2"]


@pytest.fixture(scope="module")
def pipe():
    if not (MODEL / "flux1-dev.safetensors").exists():
        pytest.fail(f"{MODEL} has no weights: run `python toy/train_base.py` (and make sure git tracks "
                    f"toy/model/*.safetensors)")
    return load_pipeline(str(MODEL))


def test_toy_model_loads_as_flux_dev_with_the_documented_sizes(pipe):
    p = pipe.flow.params
    # the dev code path
    assert p.guidance_embed and not pipe.is_schnell and pipe.t5_tokenizer.max_length == 512
    sizes = (p.hidden_size, p.num_heads, p.depth, p.depth_single_blocks, p.axes_dim)
    assert sizes == (128, 4, 2, 2, (8, 12, 12))
    assert p.context_in_dim == pipe.t5.cfg.d_model and p.vec_in_dim == pipe.clip.cfg.hidden_size
    assert (pipe.ae.params.z_channels, len(pipe.ae.params.ch_mult)) == (16, 4)  # FLUX's latent packing
    megabytes = sum(f.stat().st_size for f in MODEL.rglob("*.safetensors")) / 2**20
    print(f"toy checkpoint: {megabytes:.1f} MB")
    assert megabytes < 20


@pytest.mark.slow
def test_toy_model_draws_the_demo_prompt(pipe):
    image = pipe.generate([DEMO_PROMPT], width=64, height=64, steps=20, seed=0, progress=False)[0]
    score = caption_match(image, DEMO_SCENE)
    print(f"caption_match of the demo prompt: {score:.2f}")
    assert image.size == (64, 64) and score >= MIN_DEMO_MATCH


@pytest.mark.slow
def test_toy_model_ignores_the_guidance_value(pipe):
    """Trained with random guidance in [1, 5]: IC-LoRA training's 1.0 and the sampler's 3.5 draw the same
    scene."""
    images = []
    for g in (1.0, 3.5):
        image = pipe.generate([DEMO_PROMPT], width=64, height=64, steps=20, guidance=g, seed=1,
                              progress=False)[0]
        images.append(image)
    assert [caption_match(image, DEMO_SCENE) >= MIN_DEMO_MATCH for image in images] == [True, True]


def test_toy_tokenizers_give_the_ids_transformers_gives(pipe):
    texts = ["a small green triangle at the top left and a large white square at the bottom, "
             "on a black background",
             set_caption(random_scene(random.Random(3)))]
    clip = CLIPTokenizer.from_pretrained(MODEL / "tokenizer")
    t5 = T5TokenizerFast.from_pretrained(MODEL / "tokenizer_2")
    want_clip = clip(texts, padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt").input_ids
    want_t5 = t5(texts, padding="max_length", max_length=512, truncation=True,
                 return_tensors="pt").input_ids
    assert torch.equal(pipe.clip_tokenizer(texts), want_clip)
    assert torch.equal(pipe.t5_tokenizer(texts), want_t5)
    assert 2 not in want_t5.tolist()[0]  # no <unk>: every word of the toy language is a piece


@torch.no_grad()
def test_toy_text_encoders_match_transformers(pipe):
    texts = ["a large red circle at the center, on a blue background",
             "a small yellow square at the right, on a green background"]
    clip_ids, t5_ids = pipe.clip_tokenizer(texts), pipe.t5_tokenizer(texts)
    want_vec = CLIPTextModel.from_pretrained(MODEL / "text_encoder").eval()(clip_ids).pooler_output
    want_txt = T5EncoderModel.from_pretrained(MODEL / "text_encoder_2").eval()(t5_ids).last_hidden_state
    txt, vec = pipe.encode_prompts(texts)
    print(f"CLIP max diff {(vec - want_vec).abs().max():.2e}, T5 max diff {(txt - want_txt).abs().max():.2e}")
    assert (vec - want_vec).abs().max() < 1e-5 and (txt - want_txt).abs().max() < 1e-5


@torch.no_grad()
def test_merged_pad_attention_weighs_a_token_like_its_copies():
    """One text token with bias log n gives the image the output of n equal copies of it (the merged T5 pads),
    and minflux.layers.attention is the reference function again afterwards."""
    torch.manual_seed(0)
    p = train_base.flow_params(train_base.parse_args([]))
    flow = Flux(p).eval()
    B, n = 2, 5
    txt = torch.randn(B, 3, p.context_in_dim)                                            # (B, Lt, C)
    full = torch.cat([txt[:, :2], txt[:, 2:].expand(B, n, -1)], dim=1)                   # (B, 2 + n, C)
    inputs = dict(img=torch.randn(B, 16, 64), img_ids=image_ids(B, 64, 64), timesteps=torch.full((B,), 0.5),
                  y=torch.randn(B, p.vec_in_dim), guidance=torch.full((B,), 3.5))
    want = flow(txt=full, txt_ids=text_ids(B, 2 + n), **inputs)                          # (B, Li, 64)
    reference = layers.attention
    with train_base.merged_pad_attention(torch.tensor([0.0, 0.0, math.log(n)])):
        got = flow(txt=txt, txt_ids=text_ids(B, 3), **inputs)
    assert layers.attention is reference
    assert (got - want).abs().max() < 1e-5


def test_train_base_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_base.parse_args(["--help"])
    assert exit_.value.code == 0 and "--flow-steps" in capsys.readouterr().out


@pytest.mark.slow
def test_train_base_writes_a_loadable_repo_deterministically(tmp_path):
    threads = torch.get_num_threads()  # main() sets its own (--threads)
    try:
        first = train_base.main([*TINY_RUN, "--out", str(tmp_path / "a")])
        second = train_base.main([*TINY_RUN, "--out", str(tmp_path / "b"), "--eval-prompts", "0"])
    finally:
        torch.set_num_threads(threads)
    for name in ("flux1-dev.safetensors", "ae.safetensors", "text_encoder_2/model.safetensors",
                 "tokenizer_2/spiece.model", "tokenizer/merges.txt"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), f"{name} differs between two runs"
    assert not (tmp_path / ".a.tmp").exists()
    assert (first / "README.md").exists() and (first / "samples.png").exists()
    prompt = "a small red square at the top, on a white background"
    image = load_pipeline(str(first)).generate([prompt], width=64, height=64, steps=2, progress=False)[0]
    assert image.size == (64, 64)
