"""Pairing captions with camera frames at arrival time.

A caption means "this is what the camera sees now", so its episode pairs it with the frame nearest
to its arrival: the last frame received before it or the first one after it, whichever is closer
(within ``pair_tolerance_s``). Arrival is the middleware's reception time (rmw MessageInfo), not
the moment a callback runs: the executor may run a waiting caption's callback before an image
that reached the machine first. Both candidates are pinned to the caption the moment they exist, in
the callback thread. That makes the pairing independent of how far the model worker is behind:
under a burst (a 30 Hz camera, 5 Hz captions, queries and 64-token descriptions on two cores) the
worker may reach a caption seconds later, when a bounded frame history would already have dropped
its frame. The queue of captions is the only thing that grows with the backlog, and it is bounded.

A caption's candidates come from the frames already handled when its callback runs
(``RecentFrames``). That callback may run seconds after the caption arrived (a loaded executor:
2.4 s was seen), so the ring of recent frames spans seconds while holding a bounded number of
frames: every frame of the newest ``dense_ns``, older ones thinned to at least ``sparse_gap_ns``
apart. A late caption then still finds a frame within ``sparse_gap_ns / 2`` of its arrival, instead
of being refused for want of a frame that had merely been pushed out of a short ring.

A caption without an 'after' frame waits for one only so long (``pop_ready``'s ``lag_ns``): past
that the camera is taken to have stopped. How late a camera callback runs is measured, not assumed
(``CameraLag``): on a loaded machine the executor hands frames over later, and the wait grows with it,
up to a cap, so a stalled executor is not mistaken for a stalled camera.

ROS-free and clock-free (times are passed in), so the rule is unit-tested directly.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Generic, Iterable, Iterator, Protocol, TypeVar


class _Stamped(Protocol):
    recv_ns: int


F = TypeVar("F", bound=_Stamped)


@dataclass
class PendingCaption(Generic[F]):
    text: str
    t_ns: int               # reception time (system clock, ns)
    before: F | None        # the last frame received at or before t_ns, of those handled so far
    after: F | None = None  # the first frame received after t_ns, of those handled so far


class CaptionQueue(Generic[F]):
    """A bounded FIFO of captions waiting for the worker, each carrying its candidate frames."""

    def __init__(self, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError(f"caption queue size must be >= 1, got {maxlen}")
        self.maxlen = maxlen
        self._q: collections.deque[PendingCaption[F]] = collections.deque()

    def __len__(self) -> int:
        return len(self._q)

    def add(self, text: str, t_ns: int, recent_frames: Iterable[F] = ()) -> PendingCaption[F] | None:
        """Queue a caption received at ``t_ns`` with its candidates among the frames already
        handled (``recent_frames``: a few of the newest, in any order); returns the oldest caption
        dropped to make room, if the queue was full."""
        c: PendingCaption[F] = PendingCaption(text, t_ns, None)
        for f in recent_frames:
            _offer(c, f)
        dropped = self._q.popleft() if len(self._q) >= self.maxlen else None
        self._q.append(c)
        return dropped

    def on_frame(self, frame: F) -> None:
        """A frame was handled: it may be a nearer 'after' (or, handled out of order, 'before')
        candidate of queued captions. O(queue), at most ``maxlen`` comparisons."""
        for c in self._q:
            _offer(c, frame)

    def pop_ready(self, now_ns: int, tol_ns: int, lag_ns: int) -> tuple[PendingCaption[F], F | None] | None:
        """The head caption with its nearest frame (None: no frame within ``tol_ns``, reject it), or
        None while a frame still to be handled could be nearer than the candidates so far.

        Once an 'after' candidate is in, nothing nearer can come (the camera's frames are handled in
        reception order). Without one, a nearer frame would have been received within
        ``min(tol, distance to 'before')`` of the caption; the caption waits that long plus
        ``lag_ns``, for a camera callback that runs late to hand it over."""
        if not self._q:
            return None
        c = self._q[0]
        if c.after is None:
            horizon = tol_ns if c.before is None else min(tol_ns, c.t_ns - c.before.recv_ns)
            if now_ns - c.t_ns <= horizon + lag_ns:
                return None
        self._q.popleft()
        cands = [f for f in (c.before, c.after) if f is not None and abs(f.recv_ns - c.t_ns) <= tol_ns]
        return c, min(cands, key=lambda f: abs(f.recv_ns - c.t_ns), default=None)


class CameraLag:
    """How late camera callbacks hand frames over (callback time − reception time), over the last
    ``window`` frames; ``allowance_ns`` is how long a caption waits past its horizon for a frame:
    ``factor`` × the worst recent lag, at least ``floor_ns`` and at most ``cap_ns``."""

    def __init__(self, floor_ns: int, cap_ns: int, window: int = 64, factor: float = 2.0) -> None:
        if not 0 <= floor_ns <= cap_ns:
            raise ValueError(f"need 0 <= floor_ns <= cap_ns, got floor_ns={floor_ns} cap_ns={cap_ns}")
        if window < 1 or factor < 1:
            raise ValueError(f"need window >= 1 and factor >= 1, got window={window} factor={factor}")
        self.floor_ns, self.cap_ns, self.factor = floor_ns, cap_ns, factor
        self._lags: collections.deque[int] = collections.deque(maxlen=window)

    def add(self, lag_ns: int) -> None:
        self._lags.append(max(0, lag_ns))

    def allowance_ns(self) -> int:
        worst = max(self._lags, default=0)
        return int(min(self.cap_ns, max(self.floor_ns, self.factor * worst)))


class RecentFrames(Generic[F]):
    """The newest frames handled, in handling order: all of the last ``dense_ns`` (by reception
    time, relative to the newest), older ones at least ``sparse_gap_ns`` apart, at most ``maxlen``."""

    def __init__(self, maxlen: int, dense_ns: int, sparse_gap_ns: int) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self.maxlen, self.dense_ns, self.sparse_gap_ns = maxlen, dense_ns, sparse_gap_ns
        self._frames: list[F] = []

    def __len__(self) -> int:
        return len(self._frames)

    def __iter__(self) -> Iterator[F]:
        return iter(list(self._frames))

    def add(self, frame: F) -> None:
        """Add the frame just handled; thin the older ones; O(maxlen)."""
        self._frames.append(frame)
        newest = max(f.recv_ns for f in self._frames)
        kept: list[F] = []
        last_sparse: F | None = None
        for f in self._frames:  # oldest first: the sparse frames keep their spacing as they age
            if newest - f.recv_ns <= self.dense_ns:
                kept.append(f)
            elif last_sparse is None or f.recv_ns - last_sparse.recv_ns >= self.sparse_gap_ns:
                kept.append(f)
                last_sparse = f
        self._frames = kept[-self.maxlen:]


def _offer(c: PendingCaption[F], f: F) -> None:
    """Keep ``f`` if it is nearer on its side of the caption than the candidate so far."""
    if f.recv_ns <= c.t_ns:
        if c.before is None or f.recv_ns > c.before.recv_ns:
            c.before = f
    elif c.after is None or f.recv_ns < c.after.recv_ns:
        c.after = f
