"""BLEU-4 and attribute P/R/F1 against hand-computed values."""
import math

import pytest

from bitmar_core.evaluation.metrics import (FactCounts, attribute_prf, bleu_tokenize, closest_ref_length, corpus_bleu,
                                 sentence_bleu)


def test_tokenize_lowercases_and_splits_punctuation():
    assert bleu_tokenize("A red Circle, top-left.") == ["a", "red", "circle", ",", "top", "-", "left", "."]


def test_identical_is_one():
    s = "there is a small red circle in the center ."
    r = corpus_bleu([s], [[s]])
    assert r.score == pytest.approx(1.0)
    assert r.brevity_penalty == 1.0
    assert sentence_bleu(s, [s]).score == pytest.approx(1.0)


def test_known_ngram_counts():
    # hyp a b c d e vs ref a b c d f: matches 4/5, 3/4, 2/3, 1/2; equal lengths → BP = 1.
    r = corpus_bleu(["a b c d e"], [["a b c d f"]])
    assert r.matches == [4, 3, 2, 1] and r.totals == [5, 4, 3, 2]
    assert r.precisions == pytest.approx([4 / 5, 3 / 4, 2 / 3, 1 / 2])
    assert r.score == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    assert r.score == pytest.approx(0.2 ** 0.25)


def test_clipping_papineni_example():
    # Papineni et al. §2.1: "the" ×7 against "the cat is on the mat" → modified unigram precision 2/7.
    r = corpus_bleu(["the the the the the the the"], [["the cat is on the mat"]], max_n=1)
    assert r.precisions == [pytest.approx(2 / 7)]
    assert r.brevity_penalty == 1.0  # c = 7 > r = 6
    assert r.score == pytest.approx(2 / 7)


def test_clipping_takes_max_count_over_references():
    r = corpus_bleu(["the the the"], [["the cat", "the the dog"]], max_n=1)
    assert r.matches == [2]


def test_brevity_penalty():
    r = corpus_bleu(["a b c d"], [["a b c d e f g h"]])
    assert r.precisions == [1.0, 1.0, 1.0, 1.0]
    assert r.brevity_penalty == pytest.approx(math.exp(1 - 8 / 4))
    assert r.score == pytest.approx(math.exp(-1))


def test_closest_reference_length_tie_goes_to_shorter():
    assert closest_ref_length(5, [3, 7]) == 3
    assert closest_ref_length(5, [6, 9]) == 6
    r = corpus_bleu(["a b c d e"], [["a b c d e f", "a b c d e f g h i"]])
    assert r.ref_len == 6 and r.brevity_penalty == pytest.approx(math.exp(1 - 6 / 5))


def test_corpus_sums_statistics_before_the_mean():
    # Sentence 2 alone has no trigram match (its sentence BLEU is 0); the corpus still scores.
    r = corpus_bleu(["a b c d", "e f g h"], [["a b c d"], ["e f x h"]])
    assert r.matches == [7, 4, 2, 1] and r.totals == [8, 6, 4, 2]
    assert r.score == pytest.approx((7 / 8 * 4 / 6 * 2 / 4 * 1 / 2) ** 0.25)
    assert corpus_bleu(["e f g h"], [["e f x h"]]).score == 0.0


def test_sentence_bleu_exp_smoothing():
    # p1 = 3/4, p2 = 1/3, p3: no match → 1/(2·2), p4: no match → 1/(4·1).
    r = sentence_bleu("e f g h", ["e f x h"])
    assert r.precisions == pytest.approx([3 / 4, 1 / 3, 1 / 4, 1 / 4])
    assert r.score == pytest.approx((3 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25)


def test_sentence_bleu_effective_order():
    # A 2-token hypothesis has no 3- or 4-grams: the mean runs over orders 1 and 2 only.
    assert sentence_bleu("a b", ["a b"]).score == pytest.approx(1.0)
    assert corpus_bleu(["a b"], [["a b"]]).score == 0.0  # unsmoothed corpus BLEU-4


def test_empty_hypothesis_scores_zero():
    assert corpus_bleu([""], [["a b c d"]]).score == 0.0
    assert sentence_bleu("", ["a b c d"]).score == 0.0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        corpus_bleu(["a", "b"], [["a"]])
    with pytest.raises(TypeError, match="list of strings"):
        corpus_bleu(["a"], ["a"])


def test_attribute_prf_hand_sets():
    pred, ref = {"a", "b", "c"}, {"a", "b", "d", "e"}
    assert attribute_prf(pred, ref) == pytest.approx({"precision": 2 / 3, "recall": 1 / 2, "f1": 4 / 7})
    # With admissible facts (everything true in the scene) the extra "c" is no error.
    out = attribute_prf(pred, ref, admissible={"a", "b", "c", "d", "e", "f"})
    assert out == pytest.approx({"precision": 1.0, "recall": 1 / 2, "f1": 2 / 3})
    assert attribute_prf(set(), ref) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_fact_counts_micro_macro_and_categories():
    fc = FactCounts()
    fc.add({("colour", "red"), ("shape", "circle")}, {("colour", "red"), ("shape", "square")})
    fc.add(set(), {("colour", "blue")})
    # overall: 2 predicted, 1 correct; 3 reference, 1 recalled.
    assert fc.overall() == pytest.approx({"precision": 1 / 2, "recall": 1 / 3, "f1": 2 * (1 / 6) / (5 / 6)})
    assert fc.macro_f1() == pytest.approx((0.5 + 0.0) / 2)
    cats = fc.by_category()
    assert cats["colour"] == pytest.approx({"precision": 1.0, "recall": 1 / 2, "f1": 2 / 3})
    assert cats["shape"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert len(fc) == 2


def test_attribute_prf_agrees_with_the_scene_module():
    from bitmar_core.data.scenes import (attribute_facts, generate_scene, parse_caption, score_caption,
                                         split_seed, true_facts)

    for i in range(5):
        scene = generate_scene(split_seed("test", i))
        other = generate_scene(split_seed("test", 100 + i)).caption
        for text in (scene.caption, other, scene.caption.split(".")[0] + "."):
            ours = attribute_prf(parse_caption(text), attribute_facts(scene), true_facts(scene))
            assert ours == pytest.approx(score_caption(text, scene))
