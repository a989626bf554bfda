"""train.py when things go wrong: signals, corrupt state, a changed dataset, two runs, a failed save."""

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import iclora.lora_files
import train
from tests import test_training
from tests.test_training import ROOT, run_train

data = test_training.data  # the fixtures: two joined two-panel sets,
repo = test_training.repo  # and the tiny random FLUX


@pytest.mark.slow
def test_sigterm_saves_the_steps_done_and_resume_matches_an_uninterrupted_run(repo, data, tmp_path):
    out = tmp_path / "term" / "lora.safetensors"
    log = out.with_name("lora.loss.csv")
    run = subprocess.Popen([sys.executable, "train.py", "--model", str(repo), "--data", str(data),
                            "--out", str(out), "--resolution", "48", "--batch-size", "2", "--rank", "4",
                            "--alpha", "4", "--lr", "3e-3", "--warmup", "1", "--caption-dropout", "0",
                            "--sample-every", "0", "--device", "cpu", "--steps", "100000",
                            "--save-every", "100000"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (log.exists() and len(log.read_text().splitlines()) > 2):  # header + step 1 + step 2
        if run.poll() is not None or time.monotonic() > deadline:
            run.kill()
            pytest.fail(f"no loss-log row for step 2 within 60 s: {run.communicate()[1][-2000:]}")
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode != 0
    assert "interrupted (SIGTERM)" in stderr and str(out) in stderr
    assert not out.with_name("lora.lock").exists()
    saved = torch.load(out.with_name("lora.state.pt"), weights_only=True)["step"]
    assert saved >= 2 and load_file(out).keys()
    total = saved + 2
    resumed = run_train(repo, data, out, "--steps", str(total), "--save-every", "100000", "--resume")
    straight = run_train(repo, data, tmp_path / "straight" / "lora.safetensors", "--steps", str(total),
                         "--save-every", "100000")
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def saved_run(repo, data, tmp_path):
    """A 2-step run in tmp_path, on a copy of the dataset the test may change."""
    copy = tmp_path / "twins"
    shutil.copytree(data, copy)
    out = tmp_path / "run" / "lora.safetensors"
    run_train(repo, copy, out, "--steps", "2", "--save-every", "2")
    return copy, out


@pytest.mark.slow
def test_resume_from_a_truncated_state_names_it_and_says_delete_it(repo, saved_run):
    copy, out = saved_run
    state = out.with_name("lora.state.pt")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(SystemExit, match=rf"{state}.*cannot be read.*expected the training state.*Delete it "
                                         r"to start over") as caught:
        run_train(repo, copy, out, "--steps", "4", "--resume")
    assert "weights_only" not in str(caught.value)


@pytest.mark.slow
def test_resume_from_a_foreign_state_names_it_and_says_delete_it(repo, saved_run):
    copy, out = saved_run
    state = out.with_name("lora.state.pt")
    torch.save({"model": torch.zeros(2)}, state)
    with pytest.raises(SystemExit,
                       match=rf"{state} is not a training state.*expected.*step, lora, optimizer, "
                                         r"args, dataset.*Delete it to start over"):
        run_train(repo, copy, out, "--steps", "4", "--resume")


@pytest.mark.slow
def test_resume_on_a_dataset_with_an_edited_caption_is_refused_naming_the_file(repo, saved_run):
    copy, out = saved_run
    (copy / "set1.txt").write_text("[TWO-PANEL] something else entirely")
    with pytest.raises(SystemExit, match=r"dataset .* changed .*\(edited: set1\.txt\)"):
        run_train(repo, copy, out, "--steps", "4", "--resume")


@pytest.mark.slow
def test_resume_on_a_dataset_with_an_added_image_is_refused_naming_it(repo, saved_run):
    copy, out = saved_run
    shutil.copy(copy / "set0.png", copy / "set2.png")
    shutil.copy(copy / "set0.txt", copy / "set2.txt")
    with pytest.raises(SystemExit, match=r"dataset .* changed .*\(added: set2\.png, set2\.txt\)"):
        run_train(repo, copy, out, "--steps", "4", "--resume")


def test_a_run_is_refused_while_a_live_process_holds_the_lock_on_its_out(repo, data, tmp_path):
    out = tmp_path / "lora.safetensors"
    lock = tmp_path / "lora.lock"
    lock.write_text(f"{socket.gethostname()} {os.getpid()}\n")  # this very process: alive
    with pytest.raises(SystemExit,
                       match=rf"another run \(pid {os.getpid()}\) is writing {out} \(lock {lock}\)"):
        run_train(repo, data, out, "--steps", "1")
    assert lock.exists() and not out.exists()


def test_a_lock_from_another_host_is_refused_saying_how_to_remove_it(repo, data, tmp_path):
    out, lock = tmp_path / "lora.safetensors", tmp_path / "lora.lock"
    lock.write_text("some-other-node 1234\n")
    with pytest.raises(SystemExit, match=rf"run on some-other-node \(pid 1234\).*delete {lock}"):
        run_train(repo, data, out, "--steps", "1")


@pytest.mark.slow
def test_a_lock_left_by_a_finished_process_is_taken_over_with_a_note_and_removed_at_the_end(repo, data,
                                                                                            tmp_path,
                                                                                             capsys):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True)
    pid = int(finished.stdout)
    out, lock = tmp_path / "lora.safetensors", tmp_path / "lora.lock"
    lock.write_text(f"{socket.gethostname()} {pid}\n")
    run_train(repo, data, out, "--steps", "1")
    assert f"taking over {lock}, left by pid {pid}" in capsys.readouterr().err
    assert out.exists() and not lock.exists()


def test_the_lock_is_held_while_the_run_works_and_removed_when_it_stops_on_an_error(repo, data, tmp_path,
                                                                                    monkeypatch):
    lock, seen = tmp_path / "lora.lock", []

    def missing_model(*args, **kwargs):
        seen.append(lock.read_text() if lock.exists() else None)
        raise ValueError("no model files")

    monkeypatch.setattr(train, "load_pipeline", missing_model)
    with pytest.raises(ValueError, match="no model files"):
        run_train(repo, data, tmp_path / "lora.safetensors", "--steps", "1")
    assert seen == [f"{socket.gethostname()} {os.getpid()}\n"] and not lock.exists()


@pytest.mark.slow
def test_a_failed_save_stops_clearly_and_leaves_the_previous_lora_and_state_byte_identical(repo, data,
                                                                                           tmp_path,
                                                                                          monkeypatch):
    out = tmp_path / "lora.safetensors"
    state = tmp_path / "lora.state.pt"
    run_train(repo, data, out, "--steps", "2", "--save-every", "2")
    before = out.read_bytes(), state.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(iclora.lora_files, "save_file", disk_full)
    with pytest.raises(SystemExit,
                       match=r"could not save step 4 .*No space left on device.*still hold the previous"):
        run_train(repo, data, out, "--steps", "4", "--save-every", "2", "--resume")
    assert (out.read_bytes(), state.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora-step000002.safetensors", "lora.loss.csv",
                                                          "lora.loss.png", "lora.safetensors",
                                                          "lora.state.pt"]  # no step 4, no temporary file


@pytest.mark.slow
def test_a_rerun_without_resume_is_refused_before_anything_loads_and_leaves_the_run_untouched(repo, data,
                                                                                              tmp_path):
    out = run_train(repo, data, tmp_path / "lora.safetensors", "--steps", "2", "--save-every", "1",
                    "--keep-last", "2")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    state = tmp_path / "lora.state.pt"
    with pytest.raises(SystemExit,
                       match=rf"{state} exists: --resume to continue it, another --out, or delete it"):
        run_train(tmp_path / "no-model-needed", data, out, "--steps", "1", "--save-every", "1",
                  "--keep-last", "2")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.slow
def test_pruning_keeps_this_runs_newest_steps_and_leaves_numbered_files_of_later_steps_alone(repo, data,
                                                                                             tmp_path):
    out = run_train(repo, data, tmp_path / "lora.safetensors", "--steps", "3", "--save-every", "3")
    out.with_name("lora.state.pt").unlink()  # a new run on the same --out, as the refusal above suggests
    run_train(repo, data, out, "--steps", "2", "--save-every", "1", "--keep-last", "2")
    assert sorted(p.name for p in tmp_path.glob("lora-step*")) == [
        "lora-step000001.safetensors", "lora-step000002.safetensors", "lora-step000003.safetensors"]


@pytest.mark.slow
def test_a_failed_first_save_says_there_is_no_earlier_save_to_resume(repo, data, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(iclora.lora_files, "save_file", disk_full)
    with pytest.raises(SystemExit,
                       match=r"could not save step 1 .*No space left.*Nothing was saved before \(no "
                                         r"state to resume\): free space and start again") as caught:
        run_train(repo, data, tmp_path / "lora.safetensors", "--steps", "1")
    assert "previous save" not in str(caught.value) and not (tmp_path / "lora.state.pt").exists()


@pytest.mark.slow
def test_resume_on_a_dataset_with_an_image_edited_to_the_same_byte_size_is_refused_naming_it(repo, data,
                                                                                             tmp_path):
    copy = shutil.copytree(data, tmp_path / "twins")
    image = Image.open(copy / "set0.png").convert("RGB")
    image.save(copy / "set0.png", compress_level=0)  # stored uncompressed: any edit of a pixel keeps the size
    out = run_train(repo, copy, tmp_path / "run" / "lora.safetensors", "--steps", "2")
    size = (copy / "set0.png").stat().st_size
    image.putpixel((0, 0), (0, 0, 0))
    image.save(copy / "set0.png", compress_level=0)
    assert (copy / "set0.png").stat().st_size == size
    with pytest.raises(SystemExit, match=r"dataset .* changed .*\(edited: set0\.png\)"):
        run_train(repo, copy, out, "--steps", "4", "--resume")


@pytest.mark.slow
def test_resume_from_the_dataset_moved_to_another_folder_continues(repo, saved_run, tmp_path):
    copy, out = saved_run
    run_train(repo, copy.rename(tmp_path / "moved"), out, "--steps", "3", "--resume")
    assert torch.load(out.with_name("lora.state.pt"), weights_only=True)["step"] == 3


@pytest.mark.slow
def test_a_state_saved_before_images_were_hashed_resumes_checking_their_sizes(repo, saved_run):
    copy, out = saved_run
    path = out.with_name("lora.state.pt")
    state = torch.load(path, weights_only=True)
    state["dataset"] = {k: v if k.endswith(".txt") else (copy / k).stat().st_size
                        for k, v in state["dataset"].items()}
    torch.save(state, path)  # as train.py saved it before: each image's size alone
    original = (copy / "set0.png").read_bytes()
    shutil.copy(copy / "set1.png", copy / "set0.png")
    assert (copy / "set0.png").stat().st_size != len(original)
    with pytest.raises(SystemExit, match=r"\(edited: set0\.png\)"):
        run_train(repo, copy, out, "--steps", "3", "--resume")
    (copy / "set0.png").write_bytes(original)
    run_train(repo, copy, out, "--steps", "3", "--resume")
    assert torch.load(path, weights_only=True)["step"] == 3
