"""GPT-2 BPE ids against known values; lossless round trip; incremental decoding never splits UTF-8;
the model's restricted vocabulary (VocabTokenizer, build_vocabulary, tokenizer_for)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from bitmar_core.model.config import BitMarConfig
from bitmar_core.model.bitmar import BitMar
from bitmar_core.inference.tokenizer import VocabTokenizer, build_vocabulary, default_tokenizer, tokenizer_for

from conftest import tiny_config_dict

tok = default_tokenizer()


def test_known_gpt2_ids():
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("<|endoftext|>") == [50256] and tok.eos_id == 50256
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]


def test_round_trip_unicode_and_emoji():
    for s in ["Robots 🤖 see a naïve café — 日本語\n\n  tabs\there", "👩‍👩‍👧 ok", "", "  leading"]:
        assert tok.decode(tok.encode(s)) == s


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_round_trip_any_text(s):
    assert tok.decode(tok.encode(s)) == s


def test_incremental_decoder_holds_back_partial_characters():
    s = "A 🤖 and 日本 😀!"
    ids = tok.encode(s)
    dec = tok.incremental_decoder()
    deltas = [dec.push(i) for i in ids]
    assert "".join(deltas) + dec.flush() == s == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)
    # the emoji is split over several byte tokens: its first pieces give empty deltas
    emoji_ids = tok.encode("🤖")
    assert len(emoji_ids) > 1
    dec = tok.incremental_decoder()
    assert [dec.push(i) for i in emoji_ids] == [""] * (len(emoji_ids) - 1) + ["🤖"]


def test_incremental_decoder_invalid_bytes_match_full_decode():
    ids = tok.encode("🤖")[:1] + tok.encode("ok")  # a lone lead byte, then ASCII
    dec = tok.incremental_decoder()
    assert "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids)


# --------------------------------------------------------------------------- the model's vocabulary
EOS = 50256


def test_build_vocabulary_eos_first_then_ascending():
    # "Hello world" = [15496, 995], " the world" = [262, 995] (GPT-2 ids, checked above)
    assert build_vocabulary(["Hello world", " the world"]) == [EOS, 262, 995, 15496]
    assert build_vocabulary(["Hello<|endoftext|>"]) == [EOS, 15496]  # eos listed once
    assert build_vocabulary([]) == [EOS]


def test_build_vocabulary_covers_every_text_across_its_batches():
    """2,100 texts (build_vocabulary encodes 1,024 at a time): words that occur only at index
    1,023, 1,024 and in the last, partial batch are all covered."""
    texts = ["the cat"] * 2_100
    texts[1_023], texts[1_024], texts[-1] = "a dog", "Hello world", "🤖 big"
    vocab = build_vocabulary(texts)
    assert vocab[0] == EOS and vocab[1:] == sorted(vocab[1:]) and len(set(vocab)) == len(vocab)
    expected = {EOS} | {g for t in set(texts) for g in tok.encode(t)}
    assert set(vocab) == expected
    vt = VocabTokenizer(vocab)
    for t in set(texts):
        assert vt.decode(vt.encode(t)) == t and vt.unknown(t) == []


def test_vocab_tokenizer_round_trip_and_unknown_words():
    vt = VocabTokenizer(build_vocabulary(["Hello world", " the world"]))  # [eos, 262, 995, 15496]
    assert vt.vocab_size == 4 and vt.eos_id == 0
    assert vt.encode("Hello the world") == [3, 1, 2]  # local ids: row of each GPT-2 id
    assert vt.decode([3, 1, 2]) == "Hello the world"
    assert vt.encode_batch(["Hello world", " the"]) == [[3, 2], [1]]
    # " big" (1263) has no row: dropped, and reported
    assert vt.encode("Hello big world") == [3, 2]
    assert vt.unknown("Hello big world") == [" big"]
    assert vt.decode([0]) == "<|endoftext|>" and vt.decode([vt.eos_id, 3]) == "<|endoftext|>Hello"
    assert vt.token_bytes(3) == b"Hello"
    with pytest.raises(ValueError, match="outside"):
        vt.token_bytes(4)


def test_vocab_tokenizer_incremental_decoding_of_byte_pieces():
    pieces = tok.encode("🤖")  # three byte-level pieces of one character
    vt = VocabTokenizer([EOS] + pieces)
    ids = vt.encode("🤖🤖")
    assert ids == [1, 2, 3, 1, 2, 3]
    dec = vt.incremental_decoder()
    assert [dec.push(i) for i in ids] == ["", "", "🤖", "", "", "🤖"]
    assert dec.flush() == ""


def test_vocab_tokenizer_rejects_bad_token_lists():
    with pytest.raises(ValueError, match="repeat"):
        VocabTokenizer([EOS, 262, 262])
    with pytest.raises(ValueError, match="endoftext"):
        VocabTokenizer([262, 995])
    with pytest.raises(ValueError, match="outside"):
        VocabTokenizer([EOS, 50257])
    with pytest.raises(ValueError, match="outside"):
        VocabTokenizer([EOS, -1])


def test_tokenizer_for_follows_the_model():
    torch.manual_seed(0)
    full = BitMar(BitMarConfig(**tiny_config_dict()))
    assert tokenizer_for(full) is tok
    vocab = build_vocabulary(["Hello world", " the world"])
    sub = BitMar(BitMarConfig(**tiny_config_dict(vocab_size=len(vocab), eos_id=0, vocab_subset=True)))
    sub.token_ids.copy_(torch.tensor(vocab))
    vt = tokenizer_for(sub)
    assert isinstance(vt, VocabTokenizer) and vt.token_ids == vocab
    assert vt.eos_id == sub.config.eos_id and vt.vocab_size == sub.config.vocab_size
    assert vt.encode("Hello world") == [3, 2]
    assert tokenizer_for(sub) is vt  # cached while the model's list is unchanged
    sub.token_ids.copy_(torch.tensor([EOS, 3797, 3290, 995]))  # e.g. a checkpoint loaded into it
    other = tokenizer_for(sub)
    assert other is not vt and other.encode(" cat dog") == [1, 2]
