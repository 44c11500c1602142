"""GPT-2 BPE ids against known values; lossless round trip; incremental decoding never splits UTF-8."""
from hypothesis import given, settings, strategies as st

from bitmar_core.tokenizer import default_tokenizer

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
