"""BitMarConfig: the paper's defaults, YAML round trip, validation errors that name the field."""
from pathlib import Path

import pytest

from bitmar_core.model.config import BitMarConfig

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers():
    c = BitMarConfig()
    assert (c.vocab_size, c.d_model, c.n_heads, c.n_encoder_layers, c.n_decoder_layers) == (50257, 128, 4, 4, 4)
    assert (c.max_text_len, c.vision_hidden, c.memory_slots, c.memory_dim, c.memory_alpha) == (256, 384, 512, 128, 0.2)
    assert (c.sink_tokens, c.window, c.max_positions) == (4, 1020, 1024)
    assert (c.lm_weight, c.cm_weight, c.mem_weight) == (1.0, 1.5, 0.1)
    # ours, beyond the paper: vision prefix on, rotary positions, the full GPT-2 head
    assert (c.vision_prefix, c.vision_grid_max, c.rope_base, c.vocab_subset) == (True, 16, 10000.0, False)


def test_default_yaml_equals_dataclass_defaults():
    assert BitMarConfig.from_yaml(ROOT / "config" / "model_default.yaml") == BitMarConfig()


def test_yaml_round_trip(tmp_path):
    c = BitMarConfig(conditioning="concat", fusion_pooling="learned", backbone="dinov2_vitb14",
                     vision_feature_dim=768, window=60, memory_forget_base=0.01, vocab_subset=True,
                     vocab_size=300, eos_id=0, vision_prefix=False, vision_grid_max=8, rope_base=500.0,
                     tie_embeddings=True)
    c.to_yaml(tmp_path / "c.yaml")
    assert BitMarConfig.from_yaml(tmp_path / "c.yaml") == c
    assert BitMarConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("field,value,expected", [
    ("d_model", 130, "multiple of n_heads"),
    ("window", 0, "integer >= 1"),
    ("conditioning", "gate", "'add' or 'concat'"),
    ("fusion_pooling", "max", "'mean' or 'learned'"),
    ("memory_alpha", 1.5, "(0, 1]"),
    ("vision_feature_dim", 768, "1280 for backbone 'efficientnet_lite0'"),
    ("memory_dim", 64, "equal to d_model"),
    ("eos_id", 50257, "[0, vocab_size"),
    ("write_fraction", -0.1, "[0, 1]"),
    ("backbone", "resnet", "one of"),
    ("n_heads", 128, "even head width"),  # 128 / 128 = 1: no rotary pairs
    ("rope_base", 1.0, "a number > 1"),
    ("vision_grid_max", 0, "integer >= 1"),
    ("position_offset_prob", 1.5, "[0, 1]"),
])
def test_validation_names_field(field, value, expected):
    with pytest.raises(ValueError) as e:
        BitMarConfig(**{field: value})
    assert f"BitMarConfig.{field}" in str(e.value) and expected in str(e.value)


def test_unknown_field_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown field.*'d_modle'"):
        BitMarConfig.from_dict({"d_modle": 128})
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        BitMarConfig.from_yaml(tmp_path / "nope.yaml")
