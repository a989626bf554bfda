"""bench/gpu.py's sections past one denoising step (issue #22): the whole image, ours against diffusers'
FluxPipeline; compiled training's equality with eager after 3 steps; and the sampling overheads (torch.compile
modes, CUDA graphs included, SDPA's attention backends, the VAE decode). Each returns {variant: timing or
result}; gpu.py times the variants alternately (its `measure`) and makes the rows.
"""

import copy
import math
import time
from functools import partial

import compile_repro
import image_models
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from iclora.lora import lora_parameters
from minflux.compile import compile_blocks

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
OVERHEAD_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def whole_image_variants(pipes: tuple, size: tuple, steps: int, text_tokens: int, device) -> dict:
    """name -> call: one image from token ids: T5 and CLIP, `steps` denoising steps, the VAE decode."""
    ours, theirs = pipes
    t5_ids, clip_ids = image_models.token_ids(ours, text_tokens, device)
    H, W = size

    def encode():
        return ours.t5(t5_ids), ours.clip(clip_ids)                               # (1, Lt, 4096), (1, 768)

    def ours_image():
        txt, vec = encode()
        return ours.decode(ours.sample(txt, vec, (H, W), steps, progress=False))  # (1, 3, H, W)

    def diffusers_image():
        txt, vec = encode()
        return theirs(prompt_embeds=txt, pooled_prompt_embeds=vec, height=H, width=W,
                      num_inference_steps=steps, guidance_scale=3.5, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
    calls = {"ours": ours_image}
    if theirs is not None:
        calls["diffusers"] = diffusers_image
    return calls


def lora_state(flow) -> list[torch.Tensor]:
    return [q.detach().clone() for q in lora_parameters(flow)]


def three_steps(flow, data: tuple, steps: int) -> dict:
    """`steps` AdamW steps from the adapters' current values: the losses, the adapters and the last
    gradients (flattened, float32) and the seconds they took."""
    params = lora_parameters(flow)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        loss, grads = compile_repro.loss_and_gradients(flow, data, step)  # clears .grad
        offset = 0
        for q in params:
            q.grad = grads[offset: offset + q.numel()].view_as(q).to(q.dtype)
            offset += q.numel()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
    adapters = torch.cat([q.detach().float().flatten() for q in params])
    return dict(losses=losses, adapters=adapters, grads=grads, seconds=time.perf_counter() - start)


def relative(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """max |Δ| and ‖Δ‖ / ‖want‖."""
    diff = got - want
    return diff.abs().max().item(), (diff.norm() / want.norm().clamp_min(1e-30)).item()


def compiled_training_check(args, device, dtype, qk_norm: str, steps: int = 3) -> dict:
    """The same `steps` LoRA training steps eager, then with the blocks compiled, from the same adapters and
    batches, on one tamed random model (compile_repro.tame_); how far the adapters and gradients end apart."""
    flow = compile_repro.tamed_flow(args.config, (None, None), device, dtype, args.rank)
    data = compile_repro.batch(flow, args.train_size, args.batch_size, args.text_tokens, device)
    start = lora_state(flow)
    before = torch.cat([v.float().flatten() for v in start])
    eager = three_steps(flow, data, steps)
    with torch.no_grad():
        for q, value in zip(lora_parameters(flow), start, strict=True):
            q.copy_(value)
    compile_blocks(flow, qk_norm=qk_norm)
    compiled = three_steps(flow, data, steps)
    adapters = relative(compiled["adapters"] - before, eager["adapters"] - before)  # the 3 steps' updates
    grads = relative(compiled["grads"], eager["grads"])
    losses = eager["losses"] + compiled["losses"]
    return dict(qk_norm=qk_norm, steps=steps, eager_losses=eager["losses"],
                compiled_losses=compiled["losses"], finite=all(math.isfinite(v) for v in losses),
                update_max_abs_diff=adapters[0], update_relative_diff=adapters[1],
                grads_max_abs_diff=grads[0], grads_relative_diff=grads[1],
                eager_s=eager["seconds"], compiled_s_with_compiling=compiled["seconds"])


def mode_forwards(flow, mode: str) -> list:
    """compile_blocks(flow, mode=mode)'s compiled block forwards, taken off the blocks (eager again)."""
    compile_blocks(flow, mode=mode)
    blocks = [*flow.double_blocks, *flow.single_blocks]
    forwards = [b.__dict__.pop("forward") for b in blocks]
    return forwards


def attention_variants(call, device) -> tuple[dict, dict]:
    """name -> call under each SDPA backend (eager), and name -> why skipped for those this device lacks."""
    variants, skipped = {}, {}
    for name, backend in BACKENDS.items():
        try:
            with torch.no_grad(), sdpa_kernel(backend):
                call()
        except RuntimeError as e:  # no kernel of this backend for these inputs or this device
            skipped[f"attention {name}, eager"] = str(e).splitlines()[0][:120]
            continue
        variants[f"attention {name}, eager"] = partial(with_backend, backend, call)
    return variants, skipped


def with_backend(backend, call):
    with sdpa_kernel(backend):
        return call()


def vae_decode_variants(ae, size: tuple, device, dtype, compiled: bool) -> dict:
    """name -> call: the autoencoder's decode of one (1, 16, H/8, W/8) latent, plain, with a channels_last
    copy of it and (on a GPU) compiled."""
    H, W = size
    z = torch.randn(1, ae.params.z_channels, H // 8, W // 8, device=device, dtype=dtype)   # (1, c, h, w)
    last = copy.deepcopy(ae).to(memory_format=torch.channels_last)
    variants = {"vae decode, eager": partial(ae.decode, z)}
    variants["vae decode, channels_last"] = partial(last.decode, z.to(memory_format=torch.channels_last))
    if compiled:
        variants["vae decode, compiled"] = partial(torch.compile(ae.decode), z)
    return variants

