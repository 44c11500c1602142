"""Four node processes (four robots) on one fleet store at 5 Hz each through a database restart
(a real PostgreSQL + pgvector server, tests/conftest.py: pg_cluster)."""
from __future__ import annotations

import os

import pytest

import ros_helpers  # noqa: F401  (ROS environment first)
from node_harness import Harness, NodeProcess, frame_message, scene_frame, write_tiny_checkpoint

from std_msgs.msg import String

pytestmark = [pytest.mark.ros, pytest.mark.slow]
FLEET_S = float(os.environ.get("BITMAR_FLEET_S", "20"))


def test_four_nodes_at_5_hz_through_a_database_restart(pg_cluster, tmp_path):
    """Four node processes record every caption of a 5 Hz stream for 20 s into one database, which is
    stopped for 2 s and started again halfway. Each node's acknowledged episodes (its 'committed'
    lines: published only after the commit) are all in the database, once, and a fleet-wide query
    returns all four robots' episodes. (`BITMAR_FLEET_S` sets the duration.)"""
    import time

    import psycopg

    dsn = pg_cluster.new_database()
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    names = [f"bitmar_{i}" for i in range(4)]
    h = Harness(names[0])
    nodes = [NodeProcess(ckpt, tmp_path / f"unused_{n}", "describe_rate_hz:=0.0", "pair_tolerance_s:=2.0",
                         "text_queue_size:=1000", f"store_dsn:={dsn}", name=n) for n in names]
    sent = 0
    try:
        h.wait_connected(nodes[0])
        h.wait(lambda: h.text_pub.get_subscription_count() >= 4 and h.image_pub.get_subscription_count() >= 4,
               120, "all four nodes' subscriptions")
        rgb, _ = scene_frame(7)
        t0 = time.monotonic()
        restarted = False
        while time.monotonic() - t0 < FLEET_S:
            sent += 1
            h.image_pub.publish(frame_message(rgb, h))
            h.text_pub.publish(String(data=f"caption number {sent} of the fleet stream"))
            if not restarted and time.monotonic() - t0 > FLEET_S / 2:
                pg_cluster.stop()
                time.sleep(2.0)
                pg_cluster.start()
                restarted = True
            next_at = t0 + sent / 5.0
            while time.monotonic() < next_at:
                h.spin()
        for _ in range(3):  # a caption is paired with the frame nearest it, before or after: later frames settle the last
            h.image_pub.publish(frame_message(rgb, h))
            end = time.monotonic() + 0.2
            while time.monotonic() < end:
                h.spin()
        settle = time.monotonic() + 20  # the queues drain, the buffers are written
        while time.monotonic() < settle:
            h.spin()
        fleet = h.ask("fleet stream", k=50, robot_scope="*")
        assert fleet.success and {e.robot_id for e in fleet.episodes} == {f"/{n}" for n in names}
    finally:
        for node in nodes:
            node.stop()
        h.close()
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT robot_id, id, caption FROM bitmar_episodes").fetchall()
    for node, name in zip(nodes, names):
        mine = {i: c for r, i, c in rows if r == f"/{name}"}
        acked = node.acked_ids()
        assert len(acked) == len(set(acked)) >= 0.9 * sent            # acknowledged once (the rest: unpaired/dropped, counted)
        assert set(acked) <= set(mine)                                 # 0 acknowledged lost
        assert sorted(mine.values()) == sorted(set(mine.values()))     # 0 duplicated
        assert len(mine) == len(acked)                                 # nothing stored unacknowledged
        print(f"/{name}: {sent} captions sent, {len(acked)} acknowledged, {len(mine)} stored")
