"""train.py on FLUX.1 Fill and FLUX.1 Kontext bases (issue #23): a `--ref-panel K` LoRA trains on each,
records its base's variant, resumes bit for bit, takes its loss on the panels to make only, and loads in
diffusers with our transformer's output. The bases are tiny random checkpoints in the official layouts
(tests/tiny_repo.py), Fill with its 384 input channels, Kontext named by its model_index.json."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline, FluxKontextPipeline, FluxTransformer2DModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sample
import train
from iclora.conditional_metadata import check_lora_variant
from iclora.data import PanelSetDataset
from iclora.lora_files import load_lora
from iclora.training import collate, encode_sets, sample_timesteps, training_loss
from minflux.conditioning import Condition, conditioned, context_ids
from minflux.model import preset
from minflux.pipeline import load_pipeline
from minflux.sampling import image_ids, pack, text_ids
from tests.tiny_repo import write_tiny_repo

CAPTIONS = ["a red square, then the same square in blue", "a green disc, then the same disc in yellow"]


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return {v: write_tiny_repo(root / f"FLUX.1-{v}-dev", layout="both", seed=1, variant=v)
            for v in ("fill", "kontext")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two before/after pairs, joined 64×32 images of two 32-px panels, with captions."""
    folder = tmp_path_factory.mktemp("pairs") / "pairs"
    folder.mkdir()
    colours = [((220, 30, 30), (30, 30, 220)), ((30, 200, 30), (230, 220, 20))]
    for i, ((left, right), caption) in enumerate(zip(colours, CAPTIONS, strict=True)):
        img = np.zeros((32, 64, 3), np.uint8)
        img[:, :32] = left
        img[:, 32:] = right
        img[8:24, 8:24] = 255
        img[8:24, 40:56] = 255
        Image.fromarray(img).save(folder / f"pair{i}.png")
        (folder / f"pair{i}.txt").write_text(caption)
    return folder


def run_train(repo, data, out: Path, *extra) -> Path:
    return train.main(["--model", str(repo), "--data", str(data), "--out", str(out), "--resolution", "48",
                       "--panels", "2", "--ref-panel", "1", "--batch-size", "2", "--rank", "4", "--alpha",
                       "4", "--lr", "1e-2", "--warmup", "1", "--caption-dropout", "0", "--sample-every", "0",
                       "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def trained(repos, data, tmp_path_factory):
    """variant -> a LoRA trained for 4 steps on that base."""
    out = tmp_path_factory.mktemp("runs")
    return {v: run_train(repos[v], data, out / v / "lora.safetensors", "--steps", "4", "--save-dtype", "fp32")
            for v in repos}


def metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


# ------------------------------------------------------------------------------------------------------------
# train.py runs


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fill", "kontext"])
def test_a_ref_panel_lora_trains_on_the_base_and_records_its_variant(trained, variant):
    meta = metadata(trained[variant])
    assert meta["base_variant"] == variant
    assert (meta["ref_panels"], meta["panels"], meta["step"]) == ("1", "2", "4")
    assert any(k.endswith("lora_A.weight") for k in load_file(trained[variant]))


@pytest.mark.slow
@pytest.mark.parametrize("variant, guidance", [("fill", "30.0"), ("kontext", "1.0")])
def test_the_training_guidance_defaults_to_the_variants(trained, variant, guidance):
    state = torch.load(trained[variant].with_name("lora.state.pt"), weights_only=True)
    assert (state["args"]["variant"], state["args"]["guidance"]) == (variant, guidance)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fill", "kontext"])
def test_resume_continues_bit_for_bit(repos, data, tmp_path, variant):
    straight = run_train(repos[variant], data, tmp_path / "a" / "lora.safetensors", "--steps", "4")
    run_train(repos[variant], data, tmp_path / "b" / "lora.safetensors", "--steps", "2")
    resumed = run_train(repos[variant], data, tmp_path / "b" / "lora.safetensors", "--steps", "4", "--resume")
    a = load_file(straight)
    b = load_file(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_fill_base_without_ref_panel_is_refused_before_the_weights_load(repos, data, tmp_path):
    with pytest.raises(ValueError, match=r"is FLUX.1 Fill: its LoRA is trained with --ref-panel K"):
        train.main(["--model", str(repos["fill"]), "--data", str(data), "--out",
                    str(tmp_path / "x.safetensors"), "--panels", "2", "--device", "cpu"])


def test_a_kontext_lora_takes_one_context_panel(repos, tmp_path):
    folder = tmp_path / "triples"
    folder.mkdir()
    Image.new("RGB", (96, 32), "red").save(folder / "triple.png")
    (folder / "triple.txt").write_text("three red squares")
    with pytest.raises(ValueError, match=r"a Kontext LoRA takes one panel as its context"):
        run_train(repos["kontext"], folder, tmp_path / "x.safetensors", "--panels", "3", "--ref-panel", "2")


# ------------------------------------------------------------------------------------------------------------
# what the flow sees and where the loss is


@pytest.fixture(scope="module")
def batches(repos, data):
    """variant -> (flow, the batch of both pairs as collate gives it to training_loss)."""
    found = {}
    for variant, repo in repos.items():
        pipe = load_pipeline(str(repo))
        dataset = PanelSetDataset(data, resolution=48, panels=2)
        sets = encode_sets(pipe, dataset, [1], "moved", variant=variant)
        found[variant] = (pipe.flow, collate(sets, sets[0], 0.0, torch.Generator(), "cpu", "moved"))
    return found


def loss_of(flow, x0, txt, vec, refs, cond) -> torch.Tensor:
    with torch.no_grad():
        return training_loss(flow, x0, txt, vec, torch.Generator().manual_seed(7), 1.0, "shift", refs,
                             cond=cond)


def test_fill_masks_and_blanks_the_panels_to_make_and_gives_the_reference(batches):
    _, (x0, txt, vec, refs, cond) = batches["fill"]
    mask = cond.channels[..., 64:]                                                # (B, Li, 256)
    on_right = (image_ids(1, 32, 64)[0, :, 2] >= 2)                                # (Li,) panel 2's tokens
    assert torch.equal(mask[:, on_right], torch.ones_like(mask[:, on_right]))
    assert torch.equal(mask[:, ~on_right], torch.zeros_like(mask[:, ~on_right]))
    assert torch.equal(refs.ref_mask, ~on_right.expand(2, -1))
    assert torch.equal(refs.latents, cond.channels[..., :64])  # the reference tokens' clean point
    assert refs.mode == "noised"


@pytest.mark.parametrize("variant", ["fill", "kontext"])
def test_perturbing_a_panel_to_make_changes_the_loss(batches, variant):
    flow, (x0, txt, vec, refs, cond) = batches[variant]
    other = x0.clone()
    other[..., -2:] += torch.randn(other[..., -2:].shape, generator=torch.Generator().manual_seed(1)) * 3
    before = loss_of(flow, x0, txt, vec, refs, cond)
    assert not torch.equal(before, loss_of(flow, other, txt, vec, refs, cond))


def test_on_fill_the_reference_panels_target_latents_do_not_change_the_loss(batches):
    """The reference tokens are out of the loss, and the flow sees them from the condition's latents: the
    training image's own latents there do not matter."""
    flow, (x0, txt, vec, refs, cond) = batches["fill"]
    other = x0.clone()
    other[..., :4] += torch.randn(other[..., :4].shape, generator=torch.Generator().manual_seed(1)) * 3
    assert torch.equal(loss_of(flow, x0, txt, vec, refs, cond), loss_of(flow, other, txt, vec, refs, cond))


def test_on_kontext_the_image_is_the_other_panel_and_the_context_follows_it_at_first_axis_1(batches):
    _, (x0, txt, vec, refs, cond) = batches["kontext"]
    assert x0.shape == (2, 16, 4, 4) and refs is None  # panel 2 alone, 32×32 px
    assert cond.tokens.shape == (2, 4, 64)             # panel 1, 32×32 px
    assert torch.equal(cond.token_ids, context_ids(1, 32, 32).expand(2, -1, -1))


def test_on_kontext_the_loss_is_the_image_tokens_mse_with_the_context_appended(batches):
    """By hand, with training_loss's draws: the context's predictions are cut off, not in the loss."""
    flow, (x0, txt, vec, refs, cond) = batches["kontext"]
    got = loss_of(flow, x0, txt, vec, refs, cond)
    g = torch.Generator().manual_seed(7)
    clean = pack(x0)
    noise = torch.randn(clean.shape, generator=g)
    t = sample_timesteps(2, clean.shape[1], g, "shift")
    x_t = (1 - t[:, None, None]) * clean + t[:, None, None] * noise
    with torch.no_grad():
        ids = torch.cat([image_ids(2, 32, 32), cond.token_ids], dim=1)
        v = flow(torch.cat([x_t, cond.tokens], dim=1), ids, txt, text_ids(2, txt.shape[1]), timesteps=t,
                 y=vec, guidance=torch.ones(2))[:, :4]
    want = (v - (noise - clean)).square().mean()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# the LoRA in diffusers


def transformer_inputs(variant: str, g: torch.Generator) -> tuple[dict, Condition]:
    """Our flow's inputs for a 32×64 image (8 tokens), and the Fill or Kontext condition (a 32×32 context)."""
    p = preset("tiny")
    x = dict(img=torch.randn(1, 8, 64, generator=g), img_ids=image_ids(1, 32, 64),
             txt=torch.randn(1, 7, p.context_in_dim, generator=g), txt_ids=text_ids(1, 7),
             timesteps=torch.tensor([0.7]), y=torch.randn(1, p.vec_in_dim, generator=g),
             guidance=torch.tensor([30.0 if variant == "fill" else 2.5]))
    if variant == "fill":
        return x, Condition(channels=torch.randn(1, 8, 320, generator=g))
    return x, Condition(tokens=torch.randn(1, 4, 64, generator=g), token_ids=context_ids(1, 32, 32))


def diffusers_output(ref, x: dict, cond: Condition) -> torch.Tensor:
    """What FluxFillPipeline / FluxKontextPipeline give their transformer: Fill's channels after the latents',
    Kontext's tokens after the image's (ids 2-D, batch-free), the prediction cut back to the image tokens."""
    img = x["img"]
    img_ids = x["img_ids"][0]
    if cond.channels is not None:
        img = torch.cat([img, cond.channels], dim=-1)
    if cond.tokens is not None:
        img = torch.cat([img, cond.tokens], dim=1)
        img_ids = torch.cat([img_ids, cond.token_ids[0]], dim=0)
    with torch.no_grad():
        out = ref(hidden_states=img, encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                  timestep=x["timesteps"], img_ids=img_ids, txt_ids=x["txt_ids"][0], guidance=x["guidance"])
    return out.sample[:, : x["img"].shape[1]]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fill", "kontext"])
def test_a_trained_lora_loads_in_diffusers_and_gives_our_transformers_output(repos, trained, variant):
    """diffusers' transformer-level load_lora_adapter (what load_lora_weights does for the transformer),
    in float64 so that only the mapping is compared (tests/test_lora_files.py: in_float64)."""
    ref = FluxTransformer2DModel.from_pretrained(repos[variant] / "transformer").eval()
    ref.load_lora_adapter(str(trained[variant]), prefix="transformer", adapter_name="lora")
    ours = load_pipeline(str(repos[variant])).flow.eval()
    x, cond = transformer_inputs(variant, torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = conditioned(ours, cond)(**x)
    load_lora(ours, trained[variant])
    ref = ref.double()
    ours = ours.double()
    x = {k: v.double() for k, v in x.items()}
    cond = Condition(*[None if c is None else c.double() for c in (cond.channels, cond.tokens,
                                                                      cond.token_ids)])
    with torch.no_grad():
        got = conditioned(ours, cond)(**x)
    want = diffusers_output(ref, x, cond)
    effect = (want - before.double()).abs().max()
    print(f"{variant}: max abs diff {(got - want).abs().max():.2e}, LoRA effect {effect:.2e}")
    assert effect > 1e-3
    assert (got - want).abs().max() < 1e-5


def smooth_picture(width: int, height: int, seed: int) -> Image.Image:
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fill", "kontext"])
def test_a_trained_lora_gives_diffusers_image_through_sample_py(repos, trained, tmp_path, variant):
    """The whole image: sample.py with the LoRA train.py wrote, and diffusers' pipeline with
    load_lora_weights of the same file, the same seed: within 1/255 per pixel."""
    image = smooth_picture(32, 32, 4)
    image.save(tmp_path / "image.png")
    flags = ["--image", str(tmp_path / "image.png")]
    call = dict(image=image, height=32, width=32, num_inference_steps=3, max_sequence_length=512,
                generator=torch.Generator().manual_seed(7))
    if variant == "fill":
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (8, 8, 24, 24))
        mask.save(tmp_path / "mask.png")
        flags += ["--mask", str(tmp_path / "mask.png")]
        pipe = FluxFillPipeline.from_pretrained(repos[variant], dtype=torch.float32)
        call |= dict(mask_image=mask, guidance_scale=30.0)
    else:
        pipe = FluxKontextPipeline.from_pretrained(repos[variant], dtype=torch.float32)
        call |= dict(guidance_scale=2.5, max_area=32 * 32, _auto_resize=False)
        flags += ["--context-size", "own", "--width", "32", "--height", "32"]
    pipe.load_lora_weights(str(trained[variant]))
    want = np.asarray(pipe(prompt=CAPTIONS[0], **call).images[0], dtype=np.int16)
    paths = sample.main(["--model", str(repos[variant]), "--lora", str(trained[variant]), "--prompt",
                         CAPTIONS[0], "--steps", "3", "--seed", "7", "--out", str(tmp_path / "ours.png"),
                         "--device", "cpu", *flags])
    got = np.asarray(Image.open(paths[0]), dtype=np.int16)
    print(f"{variant}: max pixel diff {np.abs(got - want).max()}, pixel std {want.std():.1f}")
    assert want.std() > 5, "a flat reference image would prove nothing"
    assert np.abs(got - want).max() <= 1


def test_a_fill_lora_on_dev_is_refused_by_sample_py_before_any_weight_loads(tmp_path, monkeypatch):
    lora = lora_with(tmp_path / "fill.safetensors", {"base_variant": "fill"})
    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match="a LoRA for FLUX.1 fill .* this model is FLUX.1 dev"):
        sample.main(["--model", "toy", "--prompt", "x", "--lora", str(lora), "--out",
                     str(tmp_path / "o.png")])


# ------------------------------------------------------------------------------------------------------------
# the variant a LoRA records


def lora_with(path: Path, meta: dict | None) -> Path:
    save_file({"transformer.x.lora_A.weight": torch.zeros(1, 1)}, path, metadata=meta)
    return path


def test_a_lora_recorded_for_another_variant_is_refused_naming_both(tmp_path):
    path = lora_with(tmp_path / "fill.safetensors", {"base_variant": "fill"})
    with pytest.raises(ValueError, match=r"fill\.safetensors is a LoRA for FLUX.1 fill .* this model is "
                                         r"FLUX.1 dev"):
        check_lora_variant(path, "dev")


def test_a_lora_recorded_for_this_variant_passes_without_a_note(tmp_path):
    path = lora_with(tmp_path / "k.safetensors", {"base_variant": "kontext"})
    assert check_lora_variant(path, "kontext") is None


def test_a_foreign_lora_recording_no_variant_gets_a_note(tmp_path):
    note = check_lora_variant(lora_with(tmp_path / "ace.safetensors", None), "fill")
    assert note.startswith("note: ") and "ace.safetensors" in note and "no base_variant" in note


def test_a_recorded_variant_that_is_none_of_ours_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"broken metadata: base_variant 'canny'"):
        check_lora_variant(lora_with(tmp_path / "c.safetensors", {"base_variant": "canny"}), "dev")


@pytest.mark.slow
@pytest.mark.parametrize("variant, size", [("fill", (64, 32)), ("kontext", (32, 32))])
def test_validation_images_are_sampled_with_the_first_sets_condition_at_its_size(repos, data, tmp_path,
                                                                                 variant, size):
    """Fill paints the whole set (PIL size 64×32); Kontext makes panel 2 alone (32×32) from panel 1."""
    out = run_train(repos[variant], data, tmp_path / "lora.safetensors", "--steps", "1", "--sample-every",
                    "1", "--sample-steps", "2")
    for step in ("step000000.png", "step000001.png"):
        assert Image.open(out.with_name("lora_samples") / step).size == size
