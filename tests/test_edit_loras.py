"""LoRAs for the editing models, in the layouts they ship in, through sample.py, against diffusers' image
(within 1/255). On Fill: ACE++'s (kohya `lora_unet_` keys on every linear of the blocks, modulation included)
and LoRAs on Fill's 384-wide img_in. On Kontext: ai-toolkit's (PEFT/diffusers keys) and fal's
(`base_model.model.` + BFL names). The reference is the pipeline with `load_lora_weights` where diffusers
reads the file at the tiny model's sizes, else the file's deltas merged by hand into its weights (each test
says why). A LoRA for another input width is refused before any weight loads. The layouts' sources:
docs/lora-formats.md."""

import re

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline, FluxKontextPipeline
from safetensors import safe_open
from safetensors.torch import save_file

import sample
from iclora.lora_files import load_lora
from minflux.convert import transformer_table
from minflux.model import Flux, preset
from tests.test_fill_kontext_sampling import (  # noqa: F401 (no_weights: a fixture, used through usefixtures)
    assert_same,
    fill_reference,
    kontext_reference,
    mask_image,
    no_weights,
    ours,
    picture,
    save,
)
from tests.tiny_repo import write_tiny_repo

# ACE++'s LoRA targets (train_config/ace_plus_lora.yaml's TARGET_MODULES), as BFL weight names
ACE_TARGETS = (r"double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02]|mod\.lin)\.weight",
               r"single_blocks\.\d+\.(linear1|linear2|modulation\.lin)\.weight")


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """A tiny Fill and a tiny Kontext repo, each in both layouts (ours reads the BFL file, diffusers the
    folders: the same weights)."""
    root = tmp_path_factory.mktemp("edit-lora-repos")
    return {variant: write_tiny_repo(root / variant, layout="both", seed=11, variant=variant)
            for variant in ("fill", "kontext")}


def bfl_shapes(repo) -> dict[str, tuple[int, int]]:
    """BFL linear -> (out, in) features, read from the repo's BFL transformer file."""
    (path,) = [p for p in repo.glob("flux1-*.safetensors")]
    shapes = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            if key.endswith(".weight") and len(shape) == 2:
                shapes[key.removesuffix(".weight")] = tuple(shape)
    return shapes


def random_pair(shape, rank: int, g: torch.Generator, dtype=torch.float32):
    """A random LoRA (A (r, in), B (out, r)) whose delta B·A is about half a tiny weight's size."""
    out_features, in_features = shape
    A = torch.randn(rank, in_features, generator=g) / in_features ** 0.5
    B = torch.randn(out_features, rank, generator=g) * 0.5 / rank ** 0.5
    return A.to(dtype), B.to(dtype)


def kohya_lora(path, shapes: dict, modules, rank: int, alpha: float, seed: int, dtype=torch.bfloat16):
    """A kohya file as ACE++'s trainer converts its LoRAs for ComfyUI (modules/checkpoint.py):
    `lora_unet_<BFL name, dots as underscores>.lora_down.weight` / `.lora_up.weight` and a one-number
    `.alpha` in the weights' dtype."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for module in modules:
        A, B = random_pair(shapes[module], rank, g, dtype)
        key = "lora_unet_" + module.replace(".", "_")
        sd |= {f"{key}.lora_down.weight": A, f"{key}.lora_up.weight": B,
               f"{key}.alpha": torch.tensor(alpha, dtype=dtype)}
    save_file(sd, path)
    return str(path)


def ace_modules(shapes: dict) -> list[str]:
    return [m for m in shapes if any(re.fullmatch(t, m + ".weight") for t in ACE_TARGETS)]


def fill_inputs(tmp_path):
    image = picture(64, 48, seed=1)
    mask = mask_image(64, 48, (16, 8, 55, 39))
    return image, mask, ["--image", save(image, tmp_path / "i.png"), "--mask", save(mask, tmp_path / "m.png")]


def fill_with_lora(repo, lora, image, mask) -> np.ndarray:
    pipe = FluxFillPipeline.from_pretrained(repo, dtype=torch.float32)
    pipe.load_lora_weights(lora)
    return fill_reference(pipe, image, mask, 48, 64)


def tiny_table() -> dict:
    """minflux/convert.py's diffusers -> BFL table at the tiny repos' sizes."""
    p = preset("tiny")
    return transformer_table(p.depth, p.depth_single_blocks, p.hidden_size, int(p.hidden_size * p.mlp_ratio))


def peft_pair(name: str, A, B) -> dict:
    """A and B of a diffusers module under PEFT's keys."""
    return {f"transformer.{name}.lora_A.weight": A, f"transformer.{name}.lora_B.weight": B}


def merged_by_hand(pipe, lora, bfl_names):
    """The pipeline with the file's deltas added to its transformer's weights, W + (alpha / r)·B·A, each BFL
    linear's delta cut into the rows of the diffusers linears it fills (minflux/convert.py's table);
    bfl_names maps each module name of the file (its keys less the suffix) to a BFL linear."""
    table = tiny_table()
    with safe_open(lora, "pt") as f:
        sd = {k: f.get_tensor(k).double() for k in f.keys()}
    deltas = {}
    for key in sd:
        for down, up in ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight")):
            if key.endswith(down):
                module = key.removesuffix(down)
                A, B = sd[key], sd[module + up]
                alpha = float(sd[module + ".alpha"]) if module + ".alpha" in sd else A.shape[0]
                deltas[bfl_names[module]] = alpha / A.shape[0] * B @ A
    params = dict(pipe.transformer.named_parameters())
    with torch.no_grad():
        for diffusers_name, (bfl, rows) in table.items():
            if bfl in deltas and not diffusers_name.endswith(".weight"):
                delta = deltas[bfl] if rows is None else deltas[bfl][rows]
                params[diffusers_name + ".weight"] += delta.float()
    return pipe


def assert_lora_matters(got: np.ndarray, without: np.ndarray):
    """The LoRA moves the image: a parity test of a LoRA that changes nothing would prove nothing."""
    assert np.abs(got - without).max() > 20


def test_an_ace_plus_lora_gives_fill_pipelines_image_with_its_deltas_merged_by_hand(repos, tmp_path):
    """Every linear ACE++ trains, linear1 included, which diffusers' kohya reader cuts at FLUX.1's own sizes
    (3072·3 + 12288 rows) and so cannot read at a tiny model's."""
    shapes = bfl_shapes(repos["fill"])
    modules = ace_modules(shapes)
    assert len(modules) == 2 * 10 + 2 * 3  # per stream qkv, proj, mlp.0/2, mod.lin; linear1/2, modulation
    lora = kohya_lora(tmp_path / "comfyui_portrait_lora4.safetensors", shapes, modules, rank=4, alpha=4.0,
                      seed=1)
    image, mask, flags = fill_inputs(tmp_path)
    pipe = FluxFillPipeline.from_pretrained(repos["fill"], dtype=torch.float32)
    kohya_names = {"lora_unet_" + m.replace(".", "_"): m for m in modules}
    want = fill_reference(merged_by_hand(pipe, lora, kohya_names), image, mask, 48, 64)
    got = ours(repos["fill"], tmp_path, *flags, "--lora", lora)
    assert_same("ACE++ kohya LoRA on Fill vs FluxFillPipeline with its deltas merged", got[0], want)
    assert_lora_matters(got[0], ours(repos["fill"], tmp_path / "base", *flags)[0])


def test_an_ace_plus_lora_gives_fill_pipelines_image_with_load_lora_weights(repos, tmp_path):
    """As ACE++'s own diffusers inference loads its files (inference/ace_plus_diffusers.py), modulation
    included; without linear1, which diffusers' reader cannot cut at a tiny model's sizes (above)."""
    shapes = bfl_shapes(repos["fill"])
    modules = [m for m in ace_modules(shapes) if not m.endswith("linear1")]
    lora = kohya_lora(tmp_path / "comfyui_subject_lora4.safetensors", shapes, modules, rank=4, alpha=4.0,
                      seed=3)
    image, mask, flags = fill_inputs(tmp_path)
    want = fill_with_lora(repos["fill"], lora, image, mask)
    got = ours(repos["fill"], tmp_path, *flags, "--lora", lora)
    assert_same("ACE++ kohya LoRA on Fill vs FluxFillPipeline.load_lora_weights", got[0], want)
    assert_lora_matters(got[0], ours(repos["fill"], tmp_path / "base", *flags)[0])


@pytest.mark.slow
def test_a_kohya_lora_on_fills_384_wide_img_in_gives_fill_pipelines_image_with_its_deltas_merged(repos,
                                                                                                  tmp_path):
    """diffusers 0.42's kohya reader names img_in's LoRA `x_embedder`, without the `transformer.` prefix its
    loader then selects by, so it drops it silently: the reference is the delta merged by hand."""
    shapes = bfl_shapes(repos["fill"])
    assert shapes["img_in"][1] == 384
    modules = ["img_in", "single_blocks.0.modulation.lin"]
    lora = kohya_lora(tmp_path / "fill-img-in.safetensors", shapes, modules, rank=2, alpha=1.0, seed=2,
                      dtype=torch.float32)
    image, mask, flags = fill_inputs(tmp_path)
    pipe = FluxFillPipeline.from_pretrained(repos["fill"], dtype=torch.float32)
    kohya_names = {"lora_unet_" + m.replace(".", "_"): m for m in modules}
    want = fill_reference(merged_by_hand(pipe, lora, kohya_names), image, mask, 48, 64)
    got = ours(repos["fill"], tmp_path, *flags, "--lora", lora)
    assert_same("kohya img_in LoRA on Fill vs FluxFillPipeline with its deltas merged", got[0], want)
    assert_lora_matters(got[0], ours(repos["fill"], tmp_path / "base", *flags)[0])


def test_a_peft_lora_on_fills_384_wide_x_embedder_gives_fill_pipelines_image(repos, tmp_path):
    shapes = bfl_shapes(repos["fill"])
    g = torch.Generator().manual_seed(4)
    sd = {}
    for diffusers_name, bfl in (("x_embedder", "img_in"), ("single_transformer_blocks.1.proj_out",
                                                          "single_blocks.1.linear2")):
        A, B = random_pair(shapes[bfl], 2, g)
        sd |= peft_pair(diffusers_name, A, B)
    lora = str(tmp_path / "fill-x-embedder.safetensors")
    save_file(sd, lora)
    image, mask, flags = fill_inputs(tmp_path)
    want = fill_with_lora(repos["fill"], lora, image, mask)
    got = ours(repos["fill"], tmp_path, *flags, "--lora", lora)
    assert_same("PEFT x_embedder LoRA on Fill vs FluxFillPipeline.load_lora_weights", got[0], want)
    assert_lora_matters(got[0], ours(repos["fill"], tmp_path / "base", *flags)[0])


# ------------------------------------------------------------------------------------------------------------
# Kontext: ai-toolkit's and fal's LoRAs


def block_linears(repo) -> dict[str, tuple[str, object]]:
    """diffusers linear of the blocks -> (BFL linear, rows), every one ai-toolkit trains by default
    (transformer_only: the modules named `*transformer_blocks*`)."""
    table = tiny_table()
    return {d: target for d, target in table.items() if "transformer_blocks." in d and ".norm_" not in d}


def kontext_inputs(tmp_path):
    context = picture(40, 56, seed=4)  # (W, H), its own size floored to 16: 32×48
    return context, ["--image", save(context, tmp_path / "c.png"), "--context-size", "own", "--width", "64",
                     "--height", "48"]


def test_an_ai_toolkit_kontext_lora_gives_kontext_pipelines_image(repos, tmp_path):
    """ai-toolkit saves Kontext LoRAs as PEFT: `transformer.<diffusers module>.lora_A/B.weight`, no alpha (it
    sets alpha = rank), float16, on every linear of the blocks, modulation included."""
    shapes = bfl_shapes(repos["kontext"])
    g = torch.Generator().manual_seed(5)
    sd = {}
    for diffusers_name, (bfl, rows) in block_linears(repos["kontext"]).items():
        out_features = shapes[bfl][0] if rows is None else len(torch.arange(shapes[bfl][0])[rows])
        A, B = random_pair((out_features, shapes[bfl][1]), 4, g, torch.float16)
        sd |= peft_pair(diffusers_name, A, B)
    lora = str(tmp_path / "my_first_flux_kontext_lora_v1.safetensors")
    save_file(sd, lora)
    context, flags = kontext_inputs(tmp_path)
    pipe = FluxKontextPipeline.from_pretrained(repos["kontext"], dtype=torch.float32)
    pipe.load_lora_weights(lora)
    want = kontext_reference(pipe, context, 48, 64, auto_resize=False)
    got = ours(repos["kontext"], tmp_path, *flags, "--lora", lora)
    assert_same("ai-toolkit Kontext LoRA vs FluxKontextPipeline.load_lora_weights", got[0], want)
    assert_lora_matters(got[0], ours(repos["kontext"], tmp_path / "base", *flags)[0])


@pytest.mark.slow
def test_a_fal_kontext_lora_gives_kontext_pipelines_image_with_its_deltas_merged_by_hand(repos, tmp_path):
    """fal's Kontext trainer writes `base_model.model.<BFL module>.lora_A/B.weight`, no alpha, on every linear
    of the blocks and final_layer.linear. diffusers reads that layout (its `_convert_fal_kontext_lora_to_
    diffusers`) only at FLUX.1's own sizes (19 + 38 blocks, 3072 wide): the reference is the deltas merged by
    hand."""
    shapes = bfl_shapes(repos["kontext"])
    modules = sorted({bfl for bfl, _ in block_linears(repos["kontext"]).values()}) + ["final_layer.linear"]
    g = torch.Generator().manual_seed(6)
    sd = {}
    for module in modules:
        A, B = random_pair(shapes[module], 4, g, torch.bfloat16)
        sd |= {f"base_model.model.{module}.lora_A.weight": A, f"base_model.model.{module}.lora_B.weight": B}
    lora = str(tmp_path / "plushie-kontext-dev-lora.safetensors")
    save_file(sd, lora)
    context, flags = kontext_inputs(tmp_path)
    pipe = FluxKontextPipeline.from_pretrained(repos["kontext"], dtype=torch.float32)
    fal_names = {f"base_model.model.{m}": m for m in modules}
    want = kontext_reference(merged_by_hand(pipe, lora, fal_names), context, 48, 64, auto_resize=False)
    got = ours(repos["kontext"], tmp_path, *flags, "--lora", lora)
    assert_same("fal Kontext LoRA vs FluxKontextPipeline with its deltas merged", got[0], want)
    assert_lora_matters(got[0], ours(repos["kontext"], tmp_path / "base", *flags)[0])


# ------------------------------------------------------------------------------------------------------------
# A LoRA for another input width


@pytest.mark.usefixtures("no_weights")
@pytest.mark.parametrize("model,width,error", [
    ("toy", 384, r"lora_unet_img_in\.lora_down\.weight takes 384 input channels, a LoRA for FLUX\.1 Fill; "
                 r"this model's img_in takes 64 \(FLUX\.1 dev, schnell or Kontext\)"),
    ("fill", 64, r"lora_unet_img_in\.lora_down\.weight takes 64 input channels, a LoRA for FLUX\.1 dev, "
                 r"schnell or Kontext; this model's img_in takes 384 \(FLUX\.1 Fill\)"),
])
def test_a_lora_for_another_input_width_is_refused_before_any_weight_loads(repos, tmp_path, model, width,
                                                                          error):
    lora = kohya_lora(tmp_path / "other.safetensors", {"img_in": (32, width)}, ["img_in"], rank=2, alpha=2.0,
                      seed=7)
    flags = fill_inputs(tmp_path)[2] if model == "fill" else []
    with pytest.raises(ValueError, match=r"other\.safetensors: " + error):
        sample.main(["--model", str(repos.get(model, model)), "--prompt", "x", "--lora", lora,
                     "--out", str(tmp_path / "o.png"), *flags])


def test_load_lora_refuses_a_fill_lora_on_a_dev_model_naming_both_widths():
    """train.py --init-lora and any other caller of load_lora get the same message."""
    sd = {"transformer.x_embedder.lora_A.weight": torch.zeros(2, 384),
          "transformer.x_embedder.lora_B.weight": torch.zeros(32, 2)}
    with pytest.raises(ValueError, match=r"fill\.safetensors: transformer\.x_embedder\.lora_A\.weight takes "
                                         r"384 input channels, a LoRA for FLUX\.1 Fill; this model's img_in "
                                         r"takes 64"):
        load_lora(Flux(preset("tiny")), sd, source="fill.safetensors")
