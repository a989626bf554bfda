"""Panel sets as one canvas (In-Context LoRA, arXiv 2410.23775 §3): where each panel sits; the joint caption.

A set of n panels is ONE image with ONE caption. Panels tile the canvas in a layout: "row" (side by side),
"column" (stacked) or "grid" (ceil(sqrt(n)) columns filled row-major; unused cells of the last row stay
empty). Sizes are (height, width), like the image tensors; PIL's sizes are (width, height) and its boxes
(left, top, right, bottom).
"""

import math

from PIL import Image

LAYOUTS = ("row", "column", "grid")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def grid_shape(n: int, layout: str) -> tuple[int, int]:
    """(rows, cols) of the cells that hold n panels in a layout."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}, expected one of {LAYOUTS}")
    if layout == "row":
        return 1, n
    if layout == "column":
        return n, 1
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def panel_boxes(height: int, width: int, n: int, layout: str) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of each of n panels on a height×width canvas, in panel order. Cell edges
    at floor(i·width / cols) and floor(j·height / rows) tile the canvas exactly: where the grid does not
    divide the canvas, cells differ by one pixel at most."""
    rows, cols = grid_shape(n, layout)
    xs = [i * width // cols for i in range(cols + 1)]
    ys = [j * height // rows for j in range(rows + 1)]
    return [(xs[k % cols], ys[k // cols], xs[k % cols + 1], ys[k // cols + 1]) for k in range(n)]


def panel_size(n: int, layout: str, height: int, width: int) -> tuple[int, int]:
    """(height, width) of one of the n panels that tile a height×width canvas; each must be a multiple of
    16 px."""
    rows, cols = grid_shape(n, layout)
    for side, name, cells in ((width, "width", cols), (height, "height", rows)):
        if side <= 0 or side % (16 * cells):
            nearest = 16 * cells * max(1, round(side / (16 * cells)))
            raise ValueError(f"a canvas {name} of {side} px does not split into {cells} panels of 16-px "
                             f"multiples; use a canvas {name} of {nearest} (panels {nearest // cells} px) or "
                             f"give the panel {name}")
    return height // rows, width // cols


def canvas_size(n: int, layout: str, panel_height: int, panel_width: int) -> tuple[int, int]:
    """(height, width) of the canvas joining n panels of panel_height×panel_width in a layout."""
    for side, name in ((panel_width, "width"), (panel_height, "height")):
        if side <= 0 or side % 16:
            nearest = 16 * max(1, round(side / 16))
            raise ValueError(f"panel {name} {side} is not a positive multiple of 16 px (a panel must cover "
                             f"whole latent tokens); nearest valid: {nearest}")
    rows, cols = grid_shape(n, layout)
    return rows * panel_height, cols * panel_width


def join_panels(panels: list[Image.Image], layout: str) -> Image.Image:
    """Pastes equal-sized panels into one RGB image in the given layout (empty grid cells stay black)."""
    sizes = sorted({panel.size for panel in panels})
    if len(sizes) != 1:
        raise ValueError(f"join_panels needs at least one panel, all of one size; got sizes {sizes}")
    w, h = sizes[0]
    rows, cols = grid_shape(len(panels), layout)
    canvas = Image.new("RGB", (cols * w, rows * h))
    boxes = panel_boxes(rows * h, cols * w, len(panels), layout)
    for panel, (left, top, _, _) in zip(panels, boxes, strict=True):
        canvas.paste(panel.convert("RGB"), (left, top))
    return canvas


def split_panels(image: Image.Image, n: int, layout: str) -> list[Image.Image]:
    """The n panels of a joined image (a grid's unused cells are dropped)."""
    return [image.crop(box) for box in panel_boxes(image.height, image.width, n, layout)]


def joint_caption(summary: str | None, panel_prompts: list[str]) -> str:
    """The paper's joint caption, a sentence on the whole set, then one marked description per panel:
        "This three-panel image shows <summary>; [IMAGE1] <p1>; [IMAGE2] <p2>; [IMAGE3] <p3>"
    (without a summary: "This three-panel image; [IMAGE1] ..."). With no panel prompts the summary comes
    back unchanged: a caption written by hand in the LoRA's own style ([SCENE-1], [LEFT], ...) passes."""
    if not panel_prompts:
        if not summary or not summary.strip():
            raise ValueError("give a prompt, panel prompts, or both")
        return summary
    for i, prompt in enumerate(panel_prompts, 1):
        if not prompt.strip():
            raise ValueError(f"panel prompt {i} is empty")
    n = len(panel_prompts)
    count = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n
    head = f"This {count}-panel image"
    if summary and summary.strip():
        head += f" shows {summary.strip()}"
    marked = [f"[IMAGE{i}] {prompt.strip()}" for i, prompt in enumerate(panel_prompts, 1)]
    return "; ".join([head, *marked])
