"""BitMarRuntime, the node's view of the model: episode and query embeddings, memory state round
trips, descriptions that continue one decoder session or start afresh, and answers to memory cues —
each against a reference DecoderSession on the model, with the conditioning built in the test."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from node_harness import write_tiny_checkpoint
from test_evaluate import EOS, FEATURE_DIM, fake_encode, read_cond, tiny_gpt2_model

from bitmar_core.data.scenes import make_scene, split_seed
from bitmar_core.inference.decoding import DecoderSession
from bitmar_core.inference.runtime import BitMarRuntime, RuntimeLoadError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("rt") / "tiny.safetensors")


@pytest.fixture
def rt(ckpt):
    return BitMarRuntime.from_checkpoint(ckpt)


class FakeBackbone(nn.Module):
    """The 4×4-cell colour means of test_evaluate as a backbone: (1, 8, 4, 4) per frame."""
    feature_dim = FEATURE_DIM
    input_size = 32

    def encode(self, rgb: np.ndarray) -> torch.Tensor:
        return fake_encode([rgb])


@pytest.fixture
def small():
    """A runtime on the tiny GPT-2-vocabulary model whose words depend on what it is fed. Its
    vision keys carry a bias, as a trained model's do: attending over an all-zero vision token set
    (the old image-less query) then differs from no vision at all."""
    model = tiny_gpt2_model()
    with torch.no_grad():
        model.fusion.ln_kv.bias.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(5))
    return BitMarRuntime(model, FakeBackbone(), "fake", "fake:test")


def _frame(seed):
    return np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)


def _scene(i):
    rgb, scene = make_scene(split_seed("test", i), size=32)
    return rgb, scene.caption


def _memory(rt) -> torch.Tensor:
    return torch.from_numpy(rt.memory_state()["memory"])


def test_episode_embedding_is_the_normalised_sum_of_the_infonce_pair(rt):
    code = rt.embed_frame(_frame(0))
    ep = rt.encode_episode(code, "a red circle on the left")
    m = rt.model
    ids = torch.tensor([rt.tokenizer.encode("a red circle on the left")])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        Z = m.encode_text(ids, mask)
        want = F.normalize((m.fusion.text_embedding(Z, mask) + m.fusion.vision_embedding(code.V)).reshape(-1), dim=0)
        q = m.fuse(Z, mask, code.V).reshape(-1)
    np.testing.assert_allclose(ep.embedding, want.numpy(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ep.q, q)
    # The node's query of (same frame, same caption) is that embedding itself.
    np.testing.assert_allclose(rt.embed_query("a red circle on the left", code), ep.embedding, atol=1e-6)
    with pytest.raises(ValueError, match="text, an image"):
        rt.embed_query(None, None)


def test_memory_state_round_trips_into_a_new_runtime(rt, ckpt):
    for s in range(3):
        code = rt.embed_frame(_frame(s))
        rt.write_memory(rt.encode_episode(code, f"scene {s}").q)
    state = rt.memory_state()
    assert int(state["n_writes"]) == rt.memory_writes == 3
    assert not np.array_equal(state["memory"], rt.model.memory.M0.detach().numpy())
    other = BitMarRuntime.from_checkpoint(ckpt)
    other.load_memory_state(state)
    for k, v in other.memory_state().items():
        np.testing.assert_array_equal(v, state[k])
    with pytest.raises(RuntimeLoadError, match="shape"):
        other.load_memory_state({**state, "memory": np.zeros((3, 3), np.float32)})
    with pytest.raises(RuntimeLoadError, match="missing tensor 'usage'"):
        other.load_memory_state({"memory": state["memory"], "n_writes": state["n_writes"]})
    rt.reset_memory()
    assert rt.memory_writes == 0
    np.testing.assert_array_equal(rt.memory_state()["memory"], rt.model.memory.M0.detach().numpy())


@torch.no_grad()
def test_frame_code_is_the_image_only_query(small):
    rgb, _ = _scene(3)
    code = small.embed_frame(rgb)
    m = small.model
    V = m.compress_vision(fake_encode([rgb]))
    assert torch.equal(code.V, V) and code.V.shape[1] == 4
    torch.testing.assert_close(code.q_scene, m.fuse(None, None, V))
    np.testing.assert_allclose(code.scene, F.normalize(m.fusion.vision_embedding(V).reshape(-1), dim=0).numpy(),
                               atol=1e-6)


@torch.no_grad()
def test_fresh_description_is_the_scene_prefix_under_its_memory_read(small):
    m, tok = small.model, small.tokenizer
    for i in range(3):  # something in memory, so that the read is not of M0
        rgb, caption = _scene(i)
        small.write_memory(small.encode_episode(small.embed_frame(rgb), caption).q)
    code = small.embed_frame(_scene(4)[0])
    before = small.memory_state()
    M = torch.from_numpy(before["memory"])
    want = DecoderSession(m).generate([EOS], read_cond(m, code.q_scene, M), 12, prefix=m.vision_prefix(code.V))
    items = list(small.describe(code, max_new_tokens=12, continue_session=False))
    assert [t for t, _ in items] == want
    assert "".join(d for _, d in items) == tok.decode(want)
    # S sinks, N vision tokens, [eos], every generated token fed: nothing of earlier streams
    assert small.session_position == m.config.sink_tokens + 4 + 1 + len(want)
    # the read counts as use: usage grows by w_r = softmax(τ M q), M itself is unchanged
    w_r = (m.memory.read_scale * (M @ code.q_scene.reshape(-1))).softmax(0)
    after = small.memory_state()
    np.testing.assert_allclose(after["usage"], before["usage"] + w_r.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(after["memory"], before["memory"])
    again = [t for t, _ in small.describe(code, max_new_tokens=12, continue_session=False)]
    assert again == want  # afresh: the first description left nothing behind


@torch.no_grad()
def test_continuing_descriptions_are_one_reference_session(small):
    m = small.model
    codes = [small.embed_frame(_scene(i)[0]) for i in (5, 6, 7)]
    ref = DecoderSession(m)
    got, want = [], []
    for k, code in enumerate(codes):
        if k == 1:  # an episode arrives between two descriptions: the next read sees it
            small.write_memory(small.encode_episode(codes[0], _scene(5)[1]).q)
        cond = read_cond(m, code.q_scene, _memory(small))
        want.append(ref.generate([EOS], cond, 12, prefix=m.vision_prefix(code.V)))
        got.append([t for t, _ in small.describe(code, max_new_tokens=12, continue_session=k > 0)])
    assert got == want
    assert small.session_position == ref.position
    fresh = [t for t, _ in small.describe(codes[2], max_new_tokens=12, continue_session=False)]
    assert fresh != got[2]  # the earlier descriptions in the window changed the last one


@torch.no_grad()
def test_answer_is_read_from_memory_with_the_cue_alone(small):
    m, tok = small.model, small.tokenizer
    for i in (10, 15, 17):
        rgb, caption = _scene(i)
        small.write_memory(small.encode_episode(small.embed_frame(rgb), caption).q)
    code = small.embed_frame(_scene(18)[0])
    list(small.describe(code, max_new_tokens=5))
    position, before = small.session_position, small.memory_state()
    M = torch.from_numpy(before["memory"])
    cue = "where was the red circle?"
    ids = torch.tensor([tok.encode(cue)])
    mask = torch.ones_like(ids)
    Z = m.encode_text(ids, mask)

    def reference(q):
        return tok.decode(DecoderSession(m).generate([EOS], read_cond(m, q, M), 10))

    by_cue = small.answer(cue, None, max_new_tokens=10)
    assert by_cue == reference(m.fuse(Z, mask, None))
    by_cue_and_image = small.answer(cue, code, max_new_tokens=10)
    assert by_cue_and_image == reference(m.fuse(Z, mask, code.V))
    assert small.answer(None, code, max_new_tokens=10) == reference(m.fuse(None, None, code.V))
    assert by_cue != by_cue_and_image  # the cue alone is a different query from cue + image
    # an answer is a fresh stream and a read that does not count as use: nothing else moves
    assert small.session_position == position
    for k, v in small.memory_state().items():
        np.testing.assert_array_equal(v, before[k])
    small.reset_memory()
    assert small.answer(cue, None, max_new_tokens=10) != by_cue  # it came from what was written
    with pytest.raises(ValueError, match="text, an image, or both"):
        small.answer("", None)
