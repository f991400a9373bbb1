"""Mixed precision: autocast for the forward pass and, for fp16, a gradient scaler.

One object owns the order that matters: scale the loss before backward, unscale before clipping,
step through the scaler (which skips steps whose gradients overflowed).
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, precision: str, device: torch.device):
        self.precision, self.device = precision, device
        # torch.amp.GradScaler works on CPU too; the old torch.cuda.amp one silently disables itself there.
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            # On CPU autocast leaves the loss in fp16; scaled there it would overflow by itself.
            loss = self.scaler.scale(loss.float())
        loss.backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to their true scale, so that clipping and norms mean what they say."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step the optimizer; return False when the scaler skipped the step because of inf/NaN gradients."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
