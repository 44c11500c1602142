"""The generated bitmar_ros interfaces: CDR round trips, and messages and services across OS processes."""
from __future__ import annotations

import signal

import pytest

import ros_helpers  # (sets the ROS environment first)
from ros_helpers import REPO, start_python, wait_for

rclpy = pytest.importorskip("rclpy")
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402

from bitmar_ros.msg import Description, Episode  # noqa: E402
from bitmar_ros.srv import Forget, QueryMemory  # noqa: E402

pytestmark = pytest.mark.ros
PEER = str(REPO / "tests" / "helpers" / "interface_peer.py")


def test_description_round_trip_keeps_every_field():
    msg = Description(stream_id=2**40 + 3, token_index=17, token_id=50256, text_delta=" 日本",
                      text="a red circle 日本", is_final=True)
    msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id = 1_700_000_000, 999_999_999, "cam"
    out = deserialize_message(serialize_message(msg), Description)
    assert out == msg
    assert (out.stream_id, out.text_delta, out.header.stamp.nanosec) == (2**40 + 3, " 日本", 999_999_999)


def test_query_service_types_round_trip():
    req = QueryMemory.Request(text="where is the cat?", k=5, generate_answer=True)
    req.start.sec, req.end.sec = 10, 20
    req.image.height, req.image.width, req.image.encoding, req.image.step = 2, 3, "rgb8", 9
    req.image.data = bytes(range(18))
    assert deserialize_message(serialize_message(req), QueryMemory.Request) == req

    resp = QueryMemory.Response(success=True, message="ok", answer="a cat")
    for i in range(3):
        ep = Episode(id=i, caption=f"c{i}", source="caption", score=0.5 - i)
        ep.thumbnail.data = bytes([i] * (i + 1))
        resp.episodes.append(ep)
    out = deserialize_message(serialize_message(resp), QueryMemory.Response)
    assert out == resp
    assert [e.caption for e in out.episodes] == ["c0", "c1", "c2"]
    assert [bytes(e.thumbnail.data) for e in out.episodes] == [b"\x00", b"\x01\x01", b"\x02\x02\x02"]


def test_where_fields_and_forget_round_trip():
    req = QueryMemory.Request(text="red cup", k=3, near_frame="map", radius_m=2.5, publish_goal=True)
    req.near.x, req.near.y = 1.25, -3.0
    out = deserialize_message(serialize_message(req), QueryMemory.Request)
    assert out == req and (out.near_frame, out.near.x, out.near.y, out.radius_m) == ("map", 1.25, -3.0, 2.5)
    ep = Episode(id=7, caption="c", source="caption", has_pose=True)
    ep.pose.header.frame_id = "odom"
    ep.pose.pose.position.x, ep.pose.pose.orientation.w = 4.5, 1.0
    resp = QueryMemory.Response(success=True, episodes=[ep], goal_published=True)
    got = deserialize_message(serialize_message(resp), QueryMemory.Response)
    assert got == resp and got.episodes[0].pose.pose.position.x == 4.5 and got.goal_published
    forget = Forget.Request(ids=[1, 2**40], caption_contains="cup")
    forget.start.sec = 5
    assert deserialize_message(serialize_message(forget), Forget.Request) == forget
    done = Forget.Response(success=True, message="forgot 2", forgotten_ids=[1, 2**40])
    assert deserialize_message(serialize_message(done), Forget.Response) == done


@pytest.fixture
def node():
    with ros_helpers.private_node("interfaces_test") as node_and_executor:
        yield node_and_executor


def _stop(proc):
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except Exception:
        proc.kill()


def test_description_published_by_another_process_arrives_in_order(node):
    n, ex = node
    got: list[Description] = []
    n.create_subscription(Description, "description_stream", got.append, 10)
    peer = start_python([PEER, "publish", "20"])
    try:
        wait_for(lambda: len(got) >= 20, timeout_s=30, what="20 Description messages",
                 spin=lambda: ex.spin_once(timeout_sec=0.05))
    finally:
        _stop(peer)
    assert [m.token_index for m in got] == list(range(20))
    assert [m.is_final for m in got] == [False] * 19 + [True]
    assert got[-1].text == "".join(m.text_delta for m in got)
    assert {m.stream_id for m in got} == {7}


def test_query_service_call_crosses_processes(node):
    n, ex = node
    peer = start_python([PEER, "serve"])
    try:
        client = n.create_client(QueryMemory, "query_memory")
        wait_for(lambda: client.service_is_ready(), timeout_s=30, what="query_memory service",
                 spin=lambda: ex.spin_once(timeout_sec=0.05))
        req = QueryMemory.Request(text="red circle", k=3)
        req.start.sec = 100
        req.image.data = bytes(12)
        fut = client.call_async(req)
        wait_for(fut.done, timeout_s=30, what="service response", spin=lambda: ex.spin_once(timeout_sec=0.05))
        resp = fut.result()
    finally:
        _stop(peer)
    assert resp.success and resp.message == "12 image bytes"
    assert [e.id for e in resp.episodes] == [1000, 1001, 1002]
    assert [e.caption for e in resp.episodes] == ["red circle#0", "red circle#1", "red circle#2"]
    assert [e.stamp.sec for e in resp.episodes] == [100, 101, 102]
    assert [e.score for e in resp.episodes] == [1.0, 0.75, 0.5]
    assert bytes(resp.episodes[2].thumbnail.data) == bytes([2, 253, 7])
