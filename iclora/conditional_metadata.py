"""What a conditional IC-LoRA (`train.py --ref-panel`) records in its file's metadata, and reading it back.

Its reference panels, the panel count and layout (iclora/panels.py), how reference tokens were given (a mode
of iclora/references.py) and the trained panel size: sample.py and toy/score.py need them to use the LoRA as
it was trained. Every train.py LoRA also records its base's variant (dev, fill or kontext), which
`check_lora_variant` holds to the model it is loaded on. safetensors metadata maps str to str; the values are
checked when they are read.
"""

from iclora.panels import LAYOUTS
from iclora.references import REF_MODES
from minflux.loading import open_safetensors
from minflux.sampling import MAX_PANELS, MAX_SIDE
from minflux.variants import VARIANTS

CONDITIONAL_KEYS = ("ref_panels", "panels", "layout", "ref_mode", "panel_height", "panel_width")


def conditional_metadata(ref_panels: list[int], panels: int, layout: str, ref_mode: str, panel_height: int,
                         panel_width: int) -> dict[str, str]:
    """The metadata of a conditional IC-LoRA: its 1-based reference panels ("1" or "1,3"), the panel count
    and layout, the reference mode and the trained panel size."""
    return {"ref_panels": ",".join(map(str, ref_panels)), "panels": str(panels), "layout": layout,
            "ref_mode": ref_mode, "panel_height": str(panel_height), "panel_width": str(panel_width)}


def read_conditional_metadata(path) -> dict | None:
    """`conditional_metadata`'s values read back from a LoRA file (ints as ints); None for a plain LoRA."""
    with open_safetensors(path, "not a readable safetensors LoRA file") as f:
        meta = f.metadata() or {}
    if "ref_panels" not in meta:
        return None
    try:
        found = {key: meta[key] for key in CONDITIONAL_KEYS}
        found["ref_panels"] = [int(k) for k in found["ref_panels"].split(",")]
        for key in ("panels", "panel_height", "panel_width"):
            found[key] = int(found[key])
    except (KeyError, ValueError) as e:
        keys = ", ".join(CONDITIONAL_KEYS)
        raise ValueError(f"{path}: broken conditional IC-LoRA metadata ({type(e).__name__}: {e}); expected "
                         f"the keys {keys} as train.py --ref-panel writes them") from None
    sizes = (found["panel_height"], found["panel_width"])
    bad_size = any(side < 16 or side % 16 for side in sizes)
    if found["ref_mode"] not in REF_MODES or found["layout"] not in LAYOUTS or bad_size:
        raise ValueError(f"{path}: broken conditional IC-LoRA metadata: ref_mode {found['ref_mode']!r}, "
                         f"layout {found['layout']!r}, panel size {sizes[1]}x{sizes[0]}; expected one of "
                         f"{REF_MODES}, one of {LAYOUTS}, sides multiples of 16")
    check_limits(found, path)
    return found


def check_limits(found: dict, path):
    """The panel count and size a LoRA file asks for, within what one sampling run may allocate."""
    panels, sizes = found["panels"], (found["panel_height"], found["panel_width"])
    if not 1 <= panels <= MAX_PANELS or max(sizes) > MAX_SIDE:
        raise ValueError(f"{path}: conditional IC-LoRA metadata asks for {panels} panel(s) of {sizes[1]}x"
                         f"{sizes[0]} px; the limit is 1 to {MAX_PANELS} panels of at most {MAX_SIDE} px a "
                         f"side")


def recorded_variant(path) -> str | None:
    """The base variant (dev, fill, kontext) a LoRA file's metadata records; None where it records none."""
    with open_safetensors(path, "not a readable safetensors LoRA file") as f:
        recorded = (f.metadata() or {}).get("base_variant")
    if recorded is not None and recorded not in VARIANTS:
        raise ValueError(f"{path}: broken metadata: base_variant {recorded!r}; expected one of "
                         f"{', '.join(VARIANTS)}")
    return recorded


def check_lora_variant(path, variant: str) -> str | None:
    """Refuses a LoRA file whose metadata records another base variant than `variant` (the model's: dev, fill
    or kontext), naming both; returns a note for the caller to print where the file records none (a LoRA
    from another trainer, or from train.py before the variant was recorded), else None."""
    recorded = recorded_variant(path)
    if recorded is None:
        return (f"note: {path} does not record which FLUX.1 model it was trained on (no base_variant in its "
                f"metadata); it is used on this {variant} model as it is")
    if recorded != variant:
        raise ValueError(f"{path} is a LoRA for FLUX.1 {recorded} (its metadata's base_variant) and this "
                         f"model is FLUX.1 {variant}: load it on a {recorded} model, or use a LoRA trained "
                         f"on {variant}")
    return None
