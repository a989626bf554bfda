"""sample.py's settings in every PNG it writes (the "minflux" text chunk) and `--from-image`, which runs them
again: written equals read back, the run is drawn again bit for bit, flags given win, and a foreign PNG is
refused."""

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import sample
from minflux import png_settings
from tests import test_generation
from tests.test_generation import PROMPT, reference_image, write_iclora_file

repo = test_generation.repo  # a fixture of test_generation.py (the tiny model repo), used here too

NEGATIVE = "a green triangle, blurry"


@pytest.fixture(scope="module")
def inputs(repo, tmp_path_factory):
    """A LoRA, a reference picture and an init picture for a run that uses every setting."""
    folder = tmp_path_factory.mktemp("inputs")
    reference_image(1).save(folder / "ref.png")
    reference_image(2).resize((64, 32)).save(folder / "init.png")
    return {"lora": write_iclora_file(folder / "lora.safetensors", repo, seed=0), "ref": folder / "ref.png",
            "init": folder / "init.png"}


def every_setting(repo, inputs) -> list[str]:
    return ["--model", str(repo), "--prompt", "a pair", "--panels", "2", "--layout", "row",
            "--panel-width", "32", "--panel-height", "32", "--panel-prompt", "a photo",
            "--panel-prompt", "a drawing", "--seed", "3", "4", "--steps", "3", "--guidance", "2.5",
            "--lora", str(inputs["lora"]), "--lora-scale", "0.7", "--no-merge", "--quantize", "fp8",
            "--dtype", "fp32", "--ref", str(inputs["ref"]), "--ref-panel", "2", "--ref-strength", "0.9",
            "--ref-stop", "0.34", "--init", str(inputs["init"]), "--strength", "0.8",
            "--negative-prompt", NEGATIVE, "--true-cfg", "2.5", "--device", "cpu"]


@pytest.fixture(scope="module")
def first_run(repo, inputs, tmp_path_factory):
    """Two seeds of a two-panel set with every setting: 2 × (joined image + 2 panels) files."""
    return sample.main([*every_setting(repo, inputs),
                        "--out", str(tmp_path_factory.mktemp("first") / "out.png")])


def stored(path) -> dict:
    return json.loads(Image.open(path).info[png_settings.SETTINGS_KEY])


def pixels(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p), dtype=np.int16) for p in paths]


def test_every_file_of_a_run_carries_all_its_settings(repo, inputs, first_run):
    assert len(first_run) == 6
    want = {"model": str(repo), "prompt": ["a pair"], "panel_prompt": ["a photo", "a drawing"],
            "seed": [3, 4], "num_images": 1, "height": 32, "width": 64, "panels": 2, "layout": "row",
            "panel_width": 32, "panel_height": 32, "steps": 3, "guidance": 2.5, "negative_prompt": NEGATIVE,
            "true_cfg": 2.5, "lora": [str(inputs["lora"])], "lora_scale": [0.7], "no_merge": True,
            "quantize": "fp8", "fp8_compute": "auto", "dtype": "fp32", "transformer": None,
            "ref": [str(inputs["ref"])], "ref_panel": [2], "ref_strength": 0.9, "ref_stop": 0.34,
            "init": str(inputs["init"]), "strength": 0.8, "variant": None, "image": None, "mask": None,
            "context_size": None}
    for path in first_run:
        assert stored(path) == want, path.name


def test_the_settings_read_back_are_the_ones_written(first_run, tmp_path):
    args = sample.parse_args(["--trust-settings", "--from-image", str(first_run[4]),
                              "--out", str(tmp_path / "again.png")])
    assert png_settings.read_settings(first_run[4]) == stored(first_run[4])
    assert json.loads(json.dumps(args.settings, default=str)) == stored(first_run[4])
    assert args.ref == [Path(stored(first_run[4])["ref"][0])] and args.seed == [3, 4]  # typed as the flags


def test_from_image_draws_every_file_of_the_run_again_bit_for_bit(first_run, tmp_path):
    again = sample.main(["--trust-settings", "--from-image", str(first_run[3]),
                         "--out", str(tmp_path / "out.png")])
    assert [p.name for p in again] == [p.name for p in first_run]
    for a, b in zip(pixels(first_run), pixels(again), strict=True):
        assert np.array_equal(a, b)
    assert [stored(p) for p in again] == [stored(p) for p in first_run]


def test_local_files_given_relative_are_stored_absolute_so_from_image_runs_from_any_directory(
        repo, inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(inputs["lora"].parent)
    first = sample.main(["--model", str(repo), "--prompt", PROMPT, "--width", "32", "--height", "32",
                         "--steps", "2", "--lora", "lora.safetensors", "--device", "cpu",
                         "--out", str(tmp_path / "first.png")])
    assert stored(first[0])["lora"] == [str(inputs["lora"].resolve())]
    monkeypatch.chdir(tmp_path)
    again = sample.main(["--trust-settings", "--from-image", "first.png", "--out", "again.png"])
    assert np.array_equal(*pixels([first[0], again[0]]))


def test_a_hub_id_and_the_toy_model_are_stored_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy").mkdir()  # a folder of that name does not make `toy` a path
    assert png_settings.located("toy") == "toy"
    assert png_settings.located(["ali-vilab/In-Context-LoRA/film-storyboard.safetensors", None]) == [
        "ali-vilab/In-Context-LoRA/film-storyboard.safetensors", None]


@pytest.mark.slow
def test_a_flag_given_with_from_image_replaces_the_stored_one(repo, tmp_path):
    common = ["--model", str(repo), "--prompt", PROMPT, "--width", "48", "--height", "32", "--steps", "3",
              "--device", "cpu"]
    [first] = sample.main([*common, "--seed", "1", "--out", str(tmp_path / "first.png")])
    [changed] = sample.main(["--trust-settings", "--from-image", str(first), "--seed", "5",
                             "--out", str(tmp_path / "changed.png")])
    [direct] = sample.main([*common, "--seed", "5", "--out", str(tmp_path / "direct.png")])
    got, want, before = pixels([changed, direct, first])
    assert np.array_equal(got, want)
    assert np.abs(got - before).mean() > 2, "another seed must draw another image"
    assert stored(changed) == stored(first) | {"seed": [5]}


@pytest.mark.slow
def test_a_run_at_the_model_default_size_stores_that_size_and_a_new_width_replaces_it(tmp_path):
    [first] = sample.main(["--model", "toy",
                           "--prompt", "a large red circle at the center, on a blue background",
                           "--steps", "2", "--out", str(tmp_path / "toy.png"), "--device", "cpu"])
    assert (stored(first)["width"], stored(first)["height"], stored(first)["panel_width"]) == (64, 64, None)
    [again] = sample.main(["--from-image", str(first), "--out", str(tmp_path / "again.png")])
    assert np.array_equal(*pixels([first, again]))
    [wider] = sample.main(["--from-image", str(first), "--width", "96", "--out", str(tmp_path / "wider.png")])
    assert Image.open(wider).size == (96, 64)


@pytest.mark.slow
def test_a_new_width_and_height_replace_a_stored_panel_size(tmp_path):
    [first, *_] = sample.main(["--model", "toy", "--panels", "2", "--panel-width", "64",
                               "--panel-height", "64", "--prompt", "two scenes", "--steps", "2",
                               "--out", str(tmp_path / "two.png"), "--device", "cpu"])
    [wider, *_] = sample.main(["--from-image", str(first), "--width", "256", "--height", "128", "--out",
                               str(tmp_path / "wider.png")])
    assert Image.open(wider).size == (256, 128)


@pytest.mark.parametrize("flags,want", [
    (["--lora", "other.safetensors"], {"lora": ["other.safetensors"], "lora_scale": [1.0]}),
    (["--lora-scale", "0.2"], {"lora_scale": [0.2]}),
    (["--ref", "other.png"], {"ref": ["other.png"], "ref_panel": []}),
    (["--prompt", "new"], {"prompt": ["new"], "panel_prompt": ["a photo", "a drawing"]}),
    (["--prompt-file", "PROMPTS"], {"prompt": ["first", "second"]}),
    (["--true-cfg", "1"], {"true_cfg": 1.0, "negative_prompt": NEGATIVE}),
])
def test_flags_given_replace_stored_ones_and_a_lora_ref_or_prompt_file_drops_what_belonged_to_the_old(
        first_run, tmp_path, flags, want):
    (tmp_path / "prompts.txt").write_text("first\n\nsecond\n")
    flags = [str(tmp_path / "prompts.txt") if f == "PROMPTS" else f for f in flags]
    with pytest.warns(UserWarning) if "--true-cfg" in flags else nullcontext():
        args = sample.parse_args(["--trust-settings", "--from-image", str(first_run[0]), *flags])
    for key, value in want.items():
        assert getattr(args, key) == ([Path(v) for v in value] if key == "ref" else value), key


def not_our_png(folder):
    Image.new("RGB", (16, 16)).save(folder / "plain.png")
    return folder / "plain.png", r"plain\.png: holds no sample\.py settings \(no 'minflux' PNG text chunk"


def garbage(folder):
    (folder / "garbage.png").write_bytes(b"not an image at all")
    return folder / "garbage.png", r"garbage\.png: cannot be read as an image"


def broken_json(folder):
    info = PngInfo()
    info.add_text("minflux", '{"seed": [1')
    Image.new("RGB", (16, 16)).save(folder / "broken.png", pnginfo=info)
    return folder / "broken.png", r"broken\.png: its 'minflux' text chunk is not valid JSON"


def unknown_setting(folder):
    info = PngInfo()
    info.add_text("minflux", '{"seed": [1], "sampler": "dpm"}')
    Image.new("RGB", (16, 16)).save(folder / "unknown.png", pnginfo=info)
    return folder / "unknown.png", r"unknown\.png: unknown settings sampler"


def missing(folder):
    return folder / "missing.png", r"--from-image .*missing\.png: no such file"


@pytest.mark.parametrize("make", [not_our_png, garbage, broken_json, unknown_setting, missing])
def test_a_png_without_our_settings_is_a_clear_error_naming_it_before_any_weight_loads(tmp_path, make):
    path, error = make(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        sample.main(["--from-image", str(path), "--model", str(tmp_path / "no-model-needed")])


def test_from_image_refuses_to_overwrite_the_image_it_reads(first_run):
    with pytest.raises(ValueError,
                       match=r"--out .*out\.png would overwrite the --from-image file .*out-1\.png"):
        sample.main(["--trust-settings", "--from-image", str(first_run[3]),
                     "--out", str(first_run[0].with_name("out.png")), "--model", "no-model-needed"])


@pytest.mark.parametrize("out", ["out", "out.foo"])
def test_an_out_file_without_an_image_extension_is_refused_before_any_weight_loads(out, capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["--model", "no-model-needed", "--prompt", "p", "--out", out])
    assert f"--out {out}: give a file name with an image extension" in capsys.readouterr().err


def test_a_jpg_out_is_allowed_with_a_warning_that_it_keeps_no_settings(recwarn):
    sample.parse_args(["--model", "no-model-needed", "--prompt", "p", "--out", "out.jpg"])
    assert any("stored only in .png files" in str(w.message) for w in recwarn)
