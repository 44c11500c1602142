"""Pairing captions with camera frames at arrival time.

A caption means "this is what the camera sees now", so its episode pairs it with the frame nearest
to its arrival: the newest frame when it came in, or the first frame after it, whichever is closer
(within ``pair_tolerance_s``). Both candidates are pinned to the caption the moment they exist, in
the callback thread. That makes the pairing independent of how far the model worker is behind:
under a burst (a 30 Hz camera, 5 Hz captions, queries and 64-token descriptions on two cores) the
worker may reach a caption seconds later, when a bounded frame history would already have dropped
its frame. The queue of captions is the only thing that grows with the backlog, and it is bounded.

ROS-free and clock-free (times are passed in), so the rule is unit-tested directly.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class _Stamped(Protocol):
    recv_ns: int


F = TypeVar("F", bound=_Stamped)


@dataclass
class PendingCaption(Generic[F]):
    text: str
    t_ns: int            # node clock at the caption's arrival
    before: F | None     # the newest frame when the caption arrived
    after: F | None = None  # the first frame that arrived after it


class CaptionQueue(Generic[F]):
    """A bounded FIFO of captions waiting for the worker, each carrying its candidate frames."""

    def __init__(self, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError(f"caption queue size must be >= 1, got {maxlen}")
        self.maxlen = maxlen
        self._q: collections.deque[PendingCaption[F]] = collections.deque()

    def __len__(self) -> int:
        return len(self._q)

    def add(self, text: str, t_ns: int, latest_frame: F | None) -> PendingCaption[F] | None:
        """Queue a caption that arrived at ``t_ns``; returns the oldest caption dropped to make room."""
        dropped = self._q.popleft() if len(self._q) >= self.maxlen else None
        self._q.append(PendingCaption(text, t_ns, latest_frame))
        return dropped

    def on_frame(self, frame: F) -> None:
        """A frame arrived: it is the 'after' candidate of every queued caption that has none yet.
        Those form a tail of the queue (captions arrive in order), so this costs O(new captions)."""
        for c in reversed(self._q):
            if c.after is not None:
                break
            c.after = frame

    def pop_ready(self, now_ns: int, tol_ns: int) -> tuple[PendingCaption[F], F | None] | None:
        """The head caption with its nearest frame (None: no frame within ``tol_ns``, reject it), or
        None while a frame still to come could be nearer than the candidates so far."""
        if not self._q:
            return None
        c = self._q[0]
        waited = now_ns - c.t_ns
        if c.after is None and waited <= tol_ns and (c.before is None or waited < c.t_ns - c.before.recv_ns):
            return None  # the next frame may still arrive closer than `before`
        self._q.popleft()
        cands = [f for f in (c.before, c.after) if f is not None and abs(f.recv_ns - c.t_ns) <= tol_ns]
        return c, min(cands, key=lambda f: abs(f.recv_ns - c.t_ns), default=None)
