"""fp8 compute (minflux/quantize.py, --fp8-compute): row-wise torch._scaled_mm equals a float reference of the
same quantized values; an fp8-compute layer is within fp8 rounding of the dequantized layer, and its input
gradient is the dequantized layer's; a LoRA adds the same term on either; auto takes the fp8 path on CUDA
capability 9.0 and up only; the flag forces either path, is stored in the PNG settings, and runs sample.py and
train.py. torch 2.13's CPU build runs row-wise scaled matmuls, so all of it runs here with `on`."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import sample
import train
from iclora.lora import LoRALinear, inject_lora, lora_parameters, remove_lora
from minflux import png_settings, quantize
from minflux.quantize import (
    E4M3_MAX,
    FP8Linear,
    fp8_path,
    quantize_fp8,
    quantize_rows,
    set_fp8_compute,
)
from tests.test_quantize import randomize_adapters, tiny_flux
from tests.test_transformer import inputs
from tests.tiny_repo import write_tiny_repo


def fp8_layer(in_features=64, out_features=48, dtype=torch.float32, compute="scaled_mm", seed=0) -> FP8Linear:
    torch.manual_seed(seed)
    layer = FP8Linear.from_linear(nn.Linear(in_features, out_features).to(dtype))
    layer.compute = compute
    return layer


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def test_rowwise_scaled_mm_equals_a_float_reference_of_the_same_quantized_values():
    torch.manual_seed(0)
    x8, x_scale = quantize_rows(torch.randn(7, 64) * 3)                            # (M, K), (M, 1)
    w8, w_scale = quantize_rows(torch.randn(48, 64))                               # (N, K), (N, 1)
    want = (x8.double() * x_scale.double()) @ (w8.double() * w_scale.double()).t()  # (M, N)
    b_scale = w_scale.t().contiguous()                                             # (1, N)
    fp32 = torch._scaled_mm(x8, w8.t(), x_scale, b_scale, out_dtype=torch.float32).double()
    bf16 = torch._scaled_mm(x8, w8.t(), x_scale, b_scale, out_dtype=torch.bfloat16).double()
    # the products of fp8 values are exact in float32; summing 64 of them in float32 errs by at most
    # 64 · 2^-24 of the sum of their magnitudes (the textbook bound)
    terms = (x8.double() * x_scale.double()).abs() @ (w8.double() * w_scale.double()).abs().t()
    accumulation = 64 * 2**-24 * terms
    assert (fp32 - want).abs().le(accumulation).all()
    # bf16 out: that sum rounded to bf16's 8 significant bits, within 2^-8 of it
    assert (bf16 - want).abs().le(accumulation + 2**-8 * want.abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_fp8_compute_layer_is_within_fp8_rounding_of_the_dequantized_layer(dtype):
    layer = fp8_layer(dtype=dtype)
    x = (torch.randn(3, 5, 64) * torch.logspace(-2, 1, 64)).to(dtype)  # rows of mixed magnitudes
    got = layer(x)
    layer.compute = "dequantize"
    want = layer(x)
    # The bound, per output element y = Σ_k x_k w_k (w the dequantized weight, the same on both paths): x_k
    # rounded to e4m3 moves by at most 2^-4 |x_k| (3 mantissa bits), or by 2^-10 of its row's scale where it
    # is subnormal (below 2^-6 of the scale); then each side rounds its sum to bf16 once (2^-8 of it).
    x32 = x.float().flatten(0, 1)                                                  # (M, I)
    w = layer.dequantize(torch.float32).abs()                                      # (O, I)
    _, x_scale = quantize_rows(x32)                                                # (M, 1)
    magnitude = x32.abs() @ w.t()                                                  # (M, O) Σ_k |x_k w_k|
    bias = layer.bias.float().abs()
    bound = 2**-4 * magnitude + 2**-10 * x_scale * w.sum(1) + 2**-7 * (magnitude + bias) + 1e-6
    error = (got.float() - want.float()).flatten(0, 1).abs()
    assert got.dtype == dtype
    assert error.le(bound).all()
    print(f"{dtype}: relative L2 error of fp8 compute {relative(got.float(), want.float()):.4f}")


def test_the_fp8_compute_layers_input_gradient_is_the_dequantized_layers():
    layer = fp8_layer()
    x = torch.randn(6, 64, requires_grad=True)
    grad = torch.randn(6, 48)
    layer(x).backward(grad)
    got = x.grad.clone()
    x.grad = None
    layer.compute = "dequantize"
    layer(x).backward(grad)
    torch.testing.assert_close(got, x.grad, rtol=1e-6, atol=1e-6)


def test_a_lora_on_an_fp8_compute_layer_keeps_its_base_term_exactly():
    base = fp8_layer()
    wrapped = LoRALinear(copy.deepcopy(base))
    wrapped.add_adapter("default", rank=4, alpha=4.0)  # B = 0: the base term alone
    x = torch.randn(2, 9, 64)
    assert wrapped.compute == "scaled_mm"
    assert torch.equal(wrapped(x), base(x))


def test_the_lora_term_on_an_fp8_compute_base_equals_one_on_the_dequantized_copy():
    base = fp8_layer()
    plain = nn.Linear(64, 48)
    with torch.no_grad():
        plain.weight.copy_(base.dequantize(torch.float32))
        plain.bias.copy_(base.bias)
    on_fp8 = LoRALinear(copy.deepcopy(base))
    on_plain = LoRALinear(plain)
    B = torch.randn(48, 4)
    for layer in (on_fp8, on_plain):
        layer.add_adapter("default", rank=4, alpha=8.0, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            layer.lora_B["default"].weight.copy_(B)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        got = on_fp8(x) - base(x)
        want = on_plain(x) - plain(x)
    assert relative(got, want) < 1e-5


def test_a_lora_added_and_removed_keeps_the_layers_fp8_compute():
    flow = quantize_fp8(tiny_flux())
    set_fp8_compute(flow, "on", "cpu")
    inject_lora(flow, rank=4)
    wrapped = [m for m in flow.modules() if isinstance(m, LoRALinear) and m.scale is not None]
    assert wrapped and all(m.compute == "scaled_mm" for m in wrapped)
    remove_lora(flow, "default")
    layers = [m for m in flow.modules() if isinstance(m, FP8Linear)]
    assert len(layers) == len(wrapped) and all(m.compute == "scaled_mm" for m in layers)


@pytest.mark.parametrize("capability,path", [((9, 0), "scaled_mm"), ((10, 0), "scaled_mm"),
                                             ((8, 9), "dequantize"), ((8, 0), "dequantize")])
def test_auto_computes_in_fp8_only_on_cuda_capability_9_and_up(monkeypatch, capability, path):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(quantize, "check_scaled_mm", lambda device: None)  # the trial call runs
    chosen, why = fp8_path("auto", "cuda")
    assert chosen == path
    assert f"CUDA capability {capability[0]}.{capability[1]}" in why


def test_auto_dequantizes_where_a_new_cards_trial_scaled_matmul_fails_and_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))
    chosen, why = fp8_path("auto", "cuda")  # this CPU-only torch cannot run it on "cuda"
    assert chosen == "dequantize"
    assert "CUDA capability 12.0" in why and "cannot run torch._scaled_mm" in why


def test_auto_dequantizes_on_the_cpu():
    assert fp8_path("auto", "cpu")[0] == "dequantize"


def test_on_and_off_force_either_path_on_every_fp8_layer_and_say_so():
    flow = quantize_fp8(tiny_flux())
    layers = [m for m in flow.modules() if isinstance(m, FP8Linear)]
    note = set_fp8_compute(flow, "on", "cpu")
    assert all(m.compute == "scaled_mm" for m in layers)
    assert note == f"fp8 compute: torch._scaled_mm in {len(layers)} of {len(layers)} fp8 layers " \
                   f"(--fp8-compute on, on cpu)"
    assert "off" in set_fp8_compute(flow, "off", "cpu")
    assert all(m.compute == "dequantize" for m in layers)


def test_layers_scaled_mm_cannot_take_keep_dequantizing():
    e4m3 = fp8_layer(32, 32)
    e5m2 = FP8Linear(e4m3.weight.float().to(torch.float8_e5m2), e4m3.scale, e4m3.bias)
    model = nn.Sequential(fp8_layer(64, 48), fp8_layer(48, 40), fp8_layer(24, 32), e5m2)  # 40, 24: not 16·n
    note = set_fp8_compute(model, "on", "cpu")
    assert [m.compute for m in model] == ["scaled_mm", "dequantize", "dequantize", "dequantize"]
    assert note.endswith("; 3 dequantize (e5m2, or sides not multiples of 16)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_on_is_refused_with_a_clear_error_where_the_device_cannot_run_it():
    with pytest.raises(ValueError, match=r"--fp8-compute on: cuda cannot run torch._scaled_mm with row-wise"):
        fp8_path("on", "cuda")


def test_an_unknown_mode_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="--fp8-compute fast: expected one of on, off, auto"):
        fp8_path("fast", "cpu")


def test_quantize_rows_scales_each_row_to_its_absmax():
    x = torch.tensor([[1.0, -896.0, 3.0], [0.0, 0.0, 0.0]])
    rows, scale = quantize_rows(x)
    assert scale.tolist() == [[896.0 / E4M3_MAX], [1.0]]
    assert rows.float()[0, 1] == -E4M3_MAX and torch.equal(rows.float()[1], torch.zeros(3))


def test_lora_gradients_with_fp8_compute_match_the_dequantized_path_within_fp8_rounding():
    fp8 = quantize_fp8(tiny_flux())
    deq = copy.deepcopy(fp8)
    set_fp8_compute(fp8, "on", "cpu")
    x = inputs(fp8.params)
    grads = {}
    for name, model in (("fp8", fp8), ("deq", deq)):
        inject_lora(model, rank=4, alpha=8.0, seed=3)
        randomize_adapters(model, "default")
        model(**x).square().mean().backward()
        grads[name] = torch.cat([p.grad.flatten() for p in lora_parameters(model)])
    error = relative(grads["fp8"], grads["deq"])
    print(f"tiny Flux, adapter gradients with fp8 compute vs dequantized: relative L2 error {error:.4f}")
    # e4m3 rounds each activation by at most 2^-4 of it; independent roundings average well below that
    assert error < 2**-4


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_tiny_repo(tmp_path_factory.mktemp("tiny") / "FLUX.1-dev", layout="bfl", seed=1)


def run_sample(repo, out, *flags) -> list:
    return sample.main(["--model", str(repo), "--prompt", "a red circle", "--width", "32", "--height", "32",
                        "--steps", "2", "--device", "cpu", "--out", str(out), "--quantize", "fp8", *flags])


@pytest.mark.slow
def test_sample_py_stores_fp8_compute_in_the_png_and_from_image_draws_it_again(repo, tmp_path, capsys):
    [first] = run_sample(repo, tmp_path / "a.png", "--fp8-compute", "on")
    assert "fp8 compute: torch._scaled_mm in" in capsys.readouterr().err
    assert json.loads(Image.open(first).info[png_settings.SETTINGS_KEY])["fp8_compute"] == "on"
    [again] = sample.main(["--from-image", str(first), "--trust-settings", "--out", str(tmp_path / "b.png")])
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))


def test_sample_py_fp8_compute_off_draws_what_quantize_alone_drew(repo, tmp_path, capsys):
    [off] = run_sample(repo, tmp_path / "off.png", "--fp8-compute", "off")
    assert "fp8 compute: off" in capsys.readouterr().err
    [auto] = run_sample(repo, tmp_path / "auto.png")  # the CPU: auto dequantizes
    assert np.array_equal(np.asarray(Image.open(off)), np.asarray(Image.open(auto)))


@pytest.mark.slow
def test_the_toy_model_samples_with_quantize_fp8_and_fp8_compute_on(tmp_path, capsys):
    [path] = sample.main(["--model", "toy", "--prompt", "a red circle", "--steps", "2", "--device", "cpu",
                          "--quantize", "fp8", "--fp8-compute", "on", "--out", str(tmp_path / "toy.png")])
    assert "fp8 compute: torch._scaled_mm in 26 of 26 fp8 layers" in capsys.readouterr().err
    assert np.asarray(Image.open(path)).shape == (64, 64, 3)


@pytest.mark.slow
def test_train_py_trains_a_lora_with_fp8_compute_on(tmp_path, capsys):
    (tmp_path / "sets").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (32, 64, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "sets/a.png")
    (tmp_path / "sets/a.txt").write_text("a red circle and a blue square")
    out = train.main(["--model", "toy", "--data", str(tmp_path / "sets"), "--steps", "3", "--batch-size", "1",
                      "--resolution", "32", "--sample-every", "0", "--device", "cpu", "--quantize", "fp8",
                      "--fp8-compute", "on", "--out", str(tmp_path / "a.safetensors")])
    assert "fp8 compute: torch._scaled_mm in" in capsys.readouterr().err
    lora = load_file(out)
    assert lora and all(torch.isfinite(v).all() for v in lora.values())
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k or "lora_up" in k)


@pytest.mark.slow
def test_a_compiled_fp8_compute_layer_gives_the_eager_output_and_input_gradient():
    layer = fp8_layer()
    x = torch.randn(2, 5, 64, requires_grad=True)
    eager = layer(x)
    eager.square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    compiled = torch.compile(layer)(x)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, grad, rtol=1e-6, atol=1e-6)
