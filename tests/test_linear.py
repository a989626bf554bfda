"""minflux.linear: the oneDNN kernel for frozen float32 CPU weights is F.linear up to float32 rounding."""

import pytest
import torch
import torch.nn.functional as F

import minflux.linear
from minflux.linear import linear
from minflux.model import Flux, preset
from tests.test_transformer import inputs

U = 2.0 ** -24  # float32 unit roundoff

SHAPES = [  # (x shape, out features, bias): a vector, batches, many tokens, the wide fused layers
    ((64,), 32, True), ((3, 64), 96, False), ((2, 77, 128), 384, True), ((1, 300, 256), 1152, True),
    ((17, 1024), 64, True),
]


def rounding_bound(x, weight, bias):
    """|fl(x·Wᵀ + b) − (x·Wᵀ + b)| ≤ γ_{K+1} (|x|·|W|ᵀ + |b|), γ_n = n·u / (1 − n·u), for any summation order."""
    k = x.shape[-1] + 1
    magnitude = x.double().abs() @ weight.double().abs().t() + (0 if bias is None else bias.double().abs())
    return k * U / (1 - k * U) * magnitude


def random_layer(x_shape, out_features, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g)
    weight = torch.randn(out_features, x_shape[-1], generator=g)
    return x, weight, torch.randn(out_features, generator=g) if bias else None


@pytest.mark.parametrize("x_shape,out_features,bias", SHAPES)
def test_frozen_float32_linear_is_exact_up_to_float32_rounding(x_shape, out_features, bias):
    x, weight, b = random_layer(x_shape, out_features, bias)
    got = linear(x, weight, b)
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == exact.shape
    assert ((got.double() - exact).abs() <= rounding_bound(x, weight, b)).all()


@pytest.mark.parametrize("x_shape,out_features,bias", SHAPES)
def test_input_gradient_through_frozen_weights_is_exact_up_to_float32_rounding(x_shape, out_features, bias):
    x, weight, b = random_layer(x_shape, out_features, bias)
    x.requires_grad_(True)
    grad_out = torch.randn(*x_shape[:-1], out_features, generator=torch.Generator().manual_seed(1))
    linear(x, weight, b).backward(grad_out)
    exact = grad_out.double() @ weight.double()
    bound = x.shape[-1] * U / (1 - x.shape[-1] * U) * (grad_out.double().abs() @ weight.double().abs())
    assert ((x.grad.double() - exact).abs() <= bound).all()


def test_frozen_float32_cpu_weights_take_the_onednn_kernel():
    if not minflux.linear.ONEDNN:
        pytest.skip("this PyTorch build has no oneDNN: every linear is F.linear")
    x, weight, b = random_layer((4, 64), 32, True)
    y = linear(x.requires_grad_(True), weight, b)
    assert type(y.grad_fn).__name__ == "_FrozenLinearBackward"


@pytest.mark.parametrize("case", ["trained weight", "trained bias", "bfloat16", "float64", "switched off"])
def test_everything_else_is_f_linear_bit_for_bit_with_weight_gradients(case, monkeypatch):
    dtype = {"bfloat16": torch.bfloat16, "float64": torch.float64}.get(case, torch.float32)
    x, weight, b = (t.to(dtype) for t in random_layer((5, 64), 48, True))
    if case == "switched off":
        monkeypatch.setattr(minflux.linear, "ONEDNN", False)
    trained = weight if case != "trained bias" else b
    trained.requires_grad_(True)
    got = linear(x, weight, b)
    want = F.linear(x, weight, b)
    assert torch.equal(got, want)
    (grad,) = torch.autograd.grad(got.sum(), trained)
    (want_grad,) = torch.autograd.grad(want.sum(), trained)
    assert torch.equal(grad, want_grad)


def test_the_transformer_on_onednn_is_as_accurate_as_on_f_linear(monkeypatch):
    """Against the same model in float64, the default float32 path errs no more than F.linear's does."""
    torch.manual_seed(0)
    model = Flux(preset("tiny")).eval().requires_grad_(False)
    x = inputs(model.params)
    with torch.no_grad():
        for t in model.parameters():  # as the parity tests' weights: output scale ~10
            t.copy_(torch.randn_like(t) * 0.3)
        exact = model.double()(**{k: v.double() for k, v in x.items()})
        model.float()
        onednn = model(**x)
        monkeypatch.setattr(minflux.linear, "ONEDNN", False)
        blas = model(**x)
    err_onednn, err_blas = ((y.double() - exact).abs().max().item() for y in (onednn, blas))
    print(f"tiny transformer, max abs error vs float64: oneDNN {err_onednn:.2e}, F.linear {err_blas:.2e}, "
          f"output scale {exact.abs().mean():.2e}")
    assert err_onednn <= 2 * err_blas
