"""train.py against careless flags and hostile files (issue #24): no input is overwritten or deleted, a save
killed at any instant is repaired by --resume, a failed image or curve costs no steps, non-finite floats and
bad seeds, configs and states are refused by name before anything loads, and a reused lock PID is stale."""

import errno
import hashlib
import os
import shutil
import socket
import subprocess
import time

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import iclora.checkpoint
import train
from iclora.run import command_line
from tests import test_training as base

data = base.data  # the fixture: two joined two-panel sets (64x32) with captions


def run_toy(data, out, *extra):
    """A tiny run of the toy FLUX: two sets at 32 px, batch 1, rank 4, no validation images."""
    return train.main(["--model", "toy", "--data", str(data), "--out", str(out), "--resolution", "32",
                       "--batch-size", "1", "--rank", "4", "--warmup", "1", "--caption-dropout", "0",
                       "--sample-every", "0", "--device", "cpu", *extra])


def hashes(*paths) -> dict:
    """SHA-1 of every file at or under `paths`."""
    found = {}
    for path in paths:
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            found[file] = hashlib.sha1(file.read_bytes()).hexdigest()
    return found


def state_step(out) -> int:
    return torch.load(out.with_name("lora.state.pt"), weights_only=True)["step"]


def lora_step(path) -> str:
    with safe_open(str(path), "pt") as f:
        return f.metadata()["step"]


def stop_at_model_load(monkeypatch):
    """The run stops where the weights would load: what a test checks happened before."""
    def stop(*args, **kwargs):
        raise RuntimeError("weights would load now")

    monkeypatch.setattr(train, "load_pipeline", stop)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A 2-step run saved at steps 1 and 2 (numbered copies of both), to copy: lora.safetensors and more."""
    out = tmp_path_factory.mktemp("finished") / "lora.safetensors"
    run_toy(data, out, "--steps", "2", "--save-every", "1", "--keep-last", "2")
    return out.parent


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run, for a test to resume or break: its --out."""
    return shutil.copytree(finished, tmp_path / "run") / "lora.safetensors"


# 2. No input is overwritten or deleted.

def test_init_lora_given_as_out_is_refused_naming_both_before_anything_loads(data, tmp_path, monkeypatch):
    lora = tmp_path / "mine.safetensors"
    lora.write_bytes(b"someone's only copy")
    before = hashes(lora, data)
    stop_at_model_load(monkeypatch)
    with pytest.raises(ValueError, match=rf"--out {lora} is --init-lora {lora}: the run would overwrite its "
                                         r"input; choose another --out"):
        run_toy(data, lora, "--init-lora", str(lora), "--steps", "1")
    assert hashes(lora, data) == before and os.listdir(tmp_path) == ["mine.safetensors"]


def test_a_loss_log_path_that_links_to_a_caption_in_data_is_refused_naming_both(data, tmp_path, monkeypatch):
    out = tmp_path / "lora.safetensors"
    (tmp_path / "lora.loss.csv").symlink_to(data / "set0.txt")  # opened for writing, it would truncate it
    before = hashes(data)
    stop_at_model_load(monkeypatch)
    with pytest.raises(ValueError, match=rf"--out {out} writes its loss log to {tmp_path / 'lora.loss.csv'}, "
                                         rf"which is {data / 'set0.txt'}, a file of --data"):
        run_toy(data, out, "--steps", "1")
    assert hashes(data) == before


@pytest.mark.slow
def test_keep_last_never_writes_nor_prunes_a_numbered_copy_given_as_init_lora(data, run, capsys):
    run.with_name("lora.state.pt").unlink()  # a new run on the same --out, from its step-1 copy
    given = run.with_name("lora-step000001.safetensors")
    before = hashes(given, data)
    run_toy(data, run, "--init-lora", str(given), "--steps", "2", "--save-every", "1", "--keep-last", "1")
    assert hashes(given, data) == before
    assert f"note: {given} not written: it is --init-lora {given}" in capsys.readouterr().err
    assert sorted(p.name for p in run.parent.glob("lora-step*")) == ["lora-step000001.safetensors",
                                                                    "lora-step000002.safetensors"]
    assert lora_step(run.with_name("lora-step000002.safetensors")) == "2"


# 3. Saves: the state is renamed last; --resume repairs the LoRA; stale temporary files go; images and the
# curve cost no steps.

@pytest.mark.slow
def test_a_kill_between_the_loras_rename_and_the_states_is_repaired_by_resume(data, run, monkeypatch, capsys):
    state = run.with_name("lora.state.pt")
    replace = os.replace

    def killed_before_the_state(src, dst):
        if str(dst) == str(state):
            raise SystemExit("killed")  # not an Exception: nothing in train.py handles it, as with a kill
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_state)
    with pytest.raises(SystemExit, match="killed"):
        run_toy(data, run, "--steps", "3", "--resume")
    monkeypatch.setattr(os, "replace", replace)
    assert lora_step(run) == "3" and torch.load(state, weights_only=True)["step"] == 2

    def stop(*args, **kwargs):
        raise RuntimeError("stopped after the repair")

    monkeypatch.setattr(train, "training_loss", stop)
    with pytest.raises(RuntimeError, match="stopped after the repair"):
        run_toy(data, run, "--steps", "3", "--resume")
    assert (f"note: {run} held step 3 (a run stopped while saving); rewrote it from {state} at step 2"
            in capsys.readouterr().err)
    repaired, saved = load_file(run), load_file(run.with_name("lora-step000002.safetensors"))
    assert lora_step(run) == "2" and all(torch.equal(repaired[k], saved[k]) for k in saved)


@pytest.mark.slow
def test_a_missing_lora_is_rewritten_from_the_state_on_resume(data, run, monkeypatch, capsys):
    run.unlink()

    def stop(*args, **kwargs):
        raise RuntimeError("stopped after the repair")

    monkeypatch.setattr(train, "training_loss", stop)
    with pytest.raises(RuntimeError, match="stopped after the repair"):
        run_toy(data, run, "--steps", "3", "--resume")
    assert f"note: {run} was missing" in capsys.readouterr().err
    assert lora_step(run) == "2"


@pytest.mark.slow
def test_stale_temporary_files_of_a_killed_save_are_removed_with_a_note(data, run, monkeypatch, capsys):
    samples = run.with_name("lora_samples")
    samples.mkdir()
    stale = [run.with_name(".lora.safetensors.tmp"), run.with_name("..lora-step000003.safetensors.tmp.tmp"),
             run.with_name(".lora.state.pt.tmp"), samples / ".step000004.png.tmp"]
    kept = [run.with_name(".notes.tmp"), run.with_name("lora.safetensors.tmp")]  # not ours: left alone
    for path in stale + kept:
        path.write_bytes(b"half a file")
    stop_at_model_load(monkeypatch)
    with pytest.raises(RuntimeError, match="weights would load now"):
        run_toy(data, run, "--steps", "3", "--resume")
    err = capsys.readouterr().err
    assert all(f"note: removed {p}, a temporary file left by a run stopped while saving" in err
               for p in stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


@pytest.mark.slow
def test_a_full_disk_writing_validation_images_warns_and_keeps_every_step(data, run, monkeypatch, capsys):
    save = Image.Image.save

    def disk_full_in_samples(image, fp, *args, **kwargs):
        if "lora_samples" in str(fp):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", disk_full_in_samples)
    run_toy(data, run, "--steps", "4", "--save-every", "4", "--sample-every", "3", "--sample-steps", "1",
            "--resume")
    samples = run.with_name("lora_samples")
    assert (f"warning: could not write the validation images {samples / 'step000003.png'} (No space left on "
            f"device); training goes on" in capsys.readouterr().err)
    assert state_step(run) == 4 and lora_step(run) == "4"
    assert list(samples.iterdir()) == []  # no empty image, no temporary file


@pytest.mark.slow
def test_a_full_disk_drawing_the_loss_curve_warns_and_keeps_the_save(data, run, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(iclora.checkpoint, "draw_loss", disk_full)
    run_toy(data, run, "--steps", "3", "--resume")
    assert (f"warning: could not write the loss curve {run.with_name('lora.loss.png')} (No space left on "
            f"device); training goes on" in capsys.readouterr().err)
    assert state_step(run) == 3 and lora_step(run) == "3"


# 7. Float flags are finite.

@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--grad-clip", "inf"), ("--guidance", "inf"),
                                         ("--guidance", "nan")])
def test_a_non_finite_float_flag_is_refused_at_parse_time(data, tmp_path, monkeypatch, capsys, flag, value):
    stop_at_model_load(monkeypatch)
    with pytest.raises(SystemExit):
        run_toy(data, tmp_path / "lora.safetensors", "--steps", "1", flag, value)
    assert f"argument {flag}: must be a finite number, got {value}" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_non_finite_float_in_the_config_file_is_refused_naming_it(data, tmp_path, monkeypatch, capsys):
    config = tmp_path / "run.json"
    config.write_text('{"lr": Infinity}')  # Python's json reads it
    stop_at_model_load(monkeypatch)
    with pytest.raises(SystemExit):
        run_toy(data, tmp_path / "lora.safetensors", "--steps", "1", "--config", str(config))
    assert f"{config}: 'lr': inf: must be a finite number" in capsys.readouterr().err


# 8. Errors before work.

@pytest.mark.parametrize("seed, message", [("-1", "argument --seed: must be at least 0, got -1"),
                                           (str(2**62), f"--seed {2**62}: too large")])
def test_a_seed_the_generators_cannot_take_is_refused_at_parse_time(data, tmp_path, monkeypatch, capsys, seed,
                                                                     message):
    stop_at_model_load(monkeypatch)
    with pytest.raises(SystemExit):
        run_toy(data, tmp_path / "lora.safetensors", "--steps", "1", "--seed", seed)
    assert message in capsys.readouterr().err


def test_a_config_file_that_is_not_json_is_refused_naming_it_and_where(data, tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text('{"steps": 2,\n "rank": 4,}')
    with pytest.raises(SystemExit):
        run_toy(data, tmp_path / "lora.safetensors", "--config", str(config))
    assert (f"--config {config}: not valid JSON: Expecting property name enclosed in double quotes at line 2 "
            f"column 12" in capsys.readouterr().err)


@pytest.mark.slow
@pytest.mark.parametrize("key, value, message", [
    ("step", "2", "'step' is '2', expected a step number"),
    ("lora", {"a": [1.0]}, "'lora' is a dict, expected a dict of tensors"),
    ("args", ["--rank", "4"], "'args' is a list, expected a dict of option names to str"),
    ("dataset", "twins", "'dataset' is a str, expected a dict of the dataset's files")])
def test_a_hand_edited_state_is_refused_naming_the_file_and_the_key(data, run, monkeypatch, key, value,
                                                                     message):
    path = run.with_name("lora.state.pt")
    state = torch.load(path, weights_only=True)
    torch.save(state | {key: value}, path)
    stop_at_model_load(monkeypatch)
    with pytest.raises(SystemExit, match=rf"error: --resume: {path}: {message}.*Delete it to start over"):
        run_toy(data, run, "--steps", "3", "--resume")


def test_an_out_whose_folder_cannot_be_made_is_refused_naming_out(data, tmp_path):
    (tmp_path / "runs").write_text("a file where the folder of --out would go")
    out = tmp_path / "runs" / "lora.safetensors"
    with pytest.raises(SystemExit, match=rf"error: cannot create {tmp_path / 'runs'}, the folder of --out "
                                         rf"{out}: File exists"):
        run_toy(data, out, "--steps", "1")


# 9. The lock names a PID that is a train.py run, or it is stale.

def test_a_lock_whose_pid_now_runs_another_program_is_taken_over_with_a_note(data, tmp_path, monkeypatch,
                                                                             capsys):
    other = subprocess.Popen(["sleep", "60"])  # alive, and not train.py: the lock's PID was reused
    started = time.monotonic()
    while command_line(other.pid) != ["sleep", "60"] and time.monotonic() - started < 10:
        time.sleep(0.01)  # until the child has exec'd sleep (before that it shows pytest's command line)
    try:
        lock = tmp_path / "lora.lock"
        lock.write_text(f"{socket.gethostname()} {other.pid}\n")
        stop_at_model_load(monkeypatch)
        with pytest.raises(RuntimeError, match="weights would load now"):
            run_toy(data, tmp_path / "lora.safetensors", "--steps", "1")
    finally:
        other.kill()
        other.wait()
    assert (f"note: taking over {lock}, left by pid {other.pid}: that PID now runs another program ('sleep "
            f"60'), not train.py" in capsys.readouterr().err)
    assert not lock.exists()
