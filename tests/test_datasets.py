"""Data formats: the memory-mapped image–caption rows, text corpora, the offline Wikipedia split."""
import json

import numpy as np
import pytest
import torch

from bitmar_core.data.datasets import ImageCaptionDataset, TextCorpus
from bitmar_core.data.text import load_wiki_summaries, wiki_text_split

torch.set_num_threads(1)


@pytest.fixture
def caption_data(tmp_path):
    feats = np.random.default_rng(0).standard_normal((6, 4, 2, 3)).astype(np.float16)
    np.save(tmp_path / "features.npy", feats)
    rows = [{"caption": f"caption number {i}", "feature_index": (i * 5) % 6} for i in range(6)]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path, feats, rows


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
