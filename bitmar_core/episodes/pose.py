"""Where an episode was recorded: a pose (position + unit quaternion, in a named frame) and a ring of
recent poses that gives the pose at a camera frame's stamp by interpolation. Pure numpy, no ROS: the
node feeds the ring from an odometry/pose topic; a script or a bag tool can feed it the same way.
"""
from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass

import numpy as np

MAX_FRAME_ID_CHARS = 256


class PoseError(ValueError):
    """A pose or pose stamp that is not what was expected (the message names it)."""


@dataclass(frozen=True)
class Pose:
    """A pose in ``frame_id``: position (m) and orientation as a unit quaternion (x, y, z, w), the
    order of geometry_msgs/Quaternion."""

    frame_id: str
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        if not isinstance(self.frame_id, str) or not self.frame_id or len(self.frame_id) > MAX_FRAME_ID_CHARS:
            raise PoseError(f"pose frame_id: expected a non-empty string of ≤ {MAX_FRAME_ID_CHARS} chars, "
                            f"got {self.frame_id!r}")
        p = tuple(float(v) for v in self.position)
        q = tuple(float(v) for v in self.orientation)
        if len(p) != 3 or not all(math.isfinite(v) for v in p):
            raise PoseError(f"pose position: expected 3 finite numbers, got {self.position!r}")
        norm = math.sqrt(sum(v * v for v in q)) if len(q) == 4 and all(math.isfinite(v) for v in q) else 0.0
        if norm < 1e-6:
            raise PoseError(f"pose orientation: expected a quaternion (x, y, z, w) of 4 finite numbers, not all "
                            f"zero, got {self.orientation!r}")
        object.__setattr__(self, "position", p)
        # Stored normalised: a message's quaternion is often off unit length by rounding.
        object.__setattr__(self, "orientation", tuple(v / norm for v in q))

    def planar_distance(self, x: float, y: float) -> float:
        """Distance in the frame's x-y plane: a robot's places are on its floor, and a camera pose
        sits at the camera's height while a query names a point on the map."""
        return math.hypot(self.position[0] - x, self.position[1] - y)


def slerp(q0: tuple[float, ...], q1: tuple[float, ...], t: float) -> tuple[float, float, float, float]:
    """Spherical linear interpolation of unit quaternions (x, y, z, w) along the shorter arc
    (q and -q are one rotation, so q1 is flipped when the dot product is negative)."""
    a, b = np.asarray(q0, np.float64), np.asarray(q1, np.float64)
    dot = float(a @ b)
    if dot < 0.0:
        b, dot = -b, -dot
    if dot > 0.9995:  # nearly equal: the sine below loses precision, and lerp is exact enough
        out = a + t * (b - a)
    else:
        theta = math.acos(min(1.0, dot))
        out = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    out /= np.linalg.norm(out)
    return tuple(float(v) for v in out)


def interpolate(stamp0_ns: int, pose0: Pose, stamp1_ns: int, pose1: Pose, stamp_ns: int) -> Pose:
    """The pose at ``stamp_ns`` between two stamped poses of one frame: position linearly,
    orientation by slerp."""
    if pose0.frame_id != pose1.frame_id:
        raise PoseError(f"interpolate: poses in frames {pose0.frame_id!r} and {pose1.frame_id!r}, expected one frame")
    if stamp1_ns == stamp0_ns:
        return pose1
    t = (stamp_ns - stamp0_ns) / (stamp1_ns - stamp0_ns)
    pos = tuple(a + t * (b - a) for a, b in zip(pose0.position, pose1.position))
    return Pose(pose0.frame_id, pos, slerp(pose0.orientation, pose1.orientation, t))


@dataclass(frozen=True)
class PoseRingConfig:
    capacity: int = 512             # poses kept: 10 s of 50 Hz odometry, more than a frame waits for its caption
    max_gap_s: float = 0.5          # two poses further apart than this around a stamp do not give its pose
    max_extrapolate_s: float = 0.1  # a stamp this close past the newest (or before the oldest) pose takes that pose


class PoseRing:
    """The last ``capacity`` stamped poses of one source, in stamp order; ``at(stamp)`` gives the pose
    at a stamp or None with the reason (``no_pose``: none yet or the frame changed, ``gap``: the
    poses around it are further apart than ``max_gap_s``, or it lies too far outside the ring).
    Thread-safe: the pose callback adds while the worker asks."""

    def __init__(self, config: PoseRingConfig | None = None) -> None:
        self.config = config or PoseRingConfig()
        if self.config.capacity < 2:
            raise PoseError(f"PoseRing capacity: expected ≥ 2, got {self.config.capacity}")
        self._stamps: list[int] = []
        self._poses: list[Pose] = []
        self._lock = threading.Condition()

    def __len__(self) -> int:
        return len(self._stamps)

    def add(self, stamp_ns: int, pose: Pose) -> None:
        """Add a pose. Out-of-order stamps are inserted in place; a pose in another frame than the
        ring's starts the ring afresh (poses of two frames cannot be interpolated)."""
        if not isinstance(stamp_ns, int) or stamp_ns < 0:
            raise PoseError(f"pose stamp: expected a non-negative int of nanoseconds, got {stamp_ns!r}")
        with self._lock:
            if self._poses and self._poses[-1].frame_id != pose.frame_id:
                self._stamps.clear()
                self._poses.clear()
            i = bisect.bisect_right(self._stamps, stamp_ns)
            if i > 0 and self._stamps[i - 1] == stamp_ns:
                self._poses[i - 1] = pose  # the same stamp again: the later message wins
                return
            self._stamps.insert(i, stamp_ns)
            self._poses.insert(i, pose)
            if len(self._stamps) > self.config.capacity:
                del self._stamps[0], self._poses[0]
            self._lock.notify_all()

    def wait_past(self, stamp_ns: int, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until a pose stamped at or after ``stamp_ns`` is in the ring,
        so that ``at`` interpolates instead of holding the last pose: a frame's caption is often
        stored before the next odometry message arrives. True if one is there."""
        with self._lock:
            return self._lock.wait_for(lambda: bool(self._stamps) and self._stamps[-1] >= stamp_ns, timeout_s)

    def at(self, stamp_ns: int) -> tuple[Pose | None, str]:
        """(pose at ``stamp_ns``, "") or (None, "no_pose" | "gap")."""
        max_gap = int(self.config.max_gap_s * 1e9)
        edge = int(self.config.max_extrapolate_s * 1e9)
        with self._lock:
            if not self._stamps:
                return None, "no_pose"
            i = bisect.bisect_left(self._stamps, stamp_ns)
            if i < len(self._stamps) and self._stamps[i] == stamp_ns:
                return self._poses[i], ""
            if i == 0:
                return (self._poses[0], "") if self._stamps[0] - stamp_ns <= edge else (None, "gap")
            if i == len(self._stamps):
                return (self._poses[-1], "") if stamp_ns - self._stamps[-1] <= edge else (None, "gap")
            s0, s1 = self._stamps[i - 1], self._stamps[i]
            if s1 - s0 > max_gap:
                return None, "gap"
            return interpolate(s0, self._poses[i - 1], s1, self._poses[i], stamp_ns), ""
