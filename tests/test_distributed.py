"""train.py under `torchrun` on 2 CPU processes (gloo) against one process: data parallel (DDP-style
all-reduce of the adapters' gradients) and --fsdp (FSDP2) give the LoRA one process gives, and --resume stays
bit-exact.

The sets: five 2:1 images and one 1:2 image, so that with --batch-size 4 an epoch's micro-batches hold 4, 1
and 1 examples: a micro-batch of 1 leaves one rank nothing to compute. Caption dropout is on, so that the
draws of every rank must follow one process's.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train
from iclora.lora import inject_lora
from iclora.training import References, training_loss
from minflux.pipeline import load_pipeline
from tests import test_training

ROOT = test_training.ROOT
repo = test_training.repo  # the tiny random FLUX, a fixture
TOL = 1e-5
SETTINGS = ["--resolution", "48", "--batch-size", "4", "--rank", "4", "--alpha", "4", "--lr", "3e-3",
            "--warmup", "1", "--caption-dropout", "0.3", "--sample-every", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sets") / "shapes"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        size = (32, 64, 3) if i < 5 else (64, 32, 3)
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(folder / f"set{i}.png")
        (folder / f"set{i}.txt").write_text(f"[TWO-PANEL] pattern {i}, [LEFT] noise, [RIGHT] the same noise")
    return folder


def one_process(repo, data, out: Path, *extra) -> Path:
    return train.main(["--model", str(repo), "--data", str(data), "--out", str(out), *SETTINGS, *extra])


# the two-process runs: name -> the extra flags of each run to its out (a resume: two runs, one out)
RUNS = {"ddp": [("--steps", "4")],
        "grad_accum": [("--steps", "3", "--batch-size", "2", "--grad-accum", "2")],
        "ref_panel": [("--steps", "4", "--panels", "2", "--ref-panel", "1")],
        "resumed": [("--steps", "2", "--save-every", "2"), ("--steps", "4", "--save-every", "2", "--resume")],
        "block_swap": [("--steps", "4", "--checkpointing", "--blocks-to-swap", "2")],
        "fsdp": [("--steps", "4", "--checkpointing", "--fsdp")],
        "fsdp_fp8": [("--steps", "4", "--checkpointing", "--fsdp", "--quantize", "fp8")]}


@pytest.fixture(scope="module")
def two(repo, data, tmp_path_factory) -> dict[str, Path]:
    """name -> the LoRA of each of RUNS, trained by 2 processes under torchrun (gloo), in one launch: a launch
    costs seconds of process starts and imports."""
    root = tmp_path_factory.mktemp("two")
    outs = {name: root / name / "lora.safetensors" for name in RUNS}
    argvs = [["--model", str(repo), "--data", str(data), "--out", str(outs[name]), *SETTINGS, *extra]
             for name, runs in RUNS.items() for extra in runs]
    (root / "runs.json").write_text(json.dumps(argvs))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          "2", "tests/torchrun_train.py", str(root / "runs.json")],
                         cwd=ROOT, capture_output=True, text=True,
                         env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    (root / "stderr.txt").write_text(run.stderr)  # read by the tests too
    errors = "\n".join(line for line in run.stderr.splitlines() if "Error" in line)
    assert run.returncode == 0, f"{root / 'stderr.txt'}: {errors}"
    return outs


def adapters(out: Path) -> dict[str, torch.Tensor]:
    """The trained adapters in float32, from the training state (the LoRA file holds their EMA, in fp16)."""
    return torch.load(out.with_name(f"{out.stem}.state.pt"), weights_only=True)["lora"]


def max_difference(a: Path, b: Path) -> float:
    a, b = adapters(a), adapters(b)
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def losses(out: Path) -> list[float]:
    rows = out.with_name(f"{out.stem}.loss.csv").read_text().splitlines()[1:]
    return [float(r.split(",")[1]) for r in rows]


def test_the_parts_losses_and_gradients_add_up_to_the_whole_batchs_with_and_without_a_target_mask():
    flow = load_pipeline("toy").flow
    inject_lora(flow, rank=4, seed=1)
    adapters = [p for p in flow.parameters() if p.requires_grad]
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    x0, txt, vec = (torch.randn(shape, generator=gen()) for shape in ((3, 16, 8, 16), (3, 7, 64), (3, 64)))
    target, known = torch.arange(32) % 3 == 0, torch.randn(3, 32, 64, generator=gen())  # target: in the loss
    for refs in (None, References(known, ~target, "clean")):
        whole = training_loss(flow, x0, txt, vec, gen(), 1.0, "shift", refs)
        grads = torch.autograd.grad(whole, adapters)
        parts = [training_loss(flow, x0, txt, vec, gen(), 1.0, "shift", refs, rows)
                 for rows in (slice(0, 0), slice(0, 1), slice(1, 3))]
        summed = [sum(g) for g in zip(*(torch.autograd.grad(p, adapters, allow_unused=True,
                                                            materialize_grads=True)
                                        for p in parts), strict=True)]
        loss_diff = (sum(parts) - whole).abs().item()
        grad_diff = max((a - b).abs().max().item() for a, b in zip(summed, grads, strict=True))
        print(f"mask {refs is not None}: loss diff {loss_diff:.2e}, gradient diff {grad_diff:.2e}")
        assert loss_diff <= TOL and grad_diff <= TOL


@pytest.fixture(scope="module")
def single(repo, data, tmp_path_factory):
    return one_process(repo, data, tmp_path_factory.mktemp("single") / "lora.safetensors", "--steps", "4")


@pytest.mark.slow
def test_two_processes_train_the_lora_of_one_process_at_the_same_global_batch(single, two):
    diff = max_difference(single, two["ddp"])
    loss_diff = max(abs(a - b) for a, b in zip(losses(single), losses(two["ddp"]), strict=True))
    print(f"DDP 2 processes vs 1, 4 steps at batch 4: adapters max abs diff {diff:.2e}, logged loss "
          f"{loss_diff:.2e}")
    assert diff <= TOL and loss_diff <= TOL and len(losses(two["ddp"])) == 4


@pytest.mark.slow
def test_two_processes_with_grad_accum_train_the_lora_of_one_process(repo, data, two, tmp_path):
    one = one_process(repo, data, tmp_path / "lora.safetensors", *RUNS["grad_accum"][0])
    diff = max_difference(one, two["grad_accum"])
    print(f"DDP 2 processes vs 1, 3 steps of 2 x 2: adapters max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.slow
def test_two_processes_train_the_lora_of_one_process_with_the_loss_on_the_target_panel_only(repo, data, two,
                                                                                            tmp_path):
    one = one_process(repo, data, tmp_path / "lora.safetensors", *RUNS["ref_panel"][0])
    diff = max_difference(one, two["ref_panel"])
    print(f"DDP 2 processes vs 1, --ref-panel 1 (masked loss): adapters max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.slow
def test_a_resume_at_two_processes_continues_bit_for_bit(two):
    straight, resumed = two["ddp"], two["resumed"]
    for a, b in ((load_file(straight), load_file(resumed)), (adapters(straight), adapters(resumed))):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_block_swap_composes_with_data_parallel(single, two):
    diff = max_difference(single, two["block_swap"])
    print(f"DDP 2 processes with --blocks-to-swap 2 vs 1 process: adapters max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp", "fsdp_fp8"])
def test_fsdp_shards_give_the_losses_and_the_lora_of_one_process(repo, data, two, tmp_path, name):
    one = one_process(repo, data, tmp_path / "lora.safetensors", *[f for f in RUNS[name][0] if f != "--fsdp"])
    diff = max_difference(one, two[name])
    loss_diff = max(abs(a - b) for a, b in zip(losses(one), losses(two[name]), strict=True))
    print(f"{name} 2 processes vs 1: adapters max abs diff {diff:.2e}, logged losses {loss_diff:.2e}")
    assert diff <= TOL and loss_diff <= TOL


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_rank_0_saves_it(repo, data, tmp_path):
    out = tmp_path / "lora.safetensors"
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                            "2", "train.py", "--model", str(repo), "--data", str(data), "--out", str(out),
                            *SETTINGS, "--steps", "100000", "--save-every", "100000"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=os.environ | {"OMP_NUM_THREADS": "1"})
    log, deadline = out.with_name("lora.loss.csv"), time.monotonic() + 60
    while not (log.exists() and len(log.read_text().splitlines()) > 2):  # header + steps 1 and 2
        if run.poll() is not None or time.monotonic() > deadline:
            run.kill()
            pytest.fail(f"no loss-log row for step 2 within 60 s: {run.communicate()[1][-2000:]}")
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=60)  # torchrun passes the signal on to both ranks
    # no traceback
    assert run.returncode != 0 and stderr.count("interrupted (SIGTERM)") == 2 and "[rank" not in stderr
    saved = torch.load(out.with_name("lora.state.pt"), weights_only=True)["step"]
    assert saved >= 2 and len(losses(out)) == saved and load_file(out).keys()
    assert not out.with_name("lora.lock").exists()


@pytest.mark.slow
def test_fsdp_gives_each_rank_half_of_the_frozen_weights(two):
    held = re.findall(r"--fsdp: rank (\d) holds ([\d,]+) of the base's ([\d,]+) weights",
                      two["ddp"].parents[1].joinpath("stderr.txt").read_text())
    assert len(held) == 4  # two ranks, two runs
    for (_, a, total), (_, b, _) in zip(held[::2], held[1::2], strict=True):
        a, b, total = (int(x.replace(",", "")) for x in (a, b, total))
        print(f"rank 0 holds {a:,}, rank 1 {b:,} of {total:,} frozen weights")
        assert a + b == total and max(a, b) < 0.55 * total


def test_fsdp_without_torchrun_is_refused_saying_how_to_start_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        train.parse_args(["--data", str(tmp_path), "--fsdp"])
    assert "torchrun --nproc_per_node N" in capsys.readouterr().err


def test_fsdp_with_block_swap_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        train.parse_args(["--data", str(tmp_path), "--fsdp", "--checkpointing", "--blocks-to-swap", "2"])
    assert "--fsdp and --blocks-to-swap do not compose" in capsys.readouterr().err
