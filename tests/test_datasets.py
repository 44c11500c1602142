"""Data formats, collate, 50:50 mixing and exact resume of the training stream."""
import json
import pickle

import numpy as np
import pytest
import torch

from bitmar_core.data.datasets import (EOS_ID, IMAGE, TEXT, ImageCaptionDataset, MixedBatches,
                                       MixedSampler, TextCorpus, collate, tokenize)
from bitmar_core.data.text import load_wiki_summaries, wiki_text_split

torch.set_num_threads(1)


class CharTokenizer:
    """One id per character: enough to check lengths, truncation and padding by hand."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


@pytest.fixture
def caption_data(tmp_path):
    feats = np.random.default_rng(0).standard_normal((6, 4, 2, 3)).astype(np.float16)
    np.save(tmp_path / "features.npy", feats)
    rows = [{"caption": f"caption number {i}", "feature_index": (i * 5) % 6} for i in range(6)]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path, feats, rows


def test_tokenize_appends_eos_and_truncates_to_max_tokens():
    tok = CharTokenizer()
    assert tokenize(tok, "ab") == [97, 98, EOS_ID]
    long = tokenize(tok, "x" * 300)
    assert len(long) == 256 and long[-1] == EOS_ID and long[:255] == [120] * 255
    assert tokenize(tok, "x" * 300, max_tokens=10, append_eos=False) == [120] * 10


def test_collate_pads_masks_and_zero_vision():
    v = torch.arange(24, dtype=torch.float32).reshape(4, 2, 3)
    batch = collate([{"input_ids": [5, 6, 7], "vision": v},
                     {"input_ids": [9], "vision": None}], vision_shape=(4, 2, 3))
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, EOS_ID, EOS_ID]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["vision"].shape == (2, 4, 2, 3) and batch["vision"].dtype == torch.float32
    torch.testing.assert_close(batch["vision"][0], v)
    assert (batch["vision"][1] == 0).all()
    assert batch["has_vision"].tolist() == [True, False] and batch["has_vision"].dtype == torch.bool
    with pytest.raises(ValueError, match="vision shape"):
        collate([{"input_ids": [1], "vision": torch.zeros(3, 2, 3)}], vision_shape=(4, 2, 3))


def test_image_caption_dataset_reads_the_memmapped_row_of_each_caption(caption_data):
    folder, feats, rows = caption_data
    ds = ImageCaptionDataset(folder / "captions.jsonl")
    assert len(ds) == 6 and ds.vision_shape == (4, 2, 3)
    for i, row in enumerate(rows):
        item = ds[i]
        assert item["caption"] == row["caption"]
        np.testing.assert_array_equal(item["vision"].numpy(), feats[row["feature_index"]].astype(np.float32))


def test_image_caption_dataset_errors_name_the_row(tmp_path, caption_data):
    folder, _, _ = caption_data
    bad = folder / "bad.jsonl"
    bad.write_text('{"caption": "ok", "feature_index": 0}\n{"caption": "far", "feature_index": 6}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl row 2: feature_index 6"):
        ImageCaptionDataset(bad, features_path=folder / "features.npy")
    bad.write_text('{"caption": "no source"}\n')
    with pytest.raises(ValueError, match="row 1: expected 'feature_index' or 'image'"):
        ImageCaptionDataset(bad)
    bad.write_text('{"caption": "x", "image": "a.png"}\n')
    with pytest.raises(ValueError, match="backbone"):
        ImageCaptionDataset(bad)
    bad.write_text('{"caption": "x", "feature_index": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        ImageCaptionDataset(bad, features_path=folder / "features.npy")


def test_text_corpus_packs_lines_within_paragraphs(tmp_path):
    (tmp_path / "a.txt").write_text("aaaa\nbbbb\ncccc\n\n\ndddd\n")
    (tmp_path / "b.txt").write_text("eeeeeeeeeeee\nff\n")
    (tmp_path / "skip.md").write_text("not a corpus file")
    corpus = TextCorpus.from_files(tmp_path, chunk_chars=10)
    # "aaaa\nbbbb" is 9 chars; adding "\ncccc" would pass 10. Paragraphs never merge.
    assert corpus.texts == ["aaaa\nbbbb", "cccc", "dddd", "eeeeeeeeeeee", "ff"]
    with pytest.raises(FileNotFoundError, match="missing"):
        TextCorpus.from_files(tmp_path / "missing")


def test_mixing_ratio_and_epoch_coverage():
    for fraction in (0.5, 0.25):
        sampler = MixedSampler(n_image=37, n_text=53, image_fraction=fraction, seed=3)
        draws = [next(sampler) for _ in range(20000)]
        images = [i for s, i in draws if s == IMAGE]
        # binomial sd at n=20000 is ≤ 0.0036; 0.015 is > 4 sd
        assert abs(len(images) / len(draws) - fraction) < 0.015
        # each epoch visits every item once: the first 37 image draws are a permutation
        assert sorted(images[:37]) == list(range(37)) and sorted(images[37:74]) == list(range(37))
        texts = [i for s, i in draws if s == TEXT]
        assert sorted(texts[:53]) == list(range(53))
        assert images[:37] != images[37:74]  # reshuffled every epoch
    only_text = MixedSampler(0, 5, image_fraction=0.0)
    assert all(next(only_text)[0] == TEXT for _ in range(50))
    with pytest.raises(ValueError, match="no image"):
        MixedSampler(0, 5, image_fraction=0.5)


def test_resume_keeps_the_configured_mixing_ratio_and_the_position():
    """A resume with a new image_fraction (e.g. `--set data.image_fraction=0.2`) mixes at the new
    ratio; position, cursors and RNG continue from the saved state."""
    before = MixedSampler(n_image=37, n_text=53, image_fraction=0.9, seed=3)
    for _ in range(100):
        next(before)
    state = before.state_dict()
    resumed = MixedSampler(n_image=37, n_text=53, image_fraction=0.1, seed=3)
    resumed.load_state_dict(state)
    assert resumed.image_fraction == 0.1 and resumed.position == 100
    draws = [next(resumed) for _ in range(5000)]
    assert abs(sum(s == IMAGE for s, _ in draws) / len(draws) - 0.1) < 0.02  # sd 0.0042
    # the image cursor carried on: the first image drawn after resume continues the saved epoch
    epoch, cursor = state["cursor"][IMAGE]
    first_image = next(i for s, i in draws if s == IMAGE)
    order = np.random.default_rng([3, 1, epoch]).permutation(37)
    assert first_image == order[cursor]
    same = MixedSampler(n_image=37, n_text=53, image_fraction=0.9, seed=3)
    same.load_state_dict(state)
    assert [next(same) for _ in range(50)] == [next(before) for _ in range(50)]


def _stream(caption_data, seed=0):
    folder, _, _ = caption_data
    texts = TextCorpus([f"text document {i} " + "z" * i for i in range(11)])
    return MixedBatches(ImageCaptionDataset(folder / "captions.jsonl"), texts, CharTokenizer(),
                        batch_size=4, seed=seed, max_tokens=24)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in ("input_ids", "attention_mask", "vision", "has_vision"))


def test_mixed_batches_items_match_their_sources(caption_data):
    folder, feats, rows = caption_data
    stream = _stream(caption_data)
    captions = {r["caption"]: r["feature_index"] for r in rows}
    for _ in range(5):
        batch = next(stream)
        assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 24
        for b in range(4):
            n = int(batch["attention_mask"][b].sum())
            ids = batch["input_ids"][b, :n].tolist()
            assert EOS_ID not in ids  # BitMar frames decoder sequences with eos itself
            text = "".join(map(chr, ids))
            if batch["has_vision"][b]:
                np.testing.assert_array_equal(batch["vision"][b].numpy(),
                                              feats[captions[text]].astype(np.float32))
            else:
                assert text.startswith("text document") and (batch["vision"][b] == 0).all()


def test_resume_gives_the_same_following_batches(caption_data):
    stream = _stream(caption_data, seed=7)
    for _ in range(9):
        next(stream)
    state = pickle.loads(pickle.dumps(stream.state_dict()))
    json.dumps(state)  # plain data: fits in a checkpoint
    expected = [next(stream) for _ in range(6)]
    resumed = _stream(caption_data, seed=7)
    resumed.load_state_dict(state)
    assert all(_same(a, b) for a, b in zip(expected, [next(resumed) for _ in range(6)]))
    # same seed from scratch reproduces, another seed differs
    a, b, c = _stream(caption_data, 1), _stream(caption_data, 1), _stream(caption_data, 2)
    first = [next(a) for _ in range(3)]
    assert all(_same(x, next(b)) for x in first)
    assert not all(_same(x, next(c)) for x in first)


def test_wiki_corpus_split_is_disjoint_and_deterministic():
    pairs = load_wiki_summaries()
    assert len(pairs) > 9000
    train, val = wiki_text_split("train"), wiki_text_split("validation")
    assert len(train) + len(val) == len(pairs)
    assert 0.03 < len(val) / len(pairs) < 0.07
    assert not set(train) & set(val)
    assert wiki_text_split("validation") == val
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        load_wiki_summaries("/nonexistent/nothere.json")
