"""The node as robot engineers run it (issue 13), each checked from a separate OS process over DDS:
the params file applied under a namespace (read back through the parameter services), every numeric
parameter's range visible to describe_parameters, double SIGINT / SIGTERM exiting 0 with the memory
state saved, the lifecycle transitions through the node's lifecycle services, and one resize path
for camera frames and query images."""
from __future__ import annotations

import signal
import sys
import time

import numpy as np
import pytest
import yaml

import ros_helpers  # noqa: F401
from node_harness import ChildProcess, Harness, NodeProcess, frame_message, scene_frame, write_tiny_checkpoint
from ros_helpers import REPO

from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.msg import ParameterType
from rcl_interfaces.srv import DescribeParameters, GetParameters
from sensor_msgs.msg import Image
from std_msgs.msg import String

from bitmar_ros.msg import Episode
from bitmar_ros.params import PARAMS

pytestmark = [pytest.mark.ros, pytest.mark.slow]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


# ---------------------------------------------------------------------- namespace + params file
OVERRIDES = {"max_query_k": 17, "temperature": 0.25, "qos_depth": 7, "describe_rate_hz": 0.0,
             "pair_tolerance_s": 2.0, "diagnostics_rate_hz": 5.0}


@pytest.fixture(scope="module")
def robot1(checkpoint, tmp_path_factory):
    """The node at /robot1/bitmar started as the launch file starts it: --params-file with the
    package's own config/bitmar.yaml (its top-level key kept as written), values changed."""
    tmp = tmp_path_factory.mktemp("robot1")
    doc = yaml.safe_load((REPO / "config" / "bitmar.yaml").read_text())
    (key,) = doc
    doc[key]["ros__parameters"].update(OVERRIDES, checkpoint=str(checkpoint), store_dir=str(tmp / "store"))
    params = tmp / "my.yaml"
    params.write_text(yaml.safe_dump(doc))
    proc = ChildProcess([sys.executable, str(REPO / "bin" / "bitmar_node"), "--ros-args", "-r", "__ns:=/robot1",
                         "-r", "__node:=bitmar", "--params-file", str(params)])
    h = Harness(node_name="robot1/bitmar")
    image_pub = h.node.create_publisher(Image, "/robot1/image", 10)
    text_pub = h.node.create_publisher(String, "/robot1/text", 10)
    episodes: list[Episode] = []
    h.node.create_subscription(Episode, "/robot1/episodes", episodes.append, 10)
    h.wait(lambda: proc.proc.poll() is None and image_pub.get_subscription_count() > 0
           and h.query.service_is_ready(), 60, "the namespaced node")
    yield dict(h=h, proc=proc, image_pub=image_pub, text_pub=text_pub, episodes=episodes)
    proc.proc.send_signal(signal.SIGINT)
    proc.proc.wait(timeout=30)
    h.close()


def _stat(h, key: str, node: str = "/bitmar") -> float | None:
    """The newest value of ``key`` in /diagnostics from ``node`` (another test's node may share the topic)."""
    for arr in reversed(h.diagnostics):
        for st in arr.status:
            if st.name == f"{node}: bitmar":
                for kv in st.values:
                    if kv.key == key:
                        return float(kv.value)
    return None


def _client(h, srv_type, name):
    client = h.node.create_client(srv_type, name)
    h.wait(client.service_is_ready, 30, name)
    return client


def test_params_file_applies_under_a_namespace(robot1):
    h = robot1["h"]
    client = _client(h, GetParameters, "/robot1/bitmar/get_parameters")
    names = list(OVERRIDES)
    resp = h.call(client, GetParameters.Request(names=names))
    got = {}
    for name, v in zip(names, resp.values):
        got[name] = v.integer_value if v.type == ParameterType.PARAMETER_INTEGER else v.double_value
    assert got == OVERRIDES


def test_every_numeric_parameter_has_its_range(robot1):
    h = robot1["h"]
    client = _client(h, DescribeParameters, "/robot1/bitmar/describe_parameters")
    numeric = [p for p in PARAMS if isinstance(p.default, (int, float)) and not isinstance(p.default, bool)]
    assert all(p.low is not None for p in numeric)
    resp = h.call(client, DescribeParameters.Request(names=[p.name for p in numeric]))
    assert len(resp.descriptors) == len(numeric)
    for p, d in zip(numeric, resp.descriptors):
        assert d.name == p.name and d.description == p.description
        if isinstance(p.default, int):
            assert [(r.from_value, r.to_value, r.step) for r in d.integer_range] == [(p.low, p.high, 1)], p.name
            assert not d.floating_point_range
        else:
            assert [(r.from_value, r.to_value) for r in d.floating_point_range] == [(p.low, p.high)], p.name
            assert not d.integer_range


def test_same_picture_as_camera_frame_and_as_query_embeds_the_same(robot1):
    """A 640x480 picture (not the model's input size): stored from the camera and asked with the
    same caption and picture, the query embedding is the stored one (cosine 1)."""
    h, episodes = robot1["h"], robot1["episodes"]
    rgb = np.random.default_rng(5).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    rgb[100:300, 200:500] = (200, 30, 30)
    caption = "a red rectangle on noise"
    robot1["image_pub"].publish(frame_message(rgb, h))
    robot1["text_pub"].publish(String(data=caption))
    h.wait(lambda: any(e.caption == caption for e in episodes), 60, "the episode")
    resp = h.ask(caption, k=1, image=frame_message(rgb, h))
    assert resp.success and resp.episodes[0].caption == caption
    assert resp.episodes[0].embedding_score == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------- signals
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_during_shutdown_still_exits_0_with_the_memory_saved(checkpoint, tmp_path, sig):
    store = tmp_path / "store"
    h = Harness()
    node = NodeProcess(checkpoint, store, "describe_rate_hz:=0.0", "pair_tolerance_s:=2.0",
                       "diagnostics_rate_hz:=5.0")
    try:
        h.wait_connected(node)
        for seed in (3, 4):
            rgb, caption = scene_frame(seed)
            n = len(h.episodes)
            h.image_pub.publish(frame_message(rgb, h))
            h.text_pub.publish(String(data=caption))
            h.wait(lambda: len(h.episodes) > n, 60, "episode")
        h.ask("square", k=2)  # a read: changes the usage the shutdown saves
        node.proc.send_signal(sig)
        time.sleep(0.05)
        node.proc.send_signal(sig)  # what the process group / launch's escalation adds
        assert node.stop(timeout_s=60) == 0, node.output()[-3000:]
        assert "memory state saved (2 writes)" in node.output()
        node = NodeProcess(checkpoint, store, "describe_rate_hz:=0.0", "diagnostics_rate_hz:=5.0")
        h.diagnostics.clear()
        h.wait_connected(node)
        h.wait(lambda: _stat(h, "memory_writes") is not None, 30, "diagnostics after restart")
        assert _stat(h, "memory_writes") == 2
        assert "restored episodic memory (2 writes)" in node.output()
        assert node.stop() == 0
    finally:
        node.stop()
        h.close()


# ---------------------------------------------------------------------- lifecycle
class _Lifecycle:
    def __init__(self, h: Harness, name: str = "/bitmar") -> None:
        self.h = h
        self.change = _client(h, ChangeState, f"{name}/change_state")
        self.get = _client(h, GetState, f"{name}/get_state")

    def state(self) -> str:
        return self.h.call(self.get, GetState.Request()).current_state.label

    def transition(self, transition_id: int) -> bool:
        return self.h.call(self.change, ChangeState.Request(transition=Transition(id=transition_id)), 90).success


def test_lifecycle_transitions_through_the_services(checkpoint, tmp_path):
    h = Harness()
    node = NodeProcess(checkpoint, tmp_path / "store", "autostart:=false", "describe_rate_hz:=0.0",
                       "pair_tolerance_s:=2.0", "diagnostics_rate_hz:=10.0")
    try:
        lc = _Lifecycle(h)
        assert lc.state() == "unconfigured"
        assert not h.query.service_is_ready()  # nothing loaded yet
        assert not (tmp_path / "store").exists()

        assert lc.transition(Transition.TRANSITION_CONFIGURE) and lc.state() == "inactive"
        assert (tmp_path / "store" / "episodes.sqlite3").is_file()  # configure opened the store
        h.wait_connected(node)
        assert lc.transition(Transition.TRANSITION_ACTIVATE) and lc.state() == "active"

        def store_pair(seed):
            rgb, caption = scene_frame(seed)
            h.image_pub.publish(frame_message(rgb, h))
            h.text_pub.publish(String(data=caption))
            return caption

        first = store_pair(1)
        h.wait(lambda: [e.caption for e in h.episodes] == [first], 60, "the first episode")
        # A caption accepted just before deactivate is committed by it (nothing lost).
        received = _stat(h, "text_received") or 0
        second = store_pair(2)
        h.wait(lambda: (_stat(h, "text_received") or 0) > received, 30, "the second caption received")
        assert lc.transition(Transition.TRANSITION_DEACTIVATE) and lc.state() == "inactive"
        resp = h.ask("a", k=10)  # queries are served while inactive
        assert resp.success and {e.caption for e in resp.episodes} == {first, second}

        # While inactive: a frame and a caption are counted, not stored, not silently lost.
        h.diagnostics.clear()
        third = store_pair(3)
        h.wait(lambda: (_stat(h, "text_inactive") or 0) >= 1 and (_stat(h, "frames_inactive") or 0) >= 1,
               30, "the inactive caption and frame counted in /diagnostics")
        assert _stat(h, "episodes_stored") == 2
        assert "text received while inactive" in node.output()

        assert lc.transition(Transition.TRANSITION_ACTIVATE) and lc.state() == "active"
        fourth = store_pair(4)
        h.wait(lambda: h.episodes and h.episodes[-1].caption == fourth, 60, "the episode after re-activation")
        resp = h.ask("a", k=10)
        assert {e.caption for e in resp.episodes} == {first, second, fourth} and third not in {first, second, fourth}

        assert lc.transition(Transition.TRANSITION_DEACTIVATE)
        assert lc.transition(Transition.TRANSITION_CLEANUP) and lc.state() == "unconfigured"
        h.wait(lambda: "unconfigured: the store is closed" in node.output(), 10, "cleanup log line")
        assert "memory state saved (3 writes)" in node.output()
        assert lc.transition(Transition.TRANSITION_CONFIGURE) and lc.state() == "inactive"
        h.wait(lambda: h.query.service_is_ready(), 30, "query service after re-configure")
        assert len(h.ask("a", k=10).episodes) == 3  # the store reopened with everything in it

        assert lc.transition(Transition.TRANSITION_INACTIVE_SHUTDOWN)
        assert node.proc.wait(timeout=60) == 0, node.output()[-3000:]
    finally:
        node.stop()
        h.close()


@pytest.mark.parametrize("steps, shutdown", [
    ((), Transition.TRANSITION_UNCONFIGURED_SHUTDOWN),
    ((Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE), Transition.TRANSITION_ACTIVE_SHUTDOWN),
])
def test_lifecycle_shutdown_from_any_state_exits_0(checkpoint, tmp_path, steps, shutdown):
    h = Harness()
    node = NodeProcess(checkpoint, tmp_path / "store", "autostart:=false", "describe_rate_hz:=0.0")
    try:
        lc = _Lifecycle(h)
        for step in steps:
            assert lc.transition(step)
        assert lc.transition(shutdown)
        assert node.proc.wait(timeout=60) == 0, node.output()[-3000:]
        assert ("memory state saved" in node.output()) == bool(steps)
    finally:
        node.stop()
        h.close()


def test_a_failed_configure_leaves_the_node_unconfigured(checkpoint, tmp_path):
    h = Harness()
    node = NodeProcess(tmp_path / "missing.safetensors", tmp_path / "store", "autostart:=false")
    try:
        lc = _Lifecycle(h)
        assert not lc.transition(Transition.TRANSITION_CONFIGURE)
        assert lc.state() == "unconfigured" and node.alive()
        assert "cannot load checkpoint" in node.output()
    finally:
        node.stop()
        h.close()
