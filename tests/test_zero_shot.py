"""Benchmark loaders parse each public format exactly; MC scoring matches a direct reference loop in
the text-only training layout ([eos]×S sinks, [eos], text; no conditioning)."""
from pathlib import Path

import pytest
import torch

from bitmar_core import BitMar, BitMarConfig
from bitmar_core.evaluation.zero_shot import (TASK_FILES, FormatError, MCItem, argmax_first, continuation_logprobs,
                                    evaluate_benchmarks, load_task, parse_boolq, parse_winogrande, score_items,
                                    text_only_condition)
from bitmar_core.inference.tokenizer import default_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"


def tiny_model(seed: int = 0, window: int = 254) -> BitMar:
    torch.manual_seed(seed)
    config = BitMarConfig(d_model=16, n_heads=2, n_encoder_layers=1, n_decoder_layers=1, mlp_ratio=2,
                          max_text_len=64, backbone="precomputed", vision_feature_dim=8, vision_hidden=16,
                          n_fusion_queries=2, memory_slots=8, memory_dim=16, sink_tokens=2, window=window)
    model = BitMar(config)
    with torch.no_grad():  # spread the scores so that choices are far from ties
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


# --------------------------------------------------------------------------- formats

def test_arc_both_row_forms():
    items = load_task("arc_easy", FIXTURES / "arc_easy.jsonl")
    assert len(items) == 3
    assert items[0].contexts == ["Question: Which object is a source of light?\nAnswer:"] * 4
    assert items[0].continuations == [" a rock", " the Sun", " a spoon", " a shadow"]
    assert items[0].label == 1
    # Hugging Face form, numeric labels.
    assert items[1].contexts == ["Question: What do plants need to make food?\nAnswer:"] * 3
    assert items[1].continuations == [" sunlight", " sand", " plastic"]
    assert items[1].label == 0


def test_boolq_answer_and_label_forms():
    items = load_task("boolq", FIXTURES / "boolq.jsonl")
    assert items[0].contexts[0] == ("Botanically, a tomato is the fruit of the tomato plant, although it is cooked "
                                    "as a vegetable.\nQuestion: is a tomato a fruit?\nAnswer:")
    assert items[0].continuations == [" no", " yes"]
    assert [it.label for it in items] == [1, 0, 1]


def test_hellaswag_context_and_cleaning():
    items = load_task("hellaswag", FIXTURES / "hellaswag.jsonl")
    assert items[0].contexts[0] == "Cooking: A man cracks two eggs into a bowl. He"
    assert items[0].continuations == [" whisks them with a fork.", " throws the bowl into the sky.",
                                      " paints the eggs. blue.", " sings to the fridge."]
    assert items[0].label == 0
    assert items[1].contexts[0] == "The girl puts on her shoes. She"  # "ctx" only, no activity label
    # lm-eval cleaning: " [title]" → ". ", other [tags] dropped.
    assert items[2].contexts[0] == "Home and Garden: How to water a plant. Fill a can with water."
    # As in lm-eval, a dropped leading tag leaves its space: " " + " Pour ..." (kept for comparability).
    assert items[2].continuations[0] == "  Pour it slowly onto the soil."


def test_winogrande_partial_scoring():
    items = load_task("winogrande", FIXTURES / "winogrande.jsonl")
    assert items[0].contexts == ["The trophy does not fit in the suitcase because the trophy",
                                 "The trophy does not fit in the suitcase because the suitcase"]
    assert items[0].continuations == [" is too big."] * 2
    assert [it.label for it in items] == [0, 1, 1]


def test_commonsense_qa_both_row_forms():
    items = load_task("commonsense_qa", FIXTURES / "commonsense_qa.jsonl")
    assert items[0].contexts[0] == "Question: Where would you cook a meal at home?\nAnswer:"
    assert items[0].continuations == [" stove", " ocean", " desert", " cloud", " moon"]
    assert [it.label for it in items] == [0, 1]
    assert items[1].continuations[1] == " scissors"


def test_mmlu_prompt_and_answers():
    items = load_task("mmlu", FIXTURES / "mmlu.jsonl")
    assert items[0].contexts[0] == ("The following are multiple choice questions (with answers) about elementary "
                                    "mathematics.\n\nWhat is 2 + 3?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:")
    assert items[0].continuations == [" A", " B", " C", " D"]
    assert [it.label for it in items] == [1, 0, 2]  # the third row gives its answer as a letter
    assert items[2].contexts[0].startswith("Water boils at sea level at\nA. 50 C")


def test_every_task_has_a_fixture_and_limit_works():
    for task, name in TASK_FILES.items():
        assert (FIXTURES / name).is_file(), task
    assert len(load_task("mmlu", FIXTURES / "mmlu.jsonl", limit=2)) == 2


def test_format_errors_name_the_row(tmp_path):
    bad = tmp_path / "boolq.jsonl"
    bad.write_text('{"question": "q", "passage": "p", "answer": true}\n{"question": "q", "passage": "p"}\n')
    with pytest.raises(FormatError, match=r"boolq.jsonl:2: expected a boolean 'answer'"):
        load_task("boolq", bad)
    with pytest.raises(FormatError, match="exactly one '_'"):
        parse_winogrande({"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"})
    with pytest.raises(FormatError, match="missing field 'passage'"):
        parse_boolq({"question": "q", "answer": True})
    with pytest.raises(FileNotFoundError, match="EVALUATION.md"):
        load_task("mmlu", tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="label 3 outside"):
        MCItem(["a", "b"], [" x", " y"], 3)


# --------------------------------------------------------------------------- scoring

def lead(model) -> list[int]:
    """What a text-only training item starts with (bitmar_core.data.streams): S sinks, then the
    eos that opens the text."""
    return [model.config.eos_id] * (model.config.sink_tokens + 1)


def reference_logprob(model, tok, context: str, continuation: str) -> float:
    """Direct loop: for each continuation token, decode the whole unpadded prefix (unconditioned,
    as text-only items are trained) and read the log-probability of the next token from the last
    position."""
    prefix = lead(model) + tok.encode(context)
    total = 0.0
    for t in tok.encode(continuation):
        logits = model.decode(torch.tensor([prefix]), None)[0, -1]
        total += float(logits.log_softmax(-1)[t])
        prefix.append(t)
    return total


@torch.no_grad()
def test_scoring_matches_reference_loop_on_every_fixture():
    model, tok = tiny_model(), default_tokenizer()
    for task, name in TASK_FILES.items():
        items = load_task(task, FIXTURES / name)
        result = score_items(model, tok, items)
        n_correct = n_correct_norm = 0
        for item, got in zip(items, result["items"]):
            ref = [reference_logprob(model, tok, c, x) for c, x in zip(item.contexts, item.continuations)]
            assert got["loglik"] == pytest.approx(ref, abs=1e-3), task
            pick = max(range(len(ref)), key=lambda i: ref[i])
            norm = [s / len(x.encode()) for s, x in zip(ref, item.continuations)]
            pick_norm = max(range(len(norm)), key=lambda i: norm[i])
            assert got["pred"] == pick and got["pred_norm"] == pick_norm, task
            n_correct += pick == item.label
            n_correct_norm += pick_norm == item.label
        assert result["acc"] == pytest.approx(n_correct / len(items))
        assert result["acc_norm"] == pytest.approx(n_correct_norm / len(items))
        assert result["chance"] == pytest.approx(sum(1 / len(i.continuations) for i in items) / len(items))


@torch.no_grad()
def test_text_only_condition_is_zero():
    model = tiny_model()
    assert torch.equal(text_only_condition(model), torch.zeros(1, 2 * model.config.memory_dim))


@torch.no_grad()
def test_scores_are_the_text_training_loss():
    """A continuation's score is minus the loss the text-only training task puts on those tokens:
    a batch in the layout of bitmar_core.data.streams, the context and closing eos not targeted."""
    model, tok = tiny_model(), default_tokenizer()
    context, cont = "The cat sat", " on the mat."
    c_ids, x_ids = tok.encode(context), tok.encode(cont)
    S, eos = model.config.sink_tokens, model.config.eos_id
    ids = torch.tensor([[eos] * S + [eos] + c_ids + x_ids])
    targets = torch.tensor([[-100] * (S + len(c_ids)) + x_ids + [-100]])
    r = model._text({"text_ids": ids, "text_targets": targets, "text_pos": torch.arange(ids.shape[1])})
    got = continuation_logprobs(model, tok, [context], [cont])[0]
    assert int(r["n"]) == len(x_ids)
    assert got == pytest.approx(-float(r["nll"]), abs=1e-4)


@torch.no_grad()
def test_long_context_is_cut_from_the_left():
    model, tok = tiny_model(window=14), default_tokenizer()  # S + W = 16 positions
    context = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    cont = " fifteen sixteen"
    c_ids, x_ids = tok.encode(context), tok.encode(cont)
    n_lead = model.config.sink_tokens + 1
    assert n_lead + len(c_ids) + len(x_ids) > 16
    kept = c_ids[len(c_ids) - (16 - n_lead - len(x_ids)):]
    got = continuation_logprobs(model, tok, [context], [cont])[0]
    prefix, ref = lead(model) + kept, 0.0
    for t in x_ids:
        ref += float(model.decode(torch.tensor([prefix]), None)[0, -1].log_softmax(-1)[t])
        prefix.append(t)
    assert len(prefix) == 16
    assert got == pytest.approx(ref, abs=1e-4)


def test_trailing_space_moves_to_the_continuation():
    model, tok = tiny_model(), default_tokenizer()
    a = continuation_logprobs(model, tok, ["Answer: "], ["yes"])
    b = continuation_logprobs(model, tok, ["Answer:"], [" yes"])
    assert a == pytest.approx(b)


def test_argmax_first_breaks_ties_to_the_first():
    assert argmax_first([1.0, 3.0, 3.0]) == 1
    assert argmax_first([-2.0, -1.0]) == 1


def test_evaluate_benchmarks_reports_missing_files(tmp_path):
    (tmp_path / "boolq.jsonl").write_text((FIXTURES / "boolq.jsonl").read_text())
    out = evaluate_benchmarks(tiny_model(), default_tokenizer(), tmp_path, tasks=["boolq", "mmlu"])
    assert out["boolq"]["n"] == 3
    assert out["mmlu"] == {"missing": str(tmp_path / "mmlu.jsonl")}
