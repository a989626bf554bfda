"""The sampler: schedule, noise, packing and the time convention, against the reference values and
diffusers."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from minflux.sampling import denoise, get_noise, get_schedule, image_ids, pack, unpack


def test_schedule_matches_the_reference_values():
    ts = get_schedule(50, 4096)
    assert np.allclose(ts[:4], [1.0, 0.99358, 0.986979, 0.98019], atol=2e-6)
    assert np.allclose(ts[-3:], [0.116289, 0.06055, 0.0], atol=2e-6)
    ts = get_schedule(28, 4096)
    assert np.allclose(ts[:3], [1.0, 0.988409, 0.976222], atol=2e-6)
    assert np.allclose(ts[-2:], [0.104721, 0.0], atol=2e-6)


def test_schnell_schedule_is_linear_without_shift():
    assert get_schedule(4, 4096, shift=False) == [1.0, 0.75, 0.5, 0.25, 0.0]


@pytest.mark.parametrize("steps,tokens", [(28, 4096), (20, 1024), (7, 8160), (4, 6)])
def test_schedule_matches_diffusers_scheduler(steps, tokens):
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    diff = np.abs(np.array(get_schedule(steps, tokens)) - sched.sigmas.numpy()).max()
    print(f"schedule ({steps} steps, {tokens} tokens): max abs diff {diff:.2e}")
    assert diff < 1e-6


def test_noise_and_packing_match_diffusers_prepare_latents():
    width, height, batch = 96, 64, 2
    noise = get_noise(batch, height, width, seed=42)
    want, want_ids = FluxPipeline.prepare_latents(_PipeStub(), batch, 16, height, width, torch.float32, "cpu",
                                                  torch.Generator().manual_seed(42))
    assert torch.equal(pack(noise), want)
    assert torch.equal(image_ids(batch, height, width)[0], want_ids)


class _PipeStub:
    """Just enough of a FluxPipeline for its `prepare_latents` (which only needs these two attributes)."""
    vae_scale_factor = 8
    _pack_latents = staticmethod(FluxPipeline._pack_latents)
    _prepare_latent_image_ids = staticmethod(FluxPipeline._prepare_latent_image_ids)


def test_unpack_inverts_pack():
    x = torch.randn(2, 16, 6, 10)
    assert torch.equal(unpack(pack(x), width=80, height=48), x)


def test_token_order_is_row_major_with_features_c_ph_pw():
    x = torch.arange(16 * 4 * 4, dtype=torch.float32).reshape(1, 16, 4, 4)
    tokens = pack(x)                                            # (1, 4, 64)
    assert tokens[0, 1, 0] == x[0, 0, 0, 2]                     # token 1 = row 0, col 1
    assert tokens[0, 2, 0] == x[0, 0, 2, 0]                     # token 2 = row 1, col 0
    assert tokens[0, 0, 4 * 1 + 2 * 1 + 0] == x[0, 1, 1, 0]    # feature = c·4 + ph·2 + pw


@pytest.mark.parametrize("width,height", [(100, 64), (64, 0), (17, 32)])
def test_sizes_that_are_not_multiples_of_16_are_refused(width, height):
    with pytest.raises(ValueError, match="multiples of 16"):
        get_noise(1, height, width, seed=0)


def test_time_convention_euler_with_the_true_velocity_lands_on_the_data():
    """t = 1 is noise, x_t = (1 − t)·x0 + t·ε, v = ε − x0, x += (t_next − t)·v: a straight line reaches x0."""
    x0, eps = torch.randn(1, 6, 64), torch.randn(1, 6, 64)

    def true_velocity(img, img_ids, txt, txt_ids, timesteps, y, guidance):
        t = timesteps[:, None, None]
        assert torch.allclose(img, (1 - t) * x0 + t * eps, atol=1e-5)  # every visited state is on the line
        return eps - x0

    ids, txt = torch.zeros(1, 6, 3), torch.zeros(1, 0, 8)  # no text: the velocity reads only the image state
    out = denoise(true_velocity, eps.clone(), ids, txt, ids[:, :0], torch.zeros(1, 8), get_schedule(5, 6),
                  progress=False)
    assert torch.allclose(out, x0, atol=1e-5)
