"""toy/score.py on the toy Fill and toy Kontext bases (issue #23): ref mode runs and scores, the left panel
given as each base takes it; text mode, which has no reference, is null; a LoRA of another base is refused."""

import pytest
import torch
from safetensors.torch import save_file

from toy import score


@pytest.mark.parametrize("model", ["toy-fill", "toy-kontext"])
def test_score_gives_ref_mode_numbers_and_no_text_mode_on_a_fill_or_kontext_base(model):
    results = score.main(["--model", model, "--task", "blind_recolour", "--count", "2", "--steps", "2"])
    assert results["base"]["text"] is None
    assert set(results["base"]["ref"]) == {"caption_right", "rule"}
    for value in results["base"]["ref"].values():
        assert 0.0 <= value <= 1.0


def test_kontext_ref_mode_sets_show_the_given_render_on_the_left():
    pipe = score.load_pipeline("toy-kontext")
    scenes = score.held_out_scenes(2, seed=1000)
    images = score.edit_sets(pipe, scenes, 64, 1, seed=0, task="blind_recolour")
    for image, scene in zip(images, scenes, strict=True):
        assert image.size == (128, 64)
        assert image.crop((0, 0, 64, 64)).tobytes() == score.render(scene, 64).tobytes()


def test_score_refuses_a_lora_recorded_for_another_base_naming_both(tmp_path):
    path = tmp_path / "dev.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(1, 1)}, path, metadata={"base_variant": "dev"})
    with pytest.raises(ValueError, match=r"dev\.safetensors is a LoRA for FLUX.1 dev .* FLUX.1 fill"):
        score.main(["--model", "toy-fill", "--lora", str(path), "--count", "1", "--steps", "1"])
