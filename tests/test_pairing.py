"""CaptionQueue: each caption gets the frame nearest to its arrival however late the worker is.

The reference is brute force over every frame of the run, including frames that arrive after the
worker has decided: a decision is only correct if no frame, ever, was nearer.
"""
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitmar_ros.pairing import CameraLag, CaptionQueue


@dataclass(frozen=True)
class F:
    recv_ns: int
    n: int


def _nearest(frames: list[F], t_ns: int, tol_ns: int) -> int | None:
    """Distance to the nearest frame of the whole run within tolerance (None: there is none)."""
    d = [abs(f.recv_ns - t_ns) for f in frames if abs(f.recv_ns - t_ns) <= tol_ns]
    return min(d) if d else None


events = st.lists(st.tuples(st.sampled_from(["frame", "caption", "poll"]), st.integers(0, 400)), max_size=120)


@settings(max_examples=300, deadline=None)
@given(events=events, tol_ns=st.integers(0, 300))
def test_pairs_each_caption_with_the_nearest_frame_of_the_whole_run(events, tol_ns):
    # Events in time order (frames before captions at the same instant, as the node's serialised
    # callbacks would see one of them first); polls are the worker, at arbitrary times: late or early.
    t, timeline = 0, []
    for kind, gap in events:
        t += gap
        timeline.append((t, kind))
    q: CaptionQueue[F] = CaptionQueue(maxlen=10_000)
    frames, captions, decided = [], [], []
    for now, kind in timeline:
        if kind == "frame":
            frames.append(F(now, len(frames)))
            q.on_frame(frames[-1])
        elif kind == "caption":
            captions.append((f"c{len(captions)}", now))
            assert q.add(captions[-1][0], now, frames[-3:]) is None
        else:
            while (r := q.pop_ready(now, tol_ns, lag_ns=0)) is not None:
                decided.append((r[0].text, r[0].t_ns, r[1], now))
    end = (timeline[-1][0] if timeline else 0) + tol_ns + 1
    while (r := q.pop_ready(end, tol_ns, lag_ns=0)) is not None:
        decided.append((r[0].text, r[0].t_ns, r[1], end))
    assert len(q) == 0
    assert [(c, t) for c, t, _, _ in decided] == captions  # each once, in order
    for text, t_ns, frame, at in decided:
        want = _nearest(frames, t_ns, tol_ns)
        got = None if frame is None else abs(frame.recv_ns - t_ns)
        assert got == want, (text, t_ns, frame, at, frames)
        assert frame is None or frame.recv_ns <= at  # never a frame from the future


def test_a_late_worker_still_gets_the_frame_that_was_current_at_arrival():
    """The failure this replaces: with a 90-frame history, a worker 5 s behind at 30 Hz found no
    frame within tolerance of an old caption and rejected it."""
    q: CaptionQueue[F] = CaptionQueue(maxlen=64)
    ms = 1_000_000
    frame = F(1000 * ms, 0)
    q.add("a red cube", 1010 * ms, [frame])
    for i in range(1, 300):  # 10 s of 30 Hz camera after the caption
        q.on_frame(F(1000 * ms + i * 33 * ms, i))
    caption, paired = q.pop_ready(11_000 * ms, tol_ns=1000 * ms, lag_ns=500 * ms)
    assert caption.text == "a red cube" and paired == frame  # 10 ms before beats 23 ms after


def test_waits_while_a_late_camera_callback_could_still_bring_a_nearer_frame():
    q: CaptionQueue[F] = CaptionQueue(maxlen=4)
    q.add("x", 100, [F(60, 0), F(90, 1)])
    # 'before' is 10 away: a nearer frame was received by 110 if at all; its callback may be 20 late
    assert q.pop_ready(115, tol_ns=50, lag_ns=20) is None
    q.on_frame(F(97, 2))   # received before the caption, handled late: a nearer 'before' (3 away)
    assert q.pop_ready(123, tol_ns=50, lag_ns=20) is None
    caption, frame = q.pop_ready(124, tol_ns=50, lag_ns=20)
    assert caption.text == "x" and frame == F(97, 2)
    q.add("y", 200, [F(160, 3)])
    q.on_frame(F(230, 4))  # an 'after' decides at once
    caption, frame = q.pop_ready(230, tol_ns=50, lag_ns=20)
    assert caption.text == "y" and frame == F(230, 4)   # 30 after beats 40 before
    q.add("z", 400)        # no frame near it: it waits tol + lag, then goes without
    assert q.pop_ready(470, tol_ns=50, lag_ns=20) is None
    caption, frame = q.pop_ready(471, tol_ns=50, lag_ns=20)
    assert caption.text == "z" and frame is None  # the node rejects it, with the reason


def test_a_full_queue_drops_the_oldest_caption_and_says_which():
    q: CaptionQueue[F] = CaptionQueue(maxlen=2)
    assert q.add("a", 1) is None and q.add("b", 2) is None
    dropped = q.add("c", 3)
    assert dropped.text == "a" and len(q) == 2
    with pytest.raises(ValueError, match="caption queue size"):
        CaptionQueue(maxlen=0)


def test_callbacks_out_of_order_still_pair_by_reception_time():
    """The executor ran the caption (received at 100) after frames received at 95 and 104, and
    runs the frame received at 99 later still: each candidate is the nearest on its side."""
    q: CaptionQueue[F] = CaptionQueue(maxlen=4)
    q.add("z", 100, [F(104, 2), F(95, 0)])
    q.on_frame(F(99, 1))
    q.on_frame(F(130, 3))
    caption, frame = q.pop_ready(100, tol_ns=50, lag_ns=0)
    assert frame == F(99, 1) and (caption.before, caption.after) == (F(99, 1), F(104, 2))


def test_camera_lag_allowance_is_twice_the_worst_recent_lag_between_floor_and_cap():
    lag = CameraLag(floor_ns=500, cap_ns=5_000, window=3)
    assert lag.allowance_ns() == 500  # nothing seen yet: the floor
    lag.add(100)
    assert lag.allowance_ns() == 500  # 2 × 100 is under the floor
    lag.add(1_200)
    assert lag.allowance_ns() == 2_400
    lag.add(-50)  # a reception stamp from a clock step ahead: no negative lag
    assert lag.allowance_ns() == 2_400
    lag.add(3_000)
    assert lag.allowance_ns() == 5_000  # 6,000 capped
    for _ in range(3):  # the window forgets the burst
        lag.add(200)
    assert lag.allowance_ns() == 500
    with pytest.raises(ValueError, match="floor_ns <= cap_ns"):
        CameraLag(floor_ns=10, cap_ns=5)
    with pytest.raises(ValueError, match="window >= 1"):
        CameraLag(floor_ns=0, cap_ns=5, window=0)


def test_a_loaded_executor_widens_the_wait_so_a_late_frame_still_pairs():
    """Frames handed over 1.5 s after reception (a loaded executor): a caption received at 10 s
    whose nearest frame (10.3 s) is handed over at 11.8 s. The fixed 0.5 s allowance gives up at
    11.5 s and rejects it; the measured lag keeps it waiting, and it pairs with that frame."""
    ms = 1_000_000
    tol, floor = 1000 * ms, 500 * ms
    for adaptive in (False, True):
        lag = CameraLag(floor_ns=floor, cap_ns=5000 * ms)
        q: CaptionQueue[F] = CaptionQueue(maxlen=4)
        lag.add(1500 * ms)  # the last frame handed over showed how far behind the executor runs
        q.add("late", 10_000 * ms, [F(8_000 * ms, 0)])  # only a frame 2 s before is handed over yet
        allowance = lag.allowance_ns() if adaptive else floor
        assert q.pop_ready(11_400 * ms, tol, allowance) is None  # within the floor: both wait
        popped = q.pop_ready(11_600 * ms, tol, allowance)
        if not adaptive:
            caption, frame = popped
            assert caption.text == "late" and frame is None  # rejected: its frame was still coming
            continue
        assert popped is None and allowance == 3000 * ms
        q.on_frame(F(10_300 * ms, 1))  # handed over at 11.8 s
        caption, frame = q.pop_ready(11_800 * ms, tol, allowance)
        assert caption.text == "late" and frame == F(10_300 * ms, 1)
