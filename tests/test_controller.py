"""The adaptive controller on a scripted similarity trace, with the firing step worked out by hand."""
import json
import math

import pytest

from bitmar_core.training.controller import AdaptiveController, ControllerConfig, encoder_parameters

HIGH, LOW, DROP_AT = 0.5, 0.2, 300  # similarity 0.5 for steps 1..300, then 0.2


def trace(step: int) -> float:
    return HIGH if step <= DROP_AT else LOW


def expected_fire_step(span: int = 200, threshold: float = 0.12) -> int:
    """EMA e_t = e_{t−1} + a(s_t − e_{t−1}), a = 2/(span+1), e_1 = s_1. After the drop,
    e_{300+k} = LOW + (HIGH − LOW)(1 − a)^k and the recent max stays HIGH, so the controller fires
    at the first k with HIGH − e > threshold, i.e. (1 − a)^k < (HIGH − LOW − threshold)/(HIGH − LOW)."""
    a = 2.0 / (span + 1)
    ratio = (HIGH - LOW - threshold) / (HIGH - LOW)  # 0.6
    k = math.floor(math.log(ratio) / math.log(1 - a)) + 1
    e = lambda k: LOW + (HIGH - LOW) * (1 - a) ** k  # noqa: E731
    assert HIGH - e(k) > threshold >= HIGH - e(k - 1)
    return DROP_AT + k


def run(ctrl: AdaptiveController, steps: range) -> list[dict]:
    return [e for s in steps if (e := ctrl.update(s, trace(s))) is not None]


def test_ema_follows_its_formula(tiny_model):
    ctrl = AdaptiveController(ControllerConfig(ema_span=4), tiny_model)
    ctrl.update(1, 1.0)
    ctrl.update(2, 0.0)
    assert ctrl.ema == pytest.approx(1.0 - 0.4)  # a = 2/5
    ctrl.update(3, 0.0)
    assert ctrl.ema == pytest.approx(0.6 * 0.6)


def test_fires_at_the_hand_computed_step_and_not_within_the_cooldown(tiny_model):
    fire = expected_fire_step()
    assert fire == 352
    cfg = ControllerConfig(actions=["upweight_cm"], duration=100, cooldown=50)
    ctrl = AdaptiveController(cfg, tiny_model)
    events = run(ctrl, range(1, fire))
    assert events == []  # just one step short
    events = run(ctrl, range(fire, fire + 1))
    assert [(e["event"], e["step"], e["action"]) for e in events] == [("intervene", fire, "upweight_cm")]
    assert ctrl.cm_weight(1.5) == pytest.approx(3.0)
    # It ends after `duration` steps; the trace is still low, but the cooldown holds it back ...
    events = run(ctrl, range(fire + 1, fire + 100 + 50))
    assert [(e["event"], e["step"]) for e in events] == [("undo", fire + 100)]
    assert ctrl.cm_weight(1.5) == 1.5
    # ... until exactly `cooldown` steps after the end (the recent max, 0.5, is still in the window).
    events = run(ctrl, range(fire + 150, fire + 151))
    assert [(e["event"], e["step"]) for e in events] == [("intervene", fire + 150)]


def test_paper_values_never_fire_twice_within_800_steps(tiny_model):
    ctrl = AdaptiveController(ControllerConfig(), tiny_model)
    events = run(ctrl, range(1, 5000))
    fires = [e["step"] for e in events if e["event"] == "intervene"]
    assert fires[0] == expected_fire_step()
    ends = [e["step"] for e in events if e["event"] == "undo"]
    assert ends[0] == fires[0] + 1500
    for nxt, prev_end in zip(fires[1:], ends):
        assert nxt - prev_end >= 800


@pytest.mark.parametrize("path", ["text", "vision"])
def test_freeze_sets_requires_grad_false_and_restores_after_1500_steps(tiny_model, path):
    names = set(encoder_parameters(tiny_model, path))
    assert names and all(n.startswith(("text_encoder.", "vision.", "fusion.text_head.", "fusion.vision_head."))
                         for n in names)
    tiny_model.fusion.text_head.scale.requires_grad_(False)  # a flag that was already off stays off
    before = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    ctrl = AdaptiveController(ControllerConfig(actions=[f"freeze_{path}"]), tiny_model)
    fire = expected_fire_step()
    run(ctrl, range(1, fire + 1))
    assert ctrl.active["action"] == f"freeze_{path}"
    for n, p in tiny_model.named_parameters():
        assert p.requires_grad == (before[n] and n not in names), n
    assert {id(p) for p in ctrl.frozen_parameters()} == {id(p) for n, p in tiny_model.named_parameters() if n in names}
    run(ctrl, range(fire + 1, fire + 1500))
    assert ctrl.active is not None  # still frozen at step fire + 1499
    run(ctrl, range(fire + 1500, fire + 1501))
    assert ctrl.active is None
    assert {n: p.requires_grad for n, p in tiny_model.named_parameters()} == before


def test_frozen_encoder_gets_no_gradient(tiny_model, tiny_scene_batch):
    ctrl = AdaptiveController(ControllerConfig(actions=["freeze_vision"]), tiny_model)
    run(ctrl, range(1, expected_fire_step() + 1))
    tiny_model.train()
    tiny_model(tiny_scene_batch)["loss"].backward()
    assert all(p.grad is None for p in ctrl.frozen_parameters())
    assert tiny_model.text_encoder.blocks[0].attn.qkv.weight.grad is not None


def test_action_choice_is_seeded(tiny_model):
    def choices(seed):
        ctrl = AdaptiveController(ControllerConfig(duration=10, cooldown=0, seed=seed), tiny_model)
        events = run(ctrl, range(1, 2000))
        return [e["action"] for e in events if e["event"] == "intervene"]

    a, b = choices(3), choices(3)
    assert a == b and len(a) > 5 and len(set(a)) > 1


def test_state_dict_round_trip_mid_intervention(tiny_model, tiny_config):
    from bitmar_core.model.bitmar import BitMar

    ctrl = AdaptiveController(ControllerConfig(actions=["freeze_text", "freeze_vision"], seed=1), tiny_model)
    fire = expected_fire_step()
    run(ctrl, range(1, fire + 10))
    state = json.loads(json.dumps(ctrl.state_dict()))  # must survive JSON
    other_model = BitMar(tiny_config)
    other = AdaptiveController(ControllerConfig(actions=["freeze_text", "freeze_vision"], seed=1), other_model)
    other.load_state_dict(state)
    assert {n: p.requires_grad for n, p in other_model.named_parameters()} == \
        {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    later = range(fire + 10, 6000)
    assert run(other, later) == run(ctrl, later)
    assert other.ema == ctrl.ema


def test_no_similarity_only_advances_the_clock(tiny_model):
    ctrl = AdaptiveController(ControllerConfig(actions=["upweight_cm"], duration=5), tiny_model)
    run(ctrl, range(1, expected_fire_step() + 1))
    ema, n = ctrl.ema, ctrl.n_updates
    events = [ctrl.update(s, None) for s in range(expected_fire_step() + 1, expected_fire_step() + 6)]
    assert ctrl.ema == ema and ctrl.n_updates == n
    assert [e["event"] for e in events if e] == ["undo"]


def test_disabled_controller_never_intervenes(tiny_model):
    ctrl = AdaptiveController(ControllerConfig(enabled=False), tiny_model)
    assert run(ctrl, range(1, 3000)) == []


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="actions"):
        ControllerConfig(actions=["freeze_decoder"])
    with pytest.raises(ValueError, match="ema_span"):
        ControllerConfig(ema_span=0)
