"""The node's memory queries: a bag of captioned frames, replayed into the node (another OS
process), is queried through the ROS service with three words of each caption, and the right
episode must come first; the response says how each episode matched; an empty window is a success.
And answers are generated off the executor thread: camera frames and captions are handled while
an answer is being generated (a node in this process, its answer held until they are)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import ros_helpers  # noqa: F401  (ROS environment first)
from node_harness import Harness, NodeProcess, replay_bag, write_tiny_checkpoint
from ros_helpers import wait_for

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image
from std_msgs.msg import String

from bitmar_ros import node as N
from bitmar_ros.image_conversion import rgb8_to_image
from bitmar_ros.srv import QueryMemory

pytestmark = [pytest.mark.ros]

# Ten captions with distinct words; each is queried with the three words after it.
CAPTIONS = [
    ("A ginger tabby cat asleep on a sofa.", "ginger tabby cat"),
    ("A cup of black coffee on the kitchen table.", "cup coffee kitchen"),
    ("The red stop sign at a street corner.", "red stop sign"),
    ("A bicycle leaning against a brick wall.", "bicycle brick wall"),
    ("A bowl of green apples and ripe bananas.", "apples bananas bowl"),
    ("An astronaut floating above the grey moon.", "astronaut floating moon"),
    ("A wooden rowing boat on a calm lake.", "rowing boat lake"),
    ("A chessboard with a white knight and a black bishop.", "chessboard knight bishop"),
    ("Snowy mountains under a clear blue sky.", "snowy mountains sky"),
    ("A lighthouse beside a rocky shore at dusk.", "lighthouse rocky shore"),
]
START_NS = 1_700_000_000 * 10**9
PERIOD_NS = 500_000_000  # one captioned scene per 0.5 s of bag time


def _write_bag(path, frames_per_scene: int = 3, fps: float = 10.0):
    """A rosbag2 (MCAP): each scene's frames on /camera/image_raw, its caption on /captions just
    after its first frame. Returns the bag directory and each caption's first-frame stamp."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    from bitmar_core.data.scenes import make_scene
    from bitmar_ros.bag_tools import wire_bytes

    store = get_typestore(Stores.ROS2_KILTED)
    Img, Header, Time, Str = (store.types[t] for t in (
        "sensor_msgs/msg/Image", "std_msgs/msg/Header", "builtin_interfaces/msg/Time", "std_msgs/msg/String"))
    stamps = []
    writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
    writer.open()
    try:
        cam = writer.add_connection("/camera/image_raw", "sensor_msgs/msg/Image", typestore=store)
        cap = writer.add_connection("/captions", "std_msgs/msg/String", typestore=store)
        for k, (caption, _) in enumerate(CAPTIONS):
            rgb, _ = make_scene(5_000 + k, size=128)
            first = START_NS + k * PERIOD_NS
            stamps.append(first)
            for f in range(frames_per_scene):
                ts = first + f * int(1e9 / fps)
                sec, nsec = divmod(ts, 10**9)
                msg = Img(header=Header(stamp=Time(sec=sec, nanosec=nsec), frame_id="camera"), height=128, width=128,
                          encoding="rgb8", is_bigendian=0, step=128 * 3, data=rgb.reshape(-1))
                writer.write(cam, ts, wire_bytes(store.serialize_cdr(msg, "sensor_msgs/msg/Image")))
                if f == 0:
                    writer.write(cap, ts + 20_000_000,
                                 wire_bytes(store.serialize_cdr(Str(data=caption), "std_msgs/msg/String")))
    finally:
        writer.close()
    return path, stamps


@pytest.mark.slow
def test_replayed_bag_is_found_by_three_words_of_each_caption(tmp_path):
    bag, stamps = _write_bag(tmp_path / "bag")
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.safetensors")  # a random model: the words must do it
    h = Harness()
    node = NodeProcess(ckpt, tmp_path / "store", "describe_rate_hz:=0.0")
    try:
        h.wait_connected(node)
        replay_bag(bag)
        h.wait(lambda: len(h.episodes) >= len(CAPTIONS), 120, "one episode per caption in the bag")
        assert [e.caption for e in h.episodes] == [c for c, _ in CAPTIONS]
        ids = {e.caption: e.id for e in h.episodes}

        for caption, words in CAPTIONS:
            resp = h.ask(words, k=3)
            assert resp.success, resp.message
            first = resp.episodes[0]
            assert first.caption == caption, (words, [e.caption for e in resp.episodes])
            assert first.lexical_rank == 1 and "lexical" in first.matched_by and first.lexical_score > 0
            assert -1.0 <= first.embedding_score <= 1.0 and first.embedding_rank >= 1
        # Case and plurals; words around FTS5 syntax are words.
        assert h.ask("CATS sofas", k=1).episodes[0].caption == CAPTIONS[0][0]
        assert h.ask('"knight" AND (bishop*', k=1).episodes[0].caption == CAPTIONS[7][0]

        # The time window applies to both rankings: only the last three scenes may answer.
        start = stamps[7]
        resp = h.ask("ginger tabby cat", k=10, start=_time(start), end=_time(stamps[-1] + PERIOD_NS))
        assert resp.success and [e.caption for e in resp.episodes] and \
            {e.caption for e in resp.episodes} <= {c for c, _ in CAPTIONS[7:]}
        assert all(e.lexical_rank == 0 for e in resp.episodes)  # the cat lies outside the window
        # An empty window is a success with no episode and a message.
        empty = h.ask("ginger tabby cat", k=3, start=_time(START_NS - 10**10), end=_time(START_NS - 10**9))
        assert empty.success and list(empty.episodes) == [] and "time window" in empty.message

        # An answer names the episodes it is given with: the query's own top k.
        ans = h.ask("rowing boat lake", k=2, generate_answer=True)
        assert ans.success and isinstance(ans.answer, str)
        assert list(ans.answer_episode_ids) == [e.id for e in ans.episodes]
        assert ans.answer_episode_ids[0] == ids[CAPTIONS[6][0]]
    finally:
        node.stop()
        h.close()


def _time(ns: int):
    from builtin_interfaces.msg import Time
    sec, nsec = divmod(ns, 10**9)
    return Time(sec=sec, nanosec=nsec)


# ---------------------------------------------------------------------- answers off the executor thread
@pytest.fixture(scope="module")
def ctx():
    context = rclpy.context.Context()
    rclpy.init(context=context)
    yield context
    rclpy.try_shutdown(context=context)


def test_frames_and_captions_are_handled_while_an_answer_is_generated(ctx, tmp_path):
    """The answer is held (the model's ``answer`` waits on an event) until the node has handled a
    camera frame and a caption published meanwhile: with answers on the executor thread, as before,
    neither callback could run and this would time out."""
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    node = N.BitMarNode(context=ctx, parameter_overrides=[
        Parameter("checkpoint", value=str(checkpoint)), Parameter("store_dir", value=str(tmp_path / "store")),
        Parameter("describe_rate_hz", value=0.0), Parameter("diagnostics_rate_hz", value=0.0)])
    peer = rclpy.create_node("bitmar_query_peer", context=ctx)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    executor.add_node(peer)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    answering, release = threading.Event(), threading.Event()
    real_answer = node._runtime.answer

    def held_answer(*args, **kwargs):
        answering.set()
        assert release.wait(60), "the test never released the answer"
        return real_answer(*args, **kwargs)

    try:
        image_pub = peer.create_publisher(Image, "image", 10)
        text_pub = peer.create_publisher(String, "text", 10)
        client = peer.create_client(QueryMemory, "/bitmar/query_memory")
        wait_for(lambda: client.service_is_ready() and image_pub.get_subscription_count() > 0, timeout_s=30,
                 what="the node's service and subscriptions")
        rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        image_pub.publish(rgb8_to_image(rgb))
        text_pub.publish(String(data="a zebra eating a mango"))
        wait_for(lambda: node._store.count() == 1, timeout_s=60, what="the first episode")

        node._runtime.answer = held_answer
        future = client.call_async(QueryMemory.Request(text="zebra", k=1, generate_answer=True))
        assert answering.wait(60), "the answer never started"
        before = node.stats()
        for i in range(3):
            image_pub.publish(rgb8_to_image(np.roll(rgb, i, axis=0)))
        text_pub.publish(String(data="a giraffe under a tree"))
        wait_for(lambda: node.stats().get("frames_received", 0) >= before.get("frames_received", 0) + 1
                 and node.stats().get("text_received", 0) >= before.get("text_received", 0) + 1,
                 timeout_s=30, what="a frame and a caption handled while the answer is held")
        assert not future.done()  # the answer is still being generated
        release.set()
        wait_for(future.done, timeout_s=60, what="the answer")
        resp = future.result()
        assert resp.success and resp.episodes[0].caption == "a zebra eating a mango"
        assert list(resp.answer_episode_ids) == [resp.episodes[0].id]
        wait_for(lambda: node._store.count() == 2, timeout_s=60, what="the caption sent meanwhile, stored")
    finally:
        release.set()
        executor.shutdown()
        spinner.join(timeout=10)
        node.shutdown()
        node.destroy_node()
        peer.destroy_node()


def test_queries_beyond_the_pending_bound_are_answered_busy(ctx, tmp_path, monkeypatch):
    monkeypatch.setattr(N, "MAX_PENDING_QUERIES", 0)
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    node = N.BitMarNode(context=ctx, parameter_overrides=[
        Parameter("checkpoint", value=str(checkpoint)), Parameter("store_dir", value=str(tmp_path / "store")),
        Parameter("describe_rate_hz", value=0.0), Parameter("diagnostics_rate_hz", value=0.0)])
    try:
        coro = node.on_query_memory(QueryMemory.Request(text="zebra", k=1), QueryMemory.Response())
        with pytest.raises(StopIteration) as stop:  # answered before any await
            coro.send(None)
        assert not stop.value.value.success and "busy" in stop.value.value.message
        assert node.stats()["queries_rejected"] == 1
    finally:
        node.shutdown()
        node.destroy_node()
