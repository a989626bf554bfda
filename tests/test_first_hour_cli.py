"""The first hour with the scripts (issue #25): sample.py never replaces an image unless --out names it,
train.py ends with a summary that says what was done and what to run next, and each script's --help shows
the few options most people need first, each explained in one sentence."""

import argparse
import csv
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

import sample
import train
from iclora.data import Sample
from iclora.run import finished, run_files, sample_command
from minflux.png_settings import SETTINGS_KEY
from tests import test_training

data = test_training.data  # the fixture: two joined two-panel sets (64x32) with captions

TOY = ["--model", "toy", "--prompt", "a red circle", "--steps", "1", "--width", "32", "--height", "32"]


# 1. sample.py: outputs never overwrite by default.

def test_two_runs_without_out_write_outputs_00001_then_00002(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = sample.main(TOY)
    second = sample.main(TOY)
    assert (first, second) == ([Path("outputs/00001.png")], [Path("outputs/00002.png")])
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["00001.png", "00002.png"]


def test_the_next_number_is_one_past_the_highest_any_file_in_outputs_starts_with(tmp_path):
    outputs = tmp_path / "outputs"
    assert sample.numbered_output(outputs) == outputs / "00001.png"  # the folder need not exist
    outputs.mkdir()
    for name in ("00002.png", "00007-1-panel2.png", "notes.txt"):
        (outputs / name).touch()
    assert sample.numbered_output(outputs) == outputs / "00008.png"


def test_an_existing_00007_png_makes_the_next_run_write_00008_and_its_panels(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outputs" / "00007.png")
    written = sample.main([*TOY, "--panels", "2"])
    assert [p.name for p in written] == ["00008.png", "00008-panel1.png", "00008-panel2.png"]
    assert Image.open(tmp_path / "outputs" / "00007.png").size == (8, 8)  # untouched


def test_an_explicit_out_that_exists_is_replaced_and_nothing_goes_to_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "mine.png")
    assert sample.main([*TOY, "--out", "mine.png"]) == [Path("mine.png")]
    with Image.open(tmp_path / "mine.png") as image:
        assert image.size == (32, 32) and SETTINGS_KEY in image.info
    assert not (tmp_path / "outputs").exists()


def test_the_run_ends_saying_where_its_settings_are_and_how_to_run_it_again(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sample.main(TOY)
    out, err = capsys.readouterr()
    assert out.splitlines() == ["outputs/00001.png"]
    assert err.splitlines()[-1] == ('The settings of this run are stored in each PNG (its "minflux" text '
                                    'chunk); run it again with: python sample.py --from-image '
                                    'outputs/00001.png')


def test_outputs_being_a_file_is_refused_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").write_text("not a folder")
    refusal = r"outputs/00001\.png \(where images go without --out\): .*outputs is a file, not a folder"
    with pytest.raises(ValueError, match=refusal):
        sample.parse_args(["--model", "no-model-needed", "--prompt", "x"])


# 2. train.py's summary.

@pytest.mark.slow  # a training run
def test_a_toy_run_ends_with_its_steps_loss_files_and_the_sample_command_then_the_lora_path(data, tmp_path,
                                                                                          capsys):
    out = tmp_path / "run" / "lora.safetensors"
    train.main(["--model", "toy", "--data", str(data), "--out", str(out), "--resolution", "32",
                "--batch-size", "1", "--rank", "4", "--warmup", "1", "--caption-dropout", "0",
                "--sample-every", "0", "--device", "cpu", "--steps", "3", "--save-every", "2"])
    stdout, stderr = capsys.readouterr()
    assert stdout.splitlines()[-1] == str(out)
    with open(out.with_name("lora.loss.csv"), newline="") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    summary = stderr[stderr.index("finished:"):]
    assert re.match(rf"finished: 3 steps in \d+s, final loss {sum(losses) / 3:.4f} \(the mean of the last 3 "
                    rf"steps\)\n", summary)
    for name in ("lora.safetensors", "lora-step000002.safetensors ... lora-step000003.safetensors",
                 "lora.state.pt", "lora.loss.csv", "lora.loss.png"):
        assert f"{tmp_path / 'run'}/{name}" in summary
    assert "_samples" not in summary  # --sample-every 0: no such folder, not listed
    command = shlex.split(summary.splitlines()[-1])
    assert command[:7] == ["python", "sample.py", "--model", "toy", "--lora", str(out), "--width"]
    assert command[-2] == "--prompt" and command[-1] == test_training.CAPTIONS[0]


def test_the_final_loss_is_the_mean_of_the_last_100_steps(tmp_path, capsys):
    files = run_files(tmp_path / "lora.safetensors")
    args = argparse.Namespace(model="toy", transformer=None, out=files.out, ref_panel=[], layout="row")
    losses = [10.0] * 50 + [float(i) for i in range(100)]
    finished(args, files, 150, losses, Sample(files.out, [], "c", (32, 64), None), "c")
    assert "final loss 49.5000 (the mean of the last 100 steps)" in capsys.readouterr().err


def first_set(count: int | None) -> Sample:
    return Sample(Path("sets/x/0001.png"), [], "a caption", (64, 128), count)


def test_the_command_for_a_plain_lora_gives_the_first_sets_panels_layout_and_size():
    args = argparse.Namespace(model="black-forest-labs/FLUX.1-dev", transformer=None,
                              out=Path("my lora.safetensors"), ref_panel=[], layout="column")
    assert sample_command(args, first_set(2), "a caption") == (
        "python sample.py --model black-forest-labs/FLUX.1-dev --lora 'my lora.safetensors' --panels 2 "
        "--layout column --width 128 --height 64 --prompt 'a caption'")


def test_the_command_for_a_conditional_lora_asks_for_one_ref_image_per_reference_panel():
    args = argparse.Namespace(model="toy", transformer=None, out=Path("c.safetensors"), ref_panel=[1, 3],
                              layout="row")
    assert sample_command(args, first_set(4), "a caption") == (
        "python sample.py --model toy --lora c.safetensors --ref IMAGE --ref IMAGE --prompt 'a caption'")


# 3. --help that a person reads.

@pytest.mark.parametrize("script, first", [(train, ["--config", "--data", "--ref-panel", "--model", "--out",
                                                     "--steps", "--resume"]),
                                           (sample, ["--model", "--prompt", "--width", "--height", "--seed",
                                                     "--out", "--lora", "--ref"])])
def test_help_shows_the_options_most_people_need_first_then_the_other_groups(script, first):
    groups = script.build_parser()._action_groups
    assert groups[2].title == "the options most people need"  # after argparse's own two
    assert [a.option_strings[0] for a in groups[2]._group_actions] == first
    assert len(groups) >= 6 and "memory and speed" in [g.title for g in groups]
    assert "Every option in detail: docs/" in script.build_parser().format_help()


@pytest.mark.parametrize("script", [train, sample])
def test_every_help_line_is_one_short_sentence(script):
    for action in script.build_parser()._actions:
        if action.dest == "help":
            continue
        text = action.help.replace("%(default)s", str(action.default)).replace("%%", "%")
        sentence = re.sub(r" \(default: [^()]*(\([^()]*\)[^()]*)*\)$", "", text)
        assert len(text) <= 160, (action.dest, text)
        assert not re.search(r"[.!?] [A-Z]", sentence) and not sentence.endswith("."), (action.dest, text)


def test_a_claimed_number_is_never_handed_out_again_even_before_its_image_is_saved(tmp_path):
    outputs = tmp_path / "outputs"
    first = sample.claim_numbered_output(outputs)   # another run, still sampling: its file exists, empty
    second = sample.claim_numbered_output(outputs)
    assert (first.name, second.name) == ("00001.png", "00002.png")
