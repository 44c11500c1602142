"""1.58-bit quantisation (paper §3.1, BitNet b1.58): ternary absmean weights, per-token int8 activations.

`BitLinear` trains with fake quantisation and a straight-through estimator; `PackedBitLinear` is
its deployable twin (2 bits per weight, 4 per byte) and computes the very same forward.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-5


def absmean_ternary(w: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """T = RoundClip(W / (β + eps), -1, 1) with β = mean|W|; returns (T, β). W ≈ β·T."""
    beta = w.abs().mean()
    return (w / (beta + eps)).round().clamp(-1, 1), beta


def absmax_int8(x: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dim) absmax to [-127, 127]: returns (integer-valued q, s) with x ≈ q / s."""
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    return (x * s).round().clamp(-127, 127), s


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward value q, gradient identity to x. Without autograd we return q itself, so the
    inference forward is bit-identical to `PackedBitLinear` (x + (q - x) may differ by an ulp)."""
    return x + (q - x).detach() if (torch.is_grad_enabled() and x.requires_grad) else q


class BitLinear(nn.Linear):
    """Linear layer with ternary weights (scaled by β) and int8 per-token activations.

    y = γ · (Q8(x) @ (β·T)ᵀ), γ a learned per-layer scale (init 1) — the paper's "learned per-layer
    scales". The activation quantiser never clips (the absmax maps to 127), and we pass the weight
    gradient straight through even where RoundClip saturates, as BitNet does, so the STE is the
    identity for both. No bias: BitNet layers have none and it keeps the packed form to 2 bits + 2
    scalars. Under autocast the matmul runs in the autocast dtype (FP16 training, as the paper's).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.scale = nn.Parameter(torch.ones(1))

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        return absmean_ternary(self.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        q, s = absmax_int8(x)
        t, beta = absmean_ternary(self.weight.float())
        y = F.linear(ste(x, q / s), ste(self.weight.float(), t * beta)) * self.scale
        return y + self.bias if self.bias is not None else y


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """(out, in) ternary → (out, ceil(in/4)) uint8; code = t + 1 ∈ {0,1,2}, weight j at bits 2·(j%4)."""
    out_f, in_f = t.shape
    codes = (t.to(torch.int16) + 1).to(torch.uint8)
    codes = F.pad(codes, (0, (-in_f) % 4)).view(out_f, -1, 4)  # padding code 0 never unpacked
    return codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)


def unpack_ternary(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_ternary`: uint8 (out, ceil(in/4)) → int8 (out, in) in {-1, 0, 1}."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3
    return codes.view(packed.shape[0], -1)[:, :in_features].to(torch.int8) - 1


class PackedBitLinear(nn.Module):
    """Inference form of `BitLinear`: uint8 packed ternary weights + β and γ (FP32 scalars).

    β and γ are kept apart (not folded into one) so that the dequantised weight β·T and the
    output scaling are the same floating-point operations as in training: bit-identical outputs.
    The FP32 weight is unpacked once on first use and cached outside the state_dict; that trades
    4 bytes/weight of RAM for speed while the file on disk stays at 2 bits/weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_packed", torch.zeros(out_features, (in_features + 3) // 4, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(()))  # β
        self.register_buffer("scale", torch.ones(1))  # γ
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._w_cache: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: module.invalidate_cache())

    @classmethod
    def from_bitlinear(cls, layer: BitLinear) -> "PackedBitLinear":
        m = cls(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            t, beta = layer.quantized_weight()
            m.weight_packed.copy_(pack_ternary(t))
            m.weight_scale.copy_(beta)
            m.scale.copy_(layer.scale.float())
            if layer.bias is not None:
                m.bias.copy_(layer.bias)
        return m.to(layer.weight.device)

    def invalidate_cache(self) -> None:
        self._w_cache = None

    def ternary(self) -> torch.Tensor:
        return unpack_ternary(self.weight_packed, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._w_cache is None or self._w_cache.device != x.device:
            self._w_cache = self.ternary().float() * self.weight_scale
        q, s = absmax_int8(x.float())
        y = F.linear(q / s, self._w_cache) * self.scale
        return y + self.bias if self.bias is not None else y


def zero_weight_fraction(module: nn.Module) -> float:
    """Fraction of zeros over the ternary weights of every (Packed)BitLinear in `module` (paper: 42.8%)."""
    zeros = total = 0
    for m in module.modules():
        if isinstance(m, BitLinear):
            t = m.quantized_weight()[0]
        elif isinstance(m, PackedBitLinear):
            t = m.ternary()
        else:
            continue
        zeros += int((t == 0).sum())
        total += t.numel()
    return zeros / total if total else 0.0


def pack_model(model: nn.Module) -> nn.Module:
    """Replace every BitLinear in `model` by its PackedBitLinear, in place (for deployment)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BitLinear):
                setattr(parent, name, PackedBitLinear.from_bitlinear(child))
    return model
