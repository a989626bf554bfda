"""What the scripts share to talk with their user: flags checked up front, errors printed as one line.

`USER_ERRORS` are the exceptions the scripts print as `error: <message>` (ours name the file, key or flag at
fault and what was expected, so a stack trace would add nothing); `check_device` and `ranged` check flags
before any weight loads.
"""

import argparse
import math

import torch

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, ConnectionError)


def check_device(name: str) -> torch.device:
    """A torch device that exists here, checked before anything is loaded."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this torch has no CUDA GPU available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available here; use --device cpu")
    return device


def ranged(kind, low: float, high: float = math.inf):
    """An argparse type: a finite `kind` (int or float) in [low, high], refused with what was expected (nan
    and inf mean nothing for a flag: a learning rate or a scale of inf gives NaN weights or a black image)."""
    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not low <= value <= high:
            if high == math.inf:
                raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {text}")
        return value
    return parse
