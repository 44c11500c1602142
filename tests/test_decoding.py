"""DecoderSession against a recomputing reference: the parallel decoder over the whole stream the
session should have fed (sinks with no conditioning, each segment under its own, prefix embeddings
spliced in, a closing eos not fed, a cut segment's last token fed first in the next call)."""
import pytest
import torch

from bitmar_core.model.config import BitMarConfig
from bitmar_core.inference.decoding import DecoderSession, sample_token
from bitmar_core.model.bitmar import BitMar
from bitmar_core.inference.tokenizer import VocabTokenizer, default_tokenizer

from conftest import tiny_config_dict
from decoder_reference import reference_decoder

S, W, C2 = 2, 6, 64
EOS = 30  # a token this model emits now and then under the conditionings below: segments end both ways


def _model(eos_id: int = 63) -> BitMar:
    """The conftest's tiny model, with attention made position-sensitive (γ of qkv = 4: at init
    every score is ~0); eos_id picks the token that closes a segment (and fills the sinks)."""
    torch.manual_seed(0)
    model = BitMar(BitMarConfig(**tiny_config_dict(eos_id=eos_id))).eval()
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.attn.qkv.scale.fill_(4.0)
    return model


def _cond(seed: int) -> torch.Tensor:
    return 0.2 * torch.randn(1, C2, generator=torch.Generator().manual_seed(seed))


def _greedy(logits: torch.Tensor) -> int:
    return int(torch.argmax(logits))


def _sampler(temperature: float, top_k: int | None, seed: int):
    g = torch.Generator().manual_seed(seed)

    def pick(logits):
        z = logits.float() / temperature
        if top_k is not None:
            z = torch.where(z >= z.topk(top_k).values[-1], z, torch.tensor(float("-inf"), dtype=z.dtype))
        return int(torch.multinomial(z.softmax(-1), 1, generator=g))
    return pick


class ReferenceStream:
    """What the session feeds, kept as embeddings and per-token conditioning; every step recomputes
    the logits of the whole stream (`model.decoder`'s parallel form, or the test reference with
    another sink/window)."""

    def __init__(self, model, sink: int | None = None, window: int | None = None):
        self.model, self.sink, self.window = model, sink, window
        self.eos = model.config.eos_id
        self.emb = torch.zeros(0, model.config.d_model)
        self.cond = torch.zeros(0, C2)
        self.pending = None
        self._feed([self.eos] * model.config.sink_tokens, None)  # the sinks, no conditioning

    def _feed(self, ids=None, cond=None, emb=None):
        with torch.no_grad():
            e = self.model.wte(torch.tensor(ids, dtype=torch.long)) if emb is None else emb
        c = torch.zeros(1, C2) if cond is None else cond
        self.emb = torch.cat([self.emb, e.float()])
        self.cond = torch.cat([self.cond, c.expand(e.shape[0], C2)])

    def logits(self) -> torch.Tensor:
        with torch.no_grad():
            if self.sink is None:
                return self.model.decoder(self.emb[None], self.cond[None])[0]
            return reference_decoder(self.model, self.emb, self.cond, sink=self.sink, window=self.window)

    def _open(self, prompt, cond, prefix):
        if self.pending is not None:
            self._feed([self.pending[0]], self.pending[1])
            self.pending = None
        if prefix is not None:
            self._feed(cond=cond, emb=prefix[0])
        if len(prompt):
            self._feed(list(prompt), cond)

    def segment(self, prompt, cond, max_new_tokens, pick=_greedy, prefix=None):
        """→ (generated ids, 'closed' | 'cut')."""
        self._open(prompt, cond, prefix)
        out = []
        for n in range(max_new_tokens):
            tok = pick(self.logits()[-1])
            if tok == self.eos:
                return out, "closed"
            out.append(tok)
            if n == max_new_tokens - 1:
                self.pending = (tok, cond)
                return out, "cut"
            self._feed([tok], cond)
        return out, "cut"

    def score(self, ids, cond, prefix=None) -> torch.Tensor:
        self._open(ids[:-1], cond, prefix)
        logp = self.logits()[-(len(ids) - 1):].log_softmax(-1)
        return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]

    @property
    def length(self) -> int:
        return self.emb.shape[0] + (self.pending is not None)


def _prefix(model, seed: int) -> torch.Tensor:
    V = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(seed))  # a 2×2 pooled grid
    with torch.no_grad():
        return model.vision_prefix(V)


def test_greedy_segments_equal_the_recomputing_reference():
    """Several segments per stream (prefix + [eos], or a prompt), closed by eos or cut by
    max_new_tokens, far past S+W = 8 tokens; the text deltas join to the decoded ids."""
    model = _model(eos_id=EOS)
    eos = model.config.eos_id
    tok = default_tokenizer()
    seen = {"closed": 0, "cut": 0}
    for seed in range(4):
        session, ref = DecoderSession(model), ReferenceStream(model)
        for k in range(5):
            cond = _cond(10 * seed + k)
            prefix = _prefix(model, 10 * seed + k) if k % 2 == 0 else None
            prompt = [eos] if prefix is not None else [3 + k, 9]
            pairs = list(session.stream(prompt, cond, max_new_tokens=5, prefix=prefix))
            ids = [t for t, _ in pairs]
            expect, ending = ref.segment(prompt, cond, 5, prefix=prefix)
            assert ids == expect, (seed, k)
            seen[ending] += 1
            assert "".join(d for _, d in pairs) == tok.decode(ids)
            assert session.position == ref.length
        assert session.position > S + W + 10
    assert seen["closed"] >= 2 and seen["cut"] >= 2, seen


def test_closing_eos_is_not_fed_and_a_cut_token_is_fed_under_its_own_cond():
    """The next segment's logits tell what was fed: they equal the reference's, and differ from
    what feeding the closing eos (or the cut token under the new cond) would have given."""
    model = _model(eos_id=EOS)
    found = set()
    for seed in range(12):
        session, ref = DecoderSession(model), ReferenceStream(model)
        cond_a, cond_b = _cond(100 + seed), _cond(200 + seed)
        out, ending = ref.segment([3, 9], cond_a, 4)
        assert session.generate([3, 9], cond_a, 4) == out
        if ending in found:
            continue
        found.add(ending)
        wrong = ReferenceStream(model)
        wrong.segment([3, 9], cond_a, 4)
        if ending == "closed":
            wrong._feed([model.config.eos_id], cond_a)  # as if the closing eos were fed
        else:
            wrong.pending = (wrong.pending[0], cond_b)  # as if the cut token took the next cond
        got = session.score([5, 7, 11], cond_b)
        assert torch.allclose(got, ref.score([5, 7, 11], cond_b), atol=1e-5)
        assert not torch.allclose(got, wrong.score([5, 7, 11], cond_b), atol=1e-4)
        if len(found) == 2:
            break
    assert found == {"closed", "cut"}


@pytest.mark.parametrize("top_k", [None, 5])
def test_sampling_with_the_same_seed_equals_the_reference(top_k):
    model = _model()
    session, ref = DecoderSession(model), ReferenceStream(model)
    g = torch.Generator().manual_seed(3)
    pick = _sampler(0.9, top_k, 3)
    all_ids = []
    for k in range(4):
        cond = _cond(k)
        prefix = _prefix(model, k) if k % 2 else None
        out = session.generate([63], cond, 6, temperature=0.9, top_k=top_k, generator=g, prefix=prefix)
        assert out == ref.segment([63], cond, 6, pick=pick, prefix=prefix)[0]
        all_ids += out
    greedy = DecoderSession(model)
    assert all_ids != sum((greedy.generate([63], _cond(k), 6, prefix=_prefix(model, k) if k % 2 else None)
                           for k in range(4)), [])  # it did sample


def test_top_k_samples_only_from_the_k_best():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5, -1.0])
    g = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, temperature=5.0, top_k=2, generator=g) for _ in range(200)}
    assert draws == {1, 3}
    assert sample_token(logits, temperature=0.0) == 1
    # in a session: at a high temperature every draw is still among the reference's 3 best
    model = _model()
    session, ref = DecoderSession(model), ReferenceStream(model)
    cond = _cond(7)
    out = session.generate([63], cond, 40, temperature=20.0, top_k=3, generator=torch.Generator().manual_seed(1))
    ref._open([63], cond, None)
    ranks = []
    for t in out:
        logits = ref.logits()[-1]
        assert logits[t] >= logits.topk(3).values[-1] - 1e-6
        ranks.append(int((logits > logits[t]).sum()))
        ref._feed([t], cond)
    assert set(ranks) == {0, 1, 2}  # and not just the best


def test_score_equals_log_softmax_of_the_parallel_decode():
    model = _model()
    session, ref = DecoderSession(model), ReferenceStream(model)
    for k in range(2):
        session.generate([63], _cond(k), 7, prefix=_prefix(model, k))
        ref.segment([63], _cond(k), 7, prefix=_prefix(model, k))
    ids = [63, 12, 40, 7, 7, 33, 63]
    got = session.score(ids, _cond(5), prefix=_prefix(model, 5))
    assert got.shape == (len(ids) - 1,)
    assert torch.allclose(got, ref.score(ids, _cond(5), prefix=_prefix(model, 5)), atol=1e-5)
    assert session.position == ref.length  # the closing eos is predicted, not fed
    assert session.generate([63], _cond(6), 5) == ref.segment([63], _cond(6), 5)[0]
    # a fresh stream: log-probabilities of the parallel decode over [sinks, ids[:-1]], by hand
    cond = torch.cat([torch.zeros(S, C2), _cond(5).expand(len(ids) - 1, C2)]).unsqueeze(0)
    with torch.no_grad():
        full = model.decode(torch.tensor([[63] * S + ids[:-1]]), cond)[0, S:].log_softmax(-1)
    fresh = DecoderSession(model).score(ids, _cond(5))
    assert torch.allclose(fresh, full[torch.arange(6), torch.tensor(ids[1:])], atol=1e-5)
    with pytest.raises(ValueError, match="at least two"):
        session.score([63], None)


def test_a_fresh_session_generates_one_segment():
    model = _model(eos_id=EOS)
    for seed in range(3):
        cond, prefix = _cond(seed), _prefix(model, seed)
        expect = ReferenceStream(model).segment([EOS], cond, 9, prefix=prefix)[0]
        assert DecoderSession(model).generate([EOS], cond, 9, prefix=prefix) == expect
    with pytest.raises(ValueError, match="prefix or prompt"):
        DecoderSession(model).generate([], None)
    # a segment may be its prefix alone
    prefix = _prefix(model, 9)
    assert DecoderSession(model).generate([], _cond(9), 6, prefix=prefix) == \
        ReferenceStream(model).segment([], _cond(9), 6, prefix=prefix)[0]


def test_sink_and_window_override_evicts_the_first_tokens():
    """sink=0, window=S+W: the stream's first tokens are evicted like any other — equal to the
    reference with that rule, and not to the model's own S=2 (whose sinks stay)."""
    model = _model()
    session, ref = DecoderSession(model, sink=0, window=S + W), ReferenceStream(model, sink=0, window=S + W)
    default = ReferenceStream(model)
    for k in range(3):
        out = session.generate([5 + k], _cond(k), 6)
        assert out == ref.segment([5 + k], _cond(k), 6)[0]
        forced = iter(out + [model.config.eos_id])  # the same tokens, fed to the S=2 reference
        default.segment([5 + k], _cond(k), 6, pick=lambda logits: next(forced))
    assert sorted(session.caches[0].slot_pos.tolist()) == list(range(session.caches[0].length - S - W,
                                                                     session.caches[0].length))
    ids = [63, 30, 31, 32, 63]
    default_score = default.score(ids, _cond(9))
    got = session.score(ids, _cond(9))
    assert torch.allclose(got, ref.score(ids, _cond(9)), atol=1e-5)
    assert not torch.allclose(got, default_score, atol=1e-4)


def test_text_deltas_hold_back_partial_characters():
    """With a vocabulary of UTF-8 byte pieces (VocabTokenizer over the tiny model's 64 ids), the
    deltas of each segment cut by max_new_tokens join to tokenizer.decode(ids); a piece that ends
    inside a character gives an empty delta."""
    base = default_tokenizer()
    pieces = []
    for text in ["🤖", "😀", "👍", "日本", "語", "é", "ü", "ñ", "ø", "ok", " a", "b", "!"]:
        pieces += [g for g in base.encode(text) if g not in pieces]
    fill = [g for g in range(200) if g not in pieces]
    token_ids = (pieces + fill)[:63] + [base.eos_id]
    tok = VocabTokenizer(token_ids)
    model = _model()
    assert tok.eos_id == model.config.eos_id == 63
    session = DecoderSession(model, tok)
    multibyte = 0
    for seed in range(40):
        pairs = list(session.stream([63], None, 8, temperature=3.0, generator=torch.Generator().manual_seed(seed)))
        ids = [t for t, _ in pairs]
        if len(ids) < 8:
            continue  # closed by eos
        text = tok.decode(ids)
        assert "".join(d for _, d in pairs) == text
        held = [d == "" for _, d in pairs]
        multibyte += any(ord(ch) > 127 and ch != "\ufffd" for ch in text) and any(held)
    assert multibyte >= 3
