"""Which FLUX.1 a repo or file holds (minflux/variants.py), told from headers and json files only: Fill by
img_in's 384 channels, Kontext by model_index.json's class or a name, --variant for a bare file; the ACE++
full model and Canny/Depth refused by name. And a Fill transformer in fp8 files (plain, ComfyUI scaled)
loads, and is quantized, like dev's."""

import json

import pytest
import torch
from safetensors.torch import save_file

from minflux import loading
from minflux.hub import Repo
from minflux.model import Flux, preset
from minflux.quantize import FP8Linear, quantize_fp8
from minflux.variants import DEFAULTS, detect_variant
from tests.test_quantize import file_values, write_fp8
from tests.test_transformer import inputs


def header_only_repo(folder, channels=64, name="flux1-dev.safetensors", index_class="FluxPipeline",
                     prefix=""):
    """A folder holding a transformer file with nothing but an img_in of `channels` inputs, and a
    model_index.json: all that detect_variant reads."""
    folder.mkdir(parents=True, exist_ok=True)
    if name:
        save_file({prefix + "img_in.weight": torch.zeros(8, channels)}, folder / name)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": index_class}))
    return Repo(str(folder))


@pytest.mark.parametrize("kwargs,want", [
    (dict(), "dev"),
    (dict(channels=384), "fill"),
    (dict(channels=384, name="flux1-fill-dev.safetensors"), "fill"),
    (dict(channels=384, prefix="model.diffusion_model."), "fill"),  # a ComfyUI checkpoint
    (dict(index_class="FluxKontextPipeline"), "kontext"),
    (dict(name="flux1-kontext-dev.safetensors"), "kontext"),
])
def test_the_variant_is_told_from_the_weights_the_model_index_or_the_name(tmp_path, kwargs, want):
    assert detect_variant(header_only_repo(tmp_path / "repo", **kwargs)) == want


def test_a_diffusers_folder_tells_fill_by_its_config(tmp_path):
    header_only_repo(tmp_path / "repo", name=None)
    (tmp_path / "repo" / "transformer").mkdir()
    (tmp_path / "repo" / "transformer" / "config.json").write_text(json.dumps({"in_channels": 384}))
    assert detect_variant(Repo(str(tmp_path / "repo"))) == "fill"


def test_a_transformer_file_named_kontext_makes_a_dev_repo_kontext(tmp_path):
    repo = header_only_repo(tmp_path / "repo")
    save_file({"img_in.weight": torch.zeros(8, 64)}, tmp_path / "my-flux1-kontext-dev-fp8.safetensors")
    assert detect_variant(repo, tmp_path / "my-flux1-kontext-dev-fp8.safetensors") == "kontext"


def test_variant_flag_names_a_bare_file_and_must_agree_with_its_weights(tmp_path):
    dev = header_only_repo(tmp_path / "dev")
    fill = header_only_repo(tmp_path / "fill", channels=384)
    assert detect_variant(dev, given="kontext") == "kontext"
    with pytest.raises(ValueError, match=r"--variant fill does not match .*takes 64 input channels"):
        detect_variant(dev, given="fill")
    with pytest.raises(ValueError, match=r"--variant dev does not match .*takes 384 input channels"):
        detect_variant(fill, given="dev")


@pytest.mark.parametrize("channels,named", [(448, "ACE\\+\\+ full fine-tune"), (128, "Canny or Depth"),
                                            (96, "expected 64 .* or 384 \\(Fill\\)")])
def test_other_input_widths_are_refused_naming_what_they_look_like(tmp_path, channels, named):
    with pytest.raises(ValueError, match=rf"{channels} input channels.*{named}"):
        detect_variant(header_only_repo(tmp_path / "repo", channels=channels))


def test_each_variant_has_its_sampling_defaults():
    assert DEFAULTS["fill"] == dict(guidance=30.0, steps=50)
    assert DEFAULTS["kontext"] == dict(guidance=2.5, steps=28)


def tiny_fill(seed=0) -> Flux:
    torch.manual_seed(seed)
    flow = Flux(preset("tiny", in_channels=384))
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0, 0.1)
    return flow.eval()


@pytest.mark.parametrize("scaled", [None, "rows"])
def test_a_fill_transformer_in_fp8_loads_with_the_files_values(tmp_path, scaled):
    sd = tiny_fill().state_dict()
    path = write_fp8(tmp_path / "flux1-fill-dev-fp8.safetensors", sd, torch.float8_e4m3fn, scaled)
    (tmp_path / "repo" / "transformer").mkdir(parents=True)  # the RoPE split is read from the config
    config = {"axes_dims_rope": list(preset("tiny").axes_dim)}
    (tmp_path / "repo" / "transformer" / "config.json").write_text(json.dumps(config))
    flow = loading.load_flow(header_only_repo(tmp_path / "repo"), torch.float32, path)
    assert flow.img_in.in_features == 384 and flow.params.out_channels == 64
    assert any(isinstance(m, FP8Linear) for m in flow.modules())
    want = Flux(preset("tiny", in_channels=384))
    want.load_state_dict(file_values(path))
    x = {**inputs(flow.params, batch=1), "timesteps": torch.tensor([0.9]), "guidance": torch.tensor([30.0])}
    with torch.no_grad():
        assert (flow(**x) - want.eval()(**x)).abs().max() < 1e-5


def test_quantizing_a_fill_transformer_keeps_its_384_wide_input_and_runs():
    flow = quantize_fp8(tiny_fill())
    assert isinstance(flow.img_in, torch.nn.Linear) and flow.img_in.in_features == 384
    x = {**inputs(flow.params, batch=1), "timesteps": torch.tensor([0.9]), "guidance": torch.tensor([30.0])}
    with torch.no_grad():
        assert flow(**x).shape[-1] == 64
