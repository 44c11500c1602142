"""The cosine-with-warm-restarts schedule against SGDR's formula and torch's implementation."""
import math

import pytest
import torch

from bitmar_core.training.schedule import CosineWarmRestarts


def sgdr(step: int, base: float, t0: int, t_mult: int, floor: float) -> float:
    """Loshchilov & Hutter's SGDR, cycle by cycle (the independent reference)."""
    t_i, t = t0, step
    while t >= t_i:
        t -= t_i
        t_i *= t_mult
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * t / t_i))


def test_paper_schedule_matches_the_formula_at_every_step():
    s = CosineWarmRestarts(base_lr=2e-4, t0=1000, t_mult=2, min_lr_ratio=0.1)
    for step in range(0, 15_000, 7):
        assert s.lr(step) == pytest.approx(sgdr(step, 2e-4, 1000, 2, 2e-5), rel=1e-12, abs=1e-15)


def test_restarts_happen_at_1000_3000_7000():
    s = CosineWarmRestarts(base_lr=2e-4, t0=1000, t_mult=2, min_lr_ratio=0.1)
    for start in (0, 1000, 3000, 7000):
        assert s.lr(start) == pytest.approx(2e-4)
        assert s.lr(start - 1) < 2.1e-5 if start else True
    assert s.cycle_position(2999) == (1999, 2000)
    assert s.cycle_position(3000) == (0, 4000)
    # Half-way through the second cycle the lr is half-way between floor and peak.
    assert s.lr(1000 + 1000) == pytest.approx(2e-5 + 0.5 * (2e-4 - 2e-5))


def test_equals_torch_cosine_annealing_warm_restarts():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2e-4)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10, T_mult=2, eta_min=2e-5)
    s = CosineWarmRestarts(base_lr=2e-4, t0=10, t_mult=2, min_lr_ratio=0.1)
    for step in range(200):
        assert s.lr(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        ref.step()


def test_linear_warmup_then_cycles_start():
    s = CosineWarmRestarts(base_lr=1e-3, t0=100, t_mult=1, min_lr_ratio=0.1, warmup_steps=10)
    assert [s.lr(i) for i in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert s.lr(9) == pytest.approx(1e-3)
    assert s.lr(10) == pytest.approx(1e-3)  # cycle 0 begins after the warm-up
    assert s.lr(10 + 99) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert s.lr(110) == pytest.approx(1e-3)  # t_mult=1: a restart every 100 steps


def test_apply_sets_every_param_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=1.0)
    s = CosineWarmRestarts(base_lr=2e-4, t0=1000, t_mult=2)
    assert s.apply(opt, 500) == pytest.approx(sgdr(500, 2e-4, 1000, 2, 2e-5))
    assert [g["lr"] for g in opt.param_groups] == [s.lr(500)] * 2


@pytest.mark.parametrize("kwargs, field", [({"t0": 0}, "t0"), ({"t_mult": 0}, "t_mult"),
                                           ({"min_lr_ratio": 1.5}, "min_lr_ratio"), ({"base_lr": 0}, "base_lr")])
def test_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CosineWarmRestarts(**kwargs)
