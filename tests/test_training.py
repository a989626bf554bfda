"""train.py on a tiny random FLUX: it learns, resumes bit-for-bit, and stops cleanly on bad input or NaN."""

import copy
import gc
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train
from iclora.data import PanelSetDataset
from iclora.lora import inject_lora, lora_state
from iclora.lora_files import load_lora, read_lora_file, save_lora
from iclora.options import parse_val_prompt
from iclora.resume import start_from_lora
from iclora.training import (
    TIMESTEP_MODES,
    EncodedSet,
    collate,
    encode_sets,
    flow_matching_loss,
    sample_timesteps,
)
from iclora.validation import guidance_of
from minflux.pipeline import load_pipeline
from minflux.sampling import shift_mu, time_shift
from tests.test_lora_files import trained as with_random_lora
from tests.test_transformer import reference_and_ours
from tests.tiny_repo import write_tiny_repo

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["[TWO-PANEL] a red square and its blue twin, [LEFT] a red square, [RIGHT] a blue square",
            "[TWO-PANEL] a green disc and its yellow twin, [LEFT] a green disc, [RIGHT] a yellow disc"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_tiny_repo(tmp_path_factory.mktemp("tiny") / "FLUX.1-dev", layout="bfl", seed=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two joined two-panel images (64×32) with captions: the layout most LoRA datasets use."""
    folder = tmp_path_factory.mktemp("sets") / "twins"
    folder.mkdir()
    colours = [((220, 30, 30), (30, 30, 220)), ((30, 200, 30), (230, 220, 20))]
    for i, ((left, right), caption) in enumerate(zip(colours, CAPTIONS, strict=True)):
        img = np.zeros((32, 64, 3), np.uint8)
        img[:, :32], img[:, 32:] = left, right
        img[8:24, 8:24], img[8:24, 40:56] = 255, 255
        Image.fromarray(img).save(folder / f"set{i}.png")
        (folder / f"set{i}.txt").write_text(caption)
    return folder


def run_train(repo, data, out: Path, *extra) -> Path:
    return train.main(["--model", str(repo), "--data", str(data), "--out", str(out), "--resolution", "48",
                       "--batch-size", "2", "--rank", "4", "--alpha", "4", "--lr", "3e-3", "--warmup", "1",
                       "--caption-dropout", "0", "--sample-every", "0", "--device", "cpu", *extra])


def eval_loss(flow, sets, seeds=range(16)) -> float:
    x0 = torch.stack([e.latents for e in sets])
    txt, vec = torch.stack([e.txt for e in sets]), torch.stack([e.vec for e in sets])
    with torch.no_grad():
        return float(np.mean([flow_matching_loss(flow, x0, txt, vec, torch.Generator().manual_seed(s)).item()
                              for s in seeds]))


@pytest.fixture(scope="module")
def trained(repo, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "twins.safetensors"
    run_train(repo, data, out, "--steps", "80", "--save-every", "40")
    return out


@pytest.mark.slow
def test_training_lowers_the_flow_matching_loss_on_the_training_set(repo, data, trained):
    pipe = load_pipeline(str(repo))
    sets = encode_sets(pipe, PanelSetDataset(data, resolution=48))
    before = eval_loss(pipe.flow, sets)
    load_lora(pipe.flow, trained)
    after = eval_loss(pipe.flow, sets)
    print(f"flow-matching loss on the training set: base {before:.4f}, with LoRA {after:.4f}")
    assert after < 0.5 * before


@pytest.mark.slow
def test_sampling_with_the_trained_lora_moves_toward_the_training_images(repo, data, trained):
    pipe = load_pipeline(str(repo))
    target = encode_sets(pipe, PanelSetDataset(data, resolution=48))[0].latents
    txt, vec = pipe.encode_prompts([CAPTIONS[0]])
    base = pipe.sample(txt, vec, (32, 64), steps=10, guidance=1.0, seed=3, progress=False)[0]
    load_lora(pipe.flow, trained)
    tuned = pipe.sample(txt, vec, (32, 64), steps=10, guidance=1.0, seed=3, progress=False)[0]
    d_base, d_tuned = (base - target).norm().item(), (tuned - target).norm().item()
    print(f"latent distance to the training image: base {d_base:.2f}, with LoRA {d_tuned:.2f}")
    assert d_tuned < 0.7 * d_base


@pytest.mark.slow
def test_training_writes_lora_state_and_loss_log(trained):
    assert trained.exists() and trained.with_name("twins.state.pt").exists()
    rows = trained.with_name("twins.loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,seconds" and len(rows) == 81
    assert any(k.startswith("transformer.") and k.endswith("lora_A.weight") for k in load_file(trained))


@pytest.mark.slow
def test_resume_continues_bit_for_bit(repo, data, tmp_path):
    straight = run_train(repo, data, tmp_path / "a" / "lora.safetensors", "--steps", "6", "--save-every", "3")
    run_train(repo, data, tmp_path / "b" / "lora.safetensors", "--steps", "3", "--save-every", "3")
    resumed = run_train(repo, data, tmp_path / "b" / "lora.safetensors", "--steps", "6", "--save-every", "3",
                        "--resume")
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_with_several_resolutions_continues_bit_for_bit(repo, data, tmp_path):
    two = ("--resolution", "32", "48")  # each set at 48x16 and at 64x32 (its own size)
    straight = run_train(repo, data, tmp_path / "a" / "lora.safetensors", "--steps", "4", *two)
    run_train(repo, data, tmp_path / "b" / "lora.safetensors", "--steps", "2", *two)
    resumed = run_train(repo, data, tmp_path / "b" / "lora.safetensors", "--steps", "4", *two, "--resume")
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_state_saved_with_one_resolution_number_resumes_as_that_list_and_refuses_another(repo, data,
                                                                                           tmp_path):
    out = run_train(repo, data, tmp_path / "lora.safetensors", "--steps", "2")
    state_path = out.with_name("lora.state.pt")
    state = torch.load(state_path, weights_only=True)
    assert state["args"]["resolution"] == "[48]"
    state["args"]["resolution"] = "48"  # as train.py saved it before --resolution took a list
    torch.save(state, state_path)
    run_train(repo, data, out, "--steps", "3", "--resume")
    assert torch.load(state_path, weights_only=True)["step"] == 3
    with pytest.raises(SystemExit, match=r"--resolution \[48\] -> \[32, 48\]"):
        run_train(repo, data, out, "--steps", "4", "--resolution", "32", "48", "--resume")


@pytest.mark.slow
def test_encode_sets_encodes_each_set_once_per_bucket(repo, data):
    pipe = load_pipeline(str(repo))
    dataset = PanelSetDataset(data, resolution=[32, 48, 64])
    assert [s.bucket for s in dataset.samples[:3]] == [(16, 48), (32, 64), (32, 64)]  # at 64: its own size
    encoded, alone = encode_sets(pipe, dataset), encode_sets(pipe, PanelSetDataset(data, resolution=48))
    assert encoded[2] is encoded[1] and encoded[5] is encoded[4] and encoded[0].latents.shape[-2:] == (2, 6)
    assert torch.equal(encoded[1].latents, alone[0].latents) and torch.equal(encoded[4].txt, alone[1].txt)
    assert encoded[0].txt is encoded[1].txt  # the caption is encoded once for all its buckets


@pytest.mark.slow
def test_resume_keeps_the_loss_log_rows_up_to_the_saved_step_and_closes_the_file(repo, data, tmp_path):
    """Rows after the last save were lost with the run that wrote them: the resumed log has each step once."""
    out = tmp_path / "lora.safetensors"
    # saved at 3 and 5; pretend 4 and 5 were lost
    run_train(repo, data, out, "--steps", "5", "--save-every", "3")
    state = torch.load(out.with_name("lora.state.pt"), weights_only=True)
    state["step"] = 3
    torch.save(state, out.with_name("lora.state.pt"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        run_train(repo, data, out, "--steps", "6", "--save-every", "3", "--resume")
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning) and "loss.csv" in str(w.message)]
    rows = out.with_name("lora.loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,seconds"
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6]


@pytest.mark.filterwarnings("ignore:.*exceeds fp16.s range:UserWarning")  # the blown-up LoRA it saves
@pytest.mark.slow
def test_a_nan_loss_stops_with_a_clear_message_naming_its_step_and_keeps_the_last_checkpoint(repo, data,
                                                                                             tmp_path):
    out = tmp_path / "nan.safetensors"
    with pytest.raises(SystemExit, match=r"loss is (nan|inf) at step \d+: training stopped") as caught:
        run_train(repo, data, out, "--steps", "50", "--save-every", "1", "--lr", "1e30",
                  "--grad-clip", "1e30")
    state = torch.load(out.with_name("nan.state.pt"), weights_only=True)
    assert state["step"] >= 1
    rows = out.with_name("nan.loss.csv").read_text().splitlines()[1:]  # as the bar, steps count from 1
    assert int(str(caught.value).split(" at step ")[1].split(":")[0]) == state["step"] + 1 == len(rows) + 1
    assert all(torch.isfinite(t).all() for t in load_file(out).values())


@pytest.mark.slow
def test_a_nan_loss_before_the_first_save_says_nothing_was_saved(repo, data, tmp_path):
    out = tmp_path / "nan.safetensors"
    with pytest.raises(SystemExit, match=r"at step \d+: training stopped. Nothing was saved") as caught:
        run_train(repo, data, out, "--steps", "50", "--save-every", "1000", "--lr", "1e30",
                  "--grad-clip", "0")
    assert "checkpoint" not in str(caught.value) and not out.with_name("nan.state.pt").exists()


def test_a_broken_dataset_fails_before_the_model_is_loaded(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"a\.png"):
        train.main(["--model", str(tmp_path / "no-model-needed"), "--data", str(tmp_path), "--device", "cpu"])


@pytest.mark.slow
def test_a_missing_dataset_folder_is_one_line_pointing_at_the_sets_readme(tmp_path):
    missing = tmp_path / "sets" / "home_decor"  # a fresh clone: the README's dataset is not there yet
    run = subprocess.run([sys.executable, "train.py", "--data", str(missing)], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode != 0
    want = f"error: dataset folder {missing} does not exist; sets/README.md shows how to lay one out\n"
    assert run.stderr == want
    assert not (tmp_path / "sets").exists()


def test_config_file_values_are_used_and_flags_override_them(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text('{"data": "sets/x", "rank": 8, "lr": 0.001}')
    args = train.parse_args(["--config", str(cfg), "--rank", "32"])
    assert (args.data, args.rank, args.lr) == (Path("sets/x"), 32, 0.001)


@pytest.mark.slow
def test_train_py_help_explains_every_flag():
    run = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0
    for flag in ("--data", "--model", "--out", "--steps", "--batch-size", "--rank", "--alpha", "--lr",
                 "--resolution",
                 "--seed", "--device", "--dtype", "--resume", "--config", "--grad-accum", "--save-every"):
        assert flag in run.stdout


def test_caption_dropout_swaps_in_the_empty_caption_reproducibly_at_rate_p():
    sets = [EncodedSet(torch.zeros(16, 2, 2), torch.full((3, 4), float(i + 1)), torch.ones(4))
            for i in range(8)]
    empty = EncodedSet(None, torch.zeros(3, 4), torch.zeros(4))

    def drops(seed):
        out = []
        for step in range(100):
            _, txt, *_ = collate(sets, empty, 0.25, torch.Generator().manual_seed(seed * 1000 + step), "cpu")
            out += (txt.flatten(1).abs().sum(1) == 0).tolist()
        return out

    assert drops(1) == drops(1) and drops(1) != drops(2)
    assert abs(sum(drops(1)) / 800 - 0.25) < 0.05


@pytest.mark.slow
def test_resume_with_different_settings_is_refused_naming_them(repo, data, tmp_path):
    out = tmp_path / "lora.safetensors"
    run_train(repo, data, out, "--steps", "2", "--save-every", "2")
    with pytest.raises(SystemExit, match=r"--rank 4 -> 8"):
        run_train(repo, data, out, "--steps", "4", "--rank", "8", "--resume")


def test_a_repeatable_flag_given_replaces_the_config_files_list(tmp_path):
    (tmp_path / "run.json").write_text('{"data": "d", "val_prompt": ["from the file"], "ref_panel": [1]}')
    args = train.parse_args(["--config", str(tmp_path / "run.json"), "--val-prompt", "from the flag"])
    assert args.val_prompt == ["from the flag"] and args.ref_panel == [1]


@pytest.mark.parametrize("config", ['{"steps": 0}', '{"caption_dropout": 3}', '{"lr": -1}'])
def test_nonsense_numbers_in_the_config_file_are_refused_like_flags(tmp_path, config):
    (tmp_path / "run.json").write_text(config)
    with pytest.raises(SystemExit):
        train.parse_args(["--data", str(tmp_path), "--config", str(tmp_path / "run.json")])


def test_nonsense_numbers_are_refused_before_anything_loads(tmp_path):
    for flag in ("--save-every", "--steps", "--batch-size", "--grad-accum", "--rank"):
        with pytest.raises(SystemExit):
            train.parse_args(["--data", str(tmp_path), flag, "0"])


# ------------------------------------------------------------------------------------------------------------
# Captions longer than T5 reads (512 tokens for FLUX.1-dev), reported before the transformer's weights load

LONG_CAPTION = "a red fox " * 120  # 5 tokens each (▁a ▁re d ▁fo x): 600 tokens, and </s>


@pytest.fixture
def broken_weights_repo(repo, tmp_path):
    """The tiny repo with an unreadable transformer file: whatever happens before the error, happens before
    the weights load."""
    copy = shutil.copytree(repo, tmp_path / "FLUX.1-dev")
    (copy / "flux1-dev.safetensors").write_bytes(b"broken")
    return copy


def with_first_caption(data, folder: Path, caption: str) -> Path:
    shutil.copytree(data, folder)
    (folder / "set0.txt").write_text(caption)
    return folder


def test_a_caption_over_the_t5_limit_is_reported_with_its_count_and_cut_words_before_the_weights_load(
        broken_weights_repo, data, tmp_path):
    sets = with_first_caption(data, tmp_path / "sets", LONG_CAPTION)
    with pytest.warns(UserWarning,
                      match=r"the caption of .*set0\.png is 601 T5 tokens, over the model's limit of "
                                         r"512; these words are cut off: 'red fox a red fox") as caught:
        with pytest.raises(ValueError, match=r"flux1-dev\.safetensors: unreadable safetensors file"):
            run_train(broken_weights_repo, sets, tmp_path / "lora.safetensors")
    assert len([w for w in caught if "T5 tokens" in str(w.message)]) == 1  # only the long one


def test_strict_captions_refuses_a_caption_over_the_t5_limit(broken_weights_repo, data, tmp_path):
    sets = with_first_caption(data, tmp_path / "sets", LONG_CAPTION)
    with pytest.raises(ValueError, match=r"--strict-captions: the caption of .*set0\.png is 601 T5 tokens"):
        run_train(broken_weights_repo, sets, tmp_path / "lora.safetensors", "--strict-captions")


def test_a_long_validation_prompt_is_reported_too(broken_weights_repo, data, tmp_path):
    with pytest.raises(ValueError, match=r"--val-prompt 'a red fox a red fox.*' is 601 T5 tokens"):
        run_train(broken_weights_repo, data, tmp_path / "lora.safetensors", "--val-prompt", LONG_CAPTION,
                  "--strict-captions")


def test_short_captions_give_no_t5_warning(broken_weights_repo, data, tmp_path):
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError,
                                                                       match="unreadable safetensors file"):
        warnings.simplefilter("always")
        run_train(broken_weights_repo, data, tmp_path / "lora.safetensors", "--strict-captions")
    assert not [w for w in caught if "T5 tokens" in str(w.message)]


@pytest.mark.parametrize("mode", TIMESTEP_MODES)
def test_each_timestep_mode_draws_the_distribution_it_names(mode):
    tokens, q = 4096, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    t = sample_timesteps(400_000, tokens, torch.Generator().manual_seed(0), mode)
    # sigmoid(z) at the normal's quantiles
    logit_normal = torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(q))
    want = {"sigmoid": logit_normal, "shift": time_shift(shift_mu(tokens), logit_normal), "uniform": q}[mode]
    torch.testing.assert_close(torch.quantile(t, q), want, atol=3e-3, rtol=0)
    if mode == "shift":
        assert abs(torch.median(t).item() - 0.76) < 0.005  # FLUX's shift at 1024² (4096 tokens): mu = 1.15


@pytest.mark.slow
def test_logit_normal_is_read_as_shift_in_flags_and_in_old_states(repo, data, tmp_path):
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert torch.equal(sample_timesteps(64, 256, g(), "logit_normal"),
                       sample_timesteps(64, 256, g(), "shift"))
    out = run_train(repo, data, tmp_path / "lora.safetensors", "--steps", "2",
                    "--timestep-sampling", "logit_normal")
    state_path = out.with_name("lora.state.pt")
    state = torch.load(state_path, weights_only=True)
    assert state["args"]["timestep_sampling"] == "shift"
    state["args"]["timestep_sampling"] = "logit_normal"  # as a run saved it before `shift` had its name
    torch.save(state, state_path)
    run_train(repo, data, out, "--steps", "3", "--timestep-sampling", "shift", "--resume")
    assert torch.load(state_path, weights_only=True)["step"] == 3


@pytest.mark.slow
def test_the_ema_follows_its_closed_form_and_is_what_the_lora_file_holds(repo, data, tmp_path):
    decay, raw = 0.5, []
    for steps in (1, 2, 3):  # the same run, stopped after 1, 2 and 3 steps: its raw adapters at each step
        out = run_train(repo, data, tmp_path / f"s{steps}" / "lora.safetensors", "--steps", str(steps),
                        "--ema-decay", str(decay), "--save-dtype", "fp32")
        raw.append(torch.load(out.with_name("lora.state.pt"), weights_only=True))
    ema = raw[-1]["ema"]
    for name in (n for n in ema if ".lora_B." in n):  # B starts at zero: ema_3 = (1 − d)·(d²·B1 + d·B2 + B3)
        b1, b2, b3 = (r["lora"][name] for r in raw)
        torch.testing.assert_close(ema[name], (1 - decay) * (decay**2 * b1 + decay * b2 + b3), rtol=1e-6,
                                   # float32 rounding: lerp and the closed form add in another order
                                   atol=1e-9)
    flow = load_pipeline(str(repo)).flow
    load_lora(flow, str(out))
    for module, w in lora_state(flow).items():
        assert torch.equal(w.A, ema[f"{module}.lora_A.default.weight"])
        assert torch.equal(w.B, ema[f"{module}.lora_B.default.weight"])


@pytest.mark.slow
def test_without_ema_the_lora_file_holds_the_raw_weights(repo, data, tmp_path):
    out = run_train(repo, data, tmp_path / "lora.safetensors", "--steps", "2", "--ema-decay", "0",
                    "--save-dtype", "fp32")
    state = torch.load(out.with_name("lora.state.pt"), weights_only=True)
    assert "ema" not in state
    flow = load_pipeline(str(repo)).flow
    load_lora(flow, str(out))
    assert all(torch.equal(w.B, state["lora"][f"{m}.lora_B.default.weight"])
               for m, w in lora_state(flow).items())


@pytest.mark.slow
def test_each_save_leaves_a_numbered_copy_and_only_the_last_n_are_kept(repo, data, tmp_path):
    out = run_train(repo, data, tmp_path / "lora.safetensors", "--steps", "5", "--save-every", "1",
                    "--keep-last", "2")
    copies = sorted(tmp_path.glob("lora-step*.safetensors"))
    assert [p.name for p in copies] == ["lora-step000004.safetensors", "lora-step000005.safetensors"]
    latest, last = load_file(out), load_file(copies[-1])
    assert latest.keys() == last.keys() and all(torch.equal(latest[k], last[k]) for k in latest)


@pytest.mark.slow
def test_keep_last_0_writes_no_numbered_copies(repo, data, tmp_path):
    run_train(repo, data, tmp_path / "lora.safetensors", "--steps", "2", "--save-every", "1",
              "--keep-last", "0")
    assert not list(tmp_path.glob("lora-step*"))


@pytest.mark.slow
def test_init_lora_starts_the_adapters_from_the_file(repo, data, tmp_path):
    first = run_train(repo, data, tmp_path / "a" / "lora.safetensors", "--steps", "3", "--save-dtype", "fp32",
                      "--ema-decay", "0")
    # one step at the smallest learning rate: what is saved is what the run started from
    again = run_train(repo, data, tmp_path / "b" / "lora.safetensors", "--steps", "1", "--lr", "1e-12",
                      "--save-dtype", "fp32", "--ema-decay", "0", "--init-lora", str(first))
    a, b = load_file(first), load_file(again)
    assert a.keys() == b.keys() and any(v.abs().max() > 1e-3 for k, v in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-9)


@pytest.mark.parametrize("alpha", [2.0, 4.0, 12.0])
def test_init_lora_starts_from_the_files_delta_whatever_the_alpha(tmp_path, alpha):
    """A file saved at rank 4, alpha 8 (its B holds 2·B) gives a fresh rank-4 adapter of any --alpha its
    delta."""
    _, source = reference_and_ours(guidance_embed=True)
    flow = copy.deepcopy(source)
    save_lora(with_random_lora(source, rank=4, alpha=8.0), tmp_path / "init.safetensors")
    inject_lora(flow, rank=4, alpha=alpha)
    start_from_lora(flow, read_lora_file(tmp_path / "init.safetensors"), tmp_path / "init.safetensors", 4)
    want, got = lora_state(source), lora_state(flow)
    assert got.keys() == want.keys()
    for name, w in got.items():
        assert w.alpha == alpha
        torch.testing.assert_close(alpha / 4 * w.B @ w.A, 8.0 / 4 * want[name].B @ want[name].A, rtol=0,
                                   atol=1e-6)


@pytest.mark.slow
def test_init_lora_of_another_rank_is_refused_naming_the_rank_to_give(repo, data, tmp_path):
    first = run_train(repo, data, tmp_path / "a" / "lora.safetensors", "--steps", "1")
    with pytest.raises(ValueError, match=r"has rank 4; this run trains rank 8 \(give --rank 4\)"):
        run_train(repo, data, tmp_path / "b" / "lora.safetensors", "--steps", "1", "--rank", "8",
                  "--init-lora", str(first))


@pytest.mark.slow
def test_each_save_draws_the_loss_curve_next_to_the_csv(repo, data, tmp_path):
    out = run_train(repo, data, tmp_path / "lora.safetensors", "--steps", "6", "--save-every", "3")
    curve = np.asarray(Image.open(out.with_name("lora.loss.png")))
    assert curve.shape == (400, 800, 3)
    assert ((curve == (30, 90, 200)).all(-1).sum() > 100)  # the centred average's line
    assert ((curve == (200, 200, 200)).all(-1).sum() > 50)  # the loss of every step
    assert ((curve == (220, 120, 30)).all(-1).sum() > 50)  # the learning rate


def test_inline_val_prompt_settings_are_read_and_others_take_the_defaults():
    v = parse_val_prompt("a red fox --w 64 --h 32 --seed 3 --g 2.5 --s 7", 48, 48, 20)
    assert v == dict(caption="a red fox", height=32, width=64, seed=3, guidance=2.5, steps=7)
    assert parse_val_prompt("a fox --d 5 --l 4", 48, 32, 20) == dict(caption="a fox", height=48, width=32,
                                                                         seed=5, guidance=4.0, steps=20)
    assert parse_val_prompt("a fox--like dog", 16, 16, 9)["caption"] == "a fox--like dog"


def test_a_val_prompt_without_g_is_sampled_at_its_bases_own_guidance():
    assert parse_val_prompt("a fox", 16, 16, 9)["guidance"] is None  # Validation reads the base's default
    for variant, guidance in (("dev", 3.5), ("fill", 30.0), ("kontext", 2.5)):
        assert guidance_of({"guidance": None}, variant) == guidance
        assert guidance_of({"guidance": 4.0}, variant) == 4.0


@pytest.mark.parametrize("text, error", [("a fox --x 3", "unknown option --x"),
                                         ("a fox --w wide", "--w 'wide' is not"),
                                         ("a fox --w 50", "multiples of 16"),
                                         ("a fox --s 0", "--s must be at least 1"),
                                         ("a fox --s -2", "--s must be at least 1"),
                                         ("a fox --g nan", "finite"),
                                         ("a fox --W 64", "'--W' is not a setting with its value"),
                                         ("a fox --seed=3", "'--seed=3' is not a setting"),
                                         ("a fox --s", "'--s' is not a setting")])
def test_a_bad_val_prompt_option_is_refused_before_the_weights_load(broken_weights_repo, data, tmp_path,
                                                                    text, error):
    with pytest.raises(ValueError, match=error):
        run_train(broken_weights_repo, data, tmp_path / "lora.safetensors", "--val-prompt", text,
                  "--steps", "1")


@pytest.mark.slow
def test_validation_images_go_side_by_side_into_one_picture_per_step_with_a_step_0_baseline(repo, data,
                                                                                            tmp_path):
    run_train(repo, data, tmp_path / "lora.safetensors", "--steps", "2", "--sample-every", "2",
              "--sample-steps", "2", "--val-prompt", "a red square --w 32 --h 32",
              "--val-prompt", "a green square --w 48 --h 16 --seed 1")
    pictures = sorted((tmp_path / "lora_samples").iterdir())
    assert [p.name for p in pictures] == ["step000000.png", "step000002.png"]
    assert Image.open(pictures[0]).size == (32 + 4 + 48, 32)


@pytest.mark.slow
def test_grad_clip_0_means_no_clipping_the_same_training_as_an_unreachable_clip(repo, data, tmp_path):
    fp32 = ("--steps", "2", "--ema-decay", "0", "--save-dtype", "fp32")
    unclipped = load_file(run_train(repo, data, tmp_path / "a" / "lora.safetensors", *fp32,
                                    "--grad-clip", "0"))
    huge = load_file(run_train(repo, data, tmp_path / "b" / "lora.safetensors", *fp32, "--grad-clip", "1e30"))
    assert unclipped.keys() == huge.keys() and all(torch.equal(unclipped[k], huge[k]) for k in huge)
    assert all(v.abs().max() > 0 for k, v in unclipped.items() if "lora_B" in k)  # it trained


@pytest.mark.parametrize("flag, value", [("--grad-clip", "-1"), ("--grad-clip", "nan"), ("--alpha", "0"),
                                         ("--alpha", "-4"), ("--alpha", "inf")])
def test_a_negative_grad_clip_and_an_alpha_not_above_0_are_refused(tmp_path, flag, value, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--data", str(tmp_path), flag, value])
    assert f"argument {flag}: must be" in capsys.readouterr().err


def test_an_out_inside_the_dataset_however_spelled_is_refused_before_anything_loads(tmp_path, capsys):
    (tmp_path / "sets").mkdir()
    with pytest.raises(SystemExit):
        train.parse_args(["--data", str(tmp_path / "sets"),
                          "--out", str(tmp_path / "x" / ".." / "sets" / "a.safetensors")])
    assert "is inside --data" in capsys.readouterr().err


@pytest.mark.parametrize("folder", ["existing", "new/"])
def test_an_out_naming_a_folder_is_refused_before_anything_loads(tmp_path, folder, capsys):
    (tmp_path / "existing").mkdir()
    with pytest.raises(SystemExit):
        train.parse_args(["--data", str(tmp_path / "sets"), "--out", str(tmp_path) + "/" + folder])
    assert "is a folder; name the LoRA file, e.g." in capsys.readouterr().err


def test_a_single_value_for_a_repeatable_flag_in_the_config_file_is_a_list_of_it_converted_by_the_flags_type(
        tmp_path):
    (tmp_path / "run.json").write_text('{"data": "d", "val_prompt": "a red square", "ref_panel": 1, '
                                       '"resolution": "48", "panels": 2}')
    args = train.parse_args(["--config", str(tmp_path / "run.json")])
    assert (args.val_prompt, args.ref_panel, args.resolution, args.panels) == (["a red square"], [1], [48], 2)
    (tmp_path / "run.json").write_text('{"data": "d", "ref_panel": ["2", 1], "checkpointing": false}')
    args = train.parse_args(["--config", str(tmp_path / "run.json")])
    assert (args.ref_panel, args.checkpointing) == ([2, 1], False)


@pytest.mark.parametrize("key, value", [("checkpointing", '"false"'), ("compile", "1"), ("ref_panel", "[0]"),
                                        ("resolution", '[48, "big"]'), ("layout", '"diagonal"'),
                                        ("rank", "[4]")])
def test_config_values_a_flag_would_refuse_are_refused_naming_the_file_and_key(tmp_path, key, value, capsys):
    (tmp_path / "run.json").write_text(f'{{"data": "d", "{key}": {value}}}')
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(tmp_path / "run.json")])
    assert f"{tmp_path / 'run.json'}: '{key}'" in capsys.readouterr().err


@pytest.mark.slow
def test_the_loss_logs_seconds_go_on_from_the_last_kept_row_after_resume(repo, data, tmp_path):
    out = run_train(repo, data, tmp_path / "lora.safetensors", "--steps", "2")
    log = out.with_name("lora.loss.csv")
    rows = log.read_text().splitlines()
    # a long first run
    log.write_text("\n".join(rows[:-1] + [rows[-1].rsplit(",", 1)[0] + ",1000.00"]) + "\n")
    run_train(repo, data, out, "--steps", "3", "--resume")
    seconds = [float(r.split(",")[3]) for r in log.read_text().splitlines()[1:]]
    assert seconds[1] == 1000.0 and seconds[2] > 1000.0
