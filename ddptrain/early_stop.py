"""Early stopping on a monitored validation metric; its state goes into every checkpoint."""
from __future__ import annotations

import math


class EarlyStopping:
    """Tracks the best value; `should_stop` after `patience` validations in a row without an improvement.

    A non-finite value never counts as an improvement. patience=None never stops, but still tracks the best.
    """

    def __init__(self, mode: str = "min", patience: int | None = None, min_delta: float = 0.0):
        self.mode, self.patience, self.min_delta = mode, patience, min_delta
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        self.bad_validations = 0

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float, epoch: int, step: int) -> bool:
        """Record one validation; return True if it is the new best."""
        if self.improves(value):
            self.best, self.best_epoch, self.best_step, self.bad_validations = value, epoch, step, 0
            return True
        self.bad_validations += 1
        return False

    @property
    def should_stop(self) -> bool:
        # As Keras and Lightning: patience N stops at the Nth validation in a row without an improvement.
        return self.patience is not None and self.bad_validations > 0 and self.bad_validations >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "best_step": self.best_step,
                "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.best_step, self.bad_validations = state["best_step"], state["bad_validations"]
