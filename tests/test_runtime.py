"""BitMarRuntime, the node's view of the model: episode and query embeddings, memory state round
trips, and descriptions that continue one decoder session or start afresh."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from node_harness import write_tiny_checkpoint

from bitmar_core.generation import generate
from bitmar_core.runtime import BitMarRuntime, RuntimeError_


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("rt") / "tiny.safetensors")


@pytest.fixture
def rt(ckpt):
    return BitMarRuntime.from_checkpoint(ckpt)


def _frame(seed):
    return np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)


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
    other = BitMarRuntime.from_checkpoint(ckpt)
    other.load_memory_state(state)
    for k, v in other.memory_state().items():
        np.testing.assert_array_equal(v, state[k])
    with pytest.raises(RuntimeError_, match="shape"):
        other.load_memory_state({**state, "memory": np.zeros((3, 3), np.float32)})
    rt.reset_memory()
    assert rt.memory_writes == 0


def test_descriptions_continue_one_session_or_start_afresh(rt):
    code = rt.embed_frame(_frame(7))
    eos = rt.model.config.eos_id
    fresh = [t for t, _ in rt.describe(code, max_new_tokens=5, continue_session=False)]
    again = [t for t, _ in rt.describe(code, max_new_tokens=5, continue_session=False)]
    assert fresh == again and rt.session_position == 1 + len(fresh)  # [eos] + tokens, nothing before

    # Continuing: the second description sees the first in its cache; it equals an uncached
    # generation over exactly [eos] first [eos?] with the memory conditioning of that moment.
    rt.reset_memory()
    rt._session.reset()
    first = [t for t, _ in rt.describe(code, max_new_tokens=5)]
    with torch.no_grad():
        cond = rt.model.condition(code.q_scene, rt._memory.read(code.q_scene, touch=False)[0])
    prefix = [eos] + first + ([eos] if len(first) < 5 else [])
    sep = [] if len(first) < 5 else [eos]
    second = [t for t, _ in rt.describe(code, max_new_tokens=5)]
    assert second == generate(rt.model, prefix + sep, cond, 5, use_cache=False)
