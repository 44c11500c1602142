"""safetensors checkpoints: exact FP32 reload, packed reload equals the quantised forward (a tied
head and a vocabulary subset included), clear errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config_dict

from bitmar_core.inference.checkpoint import (CheckpointError, load_checkpoint, load_memory_state, save_checkpoint,
                                    save_memory_state)
from bitmar_core.model.config import BitMarConfig
from bitmar_core.inference.fast_decoder import FastDecoder
from bitmar_core.inference.decoding import DecoderSession
from bitmar_core.model.bitmar import BitMar
from bitmar_core.model.quant import BitLinear, PackedBitLinear, unpack_ternary
from bitmar_core.inference.tokenizer import build_vocabulary, default_tokenizer, tokenizer_for


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


def test_vocab_subset_token_ids_round_trip(tmp_path):
    """A vocab_subset model's row → GPT-2 id list rides in the file (fp32 and packed), and the
    reloaded model's tokenizer reads and writes the same rows."""
    gpt2 = default_tokenizer()
    texts = ["a red circle on the left", "two small blue squares at the top"]
    vocab = build_vocabulary(texts)
    torch.manual_seed(0)
    model = BitMar(BitMarConfig(**tiny_config_dict(vocab_subset=True, vocab_size=len(vocab), eos_id=0))).eval()
    with torch.no_grad():
        model.token_ids.copy_(torch.tensor(vocab))
    assert vocab[0] == gpt2.eos_id and vocab != [gpt2.eos_id] + list(range(1, len(vocab)))  # not the init's ids
    ids = torch.tensor([[vocab.index(g) for g in gpt2.encode(texts[0])]])
    grid = torch.randn(1, 12, 3, 3)
    with torch.no_grad():
        V = model.compress_vision(grid)
        cond = model.recall_condition(model.fuse(None, None, V), model.memory.M0)
        want = model.decode(ids, cond, prefix=model.vision_prefix(V))
    for packed in (False, True):
        loaded = load_checkpoint(save_checkpoint(model, tmp_path / f"v{packed}.safetensors", packed=packed))
        assert loaded.token_ids.tolist() == vocab
        tok = tokenizer_for(loaded)
        assert tok.encode(texts[0]) == ids[0].tolist() and tok.eos_id == 0
        assert tok.decode(ids[0].tolist()) == texts[0]
        with torch.no_grad():
            V2 = loaded.compress_vision(grid)
            got = loaded.decode(ids, loaded.recall_condition(loaded.fuse(None, None, V2), loaded.memory.M0),
                                prefix=loaded.vision_prefix(V2))
        assert torch.equal(got, want), packed


def test_tied_packed_model_prefix_decode(tmp_path):
    """A tied model stores its embedding once, as the packed head; the reloaded file's embedding
    rows are β·T of those codes, and its prefix decode (reference and FastDecoder) is the FP32
    model's bit for bit."""
    torch.manual_seed(0)
    model = BitMar(BitMarConfig(**tiny_config_dict(tie_embeddings=True))).eval()
    path = save_checkpoint(model, tmp_path / "tied.safetensors", packed=True)
    tensors = load_file(str(path))
    assert not any(k.startswith("wte") for k in tensors)  # stored once, as decoder.head
    loaded = load_checkpoint(path)
    ids = torch.tensor([[5, 9, 17, 40, 2]])
    rows = unpack_ternary(tensors["decoder.head.weight_packed"], 32)[ids[0]].float() * tensors["decoder.head.weight_scale"]
    with torch.no_grad():
        assert torch.equal(loaded.wte(ids)[0], rows)
        t, beta = model.decoder.head.quantized_weight()
        assert torch.equal(rows, t[ids[0]] * beta)
        outs = []
        for m in (model, loaded):
            V = m.compress_vision(torch.randn(1, 12, 3, 3, generator=torch.Generator().manual_seed(3)))
            cond = m.recall_condition(m.fuse(None, None, V), m.memory.M0)
            prefix = m.vision_prefix(V)
            logits = m.decode(ids, cond, prefix=prefix)
            ref = DecoderSession(m).generate([63], cond, 10, prefix=prefix, eos_id=-1)
            fast = DecoderSession(FastDecoder(m)).generate([63], cond, 10, prefix=prefix, eos_id=-1)
            outs.append((logits, ref, fast))
    (l0, r0, f0), (l1, r1, f1) = outs
    assert l1.shape == (1, 4 + 5, 64) and torch.equal(l0, l1)
    assert r0 == r1 == f0 == f1 and len(r0) == 10
