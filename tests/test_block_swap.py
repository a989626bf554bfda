"""Block swap changes where the swapped blocks' frozen weights live, never what the model computes: outputs,
losses and LoRA gradients equal the unswapped model's bit for bit, and each weight is on the device only while
its block runs (on the CPU: by the storage each slot holds at each step; on a GPU: by
`torch.cuda.memory_allocated`)."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sample
import train
from iclora.lora import inject_lora, lora_parameters
from minflux.block_swap import BlockSwap
from minflux.model import Flux, preset


def inputs(h=3, w=5, n_txt=7) -> dict:
    """One image of h×w tokens and n_txt text tokens for the tiny preset, at t = 0.6 with guidance 3.5."""
    p, g = preset("tiny"), torch.Generator().manual_seed(1)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    return dict(img=torch.randn(1, h * w, p.in_channels, generator=g), img_ids=img_ids.reshape(1, h * w, 3),
                txt=torch.randn(1, n_txt, p.context_in_dim, generator=g), txt_ids=torch.zeros(1, n_txt, 3),
                timesteps=torch.tensor([0.6]), y=torch.randn(1, p.vec_in_dim, generator=g),
                guidance=torch.tensor([3.5]))


def tiny_flow(dtype=torch.float32) -> Flux:
    """The tiny preset (2 double + 2 single blocks) with random weights everywhere, frozen as loading leaves
    it."""
    torch.manual_seed(0)
    flow = Flux(preset("tiny")).eval()
    with torch.no_grad():
        for t in flow.parameters():
            t.copy_(torch.randn_like(t) * 0.3)
    return flow.to(dtype).requires_grad_(False)


def swapped(flow: Flux, count: int) -> tuple[Flux, BlockSwap]:
    flow = copy.deepcopy(flow)
    return flow, BlockSwap(flow, count, "cpu")


def run(flow: Flux, dtype=torch.float32):
    return flow(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs().items()})


def with_lora(flow: Flux) -> Flux:
    """A LoRA on every block linear, B random too, so that every A and B has a nonzero gradient."""
    flow = copy.deepcopy(flow)
    inject_lora(flow, rank=2, alpha=2.0, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in lora_parameters(flow):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return flow


def loss_and_grads(flow: Flux) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = run(flow).square().mean()
    loss.backward()
    return loss.detach(), [p.grad for p in lora_parameters(flow)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("count", [2, 4])
def test_swapped_blocks_give_the_same_output_without_gradients(count, dtype):
    flow = tiny_flow(dtype)
    with torch.no_grad():
        want = run(flow, dtype)
        flow_swapped, _ = swapped(flow, count)
        got = run(flow_swapped, dtype)
        again = run(flow_swapped, dtype)  # the second pass starts from the swap state the first left
    assert torch.equal(got, want) and torch.equal(again, want)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("count", [1, 3])
def test_swapped_blocks_give_the_same_loss_and_lora_gradients(count, checkpointing):
    base = with_lora(tiny_flow())
    base.gradient_checkpointing = checkpointing
    want_loss, want_grads = loss_and_grads(base)
    flow, _ = swapped(base, count)
    for _ in range(2):  # two steps: the second starts from the state the first backward left
        for p in lora_parameters(flow):
            p.grad = None
        loss, grads = loss_and_grads(flow)
        assert torch.equal(loss, want_loss)
        assert len(grads) == len(want_grads)
        assert all(torch.equal(a, b) for a, b in zip(grads, want_grads, strict=True))
        assert all(g.abs().sum() > 0 for g in grads)


def test_only_frozen_parameters_are_swapped_and_lora_adapters_stay():
    flow, swap = swapped(with_lora(tiny_flow()), 1)
    block = flow.single_blocks[-1]
    assert {s.name for s in swap.slots[0]} == {"weight", "bias", "scale"}
    assert all(p.numel() > 0 for p in lora_parameters(flow))
    assert all(p.numel() == 0 for p in block.parameters() if not p.requires_grad)


def record_where_weights_are(flow: Flux, swap: BlockSwap, log: list):
    """Logs (block, moment, [(numel, shape, data_ptr)] of its swapped slots) before, while and after each
    run."""
    def snapshot(i, moment):
        log.append((i, moment, [(p.numel(), tuple(p.shape), p.data_ptr())
                                for p in (getattr(s.module, s.name) for s in swap.slots[i])]))
    for i, block in enumerate(swap.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: snapshot(i, "before"), prepend=True)
        block.register_forward_hook(lambda m, a, o, i=i: snapshot(i, "after"))
        first_child = next(m for m in block.modules() if m is not block and not list(m.children()))
        first_child.register_forward_hook(lambda m, a, o, i=i: snapshot(i, "while"))


def test_each_swapped_weight_is_a_placeholder_then_a_copy_of_its_home_then_a_placeholder_again():
    flow, swap = swapped(tiny_flow(), 3)
    kept = {n: (p, p.data_ptr()) for n, p in flow.double_blocks[0].named_parameters()}
    log = []
    record_where_weights_are(flow, swap, log)
    with torch.no_grad():
        run(flow)
    moments = [(i, m) for i in range(3) for m in ("before", "while", "after")]
    assert [(i, moment) for i, moment, _ in log] == moments
    for i, moment, slots in log:
        homes = swap.slots[i]
        if moment == "while":
            home_sizes = [(s.home.numel(), tuple(s.home.shape)) for s in homes]
            assert [(n, shape) for n, shape, _ in slots] == home_sizes
            assert all(ptr != s.home.data_ptr() for (_, _, ptr), s in zip(slots, homes, strict=True))
        else:
            assert all(n == 0 for n, _, _ in slots)
    block = flow.double_blocks[0]
    assert all(p is block.get_parameter(n) and p.data_ptr() == ptr for n, (p, ptr) in kept.items())


def test_with_checkpointing_only_the_running_block_is_loaded_and_at_most_one_is_prefetched():
    flow, swap = swapped(with_lora(tiny_flow()), 4)
    flow.gradient_checkpointing = True
    seen = []

    def check(i):
        loaded = []
        for j, slots in enumerate(swap.slots):
            if any(getattr(s.module, s.name).numel() for s in slots):
                loaded.append(j)
        seen.append((i, loaded, swap.prefetched is not None))

    for i, block in enumerate(swap.blocks):
        # the block's first layer (the LoRA adapters are not called as modules)
        leaves = [m for n, m in block.named_modules() if n and "lora_" not in n and not list(m.children())]
        leaves[0].register_forward_hook(lambda m, a, o, i=i: check(i))
    for _ in range(2):  # the second step starts from where the first backward left the swap
        run(flow).square().mean().backward()
    # forward: blocks 0..3 in order, each fetching the next; backward's recomputation: 3..0, fetching the
    # previous
    assert [(i, loaded) for i, loaded, _ in seen] == [(i, [i]) for i in (0, 1, 2, 3, 3, 2, 1, 0)] * 2
    assert [p for *_, p in seen] == [True, True, True, False, True, True, True, False] * 2


@pytest.mark.parametrize("count", [2, 4])
def test_when_sampling_every_block_after_the_first_is_prefetched_across_passes(count):
    flow, swap = swapped(tiny_flow(), count)
    prefetched = []
    for block in swap.blocks:
        block.register_forward_hook(lambda m, a, o: prefetched.append(swap.prefetched is not None))
    with torch.no_grad():
        for _ in range(3):  # denoising steps: each pass's last block fetches the next pass's first
            run(flow)
    assert prefetched == [True] * (3 * count)


def test_moving_the_swapped_model_to_the_cpu_keeps_the_homes_and_the_output():
    flow = tiny_flow()
    moved, swap = swapped(flow, 2)
    homes = [(s.home, s.home.data_ptr()) for slots in swap.slots for s in slots]
    moved.to("cpu")
    with torch.no_grad():
        assert torch.equal(run(moved), run(flow))
    assert all(s.home is home and s.home.data_ptr() == ptr
               for (home, ptr), s in zip(homes, [s for slots in swap.slots for s in slots], strict=True))
    assert all(getattr(s.module, s.name).numel() == 0 for slots in swap.slots for s in slots)


@pytest.mark.parametrize("count", [-1, 5])
def test_a_block_count_outside_the_model_is_refused(count):
    message = r"between 0 and 4 \(the model's 2 double \+ 2 single blocks\), not "
    with pytest.raises(ValueError, match=message):
        BlockSwap(tiny_flow(), count, "cpu")


def count_loads(monkeypatch, script) -> list[int]:
    """The swapped blocks `script` loads, in order (a BlockSwap that also logs each load)."""
    loads = []

    class Logged(BlockSwap):
        def load(self, i):
            loads.append(i)
            super().load(i)
    monkeypatch.setattr(script, "BlockSwap", Logged)
    return loads


def test_sample_py_draws_the_same_image_with_swapped_blocks(tmp_path, monkeypatch):
    loads = count_loads(monkeypatch, sample)
    common = ["--model", "toy", "--prompt", "a red circle", "--steps", "2", "--device", "cpu"]
    [plain] = sample.main([*common, "--out", str(tmp_path / "plain.png")])
    [swap] = sample.main([*common, "--out", str(tmp_path / "swap.png"), "--blocks-to-swap", "3"])
    assert np.asarray(Image.open(plain)).std() > 5  # not a flat image, which any bug could also give
    assert np.array_equal(np.asarray(Image.open(swap)), np.asarray(Image.open(plain)))
    assert loads == [0, 1, 2] * 2  # 2 steps through 3 swapped blocks


@pytest.mark.slow
def test_train_py_learns_the_same_lora_with_swapped_blocks(tmp_path, monkeypatch):
    loads = count_loads(monkeypatch, train)
    (tmp_path / "sets").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (32, 64, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "sets/a.png")
    (tmp_path / "sets/a.txt").write_text("a red circle and a blue square")
    common = ["--model", "toy", "--data", str(tmp_path / "sets"), "--steps", "2", "--batch-size", "1",
              "--resolution", "32", "--checkpointing", "--sample-every", "0", "--device", "cpu"]
    plain = load_file(train.main([*common, "--out", str(tmp_path / "plain.safetensors")]))
    swap = load_file(train.main([*common, "--out", str(tmp_path / "swap.safetensors"),
                                 "--blocks-to-swap", "4"]))
    assert plain.keys() == swap.keys() and all(torch.equal(swap[k], plain[k]) for k in plain)
    assert any(v.abs().sum() > 0 for k, v in plain.items() if "lora_B" in k)  # two steps moved the LoRA
    # per step: forward, then backward's recomputation in reverse
    assert loads == [0, 1, 2, 3, 3, 2, 1, 0] * 2


def test_train_py_refuses_block_swap_without_checkpointing(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "toy", "--data", str(tmp_path), "--blocks-to-swap", "2"])
    assert "--blocks-to-swap needs --checkpointing" in capsys.readouterr().err


def rounded_bytes(tensors) -> int:
    """Bytes the CUDA caching allocator gives these tensors: each rounded up to a multiple of 512."""
    return sum(-(-t.numel() * t.element_size() // 512) * 512 for t in tensors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_swapped_blocks_weights_are_allocated_only_while_they_run():
    flow = tiny_flow()
    # the flow is on the CPU still: the homes are pinned, the placeholders already on the GPU
    swap = BlockSwap(flow, 3, "cuda")
    swapped_ids = {id(s.placeholder) for slots in swap.slots for s in slots}
    resident = [t for t in [*flow.parameters(), *flow.buffers()] if id(t) not in swapped_ids]
    start = torch.cuda.memory_allocated()
    flow.to("cuda")
    # the swapped weights did not come
    assert torch.cuda.memory_allocated() - start == rounded_bytes(resident)
    assert all(s.home.is_pinned() for slots in swap.slots for s in slots)
    x = {k: v.cuda() for k, v in inputs().items()}
    during = []
    for i, block in enumerate(swap.blocks):
        next(m for m in block.modules() if m is not block and not list(m.children())).register_forward_hook(
            lambda m, a, o, i=i: during.append((i, torch.cuda.memory_allocated(), {
                getattr(s.module, s.name).device.type for s in swap.slots[i]})))
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = flow(**x)
    assert [(i, devices) for i, _, devices in during] == [(0, {"cuda"}), (1, {"cuda"}), (2, {"cuda"})]
    for i, allocated, _ in during:
        assert allocated - before >= rounded_bytes(s.home for s in swap.slots[i])
    assert all(getattr(s.module, s.name).numel() == 0 for slots in swap.slots for s in slots)
    with torch.no_grad():
        assert torch.equal(out, tiny_flow().cuda()(**x))
