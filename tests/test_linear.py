"""minflux.linear: frozen float32 CPU weights take oneDNN, which is F.linear up to float32 rounding; the rest is
F.linear."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import minflux.linear
from iclora.lora import inject_lora, lora_parameters
from minflux.linear import linear
from minflux.model import Flux, preset
from tests.test_lora import randomize
from tests.test_transformer import inputs

U = 2.0 ** -24  # float32 unit roundoff

SHAPES = [  # (x shape, out features, bias): a vector, batches, many tokens, the wide fused layers
    ((8192,), 512, True), ((8, 512), 1024, False), ((2, 77, 128), 384, True), ((1, 300, 256), 1152, True),
    ((48, 1024), 64, True),
]


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def random_layer(x_shape, out_features, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g)
    weight = torch.randn(out_features, x_shape[-1], generator=g)
    return x, weight, torch.randn(out_features, generator=g) if bias else None


def takes_onednn(x, weight, bias) -> bool:
    y = linear(x.detach().requires_grad_(True), weight, bias)
    return type(y.grad_fn).__name__ == "_FrozenLinearBackward"


@pytest.fixture
def every_linear_on_onednn(monkeypatch):
    if not minflux.linear.ONEDNN:
        pytest.skip("this PyTorch build has no oneDNN: every linear is F.linear")
    monkeypatch.setattr(minflux.linear, "MIN_MACS", 0)


@pytest.mark.parametrize("x_shape,out_features,bias", SHAPES)
def test_frozen_float32_linear_is_exact_up_to_float32_rounding(x_shape, out_features, bias):
    """|fl(x·Wᵀ + b) − (x·Wᵀ + b)| ≤ γ_(I+1) (|x|·|W|ᵀ + |b|) elementwise, whatever the summation order."""
    x, weight, b = random_layer(x_shape, out_features, bias)
    got = linear(x, weight, b)
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    magnitude = x.double().abs() @ weight.double().abs().t() + (0 if b is None else b.double().abs())
    assert got.dtype == torch.float32 and got.shape == exact.shape
    assert ((got.double() - exact).abs() <= gamma(x.shape[-1] + 1) * magnitude).all()


@pytest.mark.parametrize("x_shape,out_features,bias", SHAPES)
def test_input_gradient_through_frozen_weights_is_exact_up_to_float32_rounding(x_shape, out_features, bias):
    """gx = gy·W sums over the O outputs: |fl(gx) − gx| ≤ γ_O (|gy|·|W|)."""
    x, weight, b = random_layer(x_shape, out_features, bias)
    x.requires_grad_(True)
    grad_out = torch.randn(*x_shape[:-1], out_features, generator=torch.Generator().manual_seed(1))
    linear(x, weight, b).backward(grad_out)
    exact = grad_out.double() @ weight.double()
    bound = gamma(out_features) * (grad_out.double().abs() @ weight.double().abs())
    assert ((x.grad.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("x_shape,out_features,bias", SHAPES)
def test_frozen_float32_cpu_weights_of_real_size_take_the_onednn_kernel(x_shape, out_features, bias):
    if not minflux.linear.ONEDNN:
        pytest.skip("this PyTorch build has no oneDNN: every linear is F.linear")
    assert takes_onednn(*random_layer(x_shape, out_features, bias))


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's own note on flags()
@pytest.mark.parametrize("case", ["frozen bfloat16", "frozen float64", "tiny matrices", "strided bias",
                                  "expanded bias", "bias on another device", "sparse input",
                                  "oneDNN switched off by torch", "ONEDNN = False"])
def test_everything_else_is_f_linear_bit_for_bit(case, monkeypatch):
    dtype = {"frozen bfloat16": torch.bfloat16, "frozen float64": torch.float64}.get(case, torch.float32)
    x, weight, b = (t.to(dtype) for t in random_layer((8, 1024) if case != "tiny matrices" else (4, 16), 256, True))
    if case == "strided bias":
        b = torch.randn(2 * weight.shape[0])[::2]
    if case == "expanded bias":
        b = torch.randn(1).expand(weight.shape[0])
    if case == "bias on another device":  # F.linear's error, not a result computed without the bias
        with pytest.raises(RuntimeError, match="device"):
            linear(x, weight, b.to("meta"))
        return
    if case == "sparse input":
        x = x.to_sparse()
    if case == "ONEDNN = False":
        monkeypatch.setattr(minflux.linear, "ONEDNN", False)
    off = case == "oneDNN switched off by torch"
    with torch.backends.mkldnn.flags(enabled=False) if off else contextlib.nullcontext():
        assert not takes_onednn(x, weight, b)
        assert torch.equal(linear(x, weight, b), F.linear(x, weight, b))


@pytest.mark.parametrize("trained", ["weight", "bias"])
def test_weights_being_trained_get_f_linears_gradients(trained):
    x, weight, b = random_layer((64, 512), 256, True)
    param = {"weight": weight, "bias": b}[trained].requires_grad_(True)
    got, want = linear(x, weight, b), F.linear(x, weight, b)
    assert torch.equal(got, want)
    assert torch.equal(torch.autograd.grad(got.sum(), param)[0], torch.autograd.grad(want.sum(), param)[0])


def test_a_wrong_input_size_gets_f_linears_error():
    x, weight, b = random_layer((64, 512), 256, True)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        linear(x[:, :500], weight, b)


def test_second_derivatives_through_frozen_weights_are_refused_not_silently_wrong(every_linear_on_onednn):
    x, weight, b = random_layer((8, 64), 32, True)
    x.requires_grad_(True)
    (gx,) = torch.autograd.grad(linear(x, weight, b).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


def tiny_flux(seed=0):
    """The tiny transformer with the parity tests' weights (× 0.3: output scale ~10), frozen."""
    torch.manual_seed(seed)
    model = Flux(preset("tiny")).eval().requires_grad_(False)
    with torch.no_grad():
        for t in model.parameters():
            t.copy_(torch.randn_like(t) * 0.3)
    return model


def test_the_transformer_on_onednn_errs_at_most_twice_as_much_as_on_f_linear(every_linear_on_onednn, monkeypatch):
    """Against the same model in float64: either kernel is ~2-4e-5 off at this output scale (seeds 0-4: the
    ratio of the two errors was 0.8-1.6), so both are as far from exact arithmetic as float32 allows."""
    model = tiny_flux()
    x = inputs(model.params)
    with torch.no_grad():
        exact = model.double()(**{k: v.double() for k, v in x.items()})
        model.float()
        onednn = model(**x)
        monkeypatch.setattr(minflux.linear, "ONEDNN", False)
        blas = model(**x)
    err_onednn, err_blas = ((y.double() - exact).abs().max().item() for y in (onednn, blas))
    print(f"tiny transformer, max abs error vs float64: oneDNN {err_onednn:.2e}, F.linear {err_blas:.2e}, "
          f"output scale {exact.abs().mean():.2e}")
    assert err_onednn <= 2 * err_blas


def test_lora_gradients_with_checkpointing_through_onednn_match_f_linear(every_linear_on_onednn, monkeypatch):
    model = tiny_flux()
    inject_lora(model, rank=4, alpha=4.0)
    randomize(model)
    x = inputs(model.params)
    model.gradient_checkpointing = True
    grads = []
    for onednn in (True, False):
        monkeypatch.setattr(minflux.linear, "ONEDNN", onednn)
        model.zero_grad()
        model(**x).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in lora_parameters(model)]))
    rel = ((grads[0] - grads[1]).norm() / grads[1].norm()).item()
    print(f"LoRA gradients with checkpointing, oneDNN vs F.linear: relative difference {rel:.2e}")
    assert rel < 1e-5
    assert torch.equal(checkpoint(linear, x["img"], model.img_in.weight, model.img_in.bias, use_reentrant=False),
                       linear(x["img"], model.img_in.weight, model.img_in.bias))
