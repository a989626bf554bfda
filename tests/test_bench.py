"""The benchmark scripts run and report what bench/RESULTS.md quotes (timings themselves are never asserted)."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import bench
from iclora.lora import inject_lora, lora_parameters
from minflux.model import Flux, preset

ROOT = Path(__file__).resolve().parents[1]


def lora_count(double: int, single: int, rank: int = 16) -> int:
    """LoRA parameters of a flux-dev-width model with that many blocks (built on the meta device)."""
    with torch.device("meta"):
        flux = Flux(replace(preset("flux-dev"), depth=double, depth_single_blocks=single))
    inject_lora(flux, rank=rank, alpha=float(rank))
    return sum(q.numel() for q in lora_parameters(flux))


@pytest.mark.parametrize("what", ["forward", "train"])
def test_bench_times_ours_against_diffusers(what):
    result = bench.main(["--config", "tiny", "--what", what, "--repeats", "1"])
    assert {"minflux_ms", "diffusers_ms", "ratio"} <= result.keys()
    if what == "forward":
        assert result["max_abs_diff"] < 1e-5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak memory from /proc/self/status")
def test_train_memory_adds_the_full_models_exact_sizes_to_the_measured_step():
    spec = importlib.util.spec_from_file_location("train_memory", ROOT / "bench" / "train_memory.py")
    train_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_memory)
    out = train_memory.main(["--batch-size", "2", "--width", "64", "--height", "32", "--text-tokens", "8",
                             "--double", "1", "--single", "1"])
    full, run = lora_count(19, 38), lora_count(1, 1)
    assert full == 76_578_816  # rank 16 on the 304 block linears
    assert out["tokens"] == 8 + 4 * 2
    assert out["measured_step_peak_gib"] > 0  # activations and the LoRA gradients of the 2 blocks that ran
    assert (out["full_lora_params"], out["lora_params_run"]) == (full, run)
    assert out["full_base_bf16_gib"] == 11_901_408_320 * 2 / 2**30  # the official flux-dev count, in bf16
    assert out["adapters_and_adamw_gib"] == full * 3 * 4 / 2**30  # fp32 weights + 2 moments, resident before the step
    assert out["other_blocks_lora_gradients_gib"] == (full - run) * 4 / 2**30  # fp32, only the blocks that did not run
    assert out["other_blocks_checkpoints_gib"] == 55 * 2 * 16 * 3072 * 2 / 2**30  # (B, L + N, C) bf16 per block
    parts = ("measured_step_peak_gib", "full_base_bf16_gib", "adapters_and_adamw_gib",
             "other_blocks_lora_gradients_gib", "other_blocks_checkpoints_gib")
    assert out["estimated_full_peak_gib"] == sum(out[k] for k in parts)
