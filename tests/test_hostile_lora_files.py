"""LoRA files crafted to hurt: a catastrophic or malformed alpha_pattern, tensors of a dtype no LoRA has,
rank 0, an alpha of many numbers, broken adapter metadata and values whose delta overflows are each refused
with a ValueError naming the file (and the key or pattern), when `sample.py` reads its --lora files: before
any weight loads and before anything is written."""

import json
import signal

import pytest
import torch
from safetensors.torch import save_file

import sample
from iclora.lora import LoRALinear
from iclora.lora_files import load_lora, read_lora_file
from minflux.model import Flux, preset

MODULE = "transformer.transformer_blocks.0.attn.to_q"


def peft_file(path, metadata: dict | None = None, A=None, B=None, **extra):
    """A one-module LoRA in the PEFT/diffusers layout (rank 4, 64 -> 32), written to path; `metadata` becomes
    its `lora_adapter_metadata` (a dict as JSON, a str as it is)."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"{MODULE}.lora_A.weight": torch.randn(4, 64, generator=g) * 0.1 if A is None else A,
               f"{MODULE}.lora_B.weight": torch.randn(32, 4, generator=g) * 0.1 if B is None else B,
               **extra}
    meta = {"format": "pt"}
    if metadata is not None:
        meta["lora_adapter_metadata"] = metadata if isinstance(metadata, str) else json.dumps(metadata)
    save_file(tensors, path, metadata=meta)
    return path


def refused_by_sample(tmp_path, lora) -> str:
    """sample.py's message for --lora `lora`: raised before any weight loads (loading the pipeline fails the
    test) and before any output is written."""
    def no_loading(*args, **kwargs):
        raise AssertionError("sample.py loaded the model before refusing the LoRA")

    out = tmp_path / "out.png"
    with pytest.MonkeyPatch.context() as patch, pytest.raises(ValueError) as caught:
        patch.setattr(sample, "load_pipeline", no_loading)
        sample.main(["--model", "toy", "--lora", str(lora), "--prompt", "x", "--steps", "2",
                     "--out", str(out)])
    assert not out.exists()
    return str(caught.value)


class TooSlow(Exception):
    pass


def within_seconds(seconds: int, call):
    """call(), interrupted by a TooSlow if it runs longer than `seconds` (re's matching loop sees the
    alarm)."""
    def stop(signum, frame):
        raise TooSlow(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        return call()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------------------
# alpha_pattern: module names, never run as regexes


def test_a_catastrophic_alpha_pattern_is_refused_at_once_naming_the_file_and_the_pattern(tmp_path):
    """`(a+)+b` against a module name of 40 a's takes re hours (2^40 backtracking paths)."""
    g = torch.Generator().manual_seed(0)
    module = "transformer." + "a" * 40
    path = tmp_path / "redos.safetensors"
    config = {"lora_alpha": 4, "alpha_pattern": {"(a+)+b": 8}}
    save_file({f"{module}.lora_A.weight": torch.randn(4, 64, generator=g),
               f"{module}.lora_B.weight": torch.randn(32, 4, generator=g)}, path,
              metadata={"lora_adapter_metadata": json.dumps(config)})
    message = within_seconds(5, lambda: refused_by_sample(tmp_path, path))
    assert "redos.safetensors: lora_adapter_metadata: alpha_pattern key '(a+)+b'" in message
    assert "not run as patterns" in message


def test_a_malformed_alpha_pattern_is_refused_naming_the_file_and_the_pattern_not_a_re_error(tmp_path):
    path = peft_file(tmp_path / "paren.safetensors", {"lora_alpha": 4, "alpha_pattern": {"(": 8}})
    message = refused_by_sample(tmp_path, path)
    assert "paren.safetensors: lora_adapter_metadata: alpha_pattern key '('" in message


def test_alpha_pattern_keys_match_a_module_name_or_its_dotted_end_literally(tmp_path):
    """PEFT's rule, `(.*\\.)?<key>$`, read with the key as a name: the whole name or its last dotted parts, an
    escaped `\\.` being a dot. (A guard of the semantics kept: it passes before the change as well.)"""
    patterns = {"0.attn.to_q": 8, r"attn\.to_k": 2, "to_v": 1, "n.to_out.0": 3}
    config = {"lora_alpha": 4, "alpha_pattern": patterns}
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_q",
             "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
             "transformer_blocks.0.attn.to_out.0"]
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name in names:
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(4, 64, generator=g) * 0.1
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(32, 4, generator=g) * 0.1
    metadata = {"lora_adapter_metadata": json.dumps(config)}
    save_file(tensors, tmp_path / "patterns.safetensors", metadata=metadata)
    sd = read_lora_file(tmp_path / "patterns.safetensors")
    assert [float(sd[f"transformer.{name}.alpha"]) for name in names] == [8, 4, 2, 1, 4]


# ------------------------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64,
                                   torch.float8_e4m3fn], ids=str)
def test_a_tensor_of_a_dtype_no_lora_has_is_refused_naming_the_file_and_key(tmp_path, dtype):
    path = peft_file(tmp_path / "dtype.safetensors", B=torch.ones(32, 4).to(dtype))
    message = refused_by_sample(tmp_path, path)
    name = str(dtype).removeprefix("torch.")
    assert f"dtype.safetensors: {MODULE}.lora_B.weight is {name}; " in message
    assert "float16, bfloat16 or float32" in message


def test_a_float64_value_beyond_float32s_range_is_refused_naming_the_key(tmp_path):
    """float64 tensors are read as float32 (as every adapter is): a value float32 cannot hold would become
    inf."""
    B = torch.zeros(32, 4, dtype=torch.float64)
    B[0, 0] = 1e300
    path = peft_file(tmp_path / "wide.safetensors", B=B, A=torch.zeros(4, 64, dtype=torch.float64))
    message = refused_by_sample(tmp_path, path)
    key = f"{MODULE}.lora_B.weight"
    assert f"wide.safetensors: {key} is float64 and holds values beyond float32's range" in message


# ------------------------------------------------------------------------------------------------------------
# ranks, alphas and adapter metadata


def test_a_lora_of_rank_0_is_refused_naming_the_file_and_key(tmp_path):
    path = peft_file(tmp_path / "rank0.safetensors", A=torch.zeros(0, 64), B=torch.zeros(32, 0))
    message = refused_by_sample(tmp_path, path)
    assert f"rank0.safetensors: {MODULE}.lora_A.weight has rank 0" in message


def test_an_alpha_of_several_numbers_is_refused_naming_the_file_and_key(tmp_path):
    path = peft_file(tmp_path / "alphas.safetensors", **{f"{MODULE}.alpha": torch.tensor([4.0, 8.0])})
    message = refused_by_sample(tmp_path, path)
    assert f"alphas.safetensors: {MODULE}.alpha has shape (2,), but an alpha is one number" in message


@pytest.mark.parametrize(("metadata", "says"), [
    ("[1, 2]", "should be a JSON object"),
    ("{lora_alpha: 8", "is not JSON"),
    ('{"lora_alpha": "eight"}', "lora_alpha is 'eight', not a finite number"),
    ('{"lora_alpha": NaN}', "lora_alpha is nan, not a finite number"),
    ('{"lora_alpha": 4, "alpha_pattern": ["to_q"]}', "alpha_pattern should be a JSON object"),
    ('{"lora_alpha": 4, "alpha_pattern": {"to_q": null}}', "alpha_pattern['to_q'] is None, not a finite"),
    ('{"lora_alpha": 4, "use_rslora": "false"}', "use_rslora is 'false', not true or false"),
], ids=["list", "not-json", "alpha-text", "alpha-nan", "pattern-list", "pattern-null", "rslora-text"])
def test_malformed_adapter_metadata_is_refused_naming_the_file_and_the_entry(tmp_path, metadata, says):
    path = peft_file(tmp_path / "meta.safetensors", metadata)
    message = refused_by_sample(tmp_path, path)
    assert f"{tmp_path / 'meta.safetensors'}: lora_adapter_metadata" in message
    assert says in message


# ------------------------------------------------------------------------------------------------------------
# deltas beyond what a run can hold


def test_a_b_scaled_by_1e30_is_refused_like_nan_naming_the_file_and_keys(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = peft_file(tmp_path / "huge.safetensors", B=torch.randn(32, 4, generator=g) * 1e30)
    message = refused_by_sample(tmp_path, path)
    keys = f"{MODULE}.lora_B.weight (with {MODULE}.lora_A.weight"
    assert f"huge.safetensors: {keys}, alpha 4, rank 4)" in message
    assert "only makes noise" in message


def test_an_alpha_key_of_3e38_is_refused_naming_the_file_and_keys(tmp_path):
    path = peft_file(tmp_path / "alpha.safetensors", **{f"{MODULE}.alpha": torch.tensor(3e38)})
    message = refused_by_sample(tmp_path, path)
    assert f"alpha.safetensors: {MODULE}.lora_B.weight (with {MODULE}.lora_A.weight, alpha 3e+38" in message


def test_a_lora_alpha_of_3e38_in_the_adapter_metadata_is_refused_naming_the_file_and_keys(tmp_path):
    path = peft_file(tmp_path / "meta-alpha.safetensors", {"lora_alpha": 3e38})
    message = refused_by_sample(tmp_path, path)
    keys = f"{MODULE}.lora_B.weight (with {MODULE}.lora_A.weight"
    assert f"meta-alpha.safetensors: {keys}, alpha 3e+38" in message


def test_a_huge_alpha_over_a_zero_b_is_refused_too_its_hidden_values_overflow(tmp_path):
    """scale·A·x is computed (in the run's dtype) before B: with B = 0 it is still inf, and 0·inf is NaN."""
    alpha = {f"{MODULE}.alpha": torch.tensor(1e38)}
    path = peft_file(tmp_path / "hidden.safetensors", B=torch.zeros(32, 4), **alpha)
    message = refused_by_sample(tmp_path, path)
    assert f"hidden.safetensors: {MODULE}.lora_B.weight (with {MODULE}.lora_A.weight, alpha 1e+38" in message


def test_a_state_dict_with_an_overflowing_delta_is_refused_before_anything_is_injected():
    model = Flux(preset("tiny")).eval()
    sd = {"lora_unet_img_in.lora_down.weight": torch.full((4, 64), 1e20),
          "lora_unet_img_in.lora_up.weight": torch.full((32, 4), 1e20)}
    with pytest.raises(ValueError, match=r"LoRA state dict: lora_unet_img_in\.lora_up\.weight \(with "
                                         r"lora_unet_img_in\.lora_down\.weight, alpha 4, rank 4\)"):
        load_lora(model, sd)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
