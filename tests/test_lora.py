"""The LoRA injector: fresh adapters change nothing, merging is exact, only adapters train, base names stay
official."""

import pytest
import torch
from torch import nn

from iclora.lora import (
    LoRALinear,
    inject_lora,
    lora_parameters,
    lora_state,
    merge_lora,
    remove_lora,
    set_lora_scale,
)
from minflux.convert import transformer_table
from minflux.model import Flux, preset
from tests.test_transformer import inputs


def tiny_flux() -> Flux:
    torch.manual_seed(0)
    return Flux(preset("tiny")).eval()


def randomize(model, name="default", seed=1):
    """B starts at zero; give the adapter a visible effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def run(model, x):
    with torch.no_grad():
        return model(**x)


def merged_by_hand(model, multipliers: dict[str, float]) -> Flux:
    """A plain Flux whose weights are the base plus multiplier · alpha / r · B @ A of each adapter."""
    plain = Flux(model.params).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    with torch.no_grad():
        for name, multiplier in multipliers.items():
            for module, w in lora_state(model, name).items():
                plain.get_submodule(module).weight += multiplier * w.alpha / w.A.shape[0] * w.B @ w.A
    return plain


def test_new_adapter_leaves_the_output_unchanged():
    flux = tiny_flux()
    x = inputs(flux.params)
    before = run(flux, x)
    inject_lora(flux, rank=4, alpha=8.0)
    assert torch.equal(run(flux, x), before)


def test_adapter_init_is_reproducible_from_the_seed():
    a, b, c = tiny_flux(), tiny_flux(), tiny_flux()
    inject_lora(a, seed=3), inject_lora(b, seed=3), inject_lora(c, seed=4)
    A = [m.double_blocks[0].img_attn.qkv.lora_A["default"].weight for m in (a, b, c)]
    assert torch.equal(A[0], A[1]) and not torch.equal(A[0], A[2])
    assert A[0].abs().max() <= 1 / 32**0.5  # nn.Linear's kaiming-uniform bound 1/√in


def test_unmerging_with_sign_minus_one_restores_the_base_weights():
    flux = tiny_flux()
    inject_lora(flux, rank=4, alpha=8.0)
    randomize(flux)
    base = {k: v.clone() for k, v in flux.state_dict().items() if ".lora_" not in k}
    merge_lora(flux)
    changed = max((flux.state_dict()[k] - v).abs().max().item() for k, v in base.items())
    merge_lora(flux, sign=-1)
    diff = max((flux.state_dict()[k] - v).abs().max().item() for k, v in base.items())
    print(f"merge changed weights by up to {changed:.2e}; merge+unmerge max abs diff {diff:.2e}")
    assert changed > 0.1
    assert diff < 1e-6


def test_a_merge_sign_other_than_plus_or_minus_one_is_an_error():
    flux = tiny_flux()
    inject_lora(flux, rank=4)
    with pytest.raises(ValueError, match="sign must be 1"):
        merge_lora(flux, sign=0)


def test_merged_and_unmerged_adapters_give_the_same_output():
    flux = tiny_flux()
    inject_lora(flux, rank=4, alpha=8.0)
    randomize(flux)
    x = inputs(flux.params)
    unmerged = run(flux, x)
    merge_lora(flux)
    merged = run(flux, x)
    diff = (merged - unmerged).abs()
    print(f"merged vs unmerged: max abs diff {diff.max():.2e}, mean {diff.mean():.2e}")
    assert diff.max() < 1e-5


def test_only_the_adapters_get_gradients():
    flux = tiny_flux()
    inject_lora(flux, rank=4, alpha=8.0)
    randomize(flux)
    flux(**inputs(flux.params)).square().mean().backward()
    adapter = {id(p) for p in lora_parameters(flux)}
    for name, p in flux.named_parameters():
        if id(p) in adapter:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert len(adapter) == 2 * 26  # A and B on the 2·10 + 2·3 block linears of the tiny model


def test_injecting_a_second_adapter_freezes_the_first():
    flux = tiny_flux()
    inject_lora(flux, rank=4, name="first")
    inject_lora(flux, rank=2, targets=[r"single_blocks\.\d+\.linear1"], name="second")
    trainable = {n for n, p in flux.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in flux.named_parameters() if ".second." in n}


def test_two_adapters_with_their_own_scales_add_up():
    flux = tiny_flux()
    inject_lora(flux, rank=4, alpha=4.0, name="a")
    inject_lora(flux, rank=2, alpha=8.0, targets=[r"single_blocks\.\d+\.linear1"], name="b")
    randomize(flux, "a", seed=1)
    randomize(flux, "b", seed=2)
    set_lora_scale(flux, "b", 0.3)
    x = inputs(flux.params)
    diff = (run(flux, x) - run(merged_by_hand(flux, {"a": 1.0, "b": 0.3}), x)).abs()
    print(f"two adapters vs merged by hand: max abs diff {diff.max():.2e}")
    assert diff.max() < 1e-5


def test_set_lora_scale_scales_the_update():
    flux = tiny_flux()
    inject_lora(flux, rank=4, alpha=8.0)
    randomize(flux)
    x = inputs(flux.params)
    set_lora_scale(flux, "default", 0.5)
    diff = (run(flux, x) - run(merged_by_hand(flux, {"default": 0.5}), x)).abs()
    print(f"multiplier 0.5 vs merged by hand: max abs diff {diff.max():.2e}")
    assert diff.max() < 1e-5
    merge_lora(flux)
    set_lora_scale(flux, "default", 0.0)  # a merged adapter is re-merged at the new scale
    assert torch.allclose(run(flux, x), run(merged_by_hand(flux, {}), x), atol=1e-5)


def test_remove_lora_restores_plain_linears_with_identical_weights():
    flux = tiny_flux()
    x = inputs(flux.params)
    before, out = {k: v.clone() for k, v in flux.state_dict().items()}, run(flux, x)
    inject_lora(flux, rank=4, alpha=8.0)
    randomize(flux)
    merge_lora(flux)
    remove_lora(flux)
    assert not any(isinstance(m, LoRALinear) for m in flux.modules())
    assert type(flux.double_blocks[0].img_attn.qkv) is nn.Linear
    after = flux.state_dict()
    assert after.keys() == before.keys()
    diff = max((after[k] - v).abs().max().item() for k, v in before.items())
    print(f"after merge + remove: max abs weight diff {diff:.2e}")
    assert diff < 1e-6
    assert torch.allclose(run(flux, x), out, atol=1e-6)


def test_injected_model_keeps_the_official_parameter_names():
    flux = tiny_flux()
    official = set(flux.state_dict())
    inject_lora(flux, rank=4)
    names = set(flux.state_dict())
    assert official <= names
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in names - official)
    assert "double_blocks.0.img_attn.qkv.lora_A.default.weight" in names


def test_adapters_are_float32_on_a_bf16_base():
    flux = tiny_flux().to(torch.bfloat16)
    inject_lora(flux, rank=4)
    randomize(flux)
    assert all(p.dtype == torch.float32 for p in lora_parameters(flux))
    x = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs(flux.params).items()}
    assert run(flux, x).dtype == torch.bfloat16


def test_default_targets_on_full_size_flux_cover_the_494_iclora_modules():
    with torch.device("meta"):
        flux = Flux(preset("flux-dev"))
        wrapped = inject_lora(flux)
    assert len(wrapped) == 19 * 10 + 38 * 3 == 304
    table = transformer_table(19, 38, 3072, 12288)
    assert sum(bfl in wrapped for bfl, _ in table.values()) == 494
    assert "final_layer.linear" not in wrapped and "img_in" not in wrapped


def test_targets_that_match_nothing_are_an_error():
    with pytest.raises(ValueError, match="no Linear layer matches"):
        inject_lora(tiny_flux(), targets=[r"decoder\..*"])
