"""Crash-test retention: enforces a count limit on an EpisodeStore until killed.

Usage: retention_runner.py DIRECTORY DIM IDENTITY KEEP. Deletes in batches of 50 episodes (one
transaction each, as ``enforce_retention`` does with ``RETENTION_BATCH``), so that a kill lands
between or inside many transactions. Prints ``ready`` before the first deletion, ``committed`` after
each transaction (so the test can kill it mid-pass on any machine) and ``done`` at the end.
"""

import sys

from bitmar_core.episodes import store as store_mod
from bitmar_core.episodes.store import EpisodeStore
from bitmar_core.episodes.store_api import RetentionPolicy


def main() -> None:
    directory, dim, identity, keep = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    store_mod.RETENTION_BATCH = 50
    store = EpisodeStore.open(directory, dim, identity)
    commit = store._transaction

    def traced(what, body):
        result = commit(what, body)
        print("committed", flush=True)
        return result

    store._transaction = traced
    print("ready", flush=True)
    store.enforce_retention(RetentionPolicy(max_count=keep, low_water=1.0))
    print("done", flush=True)
    store.close()


if __name__ == "__main__":
    main()
