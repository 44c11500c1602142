"""bench/retrieval.py's query sets and bookkeeping: paraphrases mean what the caption meant, a
jittered view is the same scene, the metrics are the textbook ones, and --write replaces only its
own section of RESULTS.md."""
from __future__ import annotations

import re

import numpy as np
import pytest

from bench import retrieval as R
from bitmar_core.data.scenes import attribute_facts, generate_split, parse_caption


def test_paraphrase_swaps_words_for_synonyms_the_parser_reads_alike():
    for _, scene in generate_split("test", 60):
        words = R._content_words(scene.caption)
        para, changed = R._paraphrase(words)
        assert len(para) == len(words)
        assert changed == sum(a != b for a, b in zip(words, para)) >= 1  # every caption has a size word
        # The same swaps made inside the whole caption leave every fact it states unchanged.
        tokens = re.findall(r"[a-z]+|[^a-z]+", scene.caption.lower())
        swapped = "".join(R._paraphrase([t])[0][0] if t.isalpha() else t for t in tokens)
        assert swapped != scene.caption.lower()
        assert parse_caption(swapped) == parse_caption(scene.caption)
    assert R._paraphrase(["purple", "circles", "ellipses", "large", "diamonds"])[0] == \
        ["violet", "disks", "ovals", "big", "rhombuses"]


def test_jittered_scene_keeps_its_facts_and_changes_its_pixels():
    from bitmar_core.data.scenes import render_scene

    for i, (rgb, scene) in enumerate(generate_split("test", 10)):
        j = R._jittered(scene, np.random.default_rng(i))
        assert attribute_facts(j) == attribute_facts(scene) and j.caption == scene.caption
        other = render_scene(j, pixel_noise=3.0)
        assert other.shape == rgb.shape and np.abs(other.astype(int) - rgb).mean() > 0.5


def test_metrics_are_recall_at_1_5_and_mrr_at_10():
    r1, r5, mrr = R._metrics([1, 2, 5, 6, 0])
    assert (r1, r5) == (0.2, 0.6)
    assert mrr == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 6 + 0) / 5)


def _section(hybrid_r1: float) -> R.Section:
    m = {"a. content words of the caption|lexical|100|r1": 0.8,
         "a. content words of the caption|hybrid|100|r1": hybrid_r1,
         "latency_p95_ms|100000": 42.0, "latency_before_p95_ms|100000": 30.0}
    return R.Section(R.SECTION_TITLE, [], ["a note"], m)


def test_targets_summary_reports_met_and_missed():
    good = "\n".join(R.targets_summary(_section(0.95).metrics))
    assert "0.95** — target ≥ 0.9: met" in good and "every set and metric: met" in good
    assert "42.0 ms** (before: 30.0 ms) — target ≤ 50 ms: met" in good
    bad = "\n".join(R.targets_summary(_section(0.5).metrics))
    assert "NOT met" in bad and "a at 100 (r1)" in bad


def test_write_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Tables\n\n### 6. Footprint\n\nsix\n")
    R.write_section(_section(0.5), path)
    R.write_section(_section(0.95), path)  # the second run replaces the first
    text = path.read_text()
    assert text.startswith("# Benchmark results\n\n## Tables\n\n### 6. Footprint\n\nsix\n")
    assert text.count(f"### {R.SECTION_TITLE}") == 1 and "0.95" in text and "0.50" not in text
    path.write_text(text + "\n### 8. Later\n\neight\n")
    R.write_section(_section(0.5), path)
    text = path.read_text()
    assert "### 8. Later\n\neight" in text and text.count(f"### {R.SECTION_TITLE}") == 1 and "six" in text
