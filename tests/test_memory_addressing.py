"""The memory's addressing beyond the paper (`memory_read: cosine`, `memory_write_usage`,
`memory_init: zero`), checked against float64 references written here, plus the behaviour each
was added for: a faded slot is found as when it was new, a second episode never lands on the
first one's slot, an empty memory reads nothing, and the training path (write_sequence) is the
robot's path (EpisodicMemoryState.write_) step for step."""
import math

import numpy as np
import pytest
import torch

from bitmar_core.model.config import BitMarConfig
from bitmar_core.model.memory import EpisodicMemory

from conftest import tiny_config_dict


def _memory(seed: int = 0, **over) -> EpisodicMemory:
    torch.manual_seed(seed)
    fields = dict(memory_read="cosine", memory_init="zero", memory_write_usage=50.0, memory_alpha=1.0) | over
    mem = EpisodicMemory(BitMarConfig(**tiny_config_dict(**fields)))
    with torch.no_grad():  # a key map that is not the identity, so the reference must apply it
        mem.key_proj.weight.copy_(torch.eye(32) + 0.3 * torch.randn(32, 32))
        mem.write_proj.weight.normal_()
    return mem


def _ref_read(M: np.ndarray, q: np.ndarray, P: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    keys = M @ P.T
    qk = P @ q
    cos = np.array([k @ qk / max(np.linalg.norm(k), 1e-6) / np.linalg.norm(qk) for k in keys])
    w = np.exp(tau * cos - (tau * cos).max())
    w /= w.sum()
    return w @ M, w


def test_cosine_read_matches_a_float64_reference():
    mem = _memory()
    g = torch.Generator().manual_seed(1)
    M, q = torch.randn(8, 32, generator=g), torch.randn(3, 32, generator=g)
    M[5] = 0.0  # an empty slot: cosine 0, not NaN
    with torch.no_grad():
        M_r, w_r = mem.read(M, q)
    P, tau = mem.key_proj.weight.detach().double().numpy(), float(mem.read_scale.detach())
    for b in range(3):
        ref_r, ref_w = _ref_read(M.double().numpy(), q[b].double().numpy(), P, tau)
        np.testing.assert_allclose(w_r[b].numpy(), ref_w, atol=1e-5)
        np.testing.assert_allclose(M_r[b].numpy(), ref_r, atol=1e-5)
    assert torch.isfinite(w_r).all()


def test_a_faded_slot_is_found_exactly_as_when_it_was_new():
    """Forgetting scales a slot down; cosine scores ignore the scale (dot scores would not)."""
    mem = _memory()
    g = torch.Generator().manual_seed(2)
    M, q = torch.randn(8, 32, generator=g), torch.randn(1, 32, generator=g)
    with torch.no_grad():
        dot = EpisodicMemory(BitMarConfig(**tiny_config_dict()))
        top = int(dot.read(M, q)[1].argmax())  # the slot a dot-product read picks
        faded = M.clone()
        faded[top] *= 0.05
        assert torch.allclose(mem.read(M, q)[1], mem.read(faded, q)[1], atol=1e-6)
        assert int(dot.read(faded, q)[1].argmax()) != top


def test_write_weights_match_the_reference_and_usage_steers_writes_off_used_slots():
    mem = _memory()
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 32, generator=g)
    u = torch.rand(8, generator=g)
    with torch.no_grad():
        w = mem.write_weights(q, u)[0].double().numpy()
    W = mem.write_proj.weight.detach().double().numpy()
    qn = q[0].double().numpy() / np.linalg.norm(q[0].double().numpy())
    logits = float(mem.write_log_scale.detach().exp()) * (W @ qn) / np.linalg.norm(W, axis=1) - 50.0 * u.double().numpy()
    ref = np.exp(logits - logits.max())
    np.testing.assert_allclose(w, ref / ref.sum(), atol=1e-6)
    # the same episode written twice: with λ the second write goes elsewhere; with λ = 0 on top
    for lam, same in ((50.0, False), (0.0, True)):
        m = _memory(memory_write_usage=lam)
        state = m.new_state()
        first = int(state.write_(q).argmax())
        second = int(state.write_(q).argmax())
        assert (first == second) is same, lam


def test_an_empty_memory_reads_nothing_and_a_written_one_returns_the_episode():
    mem = _memory(memory_slots=32)  # 20 episodes, 32 slots
    state = mem.new_state()
    g = torch.Generator().manual_seed(4)
    qs = 2 * torch.randn(20, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(state.read(qs[:1], touch=False)[0], torch.zeros(1, 32))
        for x in qs:
            state.write_(x)
        for e in (0, 7, 19):  # the oldest has faded most; each is still the one its own cue finds
            M_r, w_r = state.read(qs[e:e + 1], touch=False)
            cos = torch.nn.functional.cosine_similarity(M_r, qs)
            assert int(cos.argmax()) == e and float(cos[e]) > 0.9, e


@pytest.mark.parametrize("usage_weight", [0.0, 50.0])
def test_write_sequence_is_the_runtime_write_with_usage(usage_weight):
    mem = _memory(memory_write_usage=usage_weight)
    g = torch.Generator().manual_seed(5)
    q_seq = 2 * torch.randn(2, 9, 32, generator=g)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 4] = False
    with torch.no_grad():
        M = mem.write_sequence(q_seq, mask)
    for b in range(2):
        state = mem.new_state()
        for e in range(9):
            if mask[b, e]:
                state.write_(q_seq[b, e])
        assert torch.allclose(M[b], state.M, atol=1e-5), b


def test_zero_init_is_a_buffer_and_learned_init_a_parameter():
    zero = _memory()
    assert "M0" not in dict(zero.named_parameters()) and torch.equal(zero.M0, torch.zeros(8, 32))
    assert "M0" in dict(EpisodicMemory(BitMarConfig(**tiny_config_dict())).named_parameters())
    assert math.isclose(float(zero.read_scale), 30.0, rel_tol=1e-6)


@pytest.mark.parametrize("field,value", [("memory_read", "l2"), ("memory_init", "random"), ("memory_write_usage", -1.0)])
def test_bad_memory_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        BitMarConfig(**tiny_config_dict(**{field: value}))
