"""Caption metrics: BLEU-4 (Papineni et al., 2002) and attribute-level precision/recall/F1.

`corpus_bleu` is the standard corpus BLEU (clipped n-gram counts summed over the corpus, brevity
penalty from the closest reference lengths, no smoothing); `sentence_bleu` adds the "exp"
smoothing and effective order that sacrebleu uses for single sentences. `FactCounts` micro-averages
the attribute facts of `bitmar_core.data.scenes` over a corpus, overall and per fact category.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def bleu_tokenize(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: "A red cube." → ['a', 'red', 'cube', '.']."""
    return _TOKEN_RE.findall(text.lower())


def ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def closest_ref_length(hyp_len: int, ref_lens: Iterable[int]) -> int:
    """The reference length closest to the hypothesis length; a tie goes to the shorter one."""
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))


@dataclass
class BleuScore:
    score: float  # in [0, 1]
    precisions: list[float]  # modified n-gram precision per order 1..max_n
    brevity_penalty: float
    hyp_len: int
    ref_len: int
    matches: list[int] = field(default_factory=list)  # clipped n-gram matches per order
    totals: list[int] = field(default_factory=list)  # hypothesis n-grams per order


def _sufficient_stats(hyp: Sequence[str], refs: Sequence[Sequence[str]], max_n: int
                      ) -> tuple[list[int], list[int], int, int]:
    if not refs:
        raise ValueError("BLEU: every hypothesis needs at least one reference")
    matches, totals = [], []
    for n in range(1, max_n + 1):
        hyp_counts = ngram_counts(hyp, n)
        max_ref = Counter()
        for ref in refs:
            max_ref |= ngram_counts(ref, n)  # | keeps the maximum count of each n-gram
        matches.append(sum(min(c, max_ref[g]) for g, c in hyp_counts.items()))
        totals.append(max(len(hyp) - n + 1, 0))
    return matches, totals, len(hyp), closest_ref_length(len(hyp), (len(r) for r in refs))


def _brevity_penalty(hyp_len: int, ref_len: int) -> float:
    if hyp_len == 0:
        return 0.0
    return 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4,
                tokenize: Callable[[str], list[str]] = bleu_tokenize) -> BleuScore:
    """Corpus BLEU-`max_n`: references[i] is the list of reference strings of hypotheses[i].

    p_n = Σ clipped matches / Σ hypothesis n-grams over the whole corpus; BP = exp(1 − r/c) when
    c ≤ r (c: total hypothesis length, r: sum of closest reference lengths); BLEU = BP·exp(mean
    log p_n), and 0 when any p_n is 0 (no smoothing)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"BLEU: {len(hypotheses)} hypotheses but {len(references)} reference lists")
    matches, totals, c, r = [0] * max_n, [0] * max_n, 0, 0
    for hyp, refs in zip(hypotheses, references):
        if isinstance(refs, str):
            raise TypeError("BLEU: references[i] must be a list of strings, not one string")
        m, t, hl, rl = _sufficient_stats(tokenize(hyp), [tokenize(x) for x in refs], max_n)
        matches = [a + b for a, b in zip(matches, m)]
        totals = [a + b for a, b in zip(totals, t)]
        c, r = c + hl, r + rl
    precisions = [m / t if t else 0.0 for m, t in zip(matches, totals)]
    bp = _brevity_penalty(c, r)
    if min(precisions) == 0.0 or bp == 0.0:
        score = 0.0
    else:
        score = bp * math.exp(sum(math.log(p) for p in precisions) / max_n)
    return BleuScore(score, precisions, bp, c, r, matches, totals)


def sentence_bleu(hypothesis: str, references: Sequence[str], max_n: int = 4,
                  tokenize: Callable[[str], list[str]] = bleu_tokenize) -> BleuScore:
    """Smoothed sentence BLEU (sacrebleu's default for sentences: smooth_method='exp' with
    effective order). An order with no match gets precision 1/(2^k·total), k counting the
    zero-match orders so far; orders longer than the hypothesis are left out of the mean."""
    if isinstance(references, str):
        raise TypeError("sentence_bleu: references must be a list of strings, not one string")
    matches, totals, c, r = _sufficient_stats(tokenize(hypothesis), [tokenize(x) for x in references], max_n)
    precisions, k, order = [], 1.0, 0
    for m, t in zip(matches, totals):
        if t == 0:
            break
        order += 1
        if m == 0:
            k *= 2
            precisions.append(1.0 / (k * t))
        else:
            precisions.append(m / t)
    bp = _brevity_penalty(c, r)
    score = bp * math.exp(sum(math.log(p) for p in precisions) / order) if order and bp else 0.0
    precisions += [0.0] * (max_n - len(precisions))
    return BleuScore(score, precisions, bp, c, r, matches, totals)


# --------------------------------------------------------------------------- attribute facts

def prf(n_predicted: int, n_correct_p: int, n_reference: int, n_correct_r: int) -> dict[str, float]:
    """precision = correct_p / predicted, recall = correct_r / reference, F1 their harmonic mean
    (each 0 when its denominator is 0)."""
    p = n_correct_p / n_predicted if n_predicted else 0.0
    r = n_correct_r / n_reference if n_reference else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def attribute_prf(predicted: set, reference: set, admissible: set | None = None) -> dict[str, float]:
    """P/R/F1 of one fact set. Precision counts a predicted fact correct when it is `admissible`
    (default: in `reference`; for scenes, every true fact, so a true but uncaptioned relation is no
    error); recall is the share of `reference` predicted."""
    admissible = reference if admissible is None else admissible
    return prf(len(predicted), len(predicted & admissible), len(reference), len(predicted & reference))


class FactCounts:
    """Micro-averaged attribute P/R/F1 over a corpus, overall and per category (fact[0]:
    object, colour, shape, count, size, position, relation); also the macro mean of per-item F1."""

    def __init__(self) -> None:
        self._counts: dict[str, list[int]] = {}  # category → [predicted, correct_p, reference, correct_r]
        self._item_f1: list[float] = []

    def add(self, predicted: set, reference: set, admissible: set | None = None) -> dict[str, float]:
        admissible = reference if admissible is None else admissible
        for category in {f[0] for f in predicted | reference} | {"all"}:
            pick = (lambda s: s) if category == "all" else (lambda s, c=category: {f for f in s if f[0] == c})
            p, ref = pick(predicted), pick(reference)
            row = self._counts.setdefault(category, [0, 0, 0, 0])
            row[0] += len(p)
            row[1] += len(p & admissible)
            row[2] += len(ref)
            row[3] += len(p & ref)
        item = attribute_prf(predicted, reference, admissible)
        self._item_f1.append(item["f1"])
        return item

    def __len__(self) -> int:
        return len(self._item_f1)

    def overall(self) -> dict[str, float]:
        return prf(*self._counts.get("all", [0, 0, 0, 0]))

    def by_category(self) -> dict[str, dict[str, float]]:
        return {c: prf(*row) for c, row in sorted(self._counts.items()) if c != "all"}

    def macro_f1(self) -> float:
        return sum(self._item_f1) / len(self._item_f1) if self._item_f1 else 0.0

    def summary(self) -> dict:
        return {**self.overall(), "macro_f1": self.macro_f1(), "n": len(self), "by_category": self.by_category()}
