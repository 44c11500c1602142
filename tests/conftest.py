"""Shared fixtures: a tiny BitMar (d=32, vocab 64, S=2, W=6) so every test runs in milliseconds."""
import pytest
import torch

from bitmar_core.config import BitMarConfig
from bitmar_core.model import BitMar

torch.set_num_threads(1)


def tiny_config_dict(**overrides) -> dict:
    d = dict(vocab_size=64, eos_id=63, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2,
             max_text_len=16, backbone="precomputed", vision_feature_dim=12, vision_hidden=16,
             vision_dropout=0.0, n_fusion_queries=2, memory_slots=8, memory_dim=32,
             sink_tokens=2, window=6)
    d.update(overrides)
    return d


@pytest.fixture
def tiny_config() -> BitMarConfig:
    return BitMarConfig(**tiny_config_dict())


@pytest.fixture
def tiny_model(tiny_config) -> BitMar:
    torch.manual_seed(0)
    return BitMar(tiny_config).eval()


@pytest.fixture
def tiny_batch(tiny_config) -> dict:
    """4 items: 3 image–caption pairs (one with padding) and 1 text-only line."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tiny_config.vocab_size - 1, (4, 7), generator=g)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "vision": torch.randn(4, tiny_config.vision_feature_dim, 3, 3, generator=g),
            "has_vision": torch.tensor([True, True, True, False])}

# launch_testing files are run by `launch_test` on a robot (tests/launch/), not collected here:
# `launch` is not installable from PyPI.
collect_ignore = ["launch"]
