"""VisionCompressor: 2×2 ceil-mode pooling on a hand grid and the BitLinear MLP as a formula."""
import pytest
import torch

from bitmar_core.model.config import BitMarConfig
from bitmar_core.model.vision import VisionCompressor

from test_quant import _reference_bitlinear


def test_pool_hand_worked_odd_grid():
    grid = torch.arange(9.0).view(1, 1, 3, 3)  # [[0,1,2],[3,4,5],[6,7,8]]
    pooled = VisionCompressor.pool(grid)
    # windows: {0,1,3,4} → 2, {2,5} → 3.5, {6,7} → 6.5, {8} → 8 (edge windows average what they cover)
    assert torch.equal(pooled, torch.tensor([[[2.0], [3.5], [6.5], [8.0]]]))


@pytest.mark.parametrize("h,w,n", [(7, 7, 16), (16, 16, 64), (3, 4, 4)])
def test_token_count(h, w, n):
    c = BitMarConfig(backbone="precomputed", vision_feature_dim=8, vision_hidden=6)
    assert VisionCompressor(c)(torch.randn(2, 8, h, w)).shape == (2, n, 128)


def test_forward_equals_formula():
    torch.manual_seed(0)
    c = BitMarConfig(backbone="precomputed", vision_feature_dim=8, vision_hidden=6, vision_dropout=0.5)
    vc = VisionCompressor(c).eval()
    grid = torch.randn(2, 8, 4, 4)
    pooled = torch.stack([grid[..., i:i + 2, j:j + 2].mean(dim=(-1, -2)) for i in (0, 2) for j in (0, 2)], dim=1)
    with torch.no_grad():
        h = torch.relu(_reference_bitlinear(pooled, vc.fc1.weight, 1.0))
        assert torch.allclose(vc(grid), _reference_bitlinear(h, vc.fc2.weight, 1.0), atol=1e-5)
    vc.train()  # dropout between the layers is active in training
    torch.manual_seed(1)
    assert not torch.allclose(vc(grid), vc(grid))


def test_wrong_feature_dim_names_shape():
    vc = VisionCompressor(BitMarConfig())
    with pytest.raises(ValueError, match=r"\(B, 1280, h, w\).*\(1, 768, 16, 16\)"):
        vc(torch.randn(1, 768, 16, 16))
