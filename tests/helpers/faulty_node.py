"""The BitMar node with faults injected from outside, for tests/test_reliability.py.

Runs ``bitmar_ros.node.main`` after patching two places (the node's code is unchanged):

- the worker loop: each time the worker looks for its next job, if the file ``$BITMAR_FAULT_DIR/worker``
  exists it is removed and ``RuntimeError("injected worker fault")`` is raised there, outside any
  job (the loop itself dies); while ``$BITMAR_FAULT_DIR/worker_always`` exists, every look raises;
- the caption callback: a caption whose text starts with ``INJECT-CALLBACK-FAULT`` raises
  ``RuntimeError("injected callback fault")`` in the executor thread.

Usage: faulty_node.py --ros-args ... (the node's own arguments).
"""
from __future__ import annotations

import os
from pathlib import Path

from bitmar_ros import node as N

FAULT_DIR = Path(os.environ["BITMAR_FAULT_DIR"])
_next_job = N.BitMarNode._next_job
_on_text = N.BitMarNode.on_text


def _faulty_next_job(self):
    once = FAULT_DIR / "worker"
    if once.exists():
        once.unlink()
        raise RuntimeError("injected worker fault")
    if (FAULT_DIR / "worker_always").exists():
        raise RuntimeError("injected worker fault (always)")
    return _next_job(self)


def _faulty_on_text(self, msg, info):
    if msg.data.startswith("INJECT-CALLBACK-FAULT"):
        raise RuntimeError("injected callback fault")
    return _on_text(self, msg, info)


N.BitMarNode._next_job = _faulty_next_job
N.BitMarNode.on_text = _faulty_on_text

if __name__ == "__main__":
    N.main()
