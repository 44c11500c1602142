"""Episodic memory equations on a hand-worked K=3, C=2 case; the read sharpness τ; forgetting, ΔM
penalty, state save/load; the batched recall writes against the runtime's one-by-one writes."""
import math

import pytest
import torch

from bitmar_core.model.config import BitMarConfig
from bitmar_core.model.memory import EpisodicMemory, delta_penalty, forget, read, read_each, recall_step, update_usage

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


def _memory_k3(log_scale: float = 0.0):
    mem = EpisodicMemory(BitMarConfig(**tiny_config_dict(memory_slots=3, memory_dim=32)))
    mem.write_proj = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        mem.write_proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        mem.read_log_scale.fill_(log_scale)
    return mem


def test_read_scale_one_gives_the_paper_read():
    """read_log_scale = 0 → τ = 1: eq. 2 exactly as in the paper (the hand values above)."""
    M_r, w_r = _memory_k3(0.0).read(M, q)
    w = _softmax([1.0, 2.0, 3.0])
    assert torch.allclose(w_r, torch.tensor([w]))
    assert torch.allclose(M_r, torch.tensor([[0.7552716, 0.9099695]]))


def test_read_with_a_learned_sharpness_hand_worked():
    """τ = 2: w_r = softmax(2·[1, 2, 3]); a sharper read leans further to slot 3 = (1, 1)."""
    mem = _memory_k3(math.log(2.0))
    assert torch.isclose(mem.read_scale, torch.tensor(2.0))
    M_r, w_r = mem.read(M, q)
    w = _softmax([2.0, 4.0, 6.0])
    assert torch.allclose(w_r, torch.tensor([w]))
    assert torch.allclose(M_r, torch.tensor([[w[0] + w[2], w[1] + w[2]]]))
    assert torch.allclose(M_r, torch.tensor([[0.8826896, 0.9841238]]), atol=1e-6)
    # the default config starts at τ = 10
    assert torch.isclose(EpisodicMemory(BitMarConfig(**tiny_config_dict())).read_scale, torch.tensor(10.0))


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
    w_r = torch.softmax(10.0 * (x @ M_before.T), dim=-1)  # τ = 10 at init
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


def _runtime_memory(seed: int = 0) -> EpisodicMemory:
    torch.manual_seed(seed)
    mem = EpisodicMemory(BitMarConfig(**tiny_config_dict()))
    with torch.no_grad():  # content-dependent addressing, as BitMar initialises it
        mem.write_proj.weight.normal_(0.0, 0.25)
    return mem


def test_recall_step_for_one_memory_is_the_runtime_write():
    """recall_step with B=1, repeated, gives the same M and usage as EpisodicMemoryState.write_."""
    mem = _runtime_memory()
    state = mem.new_state()
    M, u = mem.M0.detach().float().unsqueeze(0), torch.zeros(1, 8)
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        x = 3 * torch.randn(1, 32, generator=g)
        state.write_(x)
        with torch.no_grad():
            M, u = recall_step(M, u, x, mem.write_weights(x), mem.alpha, mem.gamma, mem.f0, mem.f,
                               scale=mem.read_scale)
        assert torch.allclose(M[0], state.M, atol=1e-6)
        assert torch.allclose(u[0], state.usage, atol=1e-6)
    assert (state.M - mem.M0.detach()).abs().max() > 1e-2  # the writes did something


def test_recall_step_leaves_masked_memories_exactly_as_they_were():
    mem = _runtime_memory()
    g = torch.Generator().manual_seed(2)
    M, u = torch.randn(3, 8, 32, generator=g), torch.rand(3, 8, generator=g)
    x = torch.randn(3, 32, generator=g)
    with torch.no_grad():
        M2, u2 = recall_step(M, u, x, mem.write_weights(x), mem.alpha, mem.gamma, mem.f0, mem.f,
                             torch.tensor([True, False, True]), mem.read_scale)
        one, u_one = recall_step(M[2:], u[2:], x[2:], mem.write_weights(x[2:]), mem.alpha, mem.gamma,
                                 mem.f0, mem.f, scale=mem.read_scale)
    assert torch.equal(M2[1], M[1]) and torch.equal(u2[1], u[1])
    assert torch.allclose(M2[2], one[0], atol=1e-7) and torch.allclose(u2[2], u_one[0], atol=1e-7)
    assert not torch.allclose(M2[0], M[0])


def test_write_sequence_equals_each_item_written_one_by_one():
    """B=3 memories from M0, masks with gaps and an all-masked column: each equals a runtime state
    that wrote only that item's unmasked episodes, in order."""
    mem = _runtime_memory()
    g = torch.Generator().manual_seed(3)
    q_seq = 3 * torch.randn(3, 5, 32, generator=g)
    mask = torch.tensor([[True, True, False, True, True],
                         [False, True, False, False, True],
                         [True, False, False, False, False]])
    with torch.no_grad():
        M = mem.write_sequence(q_seq, mask)
    assert M.shape == (3, 8, 32)
    for b in range(3):
        state = mem.new_state()
        for e in range(5):
            if mask[b, e]:
                state.write_(q_seq[b, e])
        assert torch.allclose(M[b], state.M, atol=1e-6), b
    # the order matters (older episodes have faded more)
    with torch.no_grad():
        flipped = mem.write_sequence(q_seq.flip(1), mask.flip(1))
    assert not torch.allclose(flipped[0], M[0], atol=1e-5)


def test_read_each_equals_a_read_per_memory():
    mem = _runtime_memory()
    g = torch.Generator().manual_seed(4)
    Ms, qs = torch.randn(4, 8, 32, generator=g), torch.randn(4, 32, generator=g) * 0.3
    with torch.no_grad():
        M_r, w_r = mem.read_each(Ms, qs)
        for b in range(4):
            ref_r, ref_w = mem.read(Ms[b], qs[b:b + 1])
            by_hand = torch.softmax(10.0 * (Ms[b] @ qs[b]), 0)
            assert torch.allclose(w_r[b], ref_w[0], atol=1e-7) and torch.allclose(w_r[b], by_hand, atol=1e-6)
            assert torch.allclose(M_r[b], ref_r[0], atol=1e-6)
        assert torch.allclose(read_each(Ms, qs)[1][0], torch.softmax(Ms[0] @ qs[0], 0), atol=1e-7)  # scale 1
