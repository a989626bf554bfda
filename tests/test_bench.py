"""The benchmark scripts run and report what bench/RESULTS.md quotes; the timings themselves are
never asserted."""

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
from iclora.lora import inject_lora, lora_parameters
from minflux.model import Flux, preset
from minflux.quantize import quantize_fp8
from minflux.sampling import image_ids, text_ids
from minflux.t5 import T5Config, T5Encoder

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


def load_bench(name: str):
    """bench/<name>.py as a module (the bench scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads peak memory from /proc/self/status")


@pytest.mark.slow
@linux_only
def test_train_memory_adds_the_full_models_exact_sizes_to_the_measured_step():
    out = load_bench("train_memory").main(["--batch-size", "2", "--grad-accum", "2", "--width", "64",
                                           "--height", "32", "--text-tokens", "8", "--double", "1",
                                           "--single", "1"])
    full, run = lora_count(19, 38), lora_count(1, 1)
    assert full == 76_578_816  # rank 16 on the 304 block linears
    assert out["tokens"] == 8 + 4 * 2
    assert out["measured_step_peak_gib"] > 0  # activations and the LoRA gradients of the 2 blocks that ran
    assert (out["full_lora_params"], out["lora_params_run"]) == (full, run)
    # flux-dev's count, bf16
    assert out["base_weights_gib"] == out["flow_on_gpu_gib"] == 11_901_408_320 * 2 / 2**30
    # fp32 weights + 2 moments, resident before the step
    assert out["adapters_and_adamw_gib"] == full * 3 * 4 / 2**30
    # fp32, only the blocks that did not run
    assert out["other_blocks_lora_gradients_gib"] == (full - run) * 4 / 2**30
    # (micro-batch, L + N, C) bf16
    assert out["other_blocks_checkpoints_gib"] == 55 * 2 * 16 * 3072 * 2 / 2**30
    parts = ("measured_step_peak_gib", "flow_on_gpu_gib", "adapters_and_adamw_gib",
             "other_blocks_lora_gradients_gib", "other_blocks_checkpoints_gib")
    assert out["estimated_full_peak_gib"] == sum(out[k] for k in parts)


def test_train_memory_counts_fp8_weights_as_the_quantized_model_stores_them():
    train_memory = load_bench("train_memory")
    model = Flux(preset("tiny")).to(torch.bfloat16)
    expected = train_memory.stored_bytes(model, "fp8")
    quantize_fp8(model)
    assert expected == sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def test_train_memory_keeps_two_swapped_blocks_on_the_gpu_and_the_rest_in_host_ram():
    train_memory = load_bench("train_memory")
    with torch.device("meta"):
        full = Flux(preset("flux-dev"))
    single = sum(p.numel() for p in full.single_blocks[0].parameters()) * 2  # bf16 bytes
    base, swap = train_memory.stored_bytes(full, None), train_memory.flow_on_gpu(full, None, 3)
    assert swap["host_swap_gib"] == 3 * single / 2**30
    assert swap["swap_buffers_gib"] == 2 * single / 2**30
    assert swap["flow_on_gpu_gib"] == (base - single) / 2**30
    # the block's fp8 weights leave; its float32 row scales stay
    fp8 = train_memory.flow_on_gpu(full, "fp8", 1)
    assert fp8["host_swap_gib"] == fp8["swap_buffers_gib"] == sum(
        m.weight.numel() + (0 if m.bias is None else 2 * m.bias.numel())
        for m in full.single_blocks[-1].modules()
        if isinstance(m, torch.nn.Linear)) / 2**30 + 2 * 2 * 128 / 2**30  # + the two RMSNorm scales, bf16


@pytest.mark.slow
@linux_only
def test_sample_memory_is_the_largest_of_its_three_phases():
    out = load_bench("train_memory").main(["--what", "sample", "--width", "32", "--height", "32",
                                           "--text-tokens", "8", "--single", "0"])
    phases = ("encode_phase_gib", "denoise_phase_gib", "decode_phase_gib")
    assert out["estimated_full_peak_gib"] == max(out[k] for k in phases)
    assert out["denoise_phase_gib"] == out["flow_on_gpu_gib"] + out["measured_forward_peak_gib"]


def test_sample_memory_counts_t5_linears_in_fp8_and_the_rest_in_bf16():
    with torch.device("meta"):
        t5 = T5Encoder(T5Config())
    linears = 24 * (4 * 4096 * 4096 + 3 * 4096 * 10240)  # q, k, v, o and wi_0, wi_1, wo per layer
    rows = 24 * (4 * 4096 + 2 * 10240 + 4096)  # one float32 scale per output row
    other = 32128 * 4096 + 32 * 64 + 24 * 2 * 4096 + 4096  # embedding, relative position bias, layer norms
    assert load_bench("train_memory").stored_bytes(t5, "fp8") == linears + 4 * rows + 2 * other
    assert load_bench("train_memory").stored_bytes(t5, None) == 2 * (linears + other)


def test_gpu_bench_counts_the_forward_flops_that_torch_counts():
    """bench/gpu.py's formula against torch's FLOP counter on a flux-dev-width model (meta tensors: shapes
    only); it leaves out the modulations and embedders, under 0.1% at 1024²."""
    p = replace(preset("flux-dev"), depth=1, depth_single_blocks=2)
    B, (H, W), Lt = 2, (1024, 1024), 512
    with torch.device("meta"):
        flux = Flux(p)
        x = (torch.randn(B, 4096, 64), image_ids(B, H, W).to("meta"), torch.randn(B, Lt, 4096),
             text_ids(B, Lt).to("meta"), torch.rand(B), torch.randn(B, 768), torch.full((B,), 3.5))
    with FlopCounterMode(display=False) as counter:
        flux(*x)
    counted, ours = counter.get_total_flops(), load_bench("gpu").forward_flops(p, B, 4096, Lt)
    assert counted * (1 - 1e-3) < ours <= counted
    assert (load_bench("gpu").forward_flops(preset("flux-dev"), 1, 4096, 512) / 1e12
            == pytest.approx(74.4, abs=0.05))


@pytest.mark.slow
def test_gpu_bench_runs_every_section_on_the_cpu_and_writes_every_field(tmp_path):
    gpu, out = load_bench("gpu"), tmp_path / "gpu.json"
    result = gpu.main(["--config", "tiny", "--device", "cpu", "--sizes", "32x32", "64x32",
                       "--train-size", "32x64", "--text-tokens", "8", "--repeats", "1", "--steps", "2",
                       "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert {"device_name", "torch", "diffusers", "peak_bf16_tflops", "command", "flops_counted",
            "seconds"} <= set(result["meta"])
    assert result["meta"]["diffusers"] is not None and result["meta"]["peak_bf16_tflops"] is None  # a CPU
    rows = result["rows"]
    assert all(tuple(r) == gpu.ROW_FIELDS for r in rows)
    assert [(r["section"], r["variant"], r["size"]) for r in rows] == [
        *[("sample", f"{impl} {kind}", size) for size in ("32x32", "64x32") for impl in ("ours", "diffusers")
          for kind in ("eager", "compiled")],
        ("fp8 sample", "ours eager", "32x32"), ("fp8 sample", "ours compiled", "32x32"),
        ("fp8-compute sample", "ours eager", "32x32"), ("fp8-compute sample", "ours compiled", "32x32"),
        *[("image", f"{impl} {kind}, 2 steps", "32x32") for impl in ("ours", "diffusers")
          for kind in ("eager", "compiled")],
        ("compile-train", "compiled vs eager", "32x64"),
        ("train", "eager", "32x64"), ("train", "eager, blocks-to-swap 4", "32x64"),
        ("train", "compiled", "32x64"),
        ("fp8 train", "eager", "32x64"), ("fp8 train", "eager, blocks-to-swap 4", "32x64"),
        ("fp8 train", "compiled", "32x64"),
        ("fp8-compute train", "eager", "32x64"), ("fp8-compute train", "compiled", "32x64"),
        ("overheads", "attention flash, eager", "32x32"), ("overheads", "vae decode, eager", "32x32"),
        ("overheads", "vae decode, channels_last", "32x32"),
        ("overheads", "attention cudnn, eager", "32x32"),
        ("overheads", "attention efficient, eager", "32x32")]
    for r in rows:
        if r["section"] == "compile-train" or "attention cudnn" in r["variant"] or (
                "attention efficient" in r["variant"]):
            assert r["skipped"]  # compiled; no such SDPA kernel on the CPU
            continue
        if r["section"] in ("image", "overheads") and "compiled" not in r["variant"]:
            assert r["skipped"] is None and r["s_per_step"] > 0  # no FLOPs counted for these
            continue
        if "compiled" in r["variant"]:  # GPU only
            assert r["skipped"] and r["s_per_step"] is None and r["tflops"] is None
        else:
            assert r["skipped"] is None and r["s_per_step"] > 0 and r["tflops"] > 0 and r["peak_gib"] is None
    table = out.with_suffix(".md").read_text().splitlines()
    # the header, then a row each
    assert len([line for line in table if line.startswith("| ")]) == 1 + len(rows)


@pytest.mark.slow
def test_gpu_bench_compile_train_gives_eager_adapters_and_gradients_on_the_cpu(tmp_path):
    """--only compile-train: 3 LoRA steps eager, then compiled, from the same adapters and batches (tiny
    model, float32 on the CPU, where the compiled code must equal eager within float32 rounding)."""
    result = load_bench("gpu").main(["--only", "compile-train", "--config", "tiny", "--device", "cpu",
                                     "--train-size", "32x64", "--text-tokens", "8", "--batch-size", "1",
                                     "--out", str(tmp_path / "gpu.json")])
    check = result["checks"]["compile-train"]
    assert check["finite"] and check["steps"] == 3
    assert check["grads_relative_diff"] < 1e-5 and check["update_relative_diff"] < 1e-4


def test_tame_init_keeps_a_57_block_bf16_loss_finite():
    """compile_repro.tame_: FLUX.1-dev's depth (19 + 38 blocks) at the tiny width, bf16."""
    repro = load_bench("compile_repro")
    flow = repro.tamed_flow("tiny", (19, 38), torch.device("cpu"), torch.bfloat16, rank=4)
    data = repro.batch(flow, (32, 64), 1, 8, "cpu")
    loss, grads = repro.loss_and_gradients(flow, data, 0)
    assert torch.isfinite(torch.tensor(loss)) and torch.isfinite(grads).all()


@pytest.mark.slow
def test_compile_repro_prints_one_ok_line_per_variant_each_run_in_a_subprocess(capsys):
    lines = load_bench("compile_repro").main(["--config", "tiny", "--device", "cpu", "--size", "32x64",
                                              "--text-tokens", "8", "--batch-size", "1", "--variants",
                                              "smallest"])
    assert list(lines) == ["smallest"] and lines["smallest"].startswith("ok:")
    assert capsys.readouterr().out.startswith("smallest: ok:")


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989),
                                          ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA H100 PCIe", None),
                                          ("NVIDIA GeForce RTX 4090", None)])
def test_gpu_bench_knows_the_dense_bf16_peak_of_the_h100_sxm_h200_and_a100_only(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert load_bench("gpu").peak_tflops(torch.device("cuda")) == tflops


@pytest.mark.slow
def test_blocks_bench_finds_only_bfls_float32_upcasts_in_a_bf16_forward_and_sdpa_gets_bf16_without_copies():
    out = load_bench("blocks").main(["--config", "tiny", "--image-tokens", "16", "--text-tokens", "8",
                                     "--repeats", "1"])
    for block, qk_norms in (("double", 4), ("single", 2)):
        found = out["allocations"][f"{block} bfloat16"]
        assert {part: c["float32_count"] for part, c in found["parts"].items()} == {
            "adaLN modulation": 0,
            "RMSNorm (QK norm)": 3 * qk_norms,  # x.float(), its square, x · rrms: BFL's math
            "RoPE": 2 * 2, "attention": 0, "MLP": 0, "rest": 0}  # x · cos and swapped · sin, for q and k
        [sdpa] = found["sdpa"]
        assert all(t["dtype"] == "bfloat16" and t["last_dim_contiguous"] for t in sdpa["inputs"])
        assert found["copies_in_attention"] == []
    assert {"double float32", "single float32", "double bfloat16",
            "single bfloat16"} <= out["adapters"].keys()


def test_blocks_bench_counts_each_linears_adapter_flops_from_its_shapes():
    """Forward: 2·r·(in + out) FLOPs per token and linear; double: per stream qkv 4C, proj 2C, MLP 5C + 5C,
    single: linear1 8C, linear2 6C; the modulations run once per sample (7C double, 4C single)."""
    r, C, L = 16, 3072, 6144 + 512
    flops = load_bench("blocks").adapter_flops("flux-dev", r, 6144, 512)
    assert flops["double lora fwd"] - flops["double base fwd"] == 2 * r * 16 * C * L + 2 * 2 * r * 7 * C
    assert flops["single lora fwd"] - flops["single base fwd"] == 2 * r * 14 * C * L + 2 * r * 4 * C
