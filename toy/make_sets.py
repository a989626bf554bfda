"""Write the toy datasets: recolour sets for IC-LoRA training, or single scenes for a tiny base model.

    python toy/make_sets.py --out sets/toy_recolour         # 60 sets, panels 64 px, 1-2 shapes, seed 0
        sets/toy_recolour/set_000.png (two panels side by side, 2*size x size)
        + set_000.txt (joint caption), ...
    python toy/make_sets.py --out sets/toy_blind_recolour --task blind_recolour   # blind captions
    python toy/make_sets.py --out sets/toy_scenes --single 2000 --size 64 --seed 1
        sets/toy_scenes/scene_0000.png (size x size) + scene_0000.txt (caption), ...
Both are the "joined images" layout that iclora.data.PanelSetDataset reads (toy/world.py draws the scenes).
The same seed draws the same scenes in both modes: give held-out or base-model data its own seed.
"""

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so that a script run from anywhere finds toy
from toy.world import TASKS, caption, make_set, random_scene, render  # noqa: E402 (after sys.path.insert)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="folder to write the images and captions into")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--count", type=int, default=60,
                      help="number of two-panel recolour sets to write (default 60)")
    mode.add_argument("--single", type=int, metavar="N",
                      help="write N single scenes with their captions instead of recolour sets")
    parser.add_argument("--task", default="recolour", choices=TASKS,
                        help="the sets' captions: recolour describes both panels, blind_recolour neither, "
                             "so only a given left panel tells the right one (default: recolour)")
    parser.add_argument("--size", type=int, default=64, help="side of one panel in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random scenes (default 0)")
    parser.add_argument("--max-shapes", type=int, default=2,
                        help="1 to this many shapes per scene (default 2, as the shipped toy model was "
                             "trained)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    count = args.count if args.single is None else args.single
    if count < 1:
        raise SystemExit(f"the number of samples must be at least 1, got {count}")
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    digits = max(3, len(str(count - 1)))
    for i in range(count):
        if args.single is None:
            name = f"set_{i:0{digits}d}"
            image, text = make_set(rng, args.size, args.max_shapes, args.task)
        else:
            scene = random_scene(rng, args.max_shapes)
            name = f"scene_{i:0{digits}d}"
            image = render(scene, args.size)
            text = caption(scene)
        image.save(args.out / f"{name}.png")
        (args.out / f"{name}.txt").write_text(text + "\n")
    print(f"wrote {count} {'sets' if args.single is None else 'scenes'} to {args.out}")


if __name__ == "__main__":
    main()
