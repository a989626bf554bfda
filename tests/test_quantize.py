"""fp8 weights (minflux/quantize.py): FP8Linear is dequantize + F.linear, quantizing rounds within e4m3's
step, fp8 checkpoints (plain casts and ComfyUI scaled fp8) load to FP8Linear with the file's values, LoRAs
train and apply on an fp8 base exactly as on its dequantized fp32 copy, and sample.py merges LoRAs before
quantizing."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import sample
from iclora.lora import LoRALinear, inject_lora, linears, lora_parameters, merge_lora, remove_lora
from iclora.lora_files import load_lora, save_lora
from minflux.hub import Repo
from minflux.loading import load_flow, read_safetensors
from minflux.model import Flux, preset
from minflux.quantize import FP8Linear, dequantize, quantize_fp8
from tests.test_transformer import inputs
from tests.tiny_repo import write_tiny_repo

PROMPT = "a small red circle above a blue square"


def tiny_flux(seed=0) -> Flux:
    torch.manual_seed(seed)
    return Flux(preset("tiny")).eval()


def dequantized_copy(model: Flux) -> Flux:
    """An fp32 Flux whose Linear weights are `model`'s FP8Linear weights dequantized, everything else
    equal."""
    plain = Flux(model.params).eval()
    sd = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, (FP8Linear, LoRALinear)) and m.scale is not None:
            sd[f"{name}.weight"] = dequantize(m.weight, m.scale, torch.float32)
            del sd[f"{name}.scale"]
    plain.load_state_dict({k: v for k, v in sd.items() if ".lora_" not in k})
    return plain


def randomize_adapters(model, name, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_equals_dequantize_then_linear_exactly(dtype):
    layer = FP8Linear.from_linear(nn.Linear(32, 16).to(dtype))
    x = torch.randn(3, 5, 32).to(dtype)
    assert torch.equal(layer(x), F.linear(x, layer.dequantize(dtype), layer.bias))
    assert layer.weight.dtype == torch.float8_e4m3fn and not layer.weight.requires_grad
    assert layer.scale.dtype == torch.float32 and layer.scale.shape == (16,) and layer.bias.dtype == dtype


def test_quantize_rounds_each_weight_within_half_an_e4m3_step_and_zero_rows_stay_zero():
    linear = nn.Linear(64, 8)
    with torch.no_grad():
        linear.weight[3] = 0
    layer = FP8Linear.from_linear(linear)
    w, deq = linear.weight.detach(), layer.dequantize(torch.float32)
    # e4m3: 3 mantissa bits, so a relative rounding error <= 2^-4; below 2^-6 (subnormals) the step is 2^-9
    bound = w.abs() * 2**-4 + layer.scale[:, None] * 2**-10
    assert (deq - w).abs().le(bound).all()
    assert torch.equal(deq[3], torch.zeros(64)) and layer.scale[3] == 1
    assert torch.equal(layer.bias, linear.bias)


def test_quantize_fp8_replaces_every_linear_of_the_blocks_and_its_output_error_is_small():
    flux = tiny_flux()
    x = inputs(flux.params)
    with torch.no_grad():
        want = flux(**x)
        norms = {k: v.clone() for k, v in flux.state_dict().items() if "norm" in k}
        quantize_fp8(flux)
        got = flux(**x)
    blocks = (flux.double_blocks, flux.single_blocks)
    assert not any(type(m) is nn.Linear for b in blocks for m in b.modules())
    # the layers around the blocks are left as they are
    assert all(type(m) is nn.Linear for m in (flux.img_in, flux.txt_in, flux.final_layer.linear))
    assert all(torch.equal(flux.state_dict()[k], v) for k, v in norms.items())
    rel = ((got - want).norm() / want.norm()).item()
    largest = (got - want).abs().max()
    print(f"tiny Flux, fp8 vs fp32 output: relative L2 error {rel:.4f}, max abs {largest:.4f}")
    assert rel < 0.05  # e4m3's relative step is 2^-4; random rounding errors average out well below it


def test_a_lora_on_an_fp8_base_gets_the_gradients_of_one_on_the_dequantized_fp32_model():
    fp8 = quantize_fp8(tiny_flux())
    plain = dequantized_copy(fp8)
    for model in (fp8, plain):
        inject_lora(model, rank=4, alpha=8.0, seed=3)
        randomize_adapters(model, "default")
        model(**inputs(model.params)).square().mean().backward()
    adapters = {id(p) for p in lora_parameters(fp8)}
    for name, p in fp8.named_parameters():
        assert (p.grad is not None) == (id(p) in adapters), name
    grads = dict(plain.named_parameters())
    for name, p in fp8.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6)


def test_an_unmerged_lora_on_fp8_equals_it_merged_into_the_dequantized_weights(tmp_path):
    trained = tiny_flux(seed=5)
    inject_lora(trained, rank=4, alpha=8.0)
    randomize_adapters(trained, "default")
    save_lora(trained, tmp_path / "lora.safetensors")
    fp8 = quantize_fp8(tiny_flux())
    plain = dequantized_copy(fp8)
    load_lora(fp8, str(tmp_path / "lora.safetensors"), name="style")
    load_lora(plain, str(tmp_path / "lora.safetensors"), name="style")
    merge_lora(plain, "style")
    x = inputs(fp8.params)
    with torch.no_grad():
        torch.testing.assert_close(fp8(**x), plain(**x), rtol=1e-5, atol=1e-5)


def test_merging_into_fp8_is_refused_and_removing_the_lora_gives_back_fp8_layers():
    fp8 = quantize_fp8(tiny_flux())
    before = {k: v.clone() for k, v in fp8.state_dict().items()}
    inject_lora(fp8, rank=4)
    with pytest.raises(ValueError, match="cannot merge LoRA 'default' into fp8 weights"):
        merge_lora(fp8, "default")
    remove_lora(fp8, "default")
    assert all(isinstance(m, FP8Linear) for n, m in linears(fp8) if n.startswith(("double_", "single_")))
    after = fp8.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k].float(), after[k].float()) for k in before)


# Checkpoints: a tiny repo, and fp8 copies of its transformer in the layouts found in the wild.

@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_tiny_repo(tmp_path_factory.mktemp("repo"), layout="bfl", seed=4)


def linear_keys(sd) -> list[str]:
    """The BFL keys of Linear weights (2-D `.weight`s; the tiny flow has no other 2-D weights)."""
    return [k for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2]


def write_fp8(path, sd, fp8_dtype, scaled: str | None, prefix=""):
    """scaled None: a plain cast; "scalar" / "rows": ComfyUI scaled fp8 with one scale per tensor / per row,
    its `scaled_fp8` marker and a `scale_input` to ignore. A norm scale is cast too (to be upcast on load)."""
    out = dict(sd)
    for key in linear_keys(sd):
        w, layer = sd[key].float(), key.removesuffix(".weight")
        if scaled is None:
            out[key] = w.to(fp8_dtype)
            continue
        amax = w.abs().amax(dim=1, keepdim=True) if scaled == "rows" else w.abs().max().reshape(1)
        scale = amax / torch.finfo(fp8_dtype).max
        out[key], out[f"{layer}.scale_weight"] = (w / scale).to(fp8_dtype), scale
        out[f"{layer}.scale_input"] = torch.ones(())
    norm = next(k for k in sd if k.endswith("query_norm.scale"))
    out[norm] = sd[norm].to(fp8_dtype)
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=fp8_dtype)
    save_file({prefix + k if k != "scaled_fp8" else k: v for k, v in out.items()}, path)
    return path


def file_values(path) -> dict[str, torch.Tensor]:
    """The file's tensors as fp32, each fp8 weight times its scale_weight."""
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(path).items()}
    values = {}
    for key, value in sd.items():
        if key == "scaled_fp8" or ".scale_" in key:
            continue
        scale = sd.get(key.removesuffix(".weight") + ".scale_weight", torch.ones(())).float()
        values[key] = value.float() * scale.reshape(-1, *[1] * (value.dim() - 1))  # (rows, 1, ...)
    return values


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scaled", [None, "scalar", "rows"])
def test_fp8_checkpoints_load_to_fp8_layers_holding_the_files_values(repo, tmp_path, fp8_dtype, scaled):
    sd = load_file(repo / "flux1-dev.safetensors")
    path = write_fp8(tmp_path / "fp8.safetensors", sd, fp8_dtype, scaled,
                     prefix="model.diffusion_model." if scaled == "rows" else "")
    flow = load_flow(Repo(str(repo)), transformer=path)
    want = file_values(path)
    for key in linear_keys(sd):
        layer = flow.get_submodule(key.removesuffix(".weight"))
        assert isinstance(layer, FP8Linear) and layer.weight.dtype == fp8_dtype, key
        assert torch.equal(layer.dequantize(torch.float32), want[key]), key
    fp8_scales = {f"{key.removesuffix('.weight')}.scale" for key in linear_keys(sd)}
    for key, value in flow.state_dict().items():
        # biases and norm scales (one was fp8 in the file)
        if key not in linear_keys(sd) and key not in fp8_scales:
            assert value.dtype == torch.float32 and torch.equal(value, want[key]), key


def test_a_scaled_fp8_checkpoint_keeps_its_float32_scales_when_the_rest_is_cast_to_bf16(repo, tmp_path):
    path = write_fp8(tmp_path / "fp8.safetensors", load_file(repo / "flux1-dev.safetensors"),
                     torch.float8_e4m3fn, "rows")
    flow = load_flow(Repo(str(repo)), torch.bfloat16, transformer=path)
    want = file_values(path)
    for key in linear_keys(want):
        layer = flow.get_submodule(key.removesuffix(".weight"))
        assert layer.scale.dtype == torch.float32, key
        assert torch.equal(layer.dequantize(torch.float32), want[key]), key
    assert flow.img_in.bias.dtype == torch.bfloat16


def test_a_uint8_checkpoint_gets_an_error_naming_the_file_the_key_and_what_is_supported(tmp_path):
    path = tmp_path / "flux1-dev-nf4.safetensors"
    save_file({"img_in.weight": torch.zeros(8, 4, dtype=torch.uint8)}, path)
    message = (r"nf4.safetensors: img_in.weight is stored in torch.uint8, which looks like "
               r"bitsandbytes NF4.*supported: bf16/fp32 official files.*ComfyUI scaled fp8")
    with pytest.raises(ValueError, match=message):
        read_safetensors([path], fp8=True)


def run_sample(repo, out, *args) -> np.ndarray:
    [path] = sample.main(["--model", str(repo), "--prompt", PROMPT, "--width", "32", "--height", "32",
                          "--steps", "2", "--out", str(out), "--device", "cpu", *args])
    return np.asarray(Image.open(path))


def test_sample_py_with_an_fp8_file_draws_what_its_dequantized_fp32_copy_draws(repo, tmp_path):
    sd = load_file(repo / "flux1-dev.safetensors")
    path = write_fp8(tmp_path / "fp8.safetensors", sd, torch.float8_e4m3fn, "scalar")
    save_file(file_values(path), tmp_path / "dequantized.safetensors")
    got = run_sample(repo, tmp_path / "a.png", "--transformer", str(path))
    want = run_sample(repo, tmp_path / "b.png", "--transformer", str(tmp_path / "dequantized.safetensors"))
    assert np.array_equal(got, want)


def test_sample_py_quantize_merges_the_lora_before_quantizing(repo, tmp_path):
    flow = load_flow(Repo(str(repo)))
    inject_lora(flow, rank=4, alpha=4.0, seed=2)
    randomize_adapters(flow, "default")
    save_lora(flow, tmp_path / "lora.safetensors")
    merge_lora(flow, "default")
    # the reference: the merged fp32 weights of the blocks quantized, written as ComfyUI scaled fp8 with
    # per-row scales
    merged = {k: v for k, v in flow.state_dict().items() if ".lora_" not in k}
    quantized = {}
    for key in [k for k in linear_keys(merged) if k.startswith(("double_blocks.", "single_blocks."))]:
        layer = FP8Linear.from_linear(flow.get_submodule(key.removesuffix(".weight")))
        quantized[key], quantized[key.removesuffix(".weight") + ".scale_weight"] = layer.weight, layer.scale
    save_file(merged | quantized | {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)},
              tmp_path / "merged-fp8.safetensors")
    got = run_sample(repo, tmp_path / "a.png", "--quantize", "fp8",
                     "--lora", str(tmp_path / "lora.safetensors"))
    want = run_sample(repo, tmp_path / "b.png", "--quantize", "fp8", "--transformer",
                      str(tmp_path / "merged-fp8.safetensors"))
    assert np.array_equal(got, want)


def test_a_folder_with_an_official_and_another_flux1_file_uses_the_official_one_and_says_so(tmp_path, capsys):
    for name in ("flux1-dev.safetensors", "flux1-dev-fp8.safetensors"):
        save_file({"x": torch.zeros(1)}, tmp_path / name)
    assert Repo(str(tmp_path)).transformer_file() == tmp_path / "flux1-dev.safetensors"
    note = ("using flux1-dev.safetensors, not flux1-dev-fp8.safetensors; "
            "to use another, give --transformer FILE")
    assert note in capsys.readouterr().err
    save_file({"x": torch.zeros(1)}, tmp_path / "flux1-schnell.safetensors")
    with pytest.raises(ValueError, match="several transformer files .* choose one with --transformer FILE"):
        Repo(str(tmp_path)).transformer_file()
