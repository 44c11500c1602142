"""Adaptive training controller (paper §3.5): watch a 200-step EMA of the cross-modal cosine
similarity; when it falls more than 0.12 below its recent maximum, intervene for 1,500 steps by
freezing one encoder path or up-weighting L_cm, then undo. At least 800 steps between interventions.

EMA: e_1 = s_1, e_t = e_{t−1} + a·(s_t − e_{t−1}) with a = 2/(span+1) (the usual "N-step" EMA).
Recent maximum: the largest e over the last `max_window` updates. Cooldown: counted from the end
of the previous intervention. The action is drawn with a seeded RNG, so every DDP rank (fed the
same all-reduced similarity) takes the same decision.
"""
from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import asdict, dataclass, field

import torch.nn as nn

log = logging.getLogger(__name__)

ACTIONS = ("freeze_text", "freeze_vision", "upweight_cm")


@dataclass
class ControllerConfig:
    enabled: bool = True
    ema_span: int = 200  # steps of the similarity EMA
    drop_threshold: float = 0.12  # fire when EMA < recent max − this
    max_window: int = 1000  # "recent" maximum: over this many latest steps
    min_steps: int = 200  # no decision before the EMA has seen this many steps
    cooldown: int = 800  # steps between the end of one intervention and the next
    duration: int = 1500  # steps an intervention lasts
    actions: list[str] = field(default_factory=lambda: list(ACTIONS))
    cm_factor: float = 2.0  # L_cm weight multiplier of 'upweight_cm'
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("ema_span", "max_window", "duration"):
            if getattr(self, name) < 1:
                raise ValueError(f"controller.{name} = {getattr(self, name)}: expected an integer >= 1")
        for name in ("min_steps", "cooldown"):
            if getattr(self, name) < 0:
                raise ValueError(f"controller.{name} = {getattr(self, name)}: expected an integer >= 0")
        if self.drop_threshold <= 0:
            raise ValueError(f"controller.drop_threshold = {self.drop_threshold}: expected > 0")
        bad = [a for a in self.actions if a not in ACTIONS]
        if bad or not self.actions:
            raise ValueError(f"controller.actions = {self.actions}: expected a non-empty subset of {list(ACTIONS)}")
        if self.cm_factor <= 0:
            raise ValueError(f"controller.cm_factor = {self.cm_factor}: expected > 0")


def encoder_parameters(model: nn.Module, path: str) -> dict[str, nn.Parameter]:
    """The parameters of one encoder path of a BitMar: 'text' (text encoder + InfoNCE text head)
    or 'vision' (vision compressor + InfoNCE vision head). The shared token embedding is in neither."""
    prefixes = {"text": ("text_encoder.", "fusion.text_head."),
                "vision": ("vision.", "fusion.vision_head.")}[path]
    return {n: p for n, p in model.named_parameters() if n.startswith(prefixes)}


class AdaptiveController:
    """Call `update(step, similarity)` once per optimizer step; read `cm_weight(base)` before the
    forward. Freezing sets requires_grad False on the chosen path and `undo` restores the flags."""

    def __init__(self, config: ControllerConfig, model: nn.Module):
        self.config = config
        self.model = model
        self._rng = random.Random(config.seed)
        self.ema: float | None = None
        self.n_updates = 0
        self._recent: deque[float] = deque(maxlen=config.max_window)
        self.active: dict | None = None  # {"action", "start", "end", "saved_flags"}
        self.last_end: int | None = None
        self.events: list[dict] = []

    # --- the signal ---
    @property
    def alpha(self) -> float:
        return 2.0 / (self.config.ema_span + 1)

    @property
    def recent_max(self) -> float | None:
        return max(self._recent) if self._recent else None

    def update(self, step: int, similarity: float | None) -> dict | None:
        """Feed the similarity measured at `step` (None: the step had no image–caption items, so
        only the intervention clock advances); returns the event dict when an intervention starts
        or ends at this step (also appended to `events`), else None."""
        event = None
        if self.active is not None and step >= self.active["end"]:
            event = self._undo(step)
        if similarity is None:
            return event
        s = float(similarity)
        self.ema = s if self.ema is None else self.ema + self.alpha * (s - self.ema)
        self.n_updates += 1
        self._recent.append(self.ema)
        if not self.config.enabled or self.active is not None:
            return event
        cooled = self.last_end is None or step - self.last_end >= self.config.cooldown
        if self.n_updates >= self.config.min_steps and cooled and \
                self.recent_max - self.ema > self.config.drop_threshold:
            event = self._intervene(step)
        return event

    # --- the levers ---
    def cm_weight(self, base: float) -> float:
        if self.active is not None and self.active["action"] == "upweight_cm":
            return base * self.config.cm_factor
        return base

    def frozen_parameters(self) -> list[nn.Parameter]:
        if self.active is None or not self.active["action"].startswith("freeze_"):
            return []
        return list(encoder_parameters(self.model, self.active["action"][len("freeze_"):]).values())

    def _intervene(self, step: int) -> dict:
        action = self._rng.choice(self.config.actions)
        saved = {}
        if action.startswith("freeze_"):
            for name, p in encoder_parameters(self.model, action[len("freeze_"):]).items():
                saved[name] = p.requires_grad
                p.requires_grad_(False)
        self.active = {"action": action, "start": step, "end": step + self.config.duration, "saved_flags": saved}
        event = {"event": "intervene", "step": step, "action": action, "ema": self.ema,
                 "recent_max": self.recent_max, "until": self.active["end"]}
        self.events.append(event)
        log.warning("adaptive controller: step %d, similarity EMA %.4f is %.4f below its recent max %.4f: "
                    "%s for %d steps", step, self.ema, self.recent_max - self.ema, self.recent_max,
                    action, self.config.duration)
        return event

    def _undo(self, step: int) -> dict:
        params = dict(self.model.named_parameters())
        for name, flag in self.active["saved_flags"].items():
            params[name].requires_grad_(flag)
        event = {"event": "undo", "step": step, "action": self.active["action"], "ema": self.ema}
        self.events.append(event)
        log.warning("adaptive controller: step %d, %s ends", step, self.active["action"])
        self.active = None
        self.last_end = step
        return event

    # --- resume ---
    def state_dict(self) -> dict:
        """JSON-serialisable state (the RNG state included)."""
        version, internal, gauss = self._rng.getstate()
        return {"config": asdict(self.config), "ema": self.ema, "n_updates": self.n_updates,
                "recent": list(self._recent), "active": self.active, "last_end": self.last_end,
                "events": list(self.events), "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict) -> None:
        """Restore; an intervention that was active is re-applied to the model."""
        if self.active is not None:
            self._undo(self.active["start"])
            self.events.pop()
        self.ema, self.n_updates = state["ema"], state["n_updates"]
        self._recent = deque(state["recent"], maxlen=self.config.max_window)
        self.last_end, self.events = state["last_end"], list(state["events"])
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self.active = state["active"]
        if self.active is not None:
            params = dict(self.model.named_parameters())
            for name in self.active["saved_flags"]:
                params[name].requires_grad_(False)
