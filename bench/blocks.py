"""What one double and one single block cost on the CPU beyond their GEMMs (issue #14, "attention and
layouts"); results in bench/RESULTS.md.

    python bench/blocks.py --config mid                   # both sections, prints markdown and JSON
    python bench/blocks.py --config mid --only allocations

allocations: the new tensors (not views, not in place) of at least B·Lt·C elements that each aten op of one
bf16 (and one fp32) block forward allocates, counted and summed per part of the block (PARTS), and what SDPA
receives (kernel, dtypes, strides, copies inside `attention`). adapters: a rank-r LoRA'd block's forward +
backward against the same frozen block (input requiring grad in both), medians of interleaved runs, and the
same ratio in FLOPs, for these shapes and for FLUX.1-dev at 1024×1536 (torch's FLOP counter on meta tensors).
Shape letters: B batch, Li image tokens, Lt text tokens, L = Lt + Li, C hidden size.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from iclora.lora import inject_lora  # noqa: E402 (after sys.path.insert)
from minflux import layers  # noqa: E402 (after sys.path.insert)
from minflux.model import CONFIGS, preset  # noqa: E402 (after sys.path.insert)
from minflux.sampling import image_ids, text_ids  # noqa: E402 (after sys.path.insert)

# the parts of a block; "rest" is the linears, LayerNorms and residuals
PARTS = ("adaLN modulation", "RMSNorm (QK norm)", "RoPE", "attention", "MLP", "rest")
# the function of minflux/layers.py an op runs in -> the part it belongs to
FUNCTION_PARTS = {"Modulation.forward": "adaLN modulation", "modulate": "adaLN modulation",
                  "RMSNorm.forward": "RMSNorm (QK norm)", "QKNorm.forward": "RMSNorm (QK norm)",
                  "apply_rope": "RoPE", "attention": "attention"}
COPY_OPS = ("clone", "_to_copy", "copy_")  # the aten ops that copy a tensor


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="mid", choices=list(CONFIGS), help="block size (default: mid)")
    p.add_argument("--image-tokens", type=int, default=512,
                   help="packed image tokens Li (default: 512, bench.py's)")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens Lt (default: 64, bench.py's)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size B (default: 1)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank for the adapters section (default: 16)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs of each variant (default: 10)")
    p.add_argument("--only", choices=["allocations", "adapters"], help="run one section (default: both)")
    return p.parse_args(argv)


def block_inputs(p, B: int, Li: int, Lt: int, dtype: torch.dtype):
    """Random img (B, Li, C), txt (B, Lt, C) and vec (B, C), and pe, the RoPE table of Lt text tokens and
    a Li-token image."""
    g = torch.Generator().manual_seed(0)
    rows = max(r for r in range(1, int(Li ** 0.5) + 1) if Li % r == 0)  # the most square grid of Li tokens
    ids = torch.cat([text_ids(B, Lt), image_ids(B, 16 * rows, 16 * (Li // rows))], dim=1)  # (B, L, 3)
    pe = layers.EmbedND(p.theta, list(p.axes_dim))(ids)
    img = torch.randn(B, Li, p.hidden_size, generator=g).to(dtype)
    txt = torch.randn(B, Lt, p.hidden_size, generator=g).to(dtype)
    vec = torch.randn(B, p.hidden_size, generator=g).to(dtype)
    return img, txt, vec, pe


def blocks(p, dtype: torch.dtype):
    torch.manual_seed(0)
    double = layers.DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias).to(dtype)
    single = layers.SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio).to(dtype)
    return double.requires_grad_(False), single.requires_grad_(False)


class AllocationLog(TorchDispatchMode):
    """Logs each op's new tensor outputs (those not sharing an input's memory) with the part of the block
    that the op runs in."""

    def __init__(self, module_names: dict[int, str]):
        super().__init__()
        self.module_names = module_names
        self.modules = []  # the names of the modules running now, innermost last
        self.rows = []  # (part, op, dtype, shape, bytes) of each new tensor
        self.sdpa = []  # what each SDPA call received
        self.hooks = [torch.nn.modules.module.register_module_forward_pre_hook(self.enter),
                      torch.nn.modules.module.register_module_forward_hook(self.leave)]

    def enter(self, module, args):
        self.modules.append(self.module_names.get(id(module), ""))

    def leave(self, module, args, out):
        self.modules.pop()

    def part(self) -> str:
        frame = sys._getframe()
        while frame and frame.f_code.co_filename != layers.__file__:
            frame = frame.f_back
        function = frame.f_code.co_qualname if frame else ""
        module = self.modules[-1] if self.modules else ""
        return FUNCTION_PARTS.get(function) or ("MLP" if "mlp" in module else "rest")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **kwargs or {})
        part = self.part()
        if "scaled_dot_product" in func.__name__:
            self.sdpa.append({"op": func.__name__, "inputs": [sdpa_input(t) for t in args[:3]]})
        inputs = set()  # the storage of every input tensor
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                inputs.add(t.untyped_storage().data_ptr())
        outputs = out if isinstance(out, (tuple, list)) else [out]
        for t in outputs:
            new = isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs  # not a view
            if new:  # nor written in place
                self.rows.append((part, func.__name__, t.dtype, tuple(t.shape), t.numel() * t.element_size()))
        return out

    def close(self):
        for h in self.hooks:
            h.remove()


def sdpa_input(t: torch.Tensor) -> dict:
    """The layout of a (B, H, L, D) tensor that SDPA receives."""
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "stride": list(t.stride()),
            "last_dim_contiguous": t.stride(-1) == 1,
            "token_major_contiguous": t.transpose(1, 2).is_contiguous()}


def log_forward(block, args) -> AllocationLog:
    names = {id(m): n for n, m in block.named_modules()}
    log = AllocationLog(names)
    try:
        # no_grad, not inference_mode: under inference_mode composite ops (to, SDPA) reach the log whole
        with torch.no_grad(), log:
            block(*args)
    finally:
        log.close()
    return log


def allocations(args) -> dict:
    """The allocations section: for each dtype and block, block_report of its forward's log."""
    p = preset(args.config)
    threshold = args.batch_size * args.text_tokens * p.hidden_size  # B·Lt·C
    result = {"threshold_elements": threshold}
    for dtype in (torch.bfloat16, torch.float32):
        img, txt, vec, pe = block_inputs(p, args.batch_size, args.image_tokens, args.text_tokens, dtype)
        double, single = blocks(p, dtype)
        cases = (("double", double, (img, txt, vec, pe)),
                 ("single", single, (torch.cat([txt, img], dim=1), vec, pe)))
        for name, block, inputs in cases:
            log = log_forward(block, inputs)
            result[f"{name} {str(dtype).removeprefix('torch.')}"] = block_report(log, threshold, dtype)
    return result


def block_report(log: AllocationLog, threshold: int, dtype: torch.dtype) -> dict:
    """Count and MB of the logged tensors of at least `threshold` elements per part, float32 and other; the
    float32 ops of a bf16 block; the copies inside attention; the SDPA inputs."""
    big = []
    for row in log.rows:
        _, _, row_dtype, shape, nbytes = row
        if shape and nbytes // row_dtype.itemsize >= threshold:
            big.append(row)
    table = {}
    for part in PARTS:
        table[part] = {"float32_count": 0, "float32_mb": 0.0, "other_count": 0, "other_mb": 0.0}
    for part, _, row_dtype, _, nbytes in big:
        key = "float32" if row_dtype == torch.float32 else "other"
        table[part][f"{key}_count"] += 1
        table[part][f"{key}_mb"] = round(table[part][f"{key}_mb"] + nbytes / 1e6, 3)
    float32_ops = None
    if dtype == torch.bfloat16:
        float32_ops = sorted({f"{part}: {op} {list(shape)}" for part, op, row_dtype, shape, _ in big
                              if row_dtype == torch.float32})
    copies = [f"{op} {list(shape)}" for part, op, _, shape, _ in log.rows
              if part == "attention" and op.split(".")[0] in COPY_OPS]
    return {"parts": table, "float32_ops": float32_ops, "copies_in_attention": copies, "sdpa": log.sdpa}


def timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def forward_backward(module, x: list[torch.Tensor], vec: torch.Tensor, pe: torch.Tensor, double: bool):
    """One forward and backward of a block, its inputs requiring grad (as behind a LoRA'd block)."""
    xs = [t.detach().requires_grad_() for t in x]
    out = module(*xs, vec, pe)
    torch.autograd.backward(out, [torch.ones_like(o) for o in (out if double else [out])])


def interleaved_ms(runs: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds of each run after one warm-up, the runs interleaved."""
    for fn in runs.values():  # warm-up
        fn()
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            times[k].append(timed_ms(fn))
    return {k: statistics.median(t) for k, t in times.items()}


def adapters(args) -> dict:
    """The adapters section: each block's time with and without LoRA, fp32 and bf16, and the FLOP shares."""
    p = preset(args.config)
    B = args.batch_size
    Li = args.image_tokens
    Lt = args.text_tokens
    r = args.rank
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        img, txt, vec, pe = block_inputs(p, B, Li, Lt, dtype)
        for name, block in zip(("double", "single"), blocks(p, dtype), strict=True):
            lora = copy.deepcopy(block)
            inject_lora(lora, rank=r, alpha=r, targets=(".+",))  # every linear of the block, as the authors'
            x = [img, txt] if name == "double" else [torch.cat([txt, img], dim=1)]
            runs = {"base": partial(forward_backward, block, x, vec, pe, name == "double"),
                    "lora": partial(forward_backward, lora, x, vec, pe, name == "double")}
            ms = interleaved_ms(runs, args.repeats)
            result[f"{name} {str(dtype).removeprefix('torch.')}"] = {
                "base_ms": round(ms["base"], 2), "lora_ms": round(ms["lora"], 2),
                "ratio": round(ms["lora"] / ms["base"], 3)}
    result["flops, this config"] = adapter_flops(args.config, r, Li, Lt, B)
    result["flops, flux-dev 1024x1536"] = adapter_flops("flux-dev", r, (1024 // 16) * (1536 // 16), 512)
    return result


def adapter_flops(config: str, rank: int, Li: int, Lt: int, B: int = 1) -> dict:
    """FLOPs of one double and one single block (meta tensors: shapes only), forward and forward + backward
    (input gradients only for the frozen base, as in training), with and without a rank-r adapter on every
    linear; for flux-dev also the totals over its 19 + 38 blocks."""
    p = preset(config)
    with torch.device("meta"):
        img = torch.randn(B, Li, p.hidden_size, dtype=torch.bfloat16)
        txt = torch.randn(B, Lt, p.hidden_size, dtype=torch.bfloat16)
        vec = torch.randn(B, 1, p.hidden_size, dtype=torch.bfloat16)
        pe = torch.randn(2, B, Lt + Li, 1, p.hidden_size // p.num_heads)
        double, single = blocks(p, torch.bfloat16)
    out = {"config": config, "image_tokens": Li, "text_tokens": Lt, "rank": rank}
    for lora in (False, True):
        for name, block in (("double", double), ("single", single)):
            if lora:
                inject_lora(block, rank=rank, alpha=rank, targets=(".+",))
            for grad in (False, True):
                x = [img.detach(), txt.detach()] if name == "double" else [torch.cat([txt, img], dim=1)]
                xs = [t.requires_grad_(grad) for t in x]
                with FlopCounterMode(display=False) as counter:
                    y = block(*xs, vec[:, 0], pe)
                    if grad:
                        outputs = y if name == "double" else [y]
                        torch.autograd.backward(y, [torch.ones_like(o) for o in outputs])
                key = f"{name} {'lora' if lora else 'base'} {'fwd+bwd' if grad else 'fwd'}"
                out[key] = counter.get_total_flops()
    for name in ("double", "single"):
        for kind in ("fwd", "fwd+bwd"):
            base = out[f"{name} base {kind}"]
            lora = out[f"{name} lora {kind}"]
            out[f"{name} adapter share {kind}"] = round((lora - base) / base, 4)
    if config == "flux-dev":
        for kind in ("fwd", "fwd+bwd"):
            base = 19 * out[f"double base {kind}"] + 38 * out[f"single base {kind}"]
            lora = 19 * out[f"double lora {kind}"] + 38 * out[f"single lora {kind}"]
            out[f"57 blocks base {kind} tflop"] = round(base / 1e12, 2)
            out[f"57 blocks adapters {kind} tflop"] = round((lora - base) / 1e12, 3)
            out[f"57 blocks adapter share {kind}"] = round((lora - base) / base, 4)
    return out


def allocations_markdown(a: dict) -> list[str]:
    """The allocations section's table: count / MB per part, float32 and (when any) other dtypes."""
    lines = [f"Tensors of >= {a['threshold_elements']} elements (B·Lt·C) that one block forward allocates, "
             "count / MB per part:", "",
             "| block, dtype | " + " | ".join(PARTS) + " |", "|---|" + "---|" * len(PARTS)]
    for key, v in a.items():
        if key == "threshold_elements":
            continue
        cells = []
        for c in v["parts"].values():
            text = f"fp32 {c['float32_count']} / {c['float32_mb']:.2f}"
            if c["other_count"]:
                text += f", other {c['other_count']} / {c['other_mb']:.2f}"
            cells.append(text)
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def adapters_markdown(adapters: dict) -> list[str]:
    """The adapters section's table of times, then the FLOP shares."""
    lines = ["", "| block, dtype | no adapters ms | LoRA ms | ratio |", "|---|---|---|---|"]
    for k, v in adapters.items():
        if "ratio" in v:
            lines.append(f"| {k} | {v['base_ms']} | {v['lora_ms']} | {v['ratio']} |")
    for k, v in adapters.items():
        if k.startswith("flops"):
            shares = []
            for name in ("double", "single"):
                for kind in ("fwd", "fwd+bwd"):
                    shares.append(f"{name} {v[f'{name} adapter share {kind}']:.2%} {kind}")
            lines.append(f"\nAdapter FLOPs over the base block's, {k}: " + ", ".join(shares))
    return lines


def markdown(result: dict) -> str:
    lines = []
    if "allocations" in result:
        lines += allocations_markdown(result["allocations"])
    if "adapters" in result:
        lines += adapters_markdown(result["adapters"])
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    result = {"config": args.config, "batch_size": args.batch_size, "image_tokens": args.image_tokens,
              "text_tokens": args.text_tokens, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.only in (None, "allocations"):
        result["allocations"] = allocations(args)
    if args.only in (None, "adapters"):
        result["adapters"] = adapters(args)
    print(markdown(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
