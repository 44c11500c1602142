"""A fleet on one PostgreSQL + pgvector database: four robots' EpisodicMemoryService writer processes
(tests/helpers/fleet_writer.py: the bundled checkpoint, a frame and a caption per episode, as the node
records them) write at 5 Hz each into one database (a real server, tests/conftest.py: pg_cluster).
Halfway the server is stopped for 2 s and started again. Every episode written is acknowledged and
stored once, in order, and a fleet-wide query finds all four robots."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitmar_core.episodes.service import EpisodicMemoryService
from bitmar_core.episodes.store_pg import FLEET
from bitmar_ros.node import default_checkpoint

pytestmark = pytest.mark.slow

WRITER = Path(__file__).resolve().parent / "helpers" / "fleet_writer.py"
REPO = Path(__file__).resolve().parents[1]
ROBOTS = [f"/fleet/robot_{i}" for i in range(4)]
RATE_HZ = 5.0
DURATION_S = float(os.environ.get("BITMAR_FLEET_S", "30"))


def test_four_robots_write_into_one_database(pg_cluster):
    dsn = pg_cluster.new_database()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    # The first connect creates the tables; the others meet them (and the advisory lock) at once.
    procs = [subprocess.Popen([sys.executable, str(WRITER), dsn, r, str(RATE_HZ), str(DURATION_S)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in ROBOTS]
    for p in procs:  # wait until every robot has loaded its model and connected
        assert p.stdout.readline().strip() == "ready", p.stderr.read()[-3000:]
    # Halfway, the database restarts under them: each robot buffers, reconnects and writes in order.
    time.sleep(DURATION_S / 2)
    pg_cluster.stop()
    time.sleep(2.0)
    pg_cluster.start()
    outputs = [p.communicate(timeout=DURATION_S + 240) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    memory = EpisodicMemoryService.open(default_checkpoint(), "/nonexistent", store_dsn=dsn, robot_id="/fleet/operator")
    try:
        store = memory.store
        for robot, (out, _) in zip(ROBOTS, outputs):
            acks = {int(n): int(i) for _, i, n in (line.split() for line in out.splitlines() if line.startswith("ack"))}
            written = int(out.split("done ")[1])
            stored = store.all_episodes(robot_scope=robot)
            captions = [e.caption.split(":")[0] for e in stored]
            assert len(captions) == len(set(captions))                            # 0 duplicated
            assert {e.id: e for e in stored}.keys() >= set(acks.values())          # 0 acknowledged lost
            assert written == len(stored)                                          # nothing written was lost
            # An episode whose commit raced the server's stop can be stored with its acknowledgement
            # unknown to the robot: it is kept (above: once, in order), never acknowledged twice. Those
            # are one run of consecutive episodes (one outage: the in-flight commit, or the buffered
            # batch flushed as the server went), never more than the outage's few seconds produce.
            unacked = sorted(set(range(1, written + 1)) - acks.keys())
            assert unacked == list(range(unacked[0], unacked[0] + len(unacked))) if unacked else True, (robot, unacked)
            assert len(unacked) <= 5 * RATE_HZ, (robot, unacked)
            assert written >= 0.8 * RATE_HZ * DURATION_S                           # the rate held (2 shared cores)
            assert [int(c.split()[-1]) for c in captions] == list(range(1, written + 1))  # in order
            print(f"{robot}: {written} written, {len(acks)} acknowledged, {len(stored)} stored, "
                  f"{sum(1 for line in out.splitlines() if line.startswith('ack'))} ack lines")
        result = memory.query("cube on the table", k=50, robot_scope=FLEET)
        assert {h.episode.robot_id for h in result.hits} == set(ROBOTS)
        assert result.total == sum(store.count(r) for r in ROBOTS)
        own = memory.query("cube on the table", k=50)
        assert own.hits == [] and own.total == 0                                     # the operator recorded none
        assert store.robots() == ROBOTS
        per_robot_state = [EpisodicMemoryService.open_store(memory.runtime, "/x", store_dsn=dsn, robot_id=r) for r in ROBOTS]
        for s in per_robot_state:
            assert s.memory_state() is not None and s.integrity_check() == []
            s.close()
    finally:
        memory.close(save=False)
