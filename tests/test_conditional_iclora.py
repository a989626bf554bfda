"""Conditional IC-LoRAs (`train.py --ref-panel K`): the loss is on the panels to generate, the reference
panels are given as `sample.py --ref` gives them (one function for both), the LoRA file records the geometry,
and sample.py takes it from there. The toy model stands in for FLUX (its VAE and flow are small and
trained)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sample
import train
from iclora.conditional_metadata import conditional_metadata, read_conditional_metadata
from iclora.data import PanelSetDataset, load_rgb
from iclora.lora import inject_lora
from iclora.lora_files import load_lora, save_lora
from iclora.panels import panel_boxes, split_panels
from iclora.references import image_positions, pin_references, reference_latents, reference_tokens
from iclora.training import References, encode_sets, flow_matching_loss, sample_timesteps, training_loss
from minflux.pipeline import load_pipeline, to_pil
from minflux.sampling import get_noise, image_ids, pack, text_ids, unpack
from toy import score

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("toy")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Three recolour sets: joined two-panel images (128x64) with captions, as toy/make_sets.py writes
    them."""
    folder = tmp_path_factory.mktemp("toy_sets")
    for i in range(3):
        for suffix in (".png", ".txt"):
            shutil.copy(ROOT / "sets" / "toy_recolour" / f"set_{i:03d}{suffix}", folder)
    return folder


@pytest.fixture(scope="module")
def encoded(pipe, sets):
    dataset = PanelSetDataset(sets, resolution=96, panels=2)
    return dataset, encode_sets(pipe, dataset, [1])


def batch(encoded):
    x0 = torch.stack([e.latents for e in encoded])
    txt, vec = torch.stack([e.txt for e in encoded]), torch.stack([e.vec for e in encoded])
    ref_latents = torch.stack([e.ref_latents for e in encoded])
    ref_mask = torch.stack([e.ref_mask for e in encoded])
    return x0, txt, vec, ref_latents, ref_mask


def moved_by_hand(B: int) -> torch.Tensor:
    """The positions of a 64x128 two-panel row whose left panel is moved onto the right one: (1, row, col +
    4)."""
    ids = image_ids(B, 64, 128).reshape(B, 4, 8, 3).clone()
    ids[:, :, :4] = ids[:, :, 4:]
    ids[:, :, :4, 0] = 1
    return ids.reshape(B, 32, 3)


@pytest.mark.parametrize("mode", ["noised", "clean", "moved"])
def test_masked_loss_is_the_plain_loss_on_the_target_tokens_with_reference_tokens_given(pipe, encoded, mode):
    x0, txt, vec, ref_latents, ref_mask = batch(encoded[1])
    B = x0.shape[0]
    with torch.no_grad():
        got = training_loss(pipe.flow, x0, txt, vec, torch.Generator().manual_seed(3), 1.0, "logit_normal",
                            References(ref_latents, ref_mask, mode,
                                       image_positions(64, 128, 2, "row", [0], mode).expand(B, -1, -1)))
        # by hand, with the same draws in the same order
        g, (h, w) = torch.Generator().manual_seed(3), x0.shape[2:]
        clean = pack(x0)
        noise = torch.randn(clean.shape, generator=g)
        t = sample_timesteps(B, clean.shape[1], g)[:, None, None]
        x_t = (1 - t) * clean + t * noise
        ref = (1 - t) * ref_latents + t * noise if mode == "noised" else ref_latents
        x_t[ref_mask] = ref[ref_mask]
        ids = moved_by_hand(B) if mode == "moved" else image_ids(B, 8 * h, 8 * w)
        v = pipe.flow(x_t, ids, txt, text_ids(B, txt.shape[1]), timesteps=t[:, 0, 0], y=vec,
                      guidance=torch.ones(B))
        want = ((v - (noise - clean))[~ref_mask] ** 2).mean()
    print(f"{mode}: masked loss {got.item():.6f}, by hand {want.item():.6f}")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_an_all_true_target_mask_is_the_plain_loss(pipe, encoded):
    x0, txt, vec, ref_latents, ref_mask = batch(encoded[1])
    with torch.no_grad():
        plain = flow_matching_loss(pipe.flow, x0, txt, vec, torch.Generator().manual_seed(5))
        masked = training_loss(pipe.flow, x0, txt, vec, torch.Generator().manual_seed(5),
                               refs=References(ref_latents, torch.zeros_like(ref_mask)))
    assert torch.equal(plain, masked)


def test_what_the_reference_panel_holds_in_the_training_image_does_not_change_the_loss_or_its_gradient(
        encoded):
    """The reference tokens' loss is masked and their input comes from the reference latents: the joined
    image's own latents there (a different encoding of the same pixels; here replaced by noise) do not
    matter."""
    torch.manual_seed(0)
    flow = load_pipeline("toy").flow  # its own copy: the LoRA stays out of the module's pipe
    inject_lora(flow, rank=4, alpha=4, seed=0)
    for p in (p for p in flow.parameters() if p.requires_grad):  # nonzero B so that A gets a gradient
        torch.nn.init.normal_(p, std=0.01)
    x0, txt, vec, ref_latents, ref_mask = batch(encoded[1])
    other = pack(x0).clone()
    other[ref_mask] = torch.randn_like(other[ref_mask]) * 3

    def loss_and_grads(x):
        flow.zero_grad()
        loss = training_loss(flow, x, txt, vec, torch.Generator().manual_seed(1),
                             refs=References(ref_latents, ref_mask, "clean"))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in flow.parameters() if p.requires_grad]

    loss_a, grads_a = loss_and_grads(x0)
    loss_b, grads_b = loss_and_grads(unpack(other, 8 * x0.shape[2], 8 * x0.shape[3]))
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert any(a.abs().sum() > 0 for a in grads_a)


def test_training_reference_latents_are_what_sample_py_ref_encodes_from_the_panel_image(pipe, sets, encoded):
    dataset, sets_encoded = encoded
    panel = split_panels(load_rgb(sets / "set_000.png"), 2, "row")[0]  # the file's left panel, 64x64
    ref_latents, ref_mask = reference_latents(pipe, [(panel, panel_boxes(64, 128, 2, "row")[0])], 64, 128)
    assert torch.equal(sets_encoded[0].ref_latents, ref_latents[0])
    assert torch.equal(sets_encoded[0].ref_mask, ref_mask)
    # the left half of the tokens
    assert ref_mask.sum() == ref_mask.numel() // 2 and ref_mask.reshape(4, 8)[:, :4].all()


def test_moved_positions_put_the_reference_panel_on_the_panel_to_generate_with_first_axis_one():
    assert torch.equal(image_positions(64, 128, 2, "row", [0], "moved"), moved_by_hand(1))


def test_moved_positions_of_two_references_take_the_first_panel_to_generate_with_first_axis_one_and_two():
    """A 2x2 grid of 32x32 panels (2x2 tokens each) with panels 1 and 3 given: both land on panel 2."""
    ids = image_positions(64, 64, 4, "grid", [0, 2], "moved").reshape(4, 4, 3)
    canvas = image_ids(1, 64, 64).reshape(4, 4, 3)
    panel_2, panel_4 = canvas[:2, 2:], canvas[2:, 2:]
    assert torch.equal(ids[:2, :2, 1:], panel_2[..., 1:]) and (ids[:2, :2, 0] == 1).all()   # panel 1
    assert torch.equal(ids[2:, :2, 1:], panel_2[..., 1:]) and (ids[2:, :2, 0] == 2).all()   # panel 3
    assert torch.equal(ids[:2, 2:], panel_2) and torch.equal(ids[2:, 2:], panel_4)        # generated: unmoved


@pytest.mark.parametrize("mode", ["noised", "clean"])
def test_the_other_modes_keep_the_canvas_positions(mode):
    assert torch.equal(image_positions(64, 64, 4, "grid", [0, 2], mode), image_ids(1, 64, 64))


def test_training_sets_carry_the_positions_of_their_reference_mode(pipe, sets):
    dataset = PanelSetDataset(sets, resolution=96, panels=2)
    assert torch.equal(encode_sets(pipe, dataset, [1], "moved")[0].ids, moved_by_hand(1)[0])


@pytest.mark.parametrize("mode", ["noised", "clean", "moved"])
def test_sampling_pins_the_reference_tokens_that_training_gives_the_model(mode):
    known, noise = torch.randn(1, 8, 64), torch.randn(1, 16, 4, 8)
    mask = torch.arange(8) < 4
    x = torch.randn(1, 8, 64)
    for t in (1.0, 0.7, 0.2, 0.0):
        pinned = pin_references(known, mask, noise, [1.0, 0.7, 0.2, 0.0], mode=mode)(x, t)
        assert torch.equal(pinned[:, mask], reference_tokens(known, pack(noise), t, mode)[:, mask])
        assert torch.equal(pinned[:, ~mask], x[:, ~mask])


def test_sample_py_gives_a_moved_conditional_lora_the_moved_positions(tmp_path):
    """sample.py --ref with a LoRA trained in "moved" mode draws what the toy pipeline draws by hand with the
    reference pinned clean and the moved positions."""
    flow = load_pipeline("toy").flow
    inject_lora(flow, rank=2, alpha=2, seed=0)
    for p in (p for p in flow.parameters() if p.requires_grad):
        torch.nn.init.normal_(p, std=0.05)
    lora = tmp_path / "moved.safetensors"
    save_lora(flow, lora, metadata=conditional_metadata([1], 2, "row", "moved", 64, 64))
    reference = Image.new("RGB", (64, 64), (255, 0, 0))
    prompt = "[TWO-PANEL] the same scene in two colour schemes"
    reference.save(tmp_path / "ref.png")
    [joined, *_] = sample.main(["--model", "toy", "--lora", str(lora), "--ref", str(tmp_path / "ref.png"),
                                "--prompt", prompt, "--steps", "3", "--seed", "7",
                                "--out", str(tmp_path / "o.png")])
    pipe = load_pipeline("toy")
    load_lora(pipe.flow, str(lora))
    txt, vec = pipe.encode_prompts([prompt])
    known, mask = reference_latents(pipe, [(reference, (0, 0, 64, 64))], 64, 128)
    timesteps = pipe.schedule(64, 128, 3)
    hook = pin_references(known, mask, get_noise(1, 64, 128, 7), timesteps, mode="clean")
    want = to_pil(pipe.decode(pipe.sample(txt, vec, (64, 128), 3, 3.5, 7, False, hook, moved_by_hand(1))))[0]
    diff = np.abs(np.asarray(Image.open(joined), np.int16) - np.asarray(want, np.int16))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"


def test_before_the_first_step_the_noised_reference_is_the_noise_and_the_clean_one_the_latents():
    known, noise = torch.randn(1, 8, 64), torch.randn(1, 16, 4, 8)
    mask, x = torch.arange(8) < 4, pack(noise)
    assert torch.equal(pin_references(known, mask, noise, [1.0, 0.0], mode="noised")(x, 1.0), x)
    clean = pin_references(known, mask, noise, [1.0, 0.0], mode="clean")(x, 1.0)
    assert torch.equal(clean[:, mask], known[:, mask])


def test_conditional_metadata_round_trips_through_a_lora_file(tmp_path):
    meta = conditional_metadata([1, 3], 4, "grid", "clean", 48, 80)
    save_file({"x": torch.zeros(1)}, tmp_path / "a.safetensors", metadata=meta)
    assert read_conditional_metadata(tmp_path / "a.safetensors") == dict(
        ref_panels=[1, 3], panels=4, layout="grid", ref_mode="clean", panel_height=48, panel_width=80)
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors", metadata={"rank": "16"})
    assert read_conditional_metadata(tmp_path / "plain.safetensors") is None


def test_broken_conditional_metadata_names_the_file_and_the_keys(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "a.safetensors",
              metadata={"ref_panels": "1", "panels": "two"})
    with pytest.raises(ValueError, match=r"a\.safetensors: broken conditional IC-LoRA metadata"
                                         r".*ref_panels, panels"):
        read_conditional_metadata(tmp_path / "a.safetensors")


def test_joined_images_without_panels_fail_before_any_weight_loads(sets, tmp_path):
    with pytest.raises(ValueError, match=r"--ref-panel needs to know where the panels are"
                                         r".*set_000\.png.*--panels N"):
        train.main(["--model", str(tmp_path / "no-model-needed"), "--data", str(sets), "--ref-panel", "1",
                    "--out", str(tmp_path / "x.safetensors")])


def test_a_reference_panel_the_sets_do_not_have_fails_before_any_weight_loads(sets, tmp_path):
    with pytest.raises(ValueError, match=r"--ref-panel 3 is not a panel of this 2-panel set"):
        train.main(["--model", str(tmp_path / "no-model-needed"), "--data", str(sets), "--panels", "2",
                    "--ref-panel", "3", "--out", str(tmp_path / "x.safetensors")])


def test_joined_images_with_panels_keep_every_panel_edge_on_the_token_grid(tmp_path):
    """A 3-panel row (3x 50x40) goes to a bucket whose panels are 16-px multiples, each panel resized on its
    own."""
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    joined = np.concatenate([np.full((40, 50, 3), c, np.uint8) for c in colours], 1)
    Image.fromarray(joined).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("three")
    dataset = PanelSetDataset(tmp_path, resolution=96, panels=3)
    (H, W), image = dataset.samples[0].bucket, dataset[0]["image"]
    assert W % 48 == 0 and H % 16 == 0
    for k, box in enumerate(panel_boxes(H, W, 3, "row")):
        region = image[:, :, box[0]:box[2]]
        want = torch.tensor(colours[k]).float()[:, None, None] / 127.5 - 1
        message = f"panel {k + 1} bleeds into its neighbour"
        assert torch.allclose(region, want.expand_as(region), atol=1e-6), message


@pytest.fixture(scope="module")
def conditional_lora(tmp_path_factory):
    """A toy LoRA file with the metadata of `train.py --ref-panel 1` on two-panel rows of 48x32 (H x W)
    panels."""
    flow = load_pipeline("toy").flow
    inject_lora(flow, rank=2, alpha=2, seed=0)
    path = tmp_path_factory.mktemp("lora") / "cond.safetensors"
    save_lora(flow, path, metadata=conditional_metadata([1], 2, "row", "clean", 48, 32))
    return path


@pytest.mark.slow
def test_sample_py_takes_panels_layout_reference_panel_and_size_from_a_conditional_lora(conditional_lora,
                                                                                        tmp_path):
    ref = tmp_path / "ref.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(ref)
    files = sample.main(["--model", "toy", "--lora", str(conditional_lora), "--ref", str(ref),
                         "--prompt", "[TWO-PANEL] the same scene in two colour schemes", "--steps", "2",
                         "--out", str(tmp_path / "out.png")])
    assert [Image.open(f).size for f in files] == [(64, 48), (32, 48), (32, 48)]  # joined, panel 1, panel 2


def test_a_reference_panel_other_than_the_loras_is_refused_before_the_model_loads(conditional_lora, tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "ref.png")
    with pytest.raises(ValueError, match=r"--ref-panel \[2\] does not match the conditional LoRA "
                                         r"cond\.safetensors, trained with --ref-panel \[1\]"):
        sample.main(["--model", str(tmp_path / "no-model-needed"), "--lora", str(conditional_lora), "--ref",
                     str(tmp_path / "ref.png"), "--ref-panel", "2", "--prompt", "x"])


@pytest.mark.slow
def test_validation_with_several_resolutions_uses_the_first_sets_largest_size_and_its_positions(sets,
                                                                                                tmp_path):
    out = train.main(["--model", "toy", "--data", str(sets), "--panels", "2", "--ref-panel", "1",
                      "--resolution", "48", "96", "--steps", "1", "--sample-every", "1",
                      "--sample-steps", "2", "--device", "cpu", "--out", str(tmp_path / "c.safetensors")])
    assert Image.open(out.with_name("c_samples") / "step000001.png").size == (128, 64)  # the sets' own size


@pytest.mark.slow
def test_resuming_a_run_trained_with_another_reference_treatment_is_refused(sets, tmp_path):
    flags = ["--model", "toy", "--data", str(sets), "--panels", "2", "--ref-panel", "1",
             "--sample-every", "0", "--device", "cpu", "--out", str(tmp_path / "c.safetensors")]
    train.main([*flags, "--steps", "1"])
    state = torch.load(tmp_path / "c.state.pt", weights_only=True)
    del state["ref_mode"]  # as saved before train.py kept it: those runs were "clean"
    torch.save(state, tmp_path / "c.state.pt")
    with pytest.raises(SystemExit, match=r"trained with reference treatment 'clean' "
                                         r"and this train.py trains 'moved'"):
        train.main([*flags, "--steps", "2", "--resume"])


def metadata_only_lora(path, *geometry) -> str:
    """A file holding only conditional_metadata(*geometry): all that sample.py checks before loading."""
    save_file({"x": torch.zeros(1)}, path, metadata=conditional_metadata(*geometry))
    return str(path)


def sample_with(tmp_path, loras: list[str], refs: int) -> list:
    Image.new("RGB", (64, 64)).save(tmp_path / "ref.png")
    lora_flags = [a for lora in loras for a in ("--lora", lora)]
    ref_flags = ["--ref", str(tmp_path / "ref.png")] * refs
    model = str(tmp_path / "no-model-needed")
    return sample.main(["--model", model, "--prompt", "x", *lora_flags, *ref_flags])


def test_a_conditional_lora_given_fewer_references_than_it_was_trained_with_says_how_many_it_takes(tmp_path):
    lora = metadata_only_lora(tmp_path / "two_refs.safetensors", [1, 3], 4, "grid", "moved", 32, 32)
    with pytest.raises(ValueError, match=r"the conditional LoRA two_refs\.safetensors takes 2 reference "
                                         r"image\(s\), for panel\(s\) \[1, 3\]; got 1 --ref"):
        sample_with(tmp_path, [lora], refs=1)


def test_conditional_loras_trained_with_other_geometries_are_refused_together_naming_both(tmp_path):
    row = metadata_only_lora(tmp_path / "row.safetensors", [1], 2, "row", "moved", 32, 32)
    column = metadata_only_lora(tmp_path / "column.safetensors", [1], 2, "column", "moved", 32, 32)
    with pytest.raises(ValueError, match=r"the conditional LoRAs row\.safetensors and column\.safetensors "
                                         r"were trained with other panels, layout"):
        sample_with(tmp_path, [row, column], refs=1)


@pytest.mark.parametrize("geometry, shown", [(([1], 2, "row", "bogus", 32, 32), "ref_mode 'bogus'"),
                                             (([1], 2, "diagonal", "moved", 32, 32), "layout 'diagonal'"),
                                             (([1], 2, "row", "moved", 40, 32), "panel size 32x40")])
def test_conditional_metadata_values_out_of_their_range_are_refused_naming_the_file(tmp_path, geometry,
                                                                                    shown):
    lora = metadata_only_lora(tmp_path / "odd.safetensors", *geometry)
    with pytest.raises(ValueError, match=rf"odd\.safetensors: broken conditional IC-LoRA metadata: "
                                         rf".*{shown}"):
        sample_with(tmp_path, [lora], refs=1)


def test_toy_score_refuses_a_conditional_lora_of_another_geometry(tmp_path, capsys):
    lora = metadata_only_lora(tmp_path / "right.safetensors", [2], 2, "row", "moved", 64, 64)
    with pytest.raises(SystemExit):
        score.parse_args(["--lora", lora])
    assert "a conditional LoRA of 2 panels in a row, reference panel(s) [2]" in capsys.readouterr().err


def test_a_conditional_lora_without_ref_is_warned_of(tmp_path):
    lora = metadata_only_lora(tmp_path / "cond.safetensors", [1], 2, "row", "moved", 32, 32)
    warning = r"cond\.safetensors is a conditional IC-LoRA .* give its input image with --ref"
    with pytest.warns(UserWarning, match=warning), pytest.raises(ValueError, match="no-model-needed"):
        sample_with(tmp_path, [lora], refs=0)  # then fails at the missing model
