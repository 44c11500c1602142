"""Streaming generation over the sink KV cache: token ids with text deltas, in bounded memory.

`DecoderSession` is the one decoding loop of the project. It keeps one set of caches and the stream
position across calls, so a robot can narrate for hours. The stream is laid out as in training
(`bitmar_core.data.streams`):

    [eos]×S sinks (no conditioning) | segment | segment | ...
    segment = [prefix embeddings, e.g. a scene's vision tokens] [prompt ids, e.g. eos] generated...

Each segment has its own conditioning [q ; M_r]. A generated eos ends the segment and is not fed
(training never shows eos followed by the next scene); a segment cut at `max_new_tokens` feeds its
last token, under its own conditioning, before the next one starts. Call on a model in eval mode
(a `BitMar` or a `FastDecoder`).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ..model.decoder import SinkKVCache
from .tokenizer import tokenizer_for


def sample_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> int:
    """logits (V,) → one id: argmax when temperature == 0, else softmax(logits/T) over the top_k."""
    if temperature == 0:
        # numpy's argmax picks the same first maximum as torch's and is cheaper per token on CPU.
        return int(logits.detach().numpy().argmax()) if logits.device.type == "cpu" else int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(logits.softmax(dim=-1), 1, generator=generator))


class DecoderSession:
    """One conversation-long decoder stream: SinkKVCache per layer, the sinks, the running position."""

    def __init__(self, model, tokenizer=None, sink: int | None = None, window: int | None = None):
        """sink/window override the model's S and W (an ablation: sink=0, window=S+W evicts the
        stream's first tokens like any other)."""
        self.model = model
        base = getattr(model, "model", model)  # a FastDecoder wraps its BitMar
        self.tokenizer = tokenizer or tokenizer_for(base)
        self.eos_id = model.config.eos_id
        device = model.wte.weight.device
        c = model.config
        if sink is None and window is None:
            self.caches = model.decoder.new_caches(1, device)
        else:
            self.caches = [SinkKVCache(1, c.n_heads, c.d_model // c.n_heads, c.sink_tokens if sink is None else sink,
                                       c.window if window is None else window, device)
                           for _ in range(c.n_decoder_layers)]
        self._pending: list[int] = []  # a segment's last token, fed before the next segment
        self._pending_cond: torch.Tensor | None = None
        self._step_ids = torch.zeros(1, 1, dtype=torch.long, device=device)  # reused every step

    @property
    def position(self) -> int:
        """Stream index of the next token that will be fed."""
        return self.caches[0].length + len(self._pending)

    def reset(self) -> None:
        for c in self.caches:
            c.reset()
        self._pending, self._pending_cond = [], None

    def _ids(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor([list(ids)], dtype=torch.long, device=self._step_ids.device)

    @torch.no_grad()
    def _open(self) -> None:
        """At the start of a stream, the S sink tokens (eos, no conditioning); before a later
        segment, the previous segment's unfed last token under its own conditioning."""
        if self.caches[0].length == 0:
            self.model.decode(self._ids([self.eos_id] * self.model.config.sink_tokens), None, self.caches)
        if self._pending:
            self.model.decode(self._ids(self._pending), self._pending_cond, self.caches)
            self._pending, self._pending_cond = [], None

    @torch.no_grad()
    def stream(self, prompt_ids: Sequence[int], cond: torch.Tensor | None = None, max_new_tokens: int = 32,
               temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None,
               prefix: torch.Tensor | None = None, eos_id: int | None = None) -> Iterator[tuple[int, str]]:
        """Start a segment — prefix embeddings (1,P,d), then prompt_ids — conditioned on cond (1,2C)
        or None, and yield (token_id, text_delta) until eos (not yielded) or max_new_tokens.
        eos_id: the token that ends the segment (default the model's eos; -1: none, for tests)."""
        stop = self.eos_id if eos_id is None else eos_id
        if not len(prompt_ids) and prefix is None:
            raise ValueError("DecoderSession.stream: a segment needs a prefix or prompt ids (e.g. [eos_id])")
        self._open()
        model = self.model
        text = self.tokenizer.incremental_decoder()
        logits = model.decode(self._ids(prompt_ids), cond, self.caches, prefix=prefix)[0, -1]
        for n in range(max_new_tokens):
            tok = sample_token(logits, temperature, top_k, generator)
            if tok == stop:
                return
            last = n == max_new_tokens - 1
            yield tok, text.push(tok) + (text.flush() if last else "")
            if last:
                self._pending, self._pending_cond = [tok], cond
                return
            self._step_ids.fill_(tok)
            logits = model.decode(self._step_ids, cond, self.caches)[0, -1]

    def generate(self, prompt_ids: Sequence[int], cond: torch.Tensor | None = None, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None,
                 prefix: torch.Tensor | None = None, eos_id: int | None = None) -> list[int]:
        """`stream`, collected: the generated ids (eos excluded)."""
        return [t for t, _ in self.stream(prompt_ids, cond, max_new_tokens, temperature, top_k, generator, prefix,
                                          eos_id)]

    @torch.no_grad()
    def score(self, ids: Sequence[int], cond: torch.Tensor | None = None,
              prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Feed a segment [prefix] ids whose last token is the eos that closes it, and return the
        log-probability of each of ids[1:] (the model's reading of a known text: perplexity).
        The closing eos is predicted, not fed, as in training."""
        self._open()
        if len(ids) < 2:
            raise ValueError("DecoderSession.score: need at least two ids (a start and a target)")
        logits = self.model.decode(self._ids(ids[:-1]), cond, self.caches, prefix=prefix)
        if logits.shape[1] < len(ids) - 1:  # a FastDecoder returns the last position only: feed one by one
            raise ValueError("DecoderSession.score needs a model that returns every position (not FastDecoder)")
        logp = logits[0, -(len(ids) - 1):].float().log_softmax(dim=-1)
        return logp.gather(1, torch.tensor(ids[1:], device=logp.device).unsqueeze(1)).squeeze(1)

