"""Learning-rate schedule (paper §3.6): cosine annealing with warm restarts (SGDR), T0=1000, Tmult=2,
floor 0.1·lr, after an optional short linear warm-up.

A pure function of the optimizer step, so resuming needs nothing but the step count. Without
warm-up it equals `torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(T_0, T_mult, eta_min)`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class CosineWarmRestarts:
    base_lr: float = 2e-4
    t0: int = 1000  # length of the first cycle, in optimizer steps
    t_mult: int = 2  # each cycle is t_mult times longer than the previous one
    min_lr_ratio: float = 0.1  # floor = min_lr_ratio · base_lr
    warmup_steps: int = 0  # linear ramp to base_lr; cycles start after it

    def __post_init__(self) -> None:
        if self.base_lr <= 0:
            raise ValueError(f"schedule base_lr = {self.base_lr}: expected a learning rate > 0")
        if not isinstance(self.t0, int) or self.t0 < 1:
            raise ValueError(f"schedule t0 = {self.t0!r}: expected an integer >= 1")
        if not isinstance(self.t_mult, int) or self.t_mult < 1:
            raise ValueError(f"schedule t_mult = {self.t_mult!r}: expected an integer >= 1")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule min_lr_ratio = {self.min_lr_ratio}: expected a fraction in [0, 1]")
        if self.warmup_steps < 0:
            raise ValueError(f"schedule warmup_steps = {self.warmup_steps}: expected >= 0")

    def cycle_position(self, t: int) -> tuple[int, int]:
        """Steps t after warm-up → (T_cur, T_i): position within the current cycle and its length."""
        if self.t_mult == 1:
            return t % self.t0, self.t0
        # Cycle n starts at t0·(t_mult^n − 1)/(t_mult − 1).
        n = int(math.log(t * (self.t_mult - 1) / self.t0 + 1, self.t_mult))
        start = self.t0 * (self.t_mult ** n - 1) // (self.t_mult - 1)
        if start > t:  # float log rounding at a boundary
            n -= 1
        elif start + self.t0 * self.t_mult ** n <= t:
            n += 1
        start = self.t0 * (self.t_mult ** n - 1) // (self.t_mult - 1)
        return t - start, self.t0 * self.t_mult ** n

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        t_cur, t_i = self.cycle_position(step - self.warmup_steps)
        floor = self.min_lr_ratio * self.base_lr
        return floor + (self.base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t_cur / t_i))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every param group's lr for `step`; returns it."""
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def to_dict(self) -> dict:
        return asdict(self)
