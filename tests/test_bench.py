"""The benchmark scripts run and report what bench/RESULTS.md quotes (timings themselves are never asserted)."""

import importlib.util
import sys
from pathlib import Path

import pytest

import bench

ROOT = Path(__file__).resolve().parents[1]


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
    out = train_memory.main(["--batch", "2", "--width", "64", "--height", "32", "--text-tokens", "8",
                             "--double", "1", "--single", "1"])
    assert out["tokens"] == 8 + 4 * 2
    assert out["measured_step_peak_gib"] > 0
    assert out["full_lora_params"] == 76_578_816  # rank 16 on the 304 block linears
    assert out["full_base_bf16_gib"] == 11_901_408_320 * 2 / 2**30  # the official flux-dev count, in bf16
    assert out["other_blocks_checkpoints_gib"] == 55 * 2 * 16 * 3072 * 2 / 2**30  # (B, L + N, C) bf16 per block
    assert out["full_adapters_and_adamw_gib"] == 76_578_816 * 16 / 2**30
    parts = ("measured_step_peak_gib", "full_base_bf16_gib", "full_adapters_and_adamw_gib",
             "other_blocks_checkpoints_gib")
    assert out["estimated_full_peak_gib"] == sum(out[k] for k in parts)
