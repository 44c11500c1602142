"""Pose ring and interpolation (bitmar_core/episodes/pose.py) against poses worked out by hand."""
import math

import numpy as np
import pytest

from bitmar_core.episodes.pose import Pose, PoseError, PoseRing, PoseRingConfig, interpolate, slerp

S = 10**9


def yaw_q(deg: float) -> tuple[float, float, float, float]:
    """Quaternion (x, y, z, w) of a rotation by ``deg`` about z: (0, 0, sin(θ/2), cos(θ/2))."""
    h = math.radians(deg) / 2
    return (0.0, 0.0, math.sin(h), math.cos(h))


def test_interpolation_at_a_quarter_between_two_poses():
    # (0, 0, 0) yaw 0° at t = 0 s and (2, 4, 1) yaw 90° at 1 s: at 0.25 s, (0.5, 1, 0.25) and yaw 22.5°.
    p = interpolate(0, Pose("map", (0, 0, 0), yaw_q(0)), S, Pose("map", (2, 4, 1), yaw_q(90)), S // 4)
    assert p.frame_id == "map"
    assert p.position == pytest.approx((0.5, 1.0, 0.25))
    assert p.orientation == pytest.approx(yaw_q(22.5))


def test_slerp_takes_the_shorter_arc_and_keeps_unit_length():
    # 170° and -170° (= 190°) are 20° apart: halfway is 180°, not 0°. -q is the same rotation as q.
    mid = slerp(yaw_q(170), yaw_q(-170), 0.5)
    assert abs(mid[2]) == pytest.approx(1.0) and mid[3] == pytest.approx(0.0, abs=1e-9)
    neg = tuple(-v for v in yaw_q(60))
    assert np.allclose(np.abs(slerp(yaw_q(0), neg, 0.5)), np.abs(yaw_q(30)))
    # nearly equal quaternions (the lerp branch) still give a unit quaternion
    q = slerp(yaw_q(10), yaw_q(10.001), 0.3)
    assert math.isclose(sum(v * v for v in q), 1.0, rel_tol=1e-12)
    # a quarter along a 120° turn about x: 30°
    ax = lambda d: (math.sin(math.radians(d) / 2), 0.0, 0.0, math.cos(math.radians(d) / 2))
    assert slerp(ax(0), ax(120), 0.25) == pytest.approx(ax(30))


def test_ring_interpolates_holds_edges_and_refuses_gaps():
    ring = PoseRing(PoseRingConfig(capacity=8, max_gap_s=0.5, max_extrapolate_s=0.1))
    assert ring.at(5 * S) == (None, "no_pose")
    ring.add(1 * S, Pose("odom", (1, 0, 0), yaw_q(0)))
    ring.add(1 * S + 400_000_000, Pose("odom", (2, 0, 0), yaw_q(40)))
    ring.add(3 * S, Pose("odom", (10, 0, 0), yaw_q(40)))  # 1.6 s after the previous: a gap
    pose, why = ring.at(1 * S + 100_000_000)               # 1/4 of the way: x = 1.25, yaw 10°
    assert why == "" and pose.position == pytest.approx((1.25, 0, 0)) and pose.orientation == pytest.approx(yaw_q(10))
    assert ring.at(1 * S)[0].position == (1.0, 0.0, 0.0)   # exactly on a stamp
    assert ring.at(2 * S) == (None, "gap")                 # between poses 1.6 s apart
    assert ring.at(3 * S + 50_000_000)[0].position == (10.0, 0.0, 0.0)   # 50 ms past the newest: held
    assert ring.at(3 * S + 200_000_000) == (None, "gap")   # 200 ms past: too far
    assert ring.at(S - 50_000_000)[0].position == (1.0, 0.0, 0.0)
    assert ring.at(S - 500_000_000) == (None, "gap")


def test_ring_orders_late_poses_bounds_its_size_and_restarts_on_a_new_frame():
    ring = PoseRing(PoseRingConfig(capacity=4, max_gap_s=1.0))
    for t in (0, 2, 1, 3, 4):  # 1 s arrives late; capacity 4 drops the oldest (0)
        ring.add(t * S, Pose("map", (float(t), 0, 0)))
    assert len(ring) == 4
    assert ring.at(1 * S + S // 2)[0].position == pytest.approx((1.5, 0, 0))
    assert ring.at(0) == (None, "gap")
    ring.add(5 * S, Pose("odom", (0, 0, 0)))  # another frame: poses of two frames are never blended
    assert len(ring) == 1 and ring.at(4 * S + S // 2) == (None, "gap")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"frame_id": "", "position": (0, 0, 0)}, "frame_id"),
    ({"frame_id": "map", "position": (0, float("nan"), 0)}, "position"),
    ({"frame_id": "map", "position": (0, 0)}, "position"),
    ({"frame_id": "map", "position": (0, 0, 0), "orientation": (0, 0, 0, 0)}, "orientation"),
])
def test_bad_pose_names_the_field(kwargs, fragment):
    with pytest.raises(PoseError, match=fragment):
        Pose(**kwargs)


def test_orientation_is_stored_normalised():
    assert Pose("map", (0, 0, 0), (0, 0, 2, 0)).orientation == (0.0, 0.0, 1.0, 0.0)


def test_wait_past_returns_when_a_later_pose_arrives():
    import threading

    ring = PoseRing()
    ring.add(1 * S, Pose("map", (0, 0, 0)))
    assert not ring.wait_past(2 * S, 0.05)
    threading.Timer(0.05, lambda: ring.add(3 * S, Pose("map", (2, 0, 0)))).start()
    assert ring.wait_past(2 * S, 10.0)
    assert ring.at(2 * S)[0] is None  # 2 s apart > max_gap_s 0.5: a gap, not a guess
