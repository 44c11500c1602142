"""pairing.RecentFrames: the ring of frames a late caption callback pairs from (issue 19: a caption
whose callback ran 2.4 s late under load was refused as unpaired, its frames already pushed out of
a 32-frame ring that spans ~1 s at 30 Hz)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from bitmar_ros.pairing import CaptionQueue, RecentFrames

MS = 1_000_000
TOL = 1000 * MS
LAG = 500 * MS


@dataclass(frozen=True)
class F:
    recv_ns: int


def _ring(hz: float, seconds: float) -> RecentFrames[F]:
    ring: RecentFrames[F] = RecentFrames(32, 500 * MS, 200 * MS)
    for i in range(int(hz * seconds) + 1):
        ring.add(F(int(i * 1000 / hz) * MS))
    return ring


@pytest.mark.parametrize("hz", [10, 30, 60])
def test_ring_is_bounded_dense_when_recent_and_spans_seconds(hz):
    ring = _ring(hz, 20)
    frames = [f.recv_ns for f in ring]
    newest = frames[-1]
    assert len(frames) <= 32 and frames == sorted(frames)
    dense = [t for t in frames if newest - t <= 500 * MS]
    assert len(dense) == min(32, int(0.5 * hz) + 1)  # every frame of the last 0.5 s
    older = [t for t in frames if newest - t > 500 * MS]
    assert all(b - a >= 200 * MS for a, b in zip(older, older[1:]))
    if hz <= 30:
        assert newest - frames[0] >= 3000 * MS  # seconds of history, not ~1 s


def test_a_caption_whose_callback_ran_late_still_finds_its_frame():
    ring = _ring(30, 20)
    newest = max(f.recv_ns for f in ring)
    q: CaptionQueue[F] = CaptionQueue(8)
    t = newest - 2400 * MS  # received 2.4 s before the newest frame handled
    q.add("late caption", t, ring)
    caption, frame = q.pop_ready(newest + 10 * MS, TOL, LAG)
    assert caption.text == "late caption" and frame is not None
    assert abs(frame.recv_ns - t) <= 100 * MS  # within half the sparse gap


def test_with_a_plain_32_frame_ring_the_same_caption_was_refused():
    """What the ring replaced: the newest 32 frames at 30 Hz span ~1 s, so the caption above had no
    frame within the tolerance."""
    frames = [F(int(i * 1000 / 30) * MS) for i in range(601)][-32:]
    newest = frames[-1].recv_ns
    q: CaptionQueue[F] = CaptionQueue(8)
    q.add("late caption", newest - 2400 * MS, frames)
    _, frame = q.pop_ready(newest + 10 * MS, TOL, LAG)
    assert frame is None


def test_out_of_order_frames_and_bad_size():
    ring: RecentFrames[F] = RecentFrames(4, 100 * MS, 50 * MS)
    for t in (0, 10, 5, 300, 290):
        ring.add(F(t * MS))
    assert len(ring) <= 4 and F(300 * MS) in list(ring) and F(290 * MS) in list(ring)
    with pytest.raises(ValueError):
        RecentFrames(0, 1, 1)
