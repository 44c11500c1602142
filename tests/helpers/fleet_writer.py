"""Fleet-test writer: one robot's EpisodicMemoryService (bundled checkpoint) recording frame–caption episodes
into a shared PostgreSQL store at a fixed rate, as a node does.

Prints ``ack <id> <n>`` (flushed) for each committed episode (returned at once, or reported by the
store's on_commit after a buffered write); episode n's caption is ``<robot> episode <n>: ...``.
Usage: fleet_writer.py DSN ROBOT_ID RATE_HZ DURATION_S
"""
import sys
import threading
import time

import numpy as np

from bitmar_core.episodes.service import EpisodicMemoryService
from bitmar_ros.node import default_checkpoint

COLOURS = ("red", "green", "blue", "yellow")


def main() -> None:
    dsn, robot, rate_hz, duration_s = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    memory = EpisodicMemoryService.open(default_checkpoint(), "/nonexistent", store_dsn=dsn, robot_id=robot)
    out = threading.Lock()

    def ack(episode_id, n) -> None:
        with out:
            sys.stdout.write(f"ack {episode_id} {n}\n")
            sys.stdout.flush()

    memory.store.on_commit = ack
    rng = np.random.default_rng(abs(hash(robot)) % 2**32)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < duration_s:
        n += 1
        colour = COLOURS[n % len(COLOURS)]
        rgb = np.zeros((64, 64, 3), np.uint8)
        rgb[..., COLOURS.index(colour) % 3] = 200
        rgb += rng.integers(0, 40, rgb.shape, dtype=np.uint8)
        episode_id = memory.record(f"{robot} episode {n}: a {colour} cube on the table", time.time_ns(), rgb=rgb,
                                   token=n)
        if episode_id is not None:
            ack(episode_id, n)
        time.sleep(max(0.0, t0 + n / rate_hz - time.monotonic()))
    memory.close()
    sys.stdout.write(f"done {n}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
