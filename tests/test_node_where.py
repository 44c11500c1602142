"""Where (issue 18), end to end: a bag with odometry, camera frames and captions (the project's
generator) is replayed into the node (another OS process) running with ``pose_topic:=/odom``; each
episode must carry the pose at its frame's stamp, interpolated by hand here from the bag's own
odometry; a spatial query returns only the episodes recorded near a point, with their poses, and
publishes the top one as a goal; ``~/forget`` deletes by caption and by ids."""
from __future__ import annotations

import bisect
import json
import math
import subprocess
import sys
import time

import pytest

import ros_helpers  # noqa: F401  (ROS environment first)
from node_harness import Harness, NodeProcess, frame_message, replay_bag, scene_frame, write_tiny_checkpoint
from ros_helpers import REPO, child_env

from geometry_msgs.msg import Point

from bitmar_ros.srv import Forget

pytestmark = [pytest.mark.ros, pytest.mark.slow]

ODOM_HZ = 20.0


def expected_pose(stamp_ns: int, odom_stamps: list[int]):
    """(x, y, yaw) at stamp_ns from the bag's odometry samples: x, y linearly between the two samples
    around it, yaw linearly too (a turn about z only: slerp is linear in the angle)."""
    from bitmar_ros.bag_tools import demo_trajectory

    i = bisect.bisect_left(odom_stamps, stamp_ns)
    s0, s1 = odom_stamps[i - 1], odom_stamps[i]
    t = (stamp_ns - s0) / (s1 - s0)
    (x0, y0, a0), (x1, y1, a1) = demo_trajectory(s0), demo_trajectory(s1)
    return x0 + t * (x1 - x0), y0 + t * (y1 - y0), a0 + t * (a1 - a0)


def yaw_of(q) -> float:
    return 2 * math.atan2(q.z, q.w)


def test_replayed_bag_with_odometry_gives_posed_episodes_and_where_queries(tmp_path):
    from bitmar_ros.bag_tools import DEMO_START_NS, make_demo_bag, odometry_stamps

    n_scenes, frames_per_scene, fps = 6, 4, 8.0
    bag = make_demo_bag(tmp_path / "bag", n_scenes=n_scenes, frames_per_scene=frames_per_scene, fps=fps, seed=4,
                        photos=False, odometry_hz=ODOM_HZ)
    captions = [json.loads(line)["caption"] for line in (bag / "scenes.jsonl").read_text().splitlines() if line]
    end_ns = DEMO_START_NS + n_scenes * frames_per_scene * round(1e9 / fps)
    odom = odometry_stamps(DEMO_START_NS - 500_000_000, end_ns + 500_000_000, ODOM_HZ)
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    h = Harness()
    node = NodeProcess(ckpt, tmp_path / "store", "describe_rate_hz:=0.0", "pose_topic:=/odom",
                       "pose_topic_type:=odometry", "diagnostics_rate_hz:=5.0")
    try:
        h.wait_connected(node)
        replay_bag(bag)
        h.wait(lambda: len(h.episodes) >= len(captions), 120, "one episode per caption in the bag")
        assert [e.caption for e in h.episodes] == captions
        for e in h.episodes:
            assert e.has_pose and e.pose.header.frame_id == "odom", e
            stamp = e.stamp.sec * 10**9 + e.stamp.nanosec
            assert stamp not in odom  # between two samples: interpolated, not copied
            x, y, yaw = expected_pose(stamp, odom)
            p = e.pose.pose
            assert (p.position.x, p.position.y, p.position.z) == pytest.approx((x, y, 0.0), abs=1e-9)
            # 1e-6 rad: between close quaternions slerp is a normalised lerp (bitmar_core.episodes.pose.slerp)
            assert math.remainder(yaw_of(p.orientation) - yaw, 2 * math.pi) == pytest.approx(0.0, abs=1e-6)

        # Where: near the second episode's place, within 0.15 m (the robot moves 0.4 m/s; scenes 0.5 s apart
        # are 0.2 m apart), only that episode; the query returns its pose and publishes it as the goal.
        target = h.episodes[1]
        near = Point(x=target.pose.pose.position.x, y=target.pose.pose.position.y, z=5.0)  # z plays no part
        resp = h.ask(captions[1], k=5, near_frame="odom", near=near, radius_m=0.15, publish_goal=True)
        assert resp.success, resp.message
        assert [e.id for e in resp.episodes] == [target.id] and resp.episodes[0].has_pose
        assert resp.episodes[0].pose.pose.position.x == pytest.approx(near.x)
        assert resp.goal_published
        h.wait(lambda: len(h.goals) == 1, 30, "the goal pose")
        assert h.goals[0].header.frame_id == "odom"
        assert h.goals[0].pose.position.x == pytest.approx(near.x) and h.goals[0].pose.position.y == pytest.approx(near.y)
        # every episode within 10 m; none in another frame; a bad radius is refused and names it
        assert len(h.ask(captions[0], k=10, near_frame="odom", near=near, radius_m=10.0).episodes) == len(captions)
        other = h.ask(captions[0], k=10, near_frame="map", near=near, radius_m=10.0)
        assert other.success and list(other.episodes) == [] and "'map'" in other.message
        bad = h.ask(captions[0], k=3, near_frame="odom", near=near, radius_m=-1.0)
        assert not bad.success and "radius_m" in bad.message
        for fields in ({"near_frame": "odom", "near": Point(x=float("nan")), "radius_m": 1.0},
                       {"near_frame": "odom", "near": near, "radius_m": float("inf")},
                       {"radius_m": 1.0}):  # a radius without a frame
            refused = h.ask(captions[0], k=3, **fields)
            assert not refused.success and "radius_m" in refused.message and not refused.episodes, fields
        h.wait(lambda: (h.latest_stat("episodes_posed") or 0) >= len(captions), 30, "episodes_posed in /diagnostics")
        assert (h.latest_stat("poses_received") or 0) > 0 and not h.latest_stat("pose_missing_gap")

        # Forget: by ids, then a request naming nothing is refused (clear_memory forgets everything)
        ids = [e.id for e in h.episodes]
        done = h.call(h.forget, Forget.Request(ids=ids[:2]))
        assert done.success and list(done.forgotten_ids) == ids[:2], done.message
        nothing = h.call(h.forget, Forget.Request())
        assert not nothing.success and "expected ids" in nothing.message
        left = h.ask(captions[0], k=10, near_frame="odom", near=near, radius_m=10.0)
        assert [e.id for e in left.episodes] and {e.id for e in left.episodes} == set(ids[2:])

        # Retention set live: at most 3 episodes. The next episode (a frame and caption published here,
        # stamped past the odometry: no pose) makes the node delete down to 90% of 3 = 2, oldest first.
        from rcl_interfaces.msg import Parameter as ParamMsg, ParameterType, ParameterValue
        from rcl_interfaces.srv import SetParameters
        from std_msgs.msg import String

        setter = h.node.create_client(SetParameters, "/bitmar/set_parameters")
        value = ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=3)
        res = h.call(setter, SetParameters.Request(parameters=[ParamMsg(name="retention_max_episodes", value=value)]))
        assert res.results[0].successful, res.results[0].reason
        rgb, caption = scene_frame(77)
        h.image_pub.publish(frame_message(rgb, h))
        h.text_pub.publish(String(data=caption))
        h.wait(lambda: len(h.episodes) > len(captions), 60, "the episode after the retention change")
        newest = h.episodes[-1]
        assert not newest.has_pose  # stamped now, far past the bag's odometry: a gap, counted
        kept = h.ask(caption, k=10)
        assert [e.id for e in kept.episodes] and {e.id for e in kept.episodes} == {ids[-1], newest.id}
        h.wait(lambda: (h.latest_stat("retention_deleted") or 0) >= len(ids) - 3, 30, "retention_deleted")
        assert (h.latest_stat("pose_missing_gap") or 0) >= 1 and (h.latest_stat("store_bytes") or 0) > 0
    finally:
        node.stop()
        h.close()


def test_tf_pose_source_without_tf2_ros_stops_with_a_clear_error(tmp_path):
    """tf2_ros is not on PyPI: where it cannot be imported, pose_tf_frame stops the node at start-up
    (exit 2) naming the parameter and what to do, instead of storing episodes without poses silently."""
    try:
        import tf2_ros  # noqa: F401
        pytest.skip("tf2_ros is importable here: the tf2 path runs instead")
    except ImportError:
        pass
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    r = subprocess.run([sys.executable, str(REPO / "bin" / "bitmar_node"), "--ros-args", "-p", f"checkpoint:={ckpt}",
                        "-p", f"store_dir:={tmp_path / 's'}", "-p", "pose_tf_frame:=map"],
                       capture_output=True, text=True, env=child_env(), timeout=120, cwd=str(REPO))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "pose_tf_frame" in r.stderr and "tf2_ros" in r.stderr and "pose_topic" in r.stderr


@pytest.mark.parametrize("kind", ["pose_stamped", "pose_with_covariance_stamped"])
def test_pose_topic_types_give_the_interpolated_pose(tmp_path, kind):
    """A localiser's pose (PoseStamped, or amcl's PoseWithCovarianceStamped) 0.1 s before and 0.3 s
    after a frame's stamp: the episode's pose lies a quarter of the way, by hand: x 1 → 3 gives 1.5,
    yaw 0° → 80° gives 20°."""
    from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
    from std_msgs.msg import String

    msg_type = PoseStamped if kind == "pose_stamped" else PoseWithCovarianceStamped
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    h = Harness()
    node = NodeProcess(ckpt, tmp_path / "store", "describe_rate_hz:=0.0", "pose_topic:=/amcl_pose",
                       f"pose_topic_type:={kind}")
    pub = h.node.create_publisher(msg_type, "/amcl_pose", 10)
    try:
        h.wait_connected(node)
        h.wait(lambda: pub.get_subscription_count() > 0, 60, "the node's pose subscription")
        rgb, caption = scene_frame(5)
        frame = frame_message(rgb, h)
        t = frame.header.stamp.sec * 10**9 + frame.header.stamp.nanosec
        for dt_ns, x, yaw_deg in ((-100_000_000, 1.0, 0.0), (300_000_000, 3.0, 80.0)):
            m = msg_type()
            m.header.frame_id = "map"
            m.header.stamp.sec, m.header.stamp.nanosec = divmod(t + dt_ns, 10**9)
            pose = m.pose if kind == "pose_stamped" else m.pose.pose
            pose.position.x, pose.position.y = x, -x
            pose.orientation.z, pose.orientation.w = math.sin(math.radians(yaw_deg) / 2), math.cos(math.radians(yaw_deg) / 2)
            pub.publish(m)
        end = time.monotonic() + 0.5
        while time.monotonic() < end:  # let both poses arrive before the frame does
            h.spin()
        h.image_pub.publish(frame)
        h.text_pub.publish(String(data=caption))
        h.wait(lambda: len(h.episodes) == 1, 60, "the episode")
        e = h.episodes[0]
        assert e.has_pose and e.pose.header.frame_id == "map"
        assert (e.pose.pose.position.x, e.pose.pose.position.y) == pytest.approx((1.5, -1.5), abs=1e-9)
        assert yaw_of(e.pose.pose.orientation) == pytest.approx(math.radians(20.0), abs=1e-6)
    finally:
        node.stop()
        h.close()
