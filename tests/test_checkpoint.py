"""safetensors checkpoints: exact FP32 reload, packed reload equals the quantised forward, clear errors."""
import json

import pytest
import torch
from safetensors.torch import save_file

from bitmar_core.checkpoint import (CheckpointError, load_checkpoint, load_memory_state, save_checkpoint,
                                    save_memory_state)
from bitmar_core.quant import BitLinear, PackedBitLinear


def _outputs(model):
    torch.manual_seed(7)
    ids, grid = torch.randint(0, 63, (2, 5)), torch.randn(2, 12, 3, 3)
    with torch.no_grad():
        Z = model.encode_text(ids)
        V = model.compress_vision(grid)
        q = model.fuse(Z, None, V)
        return model.decode(ids, model.condition(q, model.read_memory(model.memory.M0, q))), q


def test_fp32_round_trip_is_exact(tiny_model, tmp_path):
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.config == tiny_model.config
    for a, b in zip(_outputs(tiny_model), _outputs(loaded)):
        assert torch.equal(a, b)


def test_packed_round_trip_equals_quantised_forward(tiny_model, tmp_path):
    fp = save_checkpoint(tiny_model, tmp_path / "fp.safetensors")
    pk = save_checkpoint(tiny_model, tmp_path / "pk.safetensors", packed=True)
    loaded = load_checkpoint(pk)
    assert not any(isinstance(m, BitLinear) for m in loaded.modules())
    n_bit = sum(isinstance(m, BitLinear) for m in tiny_model.modules())
    assert sum(isinstance(m, PackedBitLinear) for m in loaded.modules()) == n_bit
    for a, b in zip(_outputs(tiny_model), _outputs(loaded)):
        assert torch.equal(a, b)
    # size: each ternary weight costs 2 bits instead of 32
    ternary = sum(m.weight.numel() for m in tiny_model.modules() if isinstance(m, BitLinear))
    assert fp.stat().st_size - pk.stat().st_size >= ternary * 4 - (ternary + 3) // 4 - 200 * n_bit
    # a packed model saves again and stays equal
    again = load_checkpoint(save_checkpoint(loaded, tmp_path / "pk2.safetensors", packed=True))
    assert torch.equal(_outputs(again)[0], _outputs(loaded)[0])
    with pytest.raises(CheckpointError, match="already packed"):
        save_checkpoint(loaded, tmp_path / "x.safetensors", packed=False)


def test_float16_option_is_close(tiny_model, tmp_path):
    loaded = load_checkpoint(save_checkpoint(tiny_model, tmp_path / "h.safetensors", packed=True,
                                             float_dtype=torch.float16))
    assert torch.allclose(_outputs(loaded)[0], _outputs(tiny_model)[0], atol=5e-2)


def test_errors_name_file_and_expectation(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors")
    good = save_checkpoint(tiny_model, tmp_path / "good.safetensors")
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.safetensors: truncated"):
        load_checkpoint(cut)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="tiny.safetensors.*too short"):
        load_checkpoint(tiny)
    pickle_like = tmp_path / "model.pt"
    pickle_like.write_bytes(b"\x80\x04\x95" + b"\x00" * 5 + b"x" * 100)
    with pytest.raises(CheckpointError, match="model.pt"):
        load_checkpoint(pickle_like)
    noconf = tmp_path / "noconf.safetensors"
    save_file({"a": torch.zeros(2)}, str(noconf))
    with pytest.raises(CheckpointError, match="noconf.safetensors: no 'config'"):
        load_checkpoint(noconf)
    bad = tmp_path / "bad.safetensors"
    tensors = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    tensors["wte.weight"] = torch.zeros(10, 32)
    save_file(tensors, str(bad), metadata={"config": json.dumps(tiny_model.config.to_dict())})
    with pytest.raises(CheckpointError, match=r"bad.safetensors: tensor 'wte.weight' has shape \(10, 32\), expected \(64, 32\)"):
        load_checkpoint(bad)


def test_memory_state_round_trip(tiny_model, tmp_path):
    state = tiny_model.memory.new_state()
    for _ in range(4):
        state.write_(torch.randn(2, 32))
    path = save_memory_state(state, tmp_path / "mem.safetensors")
    other = load_memory_state(tiny_model.memory.new_state(), path)
    x = torch.randn(3, 32)
    assert torch.equal(state.read(x)[0], other.read(x)[0])
    assert int(other.n_writes) == 8
    with pytest.raises(CheckpointError, match="mem.safetensors"):
        small = tiny_model.memory.new_state()
        small.M = torch.zeros(4, 32)
        load_memory_state(small, path)
