"""Toy scenes: random layouts of flat shapes, their exact captions, reading images back into scenes, and the
toy In-Context LoRA task "recolour" with its scores.

A scene is a background colour plus 1-3 shapes, each in its own cell of a 3x3 grid. PALETTE holds six corners
of the RGB cube, at least 255 apart, so a blurry, noisy generator still lands nearest the colour it meant. The
task follows In-Context LoRA (arXiv 2410.23775; caption style of the authors' release): a two-panel set whose
right panel is the left scene (same shapes, cells and sizes) with every colour, background included, sent
through RECOLOUR, a fixed 6-cycle that no base model knows. "blind_recolour" is the same sets with a caption
that says what to do but not what the scene is: only the given left panel (a conditional IC-LoRA) tells the
right one. `analyse` reads blurry, noisy generated images back too. Images are PIL RGB; PIL sizes are (W, H);
arrays are (H, W) for an image, (h, w) for one cell; P palette colours.
"""

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from iclora.panels import split_panels

PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "white": (255, 255, 255), "black": (0, 0, 0)}
COLOURS = tuple(PALETTE)
RECOLOUR = {"red": "blue", "blue": "green", "green": "yellow", "yellow": "white", "white": "black",
            "black": "red"}
KINDS = ("circle", "square", "triangle")
SIZES = {"small": 0.45, "large": 0.8}  # side of the shape / side of its cell
CELLS = ("top left", "top", "top right",  # row-major
         "left", "center", "right",
         "bottom left", "bottom", "bottom right")
MIN_IMAGE_SIZE = 24  # a small shape is then 3-4 pixels wide

# Thresholds of `analyse` (cell fractions are of the cell's pixel count or side), tuned so that renders
# blurred (radius 1) and noised (sigma 20) at 64 px still read back (tests/test_toy_world.py; the rates are
# in docs/notes.md).

# A pixel takes the nearest palette colour only within SNAP_RADIUS (half the smallest palette distance, so
# never two candidates); other pixels (blurred edges, off colours) are not shapes.
SNAP_RADIUS = 127.5
# A cell holds a shape when its most common non-background colour covers more than PRESENT of it (a clean
# small triangle covers ~10% of its cell, a large square ~64%) and that colour's centroid lies within CENTERED
# of a side from the cell centre (so an edge bleeding in from a neighbouring cell is not a shape).
PRESENT = 0.04
CENTERED = 0.25
# A shape is large when the fitted shape's width (sqrt(area / fill)) exceeds LARGE of the side (SIZES).
LARGE = 0.62
# The mask's best IoU with an ideal circle, square or triangle of the same area and centroid picks the kind;
# a circle wins only by more than ROUND_CORNERS (blur rounds a small square's corners, but it never squares
# a circle).
ROUND_CORNERS = 0.04
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / (width * height)
SET_SUMMARY = "[TWO-PANEL] the same scene in two colour schemes"
BLIND_CAPTION = f"{SET_SUMMARY}; [LEFT] the scene; [RIGHT] the same scene"


@dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    colour: str  # one of COLOURS
    size: str  # one of SIZES
    cell: str  # one of CELLS

    def __post_init__(self):
        for field, value, allowed in (("kind", self.kind, KINDS), ("colour", self.colour, COLOURS),
                                      ("size", self.size, tuple(SIZES)), ("cell", self.cell, CELLS)):
            if value not in allowed:
                raise ValueError(f"shape {field} {value!r} is not one of {allowed}")


@dataclass(frozen=True)
class Scene:
    background: str  # one of COLOURS, never the colour of a shape
    shapes: tuple[Shape, ...]  # at most one per cell; stored in CELLS order, so equal scenes compare equal

    def __post_init__(self):
        if self.background not in COLOURS:
            raise ValueError(f"background {self.background!r} is not one of {COLOURS}")
        shapes = tuple(sorted(self.shapes, key=lambda shape: CELLS.index(shape.cell)))
        cells = [shape.cell for shape in shapes]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two shapes share a cell: {cells}")
        if any(shape.colour == self.background for shape in shapes):
            raise ValueError(f"a shape has the background colour {self.background!r}")
        object.__setattr__(self, "shapes", shapes)


def random_scene(rng: random.Random, max_shapes: int = 3) -> Scene:
    """A background and 1..max_shapes shapes in distinct cells, drawn from rng alone."""
    if not 1 <= max_shapes <= len(CELLS):
        raise ValueError(f"max_shapes must be in 1..{len(CELLS)}, got {max_shapes}")
    background = rng.choice(COLOURS)
    colours = [colour for colour in COLOURS if colour != background]
    cells = rng.sample(CELLS, rng.randint(1, max_shapes))
    shapes = []
    for cell in cells:
        shapes.append(Shape(rng.choice(KINDS), rng.choice(colours), rng.choice(tuple(SIZES)), cell))
    return Scene(background, tuple(shapes))


def recolour(scene: Scene) -> Scene:
    """The task's rule: every colour, background included, sent through RECOLOUR."""
    return Scene(RECOLOUR[scene.background],
                 tuple(Shape(s.kind, RECOLOUR[s.colour], s.size, s.cell) for s in scene.shapes))


# ------------------------------------------------------------------------------------- drawing and captions
def cell_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of the 9 cells in CELLS order, right and bottom exclusive.

    Cell edges lie at floor(i * side / 3)."""
    xs = [i * width // 3 for i in range(4)]
    ys = [j * height // 3 for j in range(4)]
    return [(xs[k % 3], ys[k // 3], xs[k % 3 + 1], ys[k // 3 + 1]) for k in range(9)]


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a size x size RGB image: flat palette colours, no anti-aliasing, each shape centred
    in its cell."""
    if size < MIN_IMAGE_SIZE:
        raise ValueError(f"render size must be at least {MIN_IMAGE_SIZE} pixels, got {size}")
    image = Image.new("RGB", (size, size), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    boxes = cell_boxes(size, size)
    for shape in scene.shapes:
        left, top, right, bottom = boxes[CELLS.index(shape.cell)]
        side = round(SIZES[shape.size] * min(right - left, bottom - top))
        x0, y0 = (left + right - side) // 2, (top + bottom - side) // 2
        x1, y1 = x0 + side - 1, y0 + side - 1  # PIL boxes include their last pixel
        fill = PALETTE[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # pointing up, base along the bottom
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return image


def caption(scene: Scene) -> str:
    """'a large red circle at the top left and a small blue square at the center, on a yellow background'."""
    parts = [f"a {s.size} {s.colour} {s.kind} at the {s.cell}" for s in scene.shapes]
    if not parts:
        return f"a plain {scene.background} background"
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed}, on a {scene.background} background"


def set_caption(left: Scene) -> str:
    """The joint caption of a recolour set: summary, then one description per panel (IC-LoRA style)."""
    return f"{SET_SUMMARY}; [LEFT] {caption(left)}; [RIGHT] {caption(recolour(left))}"


def blind_caption(left: Scene) -> str:
    """The joint caption of a blind_recolour set: the same for every scene."""
    return BLIND_CAPTION


TASKS = {"recolour": set_caption, "blind_recolour": blind_caption}  # task -> joint caption of a left scene


def make_set(rng: random.Random, panel_size: int = 64, max_shapes: int = 3,
             task: str = "recolour") -> tuple[Image.Image, str]:
    """A random set of a task in TASKS and its caption; the set is the two panels side by side
    (2*panel_size x panel_size)."""
    left = random_scene(rng, max_shapes)
    joined = Image.new("RGB", (2 * panel_size, panel_size))
    joined.paste(render(left, panel_size), (0, 0))
    joined.paste(render(recolour(left), panel_size), (panel_size, 0))
    return joined, TASKS[task](left)


# --------------------------------------------------------------------------------------------------- analysis
def snap(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's nearest palette colour as an index into COLOURS, and whether that colour is within
    SNAP_RADIUS; both (H, W)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    palette = np.array(list(PALETTE.values()), dtype=np.float32)  # (P, 3)
    distance = np.linalg.norm(pixels[:, :, None, :] - palette, axis=-1)  # (H, W, P)
    return distance.argmin(-1), distance.min(-1) < SNAP_RADIUS  # (H, W), (H, W)


def ideal_shapes(h: int, w: int, cy: float, cx: float, area: float) -> dict[str, np.ndarray]:
    """(h, w) masks of an upright circle, square and up-pointing triangle of the given area and centroid."""
    y, x = np.mgrid[:h, :w]  # (h, w) pixel-centre coordinates, as np.nonzero reports them
    side = np.sqrt(2 * area)  # the triangle's base and height; its centroid is a third of the way up
    top = cy - 2 * side / 3
    return {"circle": (x - cx) ** 2 + (y - cy) ** 2 <= area / np.pi,
            "square": np.maximum(abs(x - cx), abs(y - cy)) <= np.sqrt(area) / 2,
            "triangle": (y >= top) & (y <= top + side) & (abs(x - cx) <= (y - top) / 2)}


def read_cell(labels: np.ndarray, background: int, cell: str) -> Shape | None:
    """The shape in one cell, or None when the cell is empty, read from the cell's (h, w) labels (an index
    into COLOURS, -1 for no colour)."""
    h, w = labels.shape
    counts = np.bincount(labels[(labels >= 0) & (labels != background)], minlength=len(COLOURS))
    colour = int(counts.argmax())
    area = counts[colour]
    if area <= PRESENT * h * w:
        return None
    mask = labels == colour  # (h, w)
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    if max(abs(cy - (h - 1) / 2) / h, abs(cx - (w - 1) / 2) / w) > CENTERED:
        return None
    overlap = {kind: (ideal & mask).sum() / (ideal | mask).sum()
               for kind, ideal in ideal_shapes(h, w, cy, cx, area).items()}
    overlap["circle"] -= ROUND_CORNERS  # blur rounds a square's corners but never squares a circle
    kind = max(overlap, key=overlap.get)
    side = np.sqrt(area / FILL[kind])  # the width of the fitted shape
    return Shape(kind, COLOURS[colour], "large" if side / min(h, w) > LARGE else "small", cell)


def analyse(image: Image.Image) -> Scene:
    """The scene an image shows (any image size), read with the thresholds above: the background is the most
    common nearest palette colour over all pixels, then each cell is read on its own."""
    nearest, close = snap(image)  # (H, W), (H, W)
    background = int(np.bincount(nearest.ravel(), minlength=len(COLOURS)).argmax())
    labels = np.where(close, nearest, -1)  # (H, W)
    shapes = [read_cell(labels[top:bottom, left:right], background, cell)
              for cell, (left, top, right, bottom) in zip(CELLS, cell_boxes(*image.size), strict=True)]
    return Scene(COLOURS[background], tuple(shape for shape in shapes if shape is not None))


# ----------------------------------------------------------------------------------------------------- scores
def caption_match(image: Image.Image, scene: Scene) -> float:
    """Fraction of the scene's facts the image reproduces: the background, and per shape its cell (something
    is there), colour, kind and size. A shape in a cell that the caption leaves empty adds one failed fact.
    """
    seen = analyse(image)
    found = {shape.cell: shape for shape in seen.shapes}
    matched = int(seen.background == scene.background)
    for shape in scene.shapes:
        other = found.get(shape.cell)
        if other is None:
            continue
        matched += 1  # something is in the cell
        matched += other.colour == shape.colour
        matched += other.kind == shape.kind
        matched += other.size == shape.size
    extras = len(found.keys() - {shape.cell for shape in scene.shapes})
    return matched / (1 + 4 * len(scene.shapes) + extras)


def rule_score(left_image: Image.Image, right_image: Image.Image) -> float:
    """How well the right panel is the recoloured left panel, both as analysed: items are the background and
    every cell occupied in either the expected or the seen right panel; a shape item counts only when cell,
    kind, size and mapped colour all match. An identity pair scores 0 (RECOLOUR moves every colour)."""
    expected = recolour(analyse(left_image))
    seen = analyse(right_image)
    want = {shape.cell: shape for shape in expected.shapes}
    got = {shape.cell: shape for shape in seen.shapes}
    matched = int(expected.background == seen.background)
    matched += sum(got.get(cell) == shape for cell, shape in want.items())
    return matched / (1 + len(want.keys() | got.keys()))


def panel_consistency(joined: Image.Image, left_scene: Scene,
                      given_left: Image.Image | None = None) -> dict[str, float]:
    """The three scores of a (generated) recolour set whose left panel was meant to show left_scene. When the
    left panel was given (`given_left`), the rule is checked against it: the copy in `joined` is decoded with
    the whole canvas (the VAE's decoder mixes panels), so it can differ from what the model was given."""
    left, right = split_panels(joined, 2, "row")
    return {"caption_left": caption_match(left, left_scene),
            "caption_right": caption_match(right, recolour(left_scene)),
            "rule": rule_score(left if given_left is None else given_left, right)}
