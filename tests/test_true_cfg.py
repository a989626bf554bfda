"""True classifier-free guidance in sample.py (`--negative-prompt`, `--true-cfg`, diffusers'
`true_cfg_scale`): against two passes per step combined by hand, and against diffusers' FluxPipeline on a tiny
checkpoint."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

import sample
from minflux.pipeline import load_pipeline
from minflux.sampling import denoise, get_noise, image_ids, pack, text_ids
from tests.tiny_repo import write_tiny_repo

PROMPT = "a small red circle above a blue square, on a yellow background"
NEGATIVE = "a green triangle, blurry"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_tiny_repo(tmp_path_factory.mktemp("repo"), seed=3)


def pixels(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p), dtype=np.int16) for p in paths]


def test_true_cfg_is_two_passes_per_step_combined_by_hand(repo):
    pipe = load_pipeline(str(repo))
    H, W, S = 32, 48, 3.0
    txt, vec = pipe.encode_prompts([PROMPT])
    neg_txt, neg_vec = pipe.encode_prompts([NEGATIVE])
    timesteps, ids, tids = pipe.schedule(H, W, 4), image_ids(1, H, W), text_ids(1, txt.shape[1])
    x0 = pack(get_noise(1, H, W, seed=2))
    got = denoise(sample.true_cfg(pipe.flow, (neg_txt, neg_vec), S), x0, ids, txt, tids, vec, timesteps, 3.5,
                  progress=False)
    x, g = x0.clone(), torch.full((1,), 3.5)
    with torch.no_grad():
        for t, t_next in zip(timesteps[:-1], timesteps[1:], strict=True):
            time = torch.full((1,), t)
            v_pos = pipe.flow(x, ids, txt, tids, timesteps=time, y=vec, guidance=g)
            v_neg = pipe.flow(x, ids, neg_txt, tids, timesteps=time, y=neg_vec, guidance=g)
            x = x + (t_next - t) * (v_neg + S * (v_pos - v_neg))
    plain = denoise(pipe.flow, x0, ids, txt, tids, vec, timesteps, 3.5, progress=False)
    print(f"true CFG vs by hand: max abs diff {(got - x).abs().max():.2e}; "
          f"vs no CFG: mean abs diff {(got - plain).abs().mean():.3f}")
    assert torch.allclose(got, x, rtol=0, atol=1e-6)
    assert (got - plain).abs().mean() > 0.05, "the negative prompt must change the result"


@pytest.mark.slow
def test_true_cfg_matches_diffusers_true_cfg_scale(repo, tmp_path):
    size, steps, seed, scale = (64, 48), 4, 7, 4.0
    ref = FluxPipeline.from_pretrained(repo, dtype=torch.float32)
    want = np.asarray(ref(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=scale,
                          width=size[0], height=size[1], num_inference_steps=steps, guidance_scale=3.5,
                          generator=torch.Generator().manual_seed(seed)).images[0], dtype=np.int16)
    common = ["--model", str(repo), "--prompt", PROMPT, "--width", str(size[0]), "--height", str(size[1]),
              "--steps", str(steps), "--seed", str(seed), "--device", "cpu"]
    [got, plain] = pixels(sample.main([*common, "--negative-prompt", NEGATIVE, "--true-cfg", str(scale),
                                       "--out", str(tmp_path / "cfg.png")])
                          + sample.main([*common, "--out", str(tmp_path / "plain.png")]))
    diff = np.abs(got - want)
    print(f"true CFG {scale} vs diffusers: max pixel diff {diff.max()}, mean {diff.mean():.4f}; "
          f"vs no CFG: mean pixel change {np.abs(got - plain).mean():.1f}")
    assert want.std() > 5, "the reference image is flat: the test would prove nothing"
    assert diff.max() <= 1
    assert np.abs(got - plain).mean() > 2, "true CFG must change the image"


def test_true_cfg_without_a_negative_prompt_is_refused(capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["--prompt", "x", "--true-cfg", "4"])
    assert "--true-cfg 4.0 needs a --negative-prompt" in capsys.readouterr().err


def test_a_negative_prompt_without_true_cfg_is_warned_of():
    with pytest.warns(UserWarning, match="--negative-prompt has no effect at --true-cfg 1"):
        sample.parse_args(["--prompt", "x", "--negative-prompt", "blurry"])


def test_true_cfg_below_one_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["--prompt", "x", "--negative-prompt", "y", "--true-cfg", "0.5"])
    assert "--true-cfg: must be at least 1, got 0.5" in capsys.readouterr().err
