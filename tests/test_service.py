"""EpisodicMemoryService without ROS: record (memory write + store commit, rolled back together), hybrid
query, answer naming its episodes, save / clear / restore, and the caption synonyms."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from bitmar_core.data.scenes import SHAPE_SYNONYMS, SIZE_WORDS, parse_caption
from bitmar_core.episodes.service import CAPTION_SYNONYM_GROUPS, EpisodicError, EpisodicMemoryService
from bitmar_core.episodes.store import EpisodeStore
from bitmar_core.episodes.store_api import StoreWriteError

CAPTIONS = ["a ginger tabby cat asleep on a sofa", "two red circles near the top",
            "a cup of coffee on the kitchen table", "a red stop sign at the corner",
            "rockets launching at dawn"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A small random BitMar with EfficientNet-Lite0's feature width: behaviour, not skill."""
    from bitmar_core.inference.checkpoint import save_checkpoint
    from bitmar_core.model.config import BitMarConfig
    from bitmar_core.model.bitmar import BitMar

    torch.manual_seed(0)
    cfg = BitMarConfig(d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=1, max_text_len=64,
                       vision_feature_dim=1280, vision_hidden=64, n_fusion_queries=2, memory_slots=32,
                       memory_dim=32, sink_tokens=4, window=60)
    path = tmp_path_factory.mktemp("episodic") / "tiny.safetensors"
    save_checkpoint(BitMar(cfg), path, packed=True)
    return path


@pytest.fixture
def memory(ckpt, tmp_path):
    m = EpisodicMemoryService.open(ckpt, tmp_path / "store")
    yield m
    m.close(save=False)


def _frame(seed):
    return np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)


def _fill(memory, n=len(CAPTIONS)):
    return [memory.record(CAPTIONS[i], 1_000 * (i + 1), rgb=_frame(i)) for i in range(n)]


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_record_writes_memory_and_commits_the_episode_with_its_state(memory):
    ids = _fill(memory)
    assert ids == sorted(ids) and memory.count() == len(CAPTIONS)
    assert memory.runtime.memory_writes == len(CAPTIONS)
    _same_state(memory.store.memory_state(), memory.runtime.memory_state())
    stored = memory.store.all_episodes()
    assert [e.caption for e in stored] == CAPTIONS and [e.stamp_ns for e in stored] == [1000, 2000, 3000, 4000, 5000]
    assert all(e.thumbnail_jpeg.startswith(b"\xff\xd8") for e in stored)
    code = memory.runtime.embed_frame(_frame(9))
    eid = memory.record("made from a code", 9_000, code=code, source="description")
    assert memory.store.episode(eid).source == "description" and memory.store.episode(eid).thumbnail_jpeg == b""
    with pytest.raises(EpisodicError, match="neither"):
        memory.record("no frame", 1)


@pytest.mark.parametrize("fail_at", ["COMMIT", "INSERT INTO episodes"])
def test_failed_commit_undoes_the_memory_write(memory, fail_at):
    _fill(memory, 2)
    before = memory.runtime.memory_state()
    real = memory.store._conn

    class Failing:
        def execute(self, sql, *args):
            if fail_at in sql:
                raise __import__("sqlite3").OperationalError("disk I/O error (injected)")
            return real.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(real, name)

    memory.store._conn = Failing()
    try:
        with pytest.raises(StoreWriteError, match="injected"):
            memory.record("lost episode", 5_000, rgb=_frame(5))
    finally:
        memory.store._conn = real
    _same_state(memory.runtime.memory_state(), before)
    assert memory.count() == 2 and memory.runtime.memory_writes == 2
    assert memory.query("lost episode", k=5).hits[0].lexical_rank == 0  # the index never saw it
    assert memory.store.integrity_check() == []


def test_a_bad_caption_is_refused_and_changes_nothing(memory):
    _fill(memory, 1)
    before = memory.runtime.memory_state()
    with pytest.raises(ValueError, match="caption"):
        memory.record("x" * 9000, 5, rgb=_frame(1))
    _same_state(memory.runtime.memory_state(), before)
    assert memory.count() == 1


def test_query_by_caption_words_puts_that_episode_first(memory):
    ids = _fill(memory)
    for eid, caption in zip(ids, CAPTIONS):
        words = [w for w in caption.split() if len(w) > 3][:3]
        result = memory.query(" ".join(words), k=3)
        assert result.hits[0].episode.id == eid, (words, [h.episode.caption for h in result.hits])
        assert result.hits[0].matched_by == "lexical+embedding"
        assert result.total == len(CAPTIONS) and "of 5 episodes" in result.message
    # Plural and case: "CATS" finds the cat; a word in no caption still gets the embedding ranking.
    assert memory.query("CATS", k=1).hits[0].episode.id == ids[0]
    unknown = memory.query("xylophone", k=5)
    assert len(unknown.hits) == 5 and {h.matched_by for h in unknown.hits} == {"embedding"}


def test_query_with_the_frame_and_caption_finds_its_stored_embedding(memory):
    ids = _fill(memory)
    for i, eid in enumerate(ids):
        hit = memory.query(CAPTIONS[i], _frame(i), k=2).hits[0]
        assert hit.episode.id == eid and hit.embedding_rank == 1
        assert hit.embedding_score == pytest.approx(1.0, abs=1e-5)  # the query embedding is the stored one
    image_only = memory.query(None, _frame(0), k=5).hits
    assert len(image_only) == 5 and all(h.lexical_rank == 0 for h in image_only)


def test_time_window_and_empty_results(memory):
    assert memory.query("cat", k=3).hits == [] and "empty" in memory.query("cat", k=3).message
    ids = _fill(memory)
    got = memory.query("red", k=5, start_ns=3_500, end_ns=5_000)
    assert [h.episode.id for h in got.hits][0] == ids[3] and {h.episode.id for h in got.hits} == set(ids[3:])
    none = memory.query("red", k=5, start_ns=10_000)
    assert none.hits == [] and none.total == 5 and "time window" in none.message
    with pytest.raises(EpisodicError, match="text, an image"):
        memory.query("", None)


def test_answer_is_the_models_and_names_the_queried_episodes(memory, monkeypatch):
    ids = _fill(memory)
    calls = []
    real = memory.runtime.answer

    def spy(text, code, max_new_tokens=32):
        calls.append((text, code, max_new_tokens))
        return real(text, code, max_new_tokens=max_new_tokens)

    monkeypatch.setattr(memory.runtime, "answer", spy)
    ans = memory.answer("where is the coffee cup", k=2, max_new_tokens=5)
    assert calls == [("where is the coffee cup", None, 5)]
    assert ans.text == real("where is the coffee cup", None, max_new_tokens=5)
    assert ans.episode_ids[0] == ids[2] and len(ans.episode_ids) == 2
    assert ans.episode_ids == [h.episode.id for h in memory.query("where is the coffee cup", k=2).hits]


def test_save_close_and_restore_at_start(ckpt, tmp_path):
    m = EpisodicMemoryService.open(ckpt, tmp_path / "s")
    _fill(m, 3)
    m.query("cat", k=1)  # reads touch the usage statistics
    state = m.runtime.memory_state()
    assert m.save() == 3
    m.close()
    again = EpisodicMemoryService.open(ckpt, tmp_path / "s", create=False)
    assert again.runtime.memory_writes == 3 and again.count() == 3
    _same_state(again.runtime.memory_state(), state)
    again.clear()
    assert again.count() == 0 and again.runtime.memory_writes == 0
    again.close()
    fresh = EpisodicMemoryService.open(ckpt, tmp_path / "s")
    assert fresh.count() == 0 and fresh.runtime.memory_writes == 0
    fresh.close()


def test_failed_clear_keeps_memory_and_episodes(memory, monkeypatch):
    _fill(memory, 2)
    before = memory.runtime.memory_state()

    def broken():
        raise StoreWriteError("clear: injected")

    monkeypatch.setattr(memory.store, "clear", broken)
    with pytest.raises(StoreWriteError):
        memory.clear()
    _same_state(memory.runtime.memory_state(), before)
    assert memory.count() == 2


@pytest.mark.parametrize("state, fragment", [
    (lambda s: {**s, "M": np.full_like(s["M"], np.nan)} if "M" in s else None, "non-finite"),
    (lambda s: {**s, next(iter(s)): np.zeros((3, 3), np.float32)}, "does not fit"),
])
def test_restore_refuses_a_bad_state_and_changes_nothing(ckpt, tmp_path, state, fragment):
    m = EpisodicMemoryService.open(ckpt, tmp_path / "s")
    _fill(m, 1)
    good = m.runtime.memory_state()
    bad = state(good)
    if bad is None:
        bad = {k: (np.full_like(v, np.nan) if v.dtype.kind == "f" and v.size else v) for k, v in good.items()}
    m.store.put_memory_state(bad)
    with pytest.raises(EpisodicError, match=fragment):
        m.restore()
    _same_state(m.runtime.memory_state(), good)
    m.close(save=False)
    with pytest.raises(EpisodicError, match=fragment):
        EpisodicMemoryService.open(ckpt, tmp_path / "s")


def test_store_of_another_width_is_refused(ckpt, tmp_path):
    from bitmar_core.inference.runtime import BitMarRuntime
    rt = BitMarRuntime.from_checkpoint(ckpt)
    with EpisodeStore.open(tmp_path / "w", 16, "other") as store:
        with pytest.raises(EpisodicError, match="16-D"):
            EpisodicMemoryService(rt, store)


def test_queries_run_while_episodes_are_recorded(memory):
    errors = []

    def writer():
        try:
            for i in range(8):
                memory.record(f"episode number {i}", i, rgb=_frame(i))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    while t.is_alive():
        memory.query("episode number", k=3)
    t.join()
    assert not errors and memory.count() == 8 and memory.runtime.memory_writes == 8
    _same_state(memory.store.memory_state(), memory.runtime.memory_state())


# ---------------------------------------------------------------------- the caption grammar's synonyms
def test_synonym_groups_are_the_caption_grammars_own():
    """Every group holds words the caption parser reads as one attribute, and every alternative
    wording the grammar writes is in a group."""
    templates = {"colour": "a {} circle.", "shape": "a red {}.", "size": "a {} red circle.",
                 "position": "a red circle in the {} left.", "centre": "a red circle in the {}."}
    kinds = {"purple": "colour", "circle": "shape", "oval": "shape", "diamond": "shape", "large": "size",
             "small": "size", "center": "centre", "top": "position", "bottom": "position"}
    for group in CAPTION_SYNONYM_GROUPS:
        template = templates[kinds[group[0]]]
        facts = [parse_caption(template.format(w)) for w in group]
        assert facts[0] and all(f == facts[0] for f in facts), group
    grouped = {w for group in CAPTION_SYNONYM_GROUPS for w in group}
    written = {w for words in SHAPE_SYNONYMS.values() for w in words} | {w for ws in SIZE_WORDS.values() for w in ws}
    assert written <= grouped


def test_memory_store_searches_with_the_caption_synonyms(memory):
    assert memory.store.synonym_groups == CAPTION_SYNONYM_GROUPS


def test_paraphrased_query_finds_the_scene_lexically(memory):
    eid = memory.record("a small purple circle in the top left", 1, rgb=_frame(0))
    memory.record("a large orange star in the bottom right", 2, rgb=_frame(1))
    hit = memory.query("little violet disk upper left", k=1).hits[0]
    assert hit.episode.id == eid and hit.lexical_rank == 1
