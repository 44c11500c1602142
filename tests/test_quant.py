"""Quantisers against the BitNet b1.58 formulas on hand-worked tensors; packing; STE gradients."""
import torch
import torch.nn as nn

from bitmar_core.model.quant import (BitLinear, PackedBitLinear, absmax_int8, absmean_ternary, pack_model,
                               pack_ternary, unpack_ternary, zero_weight_fraction)

W = torch.tensor([[0.5, -1.0], [0.1, 2.0]])  # mean|W| = 0.9; W/0.9 = [.556, -1.11, .111, 2.22]


def test_absmean_ternary_hand_worked():
    t, beta = absmean_ternary(W)
    assert torch.isclose(beta, torch.tensor(0.9))
    assert torch.equal(t, torch.tensor([[1.0, -1.0], [0.0, 1.0]]))  # 2.22 rounds to 2, clipped to 1


def test_absmax_int8_hand_worked():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    q, s = absmax_int8(x)
    # row 0: s = 127/2 = 63.5 → [63.5, -127, 31.75] → round-half-even [64, -127, 32]
    assert torch.equal(q, torch.tensor([[64.0, -127.0, 32.0], [0.0, 0.0, 0.0]]))
    assert s[0, 0] == 63.5
    assert q.abs().max() <= 127


def _reference_bitlinear(x, w, gamma):
    beta = w.abs().mean()
    t = torch.clamp(torch.round(w / (beta + 1e-5)), -1, 1)
    s = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    xq = torch.clamp(torch.round(x * s), -127, 127) / s
    return gamma * (xq @ (t * beta).T)


def test_bitlinear_forward_equals_formula():
    torch.manual_seed(0)
    layer = BitLinear(5, 3)
    with torch.no_grad():
        layer.scale.fill_(1.7)
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        assert torch.allclose(layer(x), _reference_bitlinear(x, layer.weight, 1.7), atol=1e-6)


def test_ste_gradient_is_identity():
    """dL/dx and dL/dW equal those of the plain linear map evaluated at the quantised values."""
    torch.manual_seed(1)
    layer = BitLinear(6, 4)
    with torch.no_grad():
        layer.weight[0, 0] = 5.0  # far outside the clip range: gradient still passes (BitNet STE)
        layer.scale.fill_(0.5)
    x = torch.randn(3, 6, requires_grad=True)
    g = torch.randn(3, 4)
    (layer(x) * g).sum().backward()
    with torch.no_grad():
        beta = layer.weight.abs().mean()
        wq = torch.clamp(torch.round(layer.weight / (beta + 1e-5)), -1, 1) * beta
        s = 127.0 / x.abs().max(dim=-1, keepdim=True).values
        xq = torch.round(x * s) / s
    assert torch.allclose(x.grad, 0.5 * g @ wq, atol=1e-6)
    assert torch.allclose(layer.weight.grad, 0.5 * g.T @ xq, atol=1e-6)
    assert layer.weight.grad[0, 0] != 0
    assert torch.allclose(layer.scale.grad, ((xq @ wq.T) * g).sum().reshape(1), atol=1e-5)


def test_pack_hand_worked_byte_and_round_trip():
    t = torch.tensor([[-1, 0, 1, 1]], dtype=torch.int8)
    assert pack_ternary(t).tolist() == [[0 | 1 << 2 | 2 << 4 | 2 << 6]]  # codes t+1, 2 bits each = 164
    torch.manual_seed(2)
    for in_f in (1, 4, 7, 13):
        t = torch.randint(-1, 2, (5, in_f), dtype=torch.int8)
        p = pack_ternary(t)
        assert p.dtype == torch.uint8 and p.shape == (5, (in_f + 3) // 4)
        assert torch.equal(unpack_ternary(p, in_f), t)


def test_packed_equals_training_forward():
    torch.manual_seed(3)
    layer = BitLinear(13, 7)
    with torch.no_grad():
        layer.scale.fill_(1.3)
    packed = PackedBitLinear.from_bitlinear(layer)
    x = torch.randn(4, 13)
    with torch.no_grad():
        assert torch.equal(packed(x), layer(x))  # bit-exact at inference
    y_train = layer(x.requires_grad_())  # STE path: equal up to FP32 rounding
    assert torch.allclose(packed(x.detach()), y_train.detach(), rtol=1e-6, atol=1e-6)
    assert packed.weight_packed.numel() == 7 * 4  # 2 bits per weight
    assert torch.equal(packed.ternary(), absmean_ternary(layer.weight.detach())[0].to(torch.int8))


def test_zero_weight_fraction_known_tensor():
    a, b = BitLinear(2, 2), BitLinear(2, 1)
    with torch.no_grad():
        a.weight.copy_(W)  # T = [[1,-1],[0,1]]: 1 zero of 4
        b.weight.copy_(torch.tensor([[0.0, 1.0]]))  # β = .5, T = [0, 1]: 1 zero of 2
    m = nn.Sequential(a, nn.ReLU(), b)
    assert zero_weight_fraction(m) == 2 / 6
    assert zero_weight_fraction(pack_model(m)) == 2 / 6


def test_pack_model_replaces_every_bitlinear(tiny_model):
    ids = torch.randint(0, 60, (1, 5))
    with torch.no_grad():
        before = tiny_model.decode(ids)
        n = sum(isinstance(m, BitLinear) for m in tiny_model.modules())
        pack_model(tiny_model)
        assert not any(isinstance(m, BitLinear) for m in tiny_model.modules())
        assert sum(isinstance(m, PackedBitLinear) for m in tiny_model.modules()) == n
        assert torch.equal(tiny_model.decode(ids), before)
