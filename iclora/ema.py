"""--ema-decay: an exponential moving average of the LoRA weights, updated after every optimizer step, as the
In-Context LoRA authors' trainer keeps it; the saved LoRA and the validation images use it."""

import contextlib

import torch
from torch import Tensor


class EMA:
    """ema ← decay·ema + (1 − decay)·weights for the adapters `params`; decay 0: off, the raw weights serve.
    A --resume `state` gives the average saved with it."""

    def __init__(self, params: dict[str, Tensor], decay: float, state: dict | None = None):
        self.params = params
        self.decay = decay
        self.values = None
        if decay:
            self.values = {n: (state["ema"][n] if state else p.detach()).to(p.device, copy=True)
                           for n, p in params.items()}

    def update(self):
        if self.values is not None:
            with torch.no_grad():
                for n, p in self.params.items():
                    self.values[n].lerp_(p, 1 - self.decay)

    def state(self) -> dict:
        """What the training state keeps of it (nothing when off)."""
        if self.values is None:
            return {}
        return {"ema": {n: v.cpu() for n, v in self.values.items()}}

    @contextlib.contextmanager
    def applied(self):
        """Inside the block the adapters hold the average (when on), their own weights again after."""
        if self.values is None:
            yield
            return
        own = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, v in self.values.items():
                self.params[n].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, v in own.items():
                    self.params[n].copy_(v)
