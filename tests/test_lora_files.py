"""LoRA files: ours load back and into diffusers; PEFT, official IC-LoRA, kohya, BFL-native and XLabs files
load onto our fused BFL linears with exactly the effect of their weight deltas; bad files fail with a clear
error."""

import copy
import re

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders import FluxLoraLoaderMixin
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from iclora.lora import (
    DEFAULT_TARGETS,
    LoRALinear,
    inject_lora,
    lora_linear_at,
    lora_parameters,
    remove_lora,
    set_lora_scale,
)
from iclora.lora_files import load_lora, save_lora
from minflux.model import Flux, preset
from tests.test_transformer import inputs, reference_and_ours, run_both


def trained(model, rank=4, alpha=4.0, seed=1):
    """Our model with an adapter of random (non-zero) A and B, as after training."""
    inject_lora(model, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def lora_pair(module, rank, g, dtype=torch.float32):
    """Random (A (r, in), B (out, r)) for a Linear."""
    return ((torch.randn(rank, module.in_features, generator=g) * 0.1).to(dtype),
            (torch.randn(module.out_features, rank, generator=g) * 0.1).to(dtype))


def in_float64(*models):
    """Models and inputs in float64, for comparing computations that differ only in fp32 summation order (a
    LoRA merged by hand, (W + BA)·x, against W·x + B(A·x); separate q/k/v adapters against one fused
    block-diagonal adapter; a saved B holding (alpha / r)·B, rounded, against B and scale alpha / r): they
    differ by ~2e-5 in fp32 at these reference weights' output scale (~13); in float64 the test sees the
    mapping itself."""
    x = {k: v.double() if v.is_floating_point() else v for k, v in inputs(models[-1].params).items()}
    return *(m.double() for m in models), x


def run(model, x):
    with torch.no_grad():
        return model(**x)


def report(label, got, want, base):
    """Parity of `got` with `want`, and proof that the LoRA moved the output away from the base model's."""
    diff = (got - want).abs()
    effect = (want - base).abs().max()
    print(f"{label}: max abs diff {diff.max():.2e}, mean {diff.mean():.2e}, "
          f"output scale {want.abs().mean():.2e}, LoRA effect {effect:.2e}")
    assert effect > 0.1
    assert diff.max() < 1e-5


def load_into_diffusers(ref, path, name="lora"):
    """What diffusers' FluxPipeline.load_lora_weights does for the transformer (alphas read from `.alpha`
    keys)."""
    state_dict, alphas = FluxLoraLoaderMixin.lora_state_dict(str(path), return_alphas=True)
    FluxLoraLoaderMixin.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=ref,
                                                   adapter_name=name)


def merged_by_hand(model, deltas: dict):
    """A copy of the model with weight (and bias) deltas added: {param name: (rows, delta)}."""
    merged = copy.deepcopy(model)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for name, (rows, delta) in deltas.items():
            params[name][rows] += delta
    return merged


# ------------------------------------------------------------------------------------------------------------
# Our own files


def test_save_then_load_gives_identical_outputs(tmp_path):
    _, ours = reference_and_ours(guidance_embed=True)
    base = copy.deepcopy(ours)
    trained(ours, rank=4, alpha=8.0)
    path = tmp_path / "lora.safetensors"
    save_lora(ours, path, metadata={"rank": "4", "alpha": "8.0", "base_model": "tiny"})
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]  # no temporary file left behind
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["base_model"] == "tiny"
        keys = list(f.keys())
    peft_suffixes = (["lora_A", "weight"], ["lora_B", "weight"])
    assert all(k.startswith("transformer.") and k.rsplit(".", 2)[-2:] in peft_suffixes for k in keys)
    # A and B for every diffusers module of the tiny blocks, no .alpha
    assert len(keys) == 2 * (2 * 14 + 2 * 6)
    x = inputs(ours.params)
    before = run(base, x)
    load_lora(base, path)
    report("save -> load round trip", run(base, x), run(ours, x), before)
    assert torch.equal(run(base, x), run(ours, x))  # the same delta: alpha / r = 2 folds into B exactly


def test_a_fused_adapter_split_on_save_loads_back_at_its_own_rank_with_its_scale_in_b(tmp_path):
    _, ours = reference_and_ours(guidance_embed=True)
    base = copy.deepcopy(ours)
    save_lora(trained(ours, rank=4, alpha=8.0), tmp_path / "lora.safetensors")
    load_lora(base, tmp_path / "lora.safetensors")
    for (name, saved), (_, loaded) in zip(ours.named_modules(), base.named_modules(), strict=True):
        if isinstance(saved, LoRALinear):
            assert torch.equal(loaded.lora_A["default"].weight, saved.lora_A["default"].weight), name
            assert torch.equal(loaded.lora_B["default"].weight, 2 * saved.lora_B["default"].weight), name
            assert loaded.alpha["default"] == 4.0  # alpha / r = 8 / 4 is in B: scale 1


def test_no_alpha_key_is_ever_written_b_and_its_bias_carry_alpha_over_r(tmp_path):
    """Every client then reads the same delta at scale 1: diffusers' load_lora_adapter ignores .alpha keys."""
    _, ours = reference_and_ours(guidance_embed=True)
    layer = lora_linear_at(ours, "single_blocks.0.linear2")
    layer.add_adapter("default", 4, alpha=3.0, bias=True)  # a LoRA bias, as BFL's files have
    with torch.no_grad():
        for p in (*layer.lora_A["default"].parameters(), *layer.lora_B["default"].parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(8)))
    save_lora(ours, tmp_path / "lora.safetensors")
    sd = load_file(tmp_path / "lora.safetensors")
    key = "transformer.single_transformer_blocks.0.proj_out"
    assert sorted(sd) == [f"{key}.lora_A.weight", f"{key}.lora_B.bias", f"{key}.lora_B.weight"]
    assert torch.equal(sd[f"{key}.lora_A.weight"], layer.lora_A["default"].weight)
    assert torch.equal(sd[f"{key}.lora_B.weight"], layer.lora_B["default"].weight * 0.75)
    assert torch.equal(sd[f"{key}.lora_B.bias"], layer.lora_B["default"].bias * 0.75)


def test_save_can_cast_the_tensors_to_fp16(tmp_path):
    _, ours = reference_and_ours(guidance_embed=True)
    save_lora(trained(ours), tmp_path / "lora.safetensors", dtype=torch.float16)
    sd = load_file(tmp_path / "lora.safetensors")
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert not any(k.endswith(".alpha") for k in sd)  # as the official files


def test_a_lora_beyond_fp16s_range_is_written_in_bf16_with_a_warning_never_as_inf(tmp_path):
    _, ours = reference_and_ours(guidance_embed=True)
    model = trained(ours, rank=4, alpha=8.0)
    with torch.no_grad():
        lora_parameters(model)[1][0, 0] = 4e4  # within 65504; beyond it once scaled by alpha / r = 2
    with pytest.warns(UserWarning, match=r"exceeds fp16's range \(65504\); written in bf16"):
        save_lora(model, tmp_path / "lora.safetensors", dtype=torch.float16)
    sd = load_file(tmp_path / "lora.safetensors")
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    assert all(torch.isfinite(v).all() for v in sd.values())


@pytest.mark.parametrize("alpha", [4.0, 12.0], ids=["alpha=rank", "alpha!=rank"])
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_our_file_loads_in_diffusers_with_the_same_output(tmp_path, alpha, multiplier):
    ref, ours = reference_and_ours(guidance_embed=True)
    x = inputs(ours.params)
    before, loaded = run(ours, x), copy.deepcopy(ours)
    save_lora(trained(ours, rank=4, alpha=alpha), tmp_path / "lora.safetensors")
    load_into_diffusers(ref, tmp_path / "lora.safetensors")
    ref.set_adapters(["lora"], weights=[multiplier])
    set_lora_scale(ours, "default", multiplier)
    load_lora(loaded, tmp_path / "lora.safetensors", multiplier=multiplier)
    # the file's B is (alpha / r)·B rounded to fp32: see in_float64
    loaded, ours, x64 = in_float64(loaded, ours)
    assert torch.allclose(run(loaded, x64), run(ours, x64), atol=1e-5)
    # peft's separate q/k/v adapters vs our fused one: see in_float64
    got, want = run_both(*in_float64(ref, ours))
    report(f"our file in diffusers (alpha {alpha}, multiplier {multiplier})", got, want, before)


@pytest.mark.parametrize("rank, alpha", [(4, 8.0), (8, 2.0)])
def test_our_file_loads_at_the_same_strength_with_diffusers_load_lora_adapter(tmp_path, rank, alpha):
    """FluxTransformer2DModel.load_lora_adapter reads no .alpha keys (scale 1): our files carry alpha / r in
    B."""
    ref, ours = reference_and_ours(guidance_embed=True)
    x = inputs(ours.params)
    before = run(ours, x)
    save_lora(trained(ours, rank=rank, alpha=alpha), tmp_path / "lora.safetensors")
    ref.load_lora_adapter(str(tmp_path / "lora.safetensors"), prefix="transformer", adapter_name="lora")
    # peft's separate q/k/v adapters vs our fused one: see in_float64
    got, want = run_both(*in_float64(ref, ours))
    report(f"our file in diffusers' load_lora_adapter (rank {rank}, alpha {alpha})", got, want, before)


# ------------------------------------------------------------------------------------------------------------
# PEFT / diffusers files


def test_separate_qkv_loras_on_fused_linears_match_diffusers_with_the_lora_applied():
    ref, ours = reference_and_ours(guidance_embed=True)
    ref, ours, x = in_float64(ref, ours)
    before = run(ours, x)
    g = torch.Generator().manual_seed(2)
    parts = {  # diffusers module -> (rank, alpha or None); some q/k/v parts are left out on purpose
        "transformer_blocks.0.attn.to_q": (2, 4.0), "transformer_blocks.0.attn.to_k": (3, None),
        "transformer_blocks.1.attn.add_v_proj": (2, 1.0), "single_transformer_blocks.1.attn.to_q": (4, 2.0),
        "single_transformer_blocks.1.attn.to_v": (2, None), "single_transformer_blocks.1.proj_mlp": (3, 6.0),
        "norm_out.linear": (2, None), "transformer_blocks.0.ff.net.0.proj": (2, 8.0)}
    sd = {}
    with torch.no_grad():
        for module, (rank, alpha) in parts.items():
            linear = ref.get_submodule(module)
            A, B = lora_pair(linear, rank, g)
            sd |= {f"transformer.{module}.lora_A.weight": A, f"transformer.{module}.lora_B.weight": B}
            if alpha is not None:
                sd[f"transformer.{module}.alpha"] = torch.tensor(alpha)
            linear.weight += (alpha or rank) / rank * B @ A  # diffusers with the LoRA merged in by hand
    fused = load_lora(ours, sd)
    assert sorted(fused) == ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0",
                             "double_blocks.1.txt_attn.qkv", "final_layer.adaLN_modulation.1",
                             "single_blocks.1.linear1"]
    assert ours.single_blocks[1].linear1.lora_A["default"].out_features == 4 + 2 + 3
    got, want = run_both(ref, ours, x)
    report("separate q/k/v/mlp LoRAs on fused linears (float64 base)", got, want, before)


def kohya_diffusers_name(key: str) -> str:
    """transformer.transformer_blocks.0.attn.to_out.0.lora_down.weight
    -> lora_transformer_transformer_blocks_0_attn_to_out_0.lora_down.weight (kohya's naming of diffusers
    modules)"""
    module, role = key.removeprefix("transformer.").split(".lora_")
    return f"lora_transformer_{module.replace('.', '_')}.lora_{role}"


def test_peft_name_variants_load_the_same():
    """transformer.-prefixed or not, lora_A/B or lora_down/up, peft's base_model.model. prefix, kohya's
    naming."""
    _, ours = reference_and_ours(guidance_embed=True)
    g = torch.Generator().manual_seed(3)
    A, B = lora_pair(torch.nn.Linear(32, 32), 4, g)
    standard = {"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": A,
                "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": B}
    x = inputs(ours.params)
    outputs = []
    down_up = {k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v for k, v in standard.items()}
    bare = {k.removeprefix("transformer."): v for k, v in standard.items()}
    peft_own = {"base_model.model." + k: v for k, v in bare.items()}
    variants = [standard, bare, down_up, peft_own, {kohya_diffusers_name(k): v for k, v in down_up.items()}]
    for sd in variants:
        model = copy.deepcopy(ours)
        load_lora(model, sd)
        outputs.append(run(model, x))
    assert not torch.allclose(outputs[0], run(ours, x))
    assert all(torch.equal(outputs[0], out) for out in outputs[1:])


def test_a_file_in_the_official_iclora_layout_matches_diffusers(tmp_path):
    """ali-vilab/In-Context-LoRA: `transformer.` prefix, lora_A/lora_B only, no alpha, rank 16, fp16, every
    Linear of every double (14) and single (6) block, modulation linears included."""
    ref, ours = reference_and_ours(guidance_embed=True)
    double = ["norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
              "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
              "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
    single = ["norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v"]
    modules = [f"transformer_blocks.{i}.{m}" for i in range(2) for m in double]
    modules += [f"single_transformer_blocks.{i}.{m}" for i in range(2) for m in single]
    g = torch.Generator().manual_seed(4)
    sd = {}
    for module in modules:
        A, B = lora_pair(ref.get_submodule(module), 16, g, torch.float16)
        sd |= {f"transformer.{module}.lora_A.weight": A, f"transformer.{module}.lora_B.weight": B * 0.5}
    save_file(sd, tmp_path / "film-storyboard.safetensors")
    x = inputs(ours.params)
    before = run(ours, x)
    assert len(sd) == 2 * 40  # the tiny analogue of 494 modules / 988 tensors
    covered = load_lora(ours, tmp_path / "film-storyboard.safetensors")
    wrapped = inject_lora(copy.deepcopy(ours), targets=DEFAULT_TARGETS, name="probe")
    assert sorted(covered) == sorted(wrapped)  # the release covers exactly our default targets
    load_into_diffusers(ref, tmp_path / "film-storyboard.safetensors")
    got, want = run_both(ref, ours, x)
    report("official IC-LoRA layout vs diffusers", got, want, before)


def test_the_full_size_iclora_layout_maps_494_modules_onto_304_linears():
    with torch.device("meta"):
        ref, ours = FluxTransformer2DModel(), Flux(preset("flux-dev"))
    sd = {}
    for name, module in ref.named_modules():
        if isinstance(module, torch.nn.Linear) and "transformer_blocks." in name:
            sd |= {f"transformer.{name}.lora_A.weight": torch.empty(16, module.in_features, device="meta"),
                   f"transformer.{name}.lora_B.weight": torch.empty(module.out_features, 16, device="meta")}
    assert len(sd) == 988
    covered = load_lora(ours, sd)
    assert len(covered) == 19 * 10 + 38 * 3
    assert ours.double_blocks[0].img_attn.qkv.lora_A["default"].out_features == 3 * 16  # to_q, to_k, to_v
    assert ours.single_blocks[0].linear1.lora_A["default"].out_features == 4 * 16       # ... and proj_mlp
    assert ours.single_blocks[0].linear2.lora_A["default"].out_features == 16


# ------------------------------------------------------------------------------------------------------------
# kohya, BFL-native and XLabs files (BFL module names, fused)


@pytest.mark.parametrize("style", ["kohya", "comfyui"])
def test_kohya_file_equals_merging_its_deltas_by_hand(style):
    _, ours = reference_and_ours(guidance_embed=True)
    g = torch.Generator().manual_seed(5)
    modules = {"double_blocks.0.img_attn.qkv": (4, 2.0), "double_blocks.1.txt_mlp.0": (2, None),
               "single_blocks.0.linear1": (3, 6.0), "single_blocks.1.linear2": (2, 1.0),
               "final_layer.adaLN_modulation.1": (2, 4.0), "double_blocks.0.img_mod.lin": (2, 2.0)}
    sd, deltas = {}, {}
    for module, (rank, alpha) in modules.items():
        A, B = lora_pair(ours.get_submodule(module), rank, g)
        key = f"lora_unet_{module.replace('.', '_')}" if style == "kohya" else f"diffusion_model.{module}"
        sd |= {f"{key}.lora_down.weight": A, f"{key}.lora_up.weight": B}
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(alpha)
        deltas[f"{module}.weight"] = (slice(None), (alpha or rank) / rank * B @ A)
    ours, x = in_float64(ours)
    before, want = run(ours, x), run(merged_by_hand(ours, deltas), x)
    load_lora(ours, sd)
    report(f"{style} file vs its deltas merged by hand (float64 base)", run(ours, x), want, before)


def test_bfl_native_file_equals_merging_its_deltas_by_hand():
    _, ours = reference_and_ours(guidance_embed=True)
    g = torch.Generator().manual_seed(6)
    sd, deltas = {}, {}
    for module in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1",
                   "final_layer.adaLN_modulation.1", "img_in"):
        A, B = lora_pair(ours.get_submodule(module), 3, g)
        bias = torch.randn(B.shape[0], generator=g) * 0.1
        sd |= {f"{module}.lora_A.weight": A, f"{module}.lora_B.weight": B, f"{module}.lora_B.bias": bias}
        deltas |= {f"{module}.weight": (slice(None), B @ A), f"{module}.bias": (slice(None), bias)}
    norm = "double_blocks.1.txt_attn.norm.query_norm.scale"
    sd[norm] = torch.randn(16, generator=g)  # a full replacement tensor, as in the Canny/Depth LoRAs
    ours, x = in_float64(ours)
    before, want = run(ours, x), merged_by_hand(ours, deltas)
    with torch.no_grad():
        want.get_parameter(norm).copy_(sd[norm])
    load_lora(ours, sd)
    report("BFL-native file vs its deltas merged by hand (float64 base)", run(ours, x), run(want, x), before)
    remove_lora(ours)
    assert torch.equal(ours.get_parameter(norm), sd[norm])  # documented: the replaced norm scale stays


def test_bfl_native_keys_may_carry_comfyui_diffusion_model_prefix():
    _, ours = reference_and_ours(guidance_embed=True)
    A, B = lora_pair(ours.get_submodule("single_blocks.0.linear1"), 3, torch.Generator().manual_seed(7))
    plain = {"single_blocks.0.linear1.lora_A.weight": A, "single_blocks.0.linear1.lora_B.weight": B}
    x, outputs = inputs(ours.params), []
    for sd in (plain, {"diffusion_model." + k: v for k, v in plain.items()}):
        model = copy.deepcopy(ours)
        assert load_lora(model, sd) == ["single_blocks.0.linear1"]
        outputs.append(run(model, x))
    assert not torch.allclose(outputs[0], run(ours, x)) and torch.equal(*outputs)


def test_fal_kontext_keys_load_as_the_same_bfl_native_keys():
    """fal's Kontext trainer writes `base_model.model.<BFL module>.lora_A/B.weight`. diffusers' converter for
    these files hard-codes FLUX.1's sizes (3072 wide, 19 + 38 blocks), so the reference here is our BFL-native
    loading, which test_bfl_native_file_equals_merging_its_deltas_by_hand checks against the deltas merged by
    hand."""
    _, ours = reference_and_ours(guidance_embed=True)
    g, plain = torch.Generator().manual_seed(9), {}
    for module in ("double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.2", "single_blocks.1.linear1"):
        A, B = lora_pair(ours.get_submodule(module), 4, g)
        plain |= {f"{module}.lora_A.weight": A, f"{module}.lora_B.weight": B}
    x, outputs = inputs(ours.params), []
    for sd in (plain, {"base_model.model." + k: v for k, v in plain.items()}):
        model = copy.deepcopy(ours)
        assert sorted(load_lora(model, sd)) == ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.2",
                                                "single_blocks.1.linear1"]
        outputs.append(run(model, x))
    assert not torch.allclose(outputs[0], run(ours, x)) and torch.equal(*outputs)


def test_xlabs_file_equals_merging_its_deltas_by_hand():
    _, ours = reference_and_ours(guidance_embed=True)
    g = torch.Generator().manual_seed(7)
    C = ours.params.hidden_size
    layers = {"double_blocks.0.processor.qkv_lora1": ("double_blocks.0.img_attn.qkv", slice(None), 3 * C),
              "double_blocks.0.processor.proj_lora1": ("double_blocks.0.img_attn.proj", slice(None), C),
              "double_blocks.1.processor.qkv_lora2": ("double_blocks.1.txt_attn.qkv", slice(None), 3 * C),
              "double_blocks.1.processor.proj_lora2": ("double_blocks.1.txt_attn.proj", slice(None), C),
              "single_blocks.1.processor.qkv_lora": ("single_blocks.1.linear1", slice(0, 3 * C), 3 * C),
              "single_blocks.0.processor.proj_lora": ("single_blocks.0.linear2", slice(None), C)}
    sd, deltas = {}, {}
    for key, (module, rows, out) in layers.items():
        A = torch.randn(4, ours.get_submodule(module).in_features, generator=g) * 0.1
        B = torch.randn(out, 4, generator=g) * 0.1
        sd |= {f"{key}.down.weight": A, f"{key}.up.weight": B}
        deltas[f"{module}.weight"] = (rows, B @ A)
    ours, x = in_float64(ours)
    before, want = run(ours, x), run(merged_by_hand(ours, deltas), x)
    load_lora(ours, sd)
    mlp_rows = ours.single_blocks[1].linear1.lora_B["default"].weight[3 * C :]
    assert mlp_rows.abs().max() == 0  # untouched
    report("XLabs file vs its deltas merged by hand (float64 base)", run(ours, x), want, before)


# ------------------------------------------------------------------------------------------------------------
# Errors


def test_a_file_in_no_known_layout_is_rejected_naming_its_keys():
    _, ours = reference_and_ours(guidance_embed=True)
    with pytest.raises(ValueError, match=r"tried PEFT/diffusers, kohya, BFL-native, XLabs"
                                         r".*unet\.conv_in\.weight"):
        load_lora(ours, {"unet.conv_in.weight": torch.zeros(4, 4), "unet.mid.lora.up": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="any known layout"):  # a full checkpoint is not a LoRA
        load_lora(ours, dict(ours.state_dict()))


@pytest.mark.parametrize("key", ["lora_unet_img_in.dora_scale", "lora_unet_img_in.diff"])
def test_dora_and_full_weight_diff_tensors_are_refused_as_such_naming_the_file_and_key(tmp_path, key):
    _, ours = reference_and_ours(guidance_embed=True)
    save_file({"lora_unet_img_in.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_img_in.lora_up.weight": torch.zeros(32, 4),
               key: torch.zeros(32, 1 if "dora" in key else 64)}, tmp_path / "dora.safetensors")
    with pytest.raises(ValueError, match=rf"dora\.safetensors: DoRA \(dora_scale\) / full-weight "
                                         rf"\.diff tensors are not supported \(e\.g\. {re.escape(key)}\)"):
        load_lora(ours, tmp_path / "dora.safetensors")


def test_a_lora_for_a_module_the_model_lacks_is_rejected_naming_it():
    _, ours = reference_and_ours(guidance_embed=True)
    sd = {"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 32),
          "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    with pytest.raises(ValueError, match=r"double_blocks\.7\.img_attn\.qkv, which this model does not have"):
        load_lora(ours, sd)
    _, schnell = reference_and_ours(guidance_embed=False)
    with pytest.raises(ValueError, match=r"guidance_in\.in_layer"):
        load_lora(schnell, {"lora_unet_guidance_in_in_layer.lora_down.weight": torch.zeros(4, 256),
                            "lora_unet_guidance_in_in_layer.lora_up.weight": torch.zeros(32, 4)})


def test_a_down_weight_without_its_up_weight_is_rejected():
    _, ours = reference_and_ours(guidance_embed=True)
    with pytest.raises(ValueError, match=r"lora_unet_img_in needs both .* "
                                         r"has only lora_unet_img_in\.lora_down"):
        load_lora(ours, {"lora_unet_img_in.lora_down.weight": torch.zeros(4, 64)})


def test_a_shape_mismatch_is_rejected_with_the_key_and_both_shapes():
    _, ours = reference_and_ours(guidance_embed=True)
    sd = {"lora_unet_single_blocks_0_linear2.lora_down.weight": torch.zeros(4, 64),
          "lora_unet_single_blocks_0_linear2.lora_up.weight": torch.zeros(32, 4)}
    with pytest.raises(ValueError, match=r"lora_unet_single_blocks_0_linear2\.lora_down\.weight has shape "
                                         r"\(4, 64\), but single_blocks\.0\.linear2 \(32×160\) "
                                         r"needs \(4, 160\)"):
        load_lora(ours, sd)
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())  # nothing was changed


def test_text_encoder_loras_are_skipped_with_a_warning():
    _, ours = reference_and_ours(guidance_embed=True)
    te = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 768),
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768)}
    unet = {"lora_unet_img_in.lora_down.weight": torch.zeros(4, 64),
            "lora_unet_img_in.lora_up.weight": torch.zeros(32, 4)}
    with pytest.warns(UserWarning, match="skipping 2 text-encoder LoRA tensors"):
        assert load_lora(ours, te | unet) == ["img_in"]
    with pytest.raises(ValueError, match="only text-encoder"), pytest.warns(UserWarning):
        load_lora(ours, te, name="te")


def test_loading_twice_under_one_name_is_an_error():
    _, ours = reference_and_ours(guidance_embed=True)
    sd = {"lora_unet_img_in.lora_down.weight": torch.zeros(4, 64),
          "lora_unet_img_in.lora_up.weight": torch.zeros(32, 4)}
    load_lora(ours, sd, name="a")
    with pytest.raises(ValueError, match="already has a LoRA adapter named 'a'"):
        load_lora(ours, sd, name="a")
    load_lora(ours, sd, name="b")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_lora_holding_nan_or_inf_is_refused_naming_the_file_and_key(tmp_path, bad):
    _, ours = reference_and_ours(guidance_embed=True)
    up = torch.zeros(32, 4)
    up[3, 1] = bad
    save_file({"lora_unet_img_in.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_img_in.lora_up.weight": up}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"bad\.safetensors: lora_unet_img_in\.lora_up\.weight "
                                         r"holds (NaN|inf)"):
        load_lora(ours, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"LoRA state dict: lora_unet_img_in\.lora_up\.weight holds"):
        load_lora(ours, load_file(tmp_path / "bad.safetensors"))
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())  # nothing was changed


def test_saving_an_adapter_holding_nan_is_refused_and_keeps_the_existing_file(tmp_path):
    _, ours = reference_and_ours(guidance_embed=True)
    path = tmp_path / "lora.safetensors"
    save_lora(trained(ours), path)
    before = path.read_bytes()
    with torch.no_grad():
        ours.double_blocks[0].img_attn.qkv.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"lora\.safetensors: not written: "
                                         r".*double_blocks\.0\.img_attn\.qkv B holds NaN"):
        save_lora(ours, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


def test_saving_a_b_that_overflows_once_scaled_by_alpha_over_r_is_refused(tmp_path):
    _, ours = reference_and_ours(guidance_embed=True)
    trained(ours, rank=4, alpha=8.0)
    with torch.no_grad():
        ours.double_blocks[0].img_attn.qkv.lora_B["default"].weight[0, 0] = 3e38  # finite; 6e38 once scaled
    with pytest.raises(ValueError, match=r"not written: .*double_blocks\.0\.img_attn\.qkv B holds inf"):
        save_lora(ours, tmp_path / "lora.safetensors")


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_a_diffusers_save_with_alpha_only_in_its_adapter_metadata_loads_at_the_right_scale(tmp_path, rslora):
    """Newer diffusers writes no .alpha keys: lora_alpha lives in the `lora_adapter_metadata` JSON."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref, ours = reference_and_ours(guidance_embed=True)
    x = inputs(ours.params)
    before = run(ours, x)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "proj_mlp", "ff.net.2"],
                        init_lora_weights=False, use_rslora=rslora)
    ref.add_adapter(config)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(ref),
                                   transformer_lora_adapter_metadata=config.to_dict())
    load_lora(ours, tmp_path / "pytorch_lora_weights.safetensors")
    got, want = run_both(*in_float64(ref, ours))  # separate q/k/v adapters vs our fused one: see in_float64
    report(f"diffusers save, alpha in metadata ({'rslora' if rslora else 'lora'})", got, want, before)
