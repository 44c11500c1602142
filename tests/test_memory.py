"""Episodic memory equations on a hand-worked K=3, C=2 case; forgetting, ΔM penalty, state save/load."""
import math

import pytest
import torch

from bitmar_core.config import BitMarConfig
from bitmar_core.memory import EpisodicMemory, delta_penalty, forget, read, update_usage, write

from conftest import tiny_config_dict

M = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
q = torch.tensor([[1.0, 2.0]])


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_read_hand_worked():
    M_r, w_r = read(M, q)
    w = _softmax([1.0, 2.0, 3.0])  # M q = [1, 2, 3]
    assert torch.allclose(w_r, torch.tensor([w]))
    assert torch.allclose(M_r, torch.tensor([[w[0] + w[2], w[1] + w[2]]]))  # = w_rᵀ M
    assert torch.allclose(M_r, torch.tensor([[0.7552716, 0.9099695]]))


def _memory_k3():
    mem = EpisodicMemory(BitMarConfig(**tiny_config_dict(memory_slots=3, memory_dim=32)))
    mem.write_proj = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        mem.write_proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    return mem


def test_write_hand_worked():
    mem = _memory_k3()
    M_after, w_w = mem.write(M, q)
    w = _softmax([1.0, 2.0, 0.0])  # W_w q = [1, 2, 0]
    assert torch.allclose(w_w, torch.tensor([w]))
    expected = M + 0.2 * torch.tensor([[w[0] * 1, w[0] * 2], [w[1] * 1, w[1] * 2], [w[2] * 1, w[2] * 2]])
    assert torch.allclose(M_after, expected)
    # ||ΔM||_F² = α² · Σ_k w_k² · ||q||²
    assert torch.isclose(delta_penalty(M_after, M), torch.tensor(0.04 * sum(x * x for x in w) * 5.0))
    assert torch.isclose(delta_penalty(M_after, M), torch.tensor(0.1021086), atol=1e-6)


def test_batched_masked_write_is_a_sum_of_single_writes():
    mem = _memory_k3()
    qs = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [3.0, 0.0]])
    M_b, _ = mem.write(M, qs, mask=torch.tensor([True, False, True]))
    M0, _ = mem.write(M, qs[:1])
    M2, _ = mem.write(M, qs[2:])
    assert torch.allclose(M_b, M + (M0 - M) + (M2 - M))


def test_usage_and_forget_hand_worked():
    u = update_usage(torch.ones(3), torch.tensor([[0.2, 0.3, 0.5]]), torch.tensor([[0.1, 0.1, 0.8]]), gamma=0.5)
    assert torch.allclose(u, torch.tensor([0.8, 0.9, 1.8]))  # 0.5·1 + w_w + w_r
    # u = [2, 1, 0] → u/max = [1, .5, 0] → decay 1 − .01 − .1·[0, .5, 1] = [.99, .94, .89]
    out = forget(M, torch.tensor([2.0, 1.0, 0.0]), f0=0.01, f=0.1)
    assert torch.allclose(out, M * torch.tensor([[0.99], [0.94], [0.89]]))


def test_state_write_follows_the_equations():
    torch.manual_seed(0)
    mem = EpisodicMemory(BitMarConfig(**tiny_config_dict()))
    state = mem.new_state()
    x = torch.randn(2, 32)
    M_before = state.M.clone()
    state.write_(x)
    w_r = torch.softmax(x @ M_before.T, dim=-1)
    w_w = torch.softmax(x @ mem.write_proj.weight.T, dim=-1)
    u = w_w.mean(0) + w_r.mean(0)
    decay = 1 - mem.f0 - mem.f * (1 - u / u.max())
    expected = (M_before + mem.alpha * w_w.T @ x) * decay[:, None]
    assert torch.allclose(state.M, expected, atol=1e-6)
    assert torch.allclose(state.usage, u) and int(state.n_writes) == 2


def test_norm_stays_bounded_over_many_writes():
    """Every slot decays by at least f0 per write, so |M_k| ≤ |M0_k| + α·|q|/f0 for ever."""
    torch.manual_seed(0)
    cfg = BitMarConfig(**tiny_config_dict(memory_forget_base=0.01, memory_forget_rate=0.05))
    mem = EpisodicMemory(cfg)
    state = mem.new_state()
    x = torch.randn(32) * 3
    bound = mem.M0.detach().norm(dim=1) + cfg.memory_alpha * x.norm() / cfg.memory_forget_base
    for _ in range(3000):
        state.write_(x)
    assert (state.M.norm(dim=1) <= bound + 1e-4).all()
    state.write_(x)
    norm_a = state.M.norm()
    for _ in range(500):
        state.write_(x)
    assert abs(float(state.M.norm() - norm_a)) < 1e-2 * float(norm_a)  # reached its fixed point


def test_state_save_load_read_identical():
    torch.manual_seed(0)
    mem = EpisodicMemory(BitMarConfig(**tiny_config_dict()))
    a = mem.new_state()
    for _ in range(5):
        a.write_(torch.randn(3, 32))
    a.read(torch.randn(32))
    b = mem.new_state()
    b.load_state_tensors({k: v.clone() for k, v in a.state_tensors().items()})
    for k in ("memory", "usage", "n_writes"):
        assert torch.equal(a.state_tensors()[k], b.state_tensors()[k])
    x = torch.randn(4, 32)
    ra, rb = a.read(x), b.read(x)
    assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1])
    b.reset()
    assert torch.equal(b.M, mem.M0.detach()) and int(b.n_writes) == 0 and b.usage.sum() == 0
    with pytest.raises(ValueError, match="'memory' has shape"):
        b.load_state_tensors({"memory": torch.zeros(3, 3), "usage": torch.zeros(8), "n_writes": torch.tensor(0)})
