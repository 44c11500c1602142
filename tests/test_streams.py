"""EpisodeBatches against the layout written out by hand: scene streams, recall items and text rows
from a tiny ImageCaptionDataset (captions.jsonl + features.npy) and single-object scenes; resume,
determinism and rank sharding."""
import json

import numpy as np
import pytest
import torch

from bitmar_core.data.datasets import ImageCaptionDataset
from bitmar_core.data.scenes import POSITIONS, Scene, SceneObject
from bitmar_core.data.streams import CUE_COLOURS, CUE_SHAPES, IGNORE, EpisodeBatches, recall_answer
from bitmar_core.inference.tokenizer import default_tokenizer

S, N = 2, 4  # sinks; vision tokens per scene (a 3×3 grid pools to 2×2)
DESCRIPTORS = [("red", "circle"), ("red", "circle"), ("blue", "square"), ("green", "triangle"),
               ("purple", "cross"), ("yellow", "star"), ("orange", "oval"), ("white", "diamond"),
               ("black", "hexagon"), ("blue", "square"), ("purple", "circle"), ("green", "oval")]
CELLS = list(POSITIONS)
TEXTS = ["the cat sat", "a dog ran far away", "hello"]
tok = default_tokenizer()
EOS = tok.eos_id


def _scenes() -> list[Scene]:
    out = []
    for i, (colour, shape) in enumerate(DESCRIPTORS):
        cell = CELLS[(3 * i) % 9]
        size = "small" if i % 2 else "large"
        obj = SceneObject(colour=colour, shape=shape, size=size, cell=cell, x=(cell[0] + 0.5) / 3,
                          y=(cell[1] + 0.5) / 3, radius=0.1, angle=0.0, rgb=(1, 2, 3))
        out.append(Scene(seed=i, objects=[obj], relations=[], background={},
                         caption=f"There is a {size} {colour} {shape} {obj.position}."))
    return out


@pytest.fixture
def data(tmp_path):
    """12 rows; row i reads feature row 11 − i, whose values are all i (so a grid names its row)."""
    scenes = _scenes()
    feats = np.stack([np.full((6, 3, 3), float(11 - k), dtype=np.float32) for k in range(12)])
    np.save(tmp_path / "features.npy", feats)
    with open(tmp_path / "captions.jsonl", "w") as f:
        for i, sc in enumerate(scenes):
            f.write(json.dumps({"caption": sc.caption, "feature_index": 11 - i}) + "\n")
    return ImageCaptionDataset(tmp_path / "captions.jsonl"), scenes


def _batches(data, seed=0, **kw) -> EpisodeBatches:
    ds, scenes = data
    args = dict(streams=4, scenes_per_stream=3, n_vision=N, sink=S, seed=seed, scenes=scenes,
                recall_items=2, recall_episodes=(8, 12), texts=TEXTS, text_items=2)
    args.update(kw)
    return EpisodeBatches(ds, tok, **args)


def _rows_of(vision: torch.Tensor) -> list[int]:
    """Dataset row of each episode, read off its grid (row i's grid is filled with i)."""
    assert (vision == vision[:, :1, :1, :1]).all()
    return [int(v) for v in vision[:, 0, 0, 0]]


def _unpad(row: torch.Tensor, length: int) -> list[int]:
    return row[:length].tolist()


def test_scene_streams_are_the_documented_layout(data):
    ds, scenes = data
    batch = next(_batches(data))
    rows = _rows_of(batch["vision"])
    assert len(rows) == 4 * 3 and len(set(rows)) > 3  # 12 episodes drawn, not all the same
    captions = [tok.encode(ds.rows[r]["caption"]) for r in rows]
    T = max(map(len, captions))
    for e, cap in enumerate(captions):
        assert batch["caption_ids"][e].tolist() == cap + [EOS] * (T - len(cap))
        assert batch["caption_mask"][e].tolist() == [True] * len(cap) + [False] * (T - len(cap))
    L = batch["stream_ids"].shape[1]
    for b in range(4):
        ids, vis, seg, tgt = [EOS] * S, [-1] * S, [-1] * S, [IGNORE] * S
        for e in range(3 * b, 3 * b + 3):  # stream b describes episodes 3b, 3b+1, 3b+2
            cap = captions[e]
            ids += [EOS] * N + [EOS] + cap
            vis += list(range(e * N, e * N + N)) + [-1] * (1 + len(cap))
            seg += [e] * (N + 1 + len(cap))
            tgt += [IGNORE] * N + cap + [EOS]
        pad = L - len(ids)
        assert batch["stream_ids"][b].tolist() == ids + [EOS] * pad
        assert batch["stream_vision"][b].tolist() == vis + [-1] * pad
        assert batch["stream_segment"][b].tolist() == seg + [-1] * pad
        assert batch["stream_targets"][b].tolist() == tgt + [IGNORE] * pad
    assert batch["stream_pos"].tolist() == list(range(L))
    # the input after a caption's closing target is the next scene's vision, never that eos
    t, v = batch["stream_targets"], batch["stream_vision"]
    for b, p in (t[:, :-1] == EOS).nonzero().tolist():
        assert v[b, p + 1] >= 0 or batch["stream_segment"][b, p + 1] < 0  # next scene, or padding


def test_recall_items_are_answerable_and_laid_out(data):
    ds, scenes = data
    batches = _batches(data)
    for _ in range(5):
        batch = next(batches)
        ep_rows = _rows_of(batch["recall_vision"])
        T = batch["recall_ids"].shape[1]
        for k, r in enumerate(ep_rows):
            cap = tok.encode(ds.rows[r]["caption"])
            assert batch["recall_ids"][k].tolist() == cap + [EOS] * (T - len(cap))
        for b in range(2):
            order = [i for i in batch["recall_order"][b].tolist() if i >= 0]
            assert 8 <= len(order) <= 12
            written = [ep_rows[i] for i in order]
            assert len(set(written)) == len(written)  # each episode written once
            n_ans = int((batch["answer_targets"][b] != IGNORE).sum()) - 1
            answer = batch["answer_ids"][b, S + 1:S + 1 + n_ans].tolist()
            assert batch["answer_ids"][b, :S + 1].tolist() == [EOS] * (S + 1)
            assert _unpad(batch["answer_targets"][b], S + n_ans + 1) == [IGNORE] * S + answer + [EOS]
            text = tok.decode(answer)
            objs = [scenes[r].objects[0] for r in written]
            hits = [o for o in objs if recall_answer(o.colour, o.shape, o.size, o.position) == text]
            assert len(hits) >= 1, text
            target = hits[0]
            assert [o.descriptor for o in objs].count(target.descriptor) == 1  # unique among the written
            cue = tok.decode(batch["cue_ids"][b][batch["cue_mask"][b]].tolist())
            assert any(w in cue for w in CUE_COLOURS[target.colour]) and any(w in cue for w in CUE_SHAPES[target.shape])
        assert batch["answer_pos"].tolist() == list(range(batch["answer_ids"].shape[1]))


def test_text_rows_are_the_documented_layout(data):
    batch = next(_batches(data))
    encoded = {tuple(tok.encode(t)) for t in TEXTS}
    for b in range(2):
        n = int((batch["text_targets"][b] != IGNORE).sum()) - 1
        text = batch["text_ids"][b, S + 1:S + 1 + n].tolist()
        assert tuple(text) in encoded
        assert _unpad(batch["text_ids"][b], S + 1 + n) == [EOS] * (S + 1) + text
        assert _unpad(batch["text_targets"][b], S + 1 + n) == [IGNORE] * S + text + [EOS]


def test_stream_offset_after_the_sinks(data):
    batch = next(_batches(data, offset_prob=1.0, offset_max=50))
    for key in ("stream_pos", "answer_pos", "text_pos"):
        pos = batch[key].tolist()
        off = pos[S] - S
        assert pos[:S] == list(range(S)) and 1 <= off <= 50
        assert pos[S:] == list(range(S + off, S + off + len(pos) - S))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_deterministic_by_seed_and_exact_resume(data):
    a, b, c = _batches(data, seed=3), _batches(data, seed=3), _batches(data, seed=4)
    first = [next(a) for _ in range(3)]
    assert all(_equal(x, next(b)) for x in first)
    assert not _equal(first[0], next(c))
    state = a.state_dict()
    json.dumps(state)  # plain data, fit for a checkpoint's metadata
    expect = [next(a) for _ in range(2)]
    resumed = _batches(data, seed=99)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert all(_equal(x, next(resumed)) for x in expect)


def _streams(batch) -> list[list[int]]:
    """Each scene stream as the dataset rows it describes."""
    rows = _rows_of(batch["vision"])
    out = []
    for seg in batch["stream_segment"]:
        ids = []
        for e in seg.tolist():
            if e >= 0 and (not ids or ids[-1] != e):
                ids.append(e)
        out.append([rows[e] for e in ids])
    return out


def _recalls(batch) -> list[tuple]:
    rows = _rows_of(batch["recall_vision"])
    return [(tuple(rows[i] for i in order.tolist() if i >= 0),
             tuple(batch["cue_ids"][b][batch["cue_mask"][b]].tolist()),
             tuple(batch["answer_ids"][b][batch["answer_targets"][b] != IGNORE].tolist()))
            for b, order in enumerate(batch["recall_order"])]


def _texts(batch) -> list[tuple]:
    return [tuple(batch["text_targets"][b][batch["text_targets"][b] != IGNORE].tolist())
            for b in range(batch["text_ids"].shape[0])]


def test_ranks_get_disjoint_halves_of_the_same_global_batch(data):
    whole = _batches(data, seed=5, offset_prob=0.5)
    ranks = [_batches(data, seed=5, offset_prob=0.5, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        g = next(whole)
        parts = [next(r) for r in ranks]
        for view in (_streams, _recalls, _texts):
            full = view(g)
            assert view(parts[0]) == full[0::2] and view(parts[1]) == full[1::2]
        for key in ("stream_pos", "answer_pos", "text_pos"):  # one offset draw for all ranks
            assert parts[0][key][S] == parts[1][key][S] == g[key][S]
    with pytest.raises(ValueError, match="multiples"):
        _batches(data, streams=3, world=2)
