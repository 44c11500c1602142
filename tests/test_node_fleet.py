"""Two nodes (two robots) on one fleet store: `store_dsn` points both at one PostgreSQL + pgvector
database (a real server, tests/conftest.py: pg_cluster). Each episode is published with its robot,
a query reads this robot's episodes by default and the fleet's with robot_scope '*', and the DSN's
password appears in no line the nodes print."""
from __future__ import annotations

import pytest

import ros_helpers  # noqa: F401  (ROS environment first)
from node_harness import Harness, NodeProcess, frame_message, scene_frame, write_tiny_checkpoint

from std_msgs.msg import String

pytestmark = [pytest.mark.ros, pytest.mark.slow]


def test_two_nodes_share_one_fleet_store(pg_cluster, tmp_path):
    dsn = pg_cluster.new_database()
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    h = Harness("bitmar_a")
    nodes = [NodeProcess(ckpt, tmp_path / f"unused_{n}", "describe_rate_hz:=0.0", "pair_tolerance_s:=2.0",
                         f"store_dsn:={dsn}", name=n) for n in ("bitmar_a", "bitmar_b")]
    try:
        h.wait_connected(nodes[0])
        h.wait(lambda: h.text_pub.get_subscription_count() >= 2 and h.image_pub.get_subscription_count() >= 2,
               60, "both nodes' subscriptions")
        for seed in range(3):
            rgb, caption = scene_frame(100 + seed)
            count = len(h.episodes)
            h.image_pub.publish(frame_message(rgb, h))
            h.text_pub.publish(String(data=caption))
            h.wait(lambda: len(h.episodes) >= count + 2, 60, "the episode from both robots")
        assert {e.robot_id for e in h.episodes} == {"/bitmar_a", "/bitmar_b"}
        own = h.ask(h.episodes[0].caption, k=10)
        assert own.success and len(own.episodes) == 3 and {e.robot_id for e in own.episodes} == {"/bitmar_a"}
        fleet = h.ask(h.episodes[0].caption, k=10, robot_scope="*")
        assert fleet.success and len(fleet.episodes) == 6
        assert {e.robot_id for e in fleet.episodes} == {"/bitmar_a", "/bitmar_b"}
        other = h.ask(h.episodes[0].caption, k=10, robot_scope="/bitmar_b")
        assert {e.robot_id for e in other.episodes} == {"/bitmar_b"}
    finally:
        for node in nodes:
            node.stop()
        h.close()
    for node in nodes:
        assert pg_cluster.PASSWORD not in node.output()
        assert "***" in node.output()  # the store's address is logged, masked
