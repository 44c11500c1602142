"""Shared plumbing for tests that start rclpy: discovery kept on this machine, one DDS domain per
run, logs in a temp dir, and condition waits (never fixed sleeps).

Importing this module sets the environment for the test process and its children.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]

# Default discovery multicasts off the machine; LOCALHOST keeps DDS on loopback (Kilted ignores
# ROS_LOCALHOST_ONLY). A per-run domain id keeps concurrent runs from seeing each other.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + (os.getpid() % 100)))
_ros_tmp = os.environ.setdefault("BITMAR_TEST_ROS_HOME", tempfile.mkdtemp(prefix="bitmar-ros-"))
os.environ.setdefault("ROS_HOME", _ros_tmp)
os.environ.setdefault("ROS_LOG_DIR", os.path.join(_ros_tmp, "log"))
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child OS process: ours (ROS settings included) plus the repo on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0, poll_s: float = 0.02,
             what: str = "condition", spin: Callable[[], None] | None = None) -> None:
    """Wait until ``predicate()`` is true, spinning ``spin`` meanwhile; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        if spin is not None:
            spin()
        else:
            time.sleep(poll_s)


def start_python(code_or_module: list[str], **env: str) -> subprocess.Popen:
    """Start ``python <args>`` as a separate OS process with line-buffered stdout."""
    return subprocess.Popen([sys.executable, *code_or_module], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=child_env(**env), cwd=str(REPO))


@contextmanager
def private_node(name: str) -> Iterator[tuple]:
    """(node, executor): an rclpy node named ``name`` in a context of its own, with a
    single-threaded executor; all torn down on exit, so tests do not share rclpy state."""
    import rclpy  # not at import time: some users of this module need only the environment

    ctx = rclpy.context.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node(name, context=ctx)
    ex = rclpy.executors.SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    try:
        yield node, ex
    finally:
        ex.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=ctx)
