"""Whole-image error of fp8 weights next to bf16's: the same prompts and seeds drawn by sample.py with the
stored fp32 weights, with `--dtype bf16`, with `--quantize fp8` (weights dequantized for each matmul) and with
`--quantize fp8 --fp8-compute on` (matmuls in fp8); prints the max and mean absolute pixel difference (0-255)
of each against fp32, and of fp8 compute against bf16, as JSON.

    python bench/fp8_image_error.py                # the toy model (fp32 weights), 8 held-out captions, CPU
    python bench/fp8_image_error.py --model DIR    # any FLUX repo folder with fp32 weights
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
import sample  # noqa: E402 (after sys.path.insert)
from toy.score import held_out_scenes  # noqa: E402 (after sys.path.insert)
from toy.world import set_caption  # noqa: E402 (after sys.path.insert)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", help="FLUX repo with fp32 weights (default: toy)")
    p.add_argument("--count", type=int, default=8,
                   help="prompts: toy captions of held-out scenes (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    args = p.parse_args(argv)
    prompts = [set_caption(scene) for scene in held_out_scenes(args.count, 1000)]
    runs = {"fp32": [], "bf16": ["--dtype", "bf16"], "fp8": ["--quantize", "fp8", "--fp8-compute", "off"],
            "fp8 compute": ["--quantize", "fp8", "--fp8-compute", "on"]}
    images = {}
    common = ["--model", args.model, "--device", "cpu", "--steps", str(args.steps), "--seed", str(args.seed)]
    prompt_flags = []
    for prompt in prompts:
        prompt_flags += ["--prompt", prompt]
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in runs.items():
            out = f"{tmp}/{name.replace(' ', '-')}.png"
            paths = sample.main([*common, "--out", out, *flags, *prompt_flags])
            images[name] = np.stack([np.asarray(Image.open(path), dtype=np.int16) for path in paths])
    pairs = [("bf16", "fp32"), ("fp8", "fp32"), ("fp8 compute", "fp32"), ("fp8 compute", "bf16")]
    result = {}
    for name, reference in pairs:
        d = np.abs(images[name] - images[reference])
        result[f"{name} vs {reference}"] = {"max": int(d.max()), "mean": round(float(d.mean()), 3)}
    print(json.dumps(result | {"images": len(prompts), "model": args.model, "steps": args.steps}, indent=1))
    return result


if __name__ == "__main__":
    main()
