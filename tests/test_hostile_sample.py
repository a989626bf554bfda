"""sample.py against hostile files and careless flags (issue #24): a PNG's settings choose what is drawn,
never where or how the run goes; no input is overwritten; sizes and counts are bounded; float flags are
finite; every refusal names the flag, key or file and comes before any weight loads (`load_pipeline` is
replaced by a function that fails, to prove that none is called)."""

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

import sample
from iclora.conditional_metadata import conditional_metadata

TOY = ["--model", "toy", "--steps", "2", "--prompt", "a red circle"]


@pytest.fixture
def no_weights(monkeypatch):
    """Loading the model is an error: a refusal must come before it."""
    def load_pipeline(*args, **kwargs):
        raise RuntimeError("load_pipeline was called: the refusal came after weights began to load")
    monkeypatch.setattr(sample, "load_pipeline", load_pipeline)


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """A folder for the PNG, one elsewhere holding a secret, and the working folder (the current one)."""
    made = {name: tmp_path / name for name in ("png", "elsewhere", "work")}
    for folder in made.values():
        folder.mkdir()
    (made["elsewhere"] / "secret.txt").write_text("the user's secret\n")
    monkeypatch.chdir(made["work"])
    return made


def hashes(root: Path) -> dict[str, str]:
    """Every file under `root`, by path, with the SHA-256 of its bytes."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def crafted_png(path: Path, settings: dict) -> Path:
    """A PNG whose "minflux" text chunk holds `settings`, as anyone can write one."""
    info = PngInfo()
    info.add_text("minflux", json.dumps(settings))
    Image.new("RGB", (16, 16)).save(path, pnginfo=info)
    return path


def usage_error(capsys, argv) -> str:
    """What argparse prints when it refuses `argv` (it exits)."""
    with pytest.raises(SystemExit):
        sample.main(argv)
    return capsys.readouterr().err


# 1. A PNG's settings choose what is drawn, never where or how the run goes.

def test_a_png_that_sets_out_is_refused_and_no_file_is_written(folders, tmp_path, no_weights):
    victim = folders["elsewhere"] / "photo.jpg"
    Image.new("RGB", (16, 16), "white").save(victim)
    png = crafted_png(folders["png"] / "x.png", {"model": "toy", "prompt": ["a red circle"], "steps": 2,
                                                 "out": str(victim)})
    before = hashes(tmp_path)
    with pytest.raises(ValueError, match=r"x\.png: its settings set out, which a PNG may not choose"):
        sample.main(["--from-image", str(png)])
    assert hashes(tmp_path) == before


def test_a_png_that_names_a_prompt_file_is_refused_and_the_file_is_never_read(folders, monkeypatch,
                                                                              no_weights):
    secret = folders["elsewhere"] / "secret.txt"
    png = crafted_png(folders["png"] / "x.png", {"model": "toy", "prompt": [], "prompt_file": str(secret)})
    def read_prompt_file(path):
        pytest.fail(f"{path} was read")
    monkeypatch.setattr(sample, "read_prompt_file", read_prompt_file, raising=False)
    with pytest.raises(ValueError, match=r"x\.png: its settings set prompt_file, which a PNG may not choose"):
        sample.main(["--from-image", str(png), "--prompt", "mine", "--out", "mine.png"])


@pytest.mark.parametrize("key,value", [("device", "cpu"), ("offload", True), ("compile", True),
                                       ("blocks_to_swap", 3), ("trust_settings", True)])
def test_a_png_that_says_how_the_run_goes_is_refused_naming_the_key(folders, key, value):
    png = crafted_png(folders["png"] / "x.png", {"model": "toy", "prompt": ["p"], key: value})
    with pytest.raises(ValueError, match=rf"x\.png: its settings set {key}, which a PNG may not choose"):
        sample.parse_args(["--from-image", str(png)])


@pytest.mark.parametrize("key,value,expected", [
    ("prompt", "a fox", r"setting 'prompt' is 'a fox'; expected a list"),  # not the letters a, ' ', f, o, x
    ("seed", "7", r"setting 'seed' is '7'; expected a list"),
    ("guidance", [3.5], r"setting 'guidance' is \[3\.5\]; expected a number"),
    ("true_cfg", None, r"setting 'true_cfg' is None; expected a number"),  # --guidance's None is the default
    ("guidance", float("inf"), r"setting 'guidance' is inf: must be a finite number"),
    ("no_merge", "yes", r"setting 'no_merge' is 'yes'; expected true or false"),
    ("layout", "diagonal", r"setting 'layout' is 'diagonal'; expected one of row, column, grid"),
    ("negative_prompt", 5, r"setting 'negative_prompt' is 5; expected a string"),
])
def test_a_stored_value_of_the_wrong_type_is_an_error_naming_the_key(folders, key, value, expected):
    png = crafted_png(folders["png"] / "x.png", {"model": "toy", "prompt": ["p"], key: value})
    with pytest.raises(ValueError, match=rf"--from-image .*x\.png: {expected}"):
        sample.parse_args(["--from-image", str(png)])


def test_the_files_a_png_names_are_printed_and_those_in_its_own_folder_used_without_trust(folders, capsys):
    lora = folders["png"] / "style.safetensors"
    lora.write_bytes(b"not read by parse_args")
    png = crafted_png(folders["png"] / "x.png", {"model": "toy", "prompt": ["p"], "lora": [str(lora)]})
    args = sample.parse_args(["--from-image", str(png)])
    assert args.lora == [str(lora)]
    assert f"x.png: its settings name --model toy, --lora {lora}" in capsys.readouterr().err


def link_out_of_the_png_folder(folders) -> str:
    link = folders["png"] / "innocent.png"
    link.symlink_to(folders["elsewhere"] / "secret.txt")
    return str(link)


@pytest.mark.parametrize("key,where", [
    ("lora", "elsewhere"), ("ref", "elsewhere"), ("init", "elsewhere"), ("transformer", "elsewhere"),
    ("model", "elsewhere"), ("init", "link"),
])
def test_a_file_outside_the_pngs_folder_and_the_working_folder_is_refused_without_trust(folders, key,
                                                                                         where):
    path = str(folders["elsewhere"] / "secret.txt")
    if where == "link":
        path = link_out_of_the_png_folder(folders)
    if key == "model":
        path = str(folders["elsewhere"])
    png = crafted_png(folders["png"] / "x.png", {"model": "toy", "prompt": ["p"],
                                                 key: [path] if key in ("lora", "ref") else path})
    with pytest.raises(PermissionError, match=rf"x\.png: its settings name --{key} {path} \(outside the "
                                              rf"PNG's folder and the working folder\).* give "
                                              rf"--trust-settings to allow these, or give --{key} yourself"):
        sample.parse_args(["--from-image", str(png)])


def test_trust_settings_or_the_flag_given_again_allows_a_file_outside(folders):
    secret = str(folders["elsewhere"] / "secret.txt")
    png = crafted_png(folders["png"] / "x.png", {"model": "toy", "prompt": ["p"], "init": secret})
    assert sample.parse_args(["--from-image", str(png), "--trust-settings"]).init == Path(secret)
    assert sample.parse_args(["--from-image", str(png), "--init", secret]).init == Path(secret)


@pytest.mark.parametrize("key,value", [("model", "someone/flux-finetune"),
                                       ("lora", ["someone/loras/style.safetensors"])])
def test_a_hub_download_a_png_names_is_refused_without_trust(folders, key, value):
    png = crafted_png(folders["png"] / "x.png", {"prompt": ["p"], key: value})
    with pytest.raises(PermissionError, match=rf"--{key} someone/\S+ \(a download from the HF hub\)"):
        sample.parse_args(["--from-image", str(png)])


@pytest.mark.parametrize("model", ["black-forest-labs/FLUX.1-dev", "toy"])
def test_the_default_model_and_toy_in_a_png_are_named_and_need_no_trust(folders, capsys, model):
    png = crafted_png(folders["png"] / "x.png", {"prompt": ["p"], "model": model})
    assert sample.parse_args(["--from-image", str(png)]).model == model
    assert f"x.png: its settings name --model {model}" in capsys.readouterr().err


# 2. No input is ever overwritten.

@pytest.mark.parametrize("flags,out,victim", [
    (["--init", "x.png"], "x.png", "x.png"),
    (["--panels", "2", "--ref", "x-panel1.png"], "x.png", "x-panel1.png"),
    (["--init", "x-1.png", "--seed", "1", "2"], "x.png", "x-1.png"),
    (["--init", "x.png"], "hard.png", "x.png"),
    (["--init", "x.png"], "soft.png", "x.png"),
])
def test_an_out_that_would_overwrite_an_input_is_refused_naming_both(tmp_path, monkeypatch, no_weights,
                                                                     flags, out, victim):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64), "white").save(victim)
    os.link(victim, "hard.png")
    Path("soft.png").symlink_to(victim)
    before = hashes(tmp_path)
    with pytest.raises(ValueError, match=rf"--out {out} would overwrite the --(init|ref) file {victim}"):
        sample.main([*TOY, *flags, "--out", out])
    assert hashes(tmp_path) == before


# 5. Bounded sizes and counts.

@pytest.mark.parametrize("flag,value,limit", [("--width", "16384", r"\[16, 4096\]"),
                                              ("--panel-height", "16384", r"\[16, 4096\]"),
                                              ("--panels", "17", r"\[1, 16\]"),
                                              ("--num-images", "65", r"\[1, 64\]")])
def test_a_size_or_count_over_its_limit_is_refused_stating_the_limit(capsys, no_weights, flag, value, limit):
    err = usage_error(capsys, [*TOY, flag, value])
    assert re.search(rf"argument {flag}: must be in {limit}, got {value}", err)


def test_panels_that_join_into_a_canvas_over_the_limit_are_refused(no_weights):
    with pytest.raises(ValueError, match=r"3 panels of 2048×64 px \(W×H\) in a row make a 6144×64 canvas, "
                                         r"over the limit of 4096 px a side"):
        sample.main([*TOY, "--panels", "3", "--panel-width", "2048", "--panel-height", "64"])


def test_a_png_asking_for_a_size_over_the_limit_is_refused_naming_the_key(folders):
    png = crafted_png(folders["png"] / "x.png", {"model": "toy", "prompt": ["p"], "width": 16384})
    with pytest.raises(ValueError, match=r"x\.png: setting 'width' is 16384: must be in \[16, 4096\]"):
        sample.parse_args(["--from-image", str(png)])


@pytest.mark.parametrize("panels,height,shown", [(2, 16384, "2 panel(s) of 64x16384"),
                                                 (64, 64, "64 panel(s) of 64x64")])
def test_a_conditional_lora_asking_for_panels_over_the_limit_is_refused_naming_the_file(
        tmp_path, no_weights, panels, height, shown):
    lora = tmp_path / "huge.safetensors"
    metadata = conditional_metadata([1], panels, "row", "moved", height, 64)
    save_file({"x": torch.zeros(1)}, lora, metadata=metadata)
    Image.new("RGB", (64, 64)).save(tmp_path / "ref.png")
    with pytest.raises(ValueError, match=rf"huge\.safetensors: conditional IC-LoRA metadata asks for "
                                         rf"{re.escape(shown)} px; the limit is 1 to 16 panels of at most "
                                         rf"4096 px a side"):
        sample.main([*TOY, "--lora", str(lora), "--ref", str(tmp_path / "ref.png")])


# 7. Float flags are finite; --width 0 is an invalid size like any other.

@pytest.mark.parametrize("flags", [["--guidance", "inf"], ["--guidance", "nan"],
                                   ["--lora-scale", "nan", "--lora", "a.safetensors"],
                                   ["--true-cfg", "inf", "--negative-prompt", "blurry"]])
def test_an_infinite_or_nan_float_flag_is_refused(capsys, no_weights, flags):
    err = usage_error(capsys, [*TOY, *flags])
    assert f"argument {flags[0]}: must be a finite number, got {flags[1]}" in err


@pytest.mark.parametrize("flag,value", [("--width", "0"), ("--height", "8"), ("--panel-width", "0")])
def test_a_size_below_16_is_refused_not_replaced_by_the_default(capsys, no_weights, flag, value):
    err = usage_error(capsys, [*TOY, flag, value])
    assert f"argument {flag}: must be in [16, 4096], got {value}" in err


# 8. Errors before work: --out and --prompt-file.

def test_an_out_that_is_a_folder_is_refused(tmp_path, no_weights):
    (tmp_path / "pictures.png").mkdir()
    with pytest.raises(ValueError, match=r"--out .*pictures\.png is a folder; give a file name"):
        sample.main([*TOY, "--out", str(tmp_path / "pictures.png")])


def test_an_out_inside_a_file_is_refused_naming_the_file(tmp_path, no_weights):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    with pytest.raises(ValueError, match=r"--out .*notes\.txt/out\.png: .*notes\.txt is a file, not a "
                                         r"folder"):
        sample.main([*TOY, "--out", str(tmp_path / "notes.txt" / "out.png")])


@pytest.mark.parametrize("content,error", [
    (b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary", r"not UTF-8 text \(invalid start byte at byte 0\)"),
    (b"a prompt\x00\x01\x02", r"a binary file \(it holds NUL bytes\)"),
    (None, r"no such file"),
])
def test_a_prompt_file_that_is_not_readable_text_is_refused_naming_it(tmp_path, no_weights, content, error):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError), match=rf"--prompt-file .*prompts\.txt: {error}"):
        sample.main([*TOY, "--prompt-file", str(path)])
