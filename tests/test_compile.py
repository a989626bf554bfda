"""Regional compilation (`minflux/compile.py`, `--compile`) changes how the blocks run, never what they
compute: the compiled tiny model equals the eager one within float32 rounding, with fp8 layers and block swap,
and in a LoRA training step with gradient checkpointing; each block class compiles into whole graphs (no graph
break)."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

import sample
import train
from iclora.lora import LoRALinear, lora_parameters
from minflux.block_swap import BlockSwap
from minflux.compile import compile_blocks
from minflux.model import Flux, preset
from minflux.quantize import FP8Linear, quantize_fp8
from tests.test_block_swap import with_lora
from tests.test_transformer import inputs


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from nothing: Dynamo remembers the shapes a block's code saw in earlier tests (the
    bench's in-process compile too) and would otherwise compile a dynamic-shape graph more."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def tiny_flow() -> Flux:
    """The tiny preset with its default (nn.Linear) init, frozen as loading leaves it."""
    torch.manual_seed(0)
    return Flux(preset("tiny")).eval().requires_grad_(False)


def run(flow: Flux) -> torch.Tensor:
    x = inputs(flow.params)  # a batch of 2 at two times
    return flow(**x | {"img_ids": x["img_ids"].expand(2, -1, -1), "txt_ids": x["txt_ids"].expand(2, -1, -1)})


def compiled(flow: Flux, swap: int = 0) -> Flux:
    """A copy of `flow` with the last `swap` blocks swapped (BlockSwap), then its blocks compiled."""
    flow = copy.deepcopy(flow)
    BlockSwap(flow, swap, "cpu")
    return compile_blocks(flow)


def report(name: str, got: torch.Tensor, want: torch.Tensor):
    diff = (got - want).abs()
    print(f"{name}: max abs diff {diff.max().item():.2e}, mean {diff.mean().item():.2e}, "
          f"max |eager| {want.abs().max().item():.2e}")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "fp8 and block swap"])
def test_compiled_blocks_give_the_eager_output(variant, recwarn):
    flow = tiny_flow()
    if variant != "plain":
        quantize_fp8(flow)
    counters.clear()
    with torch.no_grad():
        want, got = run(flow), run(compiled(flow, swap=3 if variant != "plain" else 0))
    report(variant, got, want)
    # one graph per block class, and Inductor generated every kernel
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    assert not [w for w in recwarn if "complex operators" in str(w.message)]


@pytest.mark.slow
@pytest.mark.parametrize("swap,fp8", [(0, False), (3, True)])
def test_a_compiled_lora_training_step_with_checkpointing_gives_the_eager_loss_and_gradients(swap, fp8):
    flow = tiny_flow()
    if fp8:  # as train.py --quantize fp8: the base quantized before the adapters wrap it
        quantize_fp8(flow)
    flow = with_lora(flow)
    # every block's inputs require grad: fewer graphs
    flow.img_in.requires_grad_()
    flow.txt_in.requires_grad_()
    flow.gradient_checkpointing = True
    fast = compiled(flow, swap)
    counters.clear()
    losses = []
    for model in (flow, fast):
        losses.append(run(model).square().mean())
        losses[-1].backward()
    assert not counters["graph_break"]
    report("loss", losses[1].detach(), losses[0].detach())
    want, got = lora_parameters(flow), lora_parameters(fast)
    # A and B of 10 linears per double block, 3 per single one
    assert len(got) == len(want) == 2 * (2 * 10 + 2 * 3)
    assert all(p.grad.abs().sum() > 0 for p in want)
    got_grads = torch.cat([p.grad.flatten() for p in got])
    want_grads = torch.cat([p.grad.flatten() for p in want])
    report("LoRA gradients", got_grads, want_grads)


def record_compiles(monkeypatch, script) -> list[dict]:
    """What each script's compile_blocks call finds in the flow (the blocks are then left uncompiled:
    compiling the toy on two cores would take most of a minute; the tests above check what compiling does)."""
    seen = []

    def record(flow):
        blocks = [*flow.double_blocks, *flow.single_blocks]
        seen.append(dict(fp8=any(isinstance(m, FP8Linear) for m in flow.modules()),
                         lora=any(isinstance(m, LoRALinear) for m in flow.modules()),
                         swap_hooks=sum(bool(b._forward_pre_hooks) for b in blocks),
                         checkpointing=flow.gradient_checkpointing))
        return flow
    monkeypatch.setattr(script, "compile_blocks", record)
    return seen


def test_sample_py_compiles_the_blocks_last_after_quantizing_and_block_swap(tmp_path, monkeypatch):
    seen = record_compiles(monkeypatch, sample)
    sample.main(["--model", "toy", "--prompt", "a red circle", "--steps", "1", "--device", "cpu",
                 "--quantize", "fp8", "--blocks-to-swap", "2", "--compile", "--out", str(tmp_path / "a.png")])
    assert seen == [dict(fp8=True, lora=False, swap_hooks=2, checkpointing=False)]


@pytest.mark.slow
def test_train_py_compiles_the_blocks_with_their_lora_checkpointing_and_block_swap(tmp_path, monkeypatch):
    seen = record_compiles(monkeypatch, train)
    (tmp_path / "sets").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (32, 64, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "sets/a.png")
    (tmp_path / "sets/a.txt").write_text("a red circle and a blue square")
    train.main(["--model", "toy", "--data", str(tmp_path / "sets"), "--steps", "1", "--batch-size", "1",
                "--resolution", "32", "--checkpointing", "--blocks-to-swap", "3", "--sample-every", "0",
                "--device", "cpu", "--compile", "--out", str(tmp_path / "a.safetensors")])
    assert seen == [dict(fp8=False, lora=True, swap_hooks=3, checkpointing=True)]


@pytest.mark.slow
@pytest.mark.parametrize("qk_norm", ["separate", "eager"])
def test_the_qk_norm_set_apart_from_the_compiled_block_gives_the_eager_loss_and_gradients(qk_norm):
    flow = with_lora(tiny_flow())
    flow.gradient_checkpointing = True
    fast = compile_blocks(copy.deepcopy(flow), qk_norm=qk_norm)
    losses = []
    for model in (flow, fast):
        losses.append(run(model).square().mean())
        losses[-1].backward()
    report("loss", losses[1].detach(), losses[0].detach())
    got_grads = torch.cat([p.grad.flatten() for p in lora_parameters(fast)])
    want_grads = torch.cat([p.grad.flatten() for p in lora_parameters(flow)])
    report("LoRA gradients", got_grads, want_grads)


@pytest.mark.parametrize("kwargs,named", [(dict(mode="fastest"), "compile mode 'fastest'"),
                                          (dict(qk_norm="apart"), "qk_norm 'apart'"),
                                          (dict(mode="max-autotune", options={"max_fusion_size": 1}),
                                           "default mode only")])
def test_compile_blocks_refuses_an_unknown_mode_qk_norm_or_options_with_a_mode(kwargs, named):
    with pytest.raises(ValueError, match=named):
        compile_blocks(tiny_flow(), **kwargs)
