"""Crash-test writer: adds episodes to an EpisodeStore in a loop until killed.

After each add_episode returns it prints ``ack <id> <n>`` (flushed); episode n has caption
``caption_for(n)`` and the memory state written with it records ``n_writes = n``, so a reader can
check that every acknowledged episode survived and that memory and episodes agree.
Usage: store_writer.py DIRECTORY DIM IDENTITY
"""

import sys

import numpy as np

from bitmar_core.episodes.store import EpisodeStore

K = 32  # memory slots


def caption_for(n: int) -> str:
    return f"episode {n}: " + "a robot sees a red cup on the table " * (1 + n % 5)


def embedding_for(n: int, dim: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal(dim).astype(np.float32)


def main() -> None:
    directory, dim, identity = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    store = EpisodeStore.open(directory, dim, identity)
    thumbnail = b"\xff\xd8" + bytes(range(256)) * 12  # ~3 KB: spills into overflow pages like a real one
    n = store.count()
    while True:
        n += 1
        state = {"M": np.full((K, dim), n, np.float32), "usage": np.full(K, n, np.float32),
                 "n_writes": np.int64(n)}
        episode_id = store.add_episode(n, caption_for(n), "caption", embedding_for(n, dim), thumbnail, state)
        sys.stdout.write(f"ack {episode_id} {n}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
