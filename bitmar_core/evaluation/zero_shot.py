"""Zero-shot multiple choice by log-likelihood (the paper's Table 1 tasks) from local JSONL files.

Each task's public row format becomes `MCItem`s: one (context, continuation) pair per choice and
the gold index. A choice's score is the decoder's summed log-likelihood of its continuation after
`[eos]×S + [eos] + context`, unconditioned (zero [q ; M_r]): the layout of the text-only training
items (`bitmar_core.data.streams`: S sinks, the eos that opens a text, no vision, no conditioning);
accuracy picks the argmax (`acc`), or the argmax of the score per UTF-8 byte of the continuation
(`acc_norm`, lm-evaluation-harness's length normalisation). Prompts follow lm-eval.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

# Task name → file name under the benchmarks directory.
TASK_FILES = {
    "arc_easy": "arc_easy.jsonl",
    "boolq": "boolq.jsonl",
    "hellaswag": "hellaswag.jsonl",
    "winogrande": "winogrande.jsonl",
    "commonsense_qa": "commonsense_qa.jsonl",
    "mmlu": "mmlu.jsonl",
}


@dataclass
class MCItem:
    contexts: list[str]  # one per choice (the same string for all but WinoGrande)
    continuations: list[str]  # one per choice
    label: int  # index of the correct choice

    def __post_init__(self) -> None:
        if len(self.contexts) != len(self.continuations) or len(self.contexts) < 2:
            raise ValueError(f"MCItem needs ≥ 2 choices with one context each, got {len(self.contexts)} contexts "
                             f"and {len(self.continuations)} continuations")
        if not 0 <= self.label < len(self.continuations):
            raise ValueError(f"MCItem label {self.label} outside [0, {len(self.continuations)})")


class FormatError(ValueError):
    """A benchmark row that does not have its task's public format."""


def _need(row: dict, key: str, where: str, kind: type | tuple = str):
    if key not in row:
        raise FormatError(f"{where}: missing field {key!r}")
    if not isinstance(row[key], kind):
        raise FormatError(f"{where}: field {key!r} should be {kind}, got {type(row[key]).__name__}")
    return row[key]


def _labelled_choices(row: dict, where: str) -> tuple[str, list[str], list[str]]:
    """(question, labels, texts) of the ARC / CommonsenseQA row forms: the original AI2 JSONL
    {"question": {"stem", "choices": [{"label", "text"}]}} or the Hugging Face rows
    {"question": str, "choices": {"label": [...], "text": [...]}}."""
    q = _need(row, "question", where, (str, dict))
    if isinstance(q, dict):
        stem = _need(q, "stem", where)
        choices = _need(q, "choices", where, list)
        try:
            labels, texts = [str(c["label"]) for c in choices], [str(c["text"]) for c in choices]
        except (KeyError, TypeError):
            raise FormatError(f"{where}: question.choices must be a list of {{'label', 'text'}}") from None
        return stem, labels, texts
    choices = _need(row, "choices", where, dict)
    labels, texts = choices.get("label"), choices.get("text")
    if not isinstance(labels, list) or not isinstance(texts, list) or len(labels) != len(texts):
        raise FormatError(f"{where}: choices must be {{'label': [...], 'text': [...]}} of equal length")
    return q, [str(x) for x in labels], [str(x) for x in texts]


def _qa_item(row: dict, where: str) -> MCItem:
    question, labels, texts = _labelled_choices(row, where)
    key = str(_need(row, "answerKey", where, (str, int)))
    if key not in labels:
        raise FormatError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    context = f"Question: {question}\nAnswer:"
    return MCItem([context] * len(texts), [" " + t for t in texts], labels.index(key))


def parse_arc(row: dict, where: str = "arc") -> MCItem:
    """ARC-Easy/Challenge: context "Question: {stem}\\nAnswer:", continuations " {choice text}"."""
    return _qa_item(row, where)


def parse_commonsense_qa(row: dict, where: str = "commonsense_qa") -> MCItem:
    """CommonsenseQA: the ARC layout (original JSONL or Hugging Face rows)."""
    return _qa_item(row, where)


def parse_boolq(row: dict, where: str = "boolq") -> MCItem:
    """BoolQ {"question", "passage", "answer": bool} (or SuperGLUE's "label": 0/1): context
    "{passage}\\nQuestion: {question}?\\nAnswer:", continuations [" no", " yes"]."""
    question, passage = _need(row, "question", where), _need(row, "passage", where)
    if "answer" in row:
        answer = _need(row, "answer", where, bool)
    elif "label" in row and row["label"] in (0, 1):
        answer = bool(row["label"])
    else:
        raise FormatError(f"{where}: expected a boolean 'answer' (or a 0/1 'label')")
    context = f"{passage}\nQuestion: {question.rstrip('?')}?\nAnswer:"
    return MCItem([context] * 2, [" no", " yes"], int(answer))


def _hellaswag_clean(text: str) -> str:
    # lm-eval's preprocessing of WikiHow artefacts: " [title]" → ". ", bracketed tags dropped.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def parse_hellaswag(row: dict, where: str = "hellaswag") -> MCItem:
    """HellaSwag {"ctx" (or "ctx_a"/"ctx_b"), "activity_label"?, "endings": [4], "label"}: context
    "{activity_label}: {ctx}", continuations " {ending}" (lm-eval's cleaning applied to both)."""
    if "ctx_a" in row:
        ctx = _need(row, "ctx_a", where) + " " + str(row.get("ctx_b", "")).capitalize()
    else:
        ctx = _need(row, "ctx", where)
    endings = _need(row, "endings", where, list)
    label = _need(row, "label", where, (str, int))
    try:
        label = int(label)
    except ValueError:
        raise FormatError(f"{where}: label {label!r} is not an integer") from None
    activity = row.get("activity_label")
    context = _hellaswag_clean(f"{activity}: {ctx}" if activity else ctx)
    return MCItem([context] * len(endings), [" " + _hellaswag_clean(str(e)) for e in endings], label)


def parse_winogrande(row: dict, where: str = "winogrande") -> MCItem:
    """WinoGrande {"sentence" with one "_", "option1", "option2", "answer": "1"|"2"}: lm-eval's
    partial scoring — context = sentence up to "_" with the option filled in, continuation = the
    rest of the sentence (the same for both options)."""
    sentence = _need(row, "sentence", where)
    options = [_need(row, "option1", where), _need(row, "option2", where)]
    answer = str(_need(row, "answer", where, (str, int)))
    if answer not in ("1", "2"):
        raise FormatError(f"{where}: answer {answer!r} should be '1' or '2'")
    if sentence.count("_") != 1:
        raise FormatError(f"{where}: sentence should hold exactly one '_' blank")
    i = sentence.index("_")
    rest = " " + sentence[i + 1:].strip()
    return MCItem([sentence[:i] + o for o in options], [rest, rest], int(answer) - 1)


def parse_mmlu(row: dict, where: str = "mmlu") -> MCItem:
    """MMLU (Hugging Face cais/mmlu rows) {"question", "subject"?, "choices": [4], "answer": 0-3}:
    lm-eval's zero-shot prompt with lettered options, continuations " A" … " D"."""
    question = _need(row, "question", where)
    choices = _need(row, "choices", where, list)
    answer = _need(row, "answer", where, (int, str))
    letters = "ABCDEFGHIJ"[: len(choices)]
    if isinstance(answer, str):
        if answer not in letters:
            raise FormatError(f"{where}: answer {answer!r} should be one of {list(letters)} or an index")
        answer = letters.index(answer)
    if not 0 <= answer < len(choices):
        raise FormatError(f"{where}: answer {answer} outside [0, {len(choices)})")
    subject = str(row.get("subject", "")).replace("_", " ").strip()
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
    options = "".join(f"\n{letter}. {str(c).strip()}" for letter, c in zip(letters, choices))
    return MCItem([f"{header}{question.strip()}{options}\nAnswer:"] * len(choices),
                  [" " + letter for letter in letters], answer)


PARSERS: dict[str, Callable[[dict, str], MCItem]] = {
    "arc_easy": parse_arc,
    "boolq": parse_boolq,
    "hellaswag": parse_hellaswag,
    "winogrande": parse_winogrande,
    "commonsense_qa": parse_commonsense_qa,
    "mmlu": parse_mmlu,
}


def load_task(task: str, path: str | Path, limit: int | None = None) -> list[MCItem]:
    """The items of one task's JSONL file (first `limit` rows)."""
    if task not in PARSERS:
        raise ValueError(f"benchmark task {task!r} unknown; expected one of {sorted(PARSERS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{task}: no file {path} (see docs/EVALUATION.md for where to put the data)")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise FormatError(f"{where}: expected a JSON object")
            items.append(PARSERS[task](row, where))
            if limit is not None and len(items) >= limit:
                break
    return items


# --------------------------------------------------------------------------- scoring

def text_only_condition(model) -> torch.Tensor:
    """Zeros (1, 2C): the conditioning of the text-only training items (`BitMar._text` decodes
    them with cond None, no memory read)."""
    return torch.zeros(1, 2 * model.config.memory_dim, device=model.memory.M0.device)


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    # lm-eval: trailing whitespace of the context belongs to the continuation.
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    return tokenizer.encode(stripped), tokenizer.encode(continuation)


@torch.no_grad()
def continuation_logprobs(model, tokenizer, contexts: Sequence[str], continuations: Sequence[str],
                          cond: torch.Tensor | None = None, max_len: int | None = None) -> list[float]:
    """Σ log p(continuation tokens | [eos]×S + [eos] + context) for each pair, in one right-padded
    batch (the text-only training layout: S sinks, then the eos that opens the text).

    Sequences longer than `max_len` (default: the decoder's S+W positions) lose context tokens from
    the left, right after the leading eos; the continuation is always kept whole."""
    eos = model.config.eos_id
    lead = [eos] * (model.config.sink_tokens + 1)
    max_len = max_len or model.config.max_positions
    seqs, spans = [], []
    for ctx, cont in zip(contexts, continuations):
        c_ids, x_ids = _encode_pair(tokenizer, ctx, cont)
        if not x_ids:
            raise ValueError(f"empty continuation after context {ctx[-40:]!r}")
        if len(lead) + len(x_ids) > max_len:
            raise ValueError(f"a continuation of {len(x_ids)} tokens does not fit in {max_len} positions")
        c_ids = c_ids[max(0, len(lead) + len(c_ids) + len(x_ids) - max_len):]
        seqs.append(lead + c_ids + x_ids)
        spans.append((len(lead) + len(c_ids), len(x_ids)))
    device = model.memory.M0.device
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), eos, dtype=torch.long, device=device)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s, device=device)
    if cond is None:
        cond = text_only_condition(model)
    logp = model.decode(ids, cond.expand(len(seqs), -1)).log_softmax(dim=-1)
    out = []
    for b, (start, n) in enumerate(spans):
        targets = ids[b, start:start + n]
        out.append(float(logp[b, start - 1:start - 1 + n].gather(-1, targets.unsqueeze(-1)).sum()))
    return out


def argmax_first(scores: Sequence[float]) -> int:
    """Index of the largest score; the first one on ties."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


@torch.no_grad()
def score_items(model, tokenizer, items: Sequence[MCItem], cond: torch.Tensor | None = None,
                max_len: int | None = None) -> dict:
    """acc (argmax of Σ log-likelihood) and acc_norm (argmax per continuation byte) over `items`,
    with each item's choice scores."""
    if cond is None:
        cond = text_only_condition(model)
    correct = correct_norm = 0
    per_item = []
    for item in items:
        ll = continuation_logprobs(model, tokenizer, item.contexts, item.continuations, cond, max_len)
        norm = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(ll, item.continuations)]
        pick, pick_norm = argmax_first(ll), argmax_first(norm)
        correct += pick == item.label
        correct_norm += pick_norm == item.label
        per_item.append({"loglik": ll, "pred": pick, "pred_norm": pick_norm, "label": item.label})
    n = len(items)
    chance = sum(1 / len(it.continuations) for it in items) / n if n else 0.0
    return {"n": n, "acc": correct / n if n else 0.0, "acc_norm": correct_norm / n if n else 0.0,
            "chance": chance, "items": per_item}


def evaluate_benchmarks(model, tokenizer, directory: str | Path, tasks: Sequence[str] | None = None,
                        limit: int | None = None) -> dict[str, dict]:
    """Every task whose file exists under `directory` (missing ones are reported, not scored)."""
    directory = Path(directory)
    results = {}
    for task in tasks or list(TASK_FILES):
        if task not in TASK_FILES:
            raise ValueError(f"benchmark task {task!r} unknown; expected some of {sorted(TASK_FILES)}")
        path = directory / TASK_FILES[task]
        if not path.is_file():
            results[task] = {"missing": str(path)}
            continue
        r = score_items(model, tokenizer, load_task(task, path, limit))
        r["file"] = str(path)
        results[task] = r
    return results
