"""bitmar_ros.bag_tools: the demo bag (read back by rosbags and, independently, by mcap), replay
into another OS process (byte-exact, in order, timed), and record (fields, schemas, re-replay)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import ros_helpers  # noqa: F401  (sets the ROS environment first)
from ros_helpers import REPO, start_python, wait_for

from bitmar_core.data import scenes
from bitmar_ros.bag_tools import CAMERA_TOPIC, CAPTION_TOPIC, DEMO_START_NS, PHOTOS, make_demo_bag, wire_bytes
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import Writer
from rosbags.rosbag2.enums import StoragePlugin
from rosbags.typesys import Stores, get_typestore

PEER = str(REPO / "tests" / "helpers" / "bag_peer.py")
STORE = get_typestore(Stores.ROS2_KILTED)
SMALL = dict(n_scenes=3, frames_per_scene=2, fps=10.0, width=48, height=32)  # 7 scenes, 0.7 s


def read_bag(path: Path) -> list[tuple[str, str, int, bytes]]:
    """(topic, msgtype, timestamp ns, raw CDR) of every message, in bag order."""
    with AnyReader([path], default_typestore=STORE) as reader:
        return [(c.topic, c.msgtype, ts, bytes(raw)) for c, ts, raw in reader.messages()]


def sidecar(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "scenes.jsonl").read_text(encoding="utf-8").splitlines()]


def scene_pixels(source: str, width: int, height: int) -> np.ndarray:
    """What the scene generator draws for a sidecar 'scenes:test:<index>' entry, centre-cropped."""
    _, split, index = source.split(":")
    size = max(width, height)
    image, _ = scenes.make_scene(scenes.split_seed(split, int(index)), size=size)
    top, left = (size - height) // 2, (size - width) // 2
    return image[top:top + height, left:left + width]


@pytest.fixture(scope="module")
def small_bag(tmp_path_factory) -> Path:
    return make_demo_bag(tmp_path_factory.mktemp("bags") / "small", seed=1, **SMALL)


# --------------------------------------------------------------------------- demo bag

def test_demo_bag_reads_back_with_rosbags(small_bag):
    rows = sidecar(small_bag)
    assert len(rows) == 3 + len(PHOTOS)
    assert sum(r["source"].startswith("skimage:") for r in rows) == len(PHOTOS)
    # Scenes follow each other every frames_per_scene / fps = 0.2 s; captions 0.1 s after.
    assert [r["stamp_ns"] for r in rows] == [DEMO_START_NS + k * 200_000_000 for k in range(7)]
    assert [r["caption_stamp_ns"] - r["stamp_ns"] for r in rows] == [100_000_000] * 7

    with AnyReader([small_bag], default_typestore=STORE) as reader:
        assert {c.topic: c.msgtype for c in reader.connections} == {
            CAMERA_TOPIC: "sensor_msgs/msg/Image", CAPTION_TOPIC: "std_msgs/msg/String"}
        assert {c.topic: c.msgcount for c in reader.connections} == {CAMERA_TOPIC: 14, CAPTION_TOPIC: 7}
        msgs = [(c.topic, ts, reader.deserialize(raw, c.msgtype)) for c, ts, raw in reader.messages()]

    captions = [(ts, m.data) for t, ts, m in msgs if t == CAPTION_TOPIC]
    assert captions == [(r["caption_stamp_ns"], r["caption"]) for r in rows]
    frames = [(ts, m) for t, ts, m in msgs if t == CAMERA_TOPIC]
    for k, (ts, m) in enumerate(frames):
        assert m.header.stamp.sec * 10**9 + m.header.stamp.nanosec == ts == DEMO_START_NS + k * 100_000_000
        assert (m.header.frame_id, m.encoding, m.height, m.width, m.step) == ("camera", "rgb8", 32, 48, 144)
    pixels = [m.data.reshape(32, 48, 3) for _, m in frames]
    for k, row in enumerate(rows):
        first, second = pixels[2 * k], pixels[2 * k + 1]
        np.testing.assert_array_equal(first, second)  # one scene, shown for two frames
        if row["source"].startswith("scenes:"):
            np.testing.assert_array_equal(first, scene_pixels(row["source"], 48, 32))
        else:
            # The photo is the one named: nearer (in pixels) to a plain resize of it than to the others.
            import cv2
            import skimage.data
            dist = {name: np.abs(cv2.resize(getattr(skimage.data, name)(), (48, 32), interpolation=cv2.INTER_AREA)
                                 .astype(int) - first).mean() for name in PHOTOS}
            assert min(dist, key=dist.get) == row["source"].split(":")[1]
            assert row["caption"] == PHOTOS[row["source"].split(":")[1]]


def test_demo_bag_reads_back_with_mcap_independently(small_bag):
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    rows = sidecar(small_bag)
    with open(small_bag / "small.mcap", "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        summary = reader.get_summary()
        channels = {c.topic: (summary.schemas[c.schema_id].name, summary.statistics.channel_message_counts[c.id])
                    for c in summary.channels.values()}
        assert channels == {CAMERA_TOPIC: ("sensor_msgs/msg/Image", 14), CAPTION_TOPIC: ("std_msgs/msg/String", 7)}
        assert {ci.compression for ci in summary.chunk_indexes} == {"zstd"}
        decoded = [(ch.topic, msg.log_time, m) for _, ch, msg, m in reader.iter_decoded_messages(log_time_order=True)]
    assert [m.data for t, _, m in decoded if t == CAPTION_TOPIC] == [r["caption"] for r in rows]
    frames = [(ts, m) for t, ts, m in decoded if t == CAMERA_TOPIC]
    assert [ts for ts, _ in frames] == [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for _, m in frames]
    first = np.frombuffer(bytes(frames[0][1].data), np.uint8).reshape(32, 48, 3)
    np.testing.assert_array_equal(first, scene_pixels(rows[0]["source"], 48, 32))


def test_demo_bag_is_deterministic_per_seed(small_bag, tmp_path):
    again = make_demo_bag(tmp_path / "small", seed=1, **SMALL)  # same directory name → same file names
    assert (again / "small.mcap").read_bytes() == (small_bag / "small.mcap").read_bytes()
    assert (again / "metadata.yaml").read_text() == (small_bag / "metadata.yaml").read_text()
    other = make_demo_bag(tmp_path / "other", seed=2, **SMALL)
    assert [r["source"] for r in sidecar(other)] != [r["source"] for r in sidecar(small_bag)]


@pytest.mark.slow
def test_default_demo_bag_is_small_and_matches_the_generator(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bin" / "bitmar_make_demo_bag"), str(tmp_path / "demo")],
                         env=ros_helpers.child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    bag = tmp_path / "demo"
    size = sum(f.stat().st_size for f in bag.iterdir())
    print(f"default demo bag: {size} bytes ({out.stdout.strip()})")
    assert size < 8_000_000  # 80 raw 224x224 frames would be 12 MB: the zstd chunks must work
    rows = sidecar(bag)
    assert len(rows) == 12 + len(PHOTOS)
    with AnyReader([bag], default_typestore=STORE) as reader:
        assert {c.topic: c.msgcount for c in reader.connections} == {CAMERA_TOPIC: 80, CAPTION_TOPIC: 16}
        assert reader.duration == 15 * 1_000_000_000 + 4 * 200_000_000 + 1  # last frame at 15.8 s
        conn = next(c for c in reader.connections if c.topic == CAMERA_TOPIC)
        k = next(i for i, r in enumerate(rows) if r["source"].startswith("scenes:") and i > 0)
        for c, ts, raw in reader.messages(connections=[conn]):
            if ts == rows[k]["stamp_ns"]:
                img = reader.deserialize(raw, c.msgtype).data.reshape(224, 224, 3)
                np.testing.assert_array_equal(img, scene_pixels(rows[k]["source"], 224, 224))
                break
        else:
            pytest.fail(f"no frame at {rows[k]['stamp_ns']}")


# --------------------------------------------------------------------------- ROS plumbing

try:
    import rclpy
except ImportError:  # the demo-bag tests above need only rosbags
    rclpy = None
needs_rclpy = pytest.mark.skipif(rclpy is None, reason="rclpy is not installed")


@pytest.fixture
def node():
    with ros_helpers.private_node("bag_tools_test") as node_and_executor:
        yield node_and_executor


class Lines:
    """Collects a child's output lines on a thread, so a test can wait for one without blocking."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._t = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
        self._t.start()

    def has(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def __str__(self) -> str:
        self._t.join(timeout=5)
        return "".join(self.lines)


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def collect_replay(node, bag: Path, subscribe: dict[str, type], *replay_args: str,
                   expected: int, clock: bool = True) -> tuple[dict[str, list[tuple[float, bytes]]], list[int], str]:
    """Replay ``bag`` in another OS process; here, record (arrival time, raw bytes) per topic."""
    from rosgraph_msgs.msg import Clock

    n, ex = node
    got: dict[str, list[tuple[float, bytes]]] = {t: [] for t in subscribe}
    for topic, cls in subscribe.items():
        n.create_subscription(cls, topic, lambda raw, t=topic: got[t].append((time.monotonic(), raw)),
                              100, raw=True)
    clocks: list[int] = []
    if clock:
        n.create_subscription(Clock, "/clock", lambda m: clocks.append(m.clock.sec * 10**9 + m.clock.nanosec), 1000)
    proc = start_python([str(REPO / "bin" / "bitmar_bag_replay"), str(bag), "--wait-for-subscribers",
                         *subscribe, *replay_args])
    out = Lines(proc)
    try:
        wait_for(lambda: sum(map(len, got.values())) >= expected or proc.poll() not in (None, 0), timeout_s=60,
                 what=f"{expected} replayed messages", spin=lambda: ex.spin_once(timeout_sec=0.02))
        assert proc.wait(timeout=30) == 0, str(out)
    finally:
        _stop(proc)
    for _ in range(20):  # anything still queued (an extra message would fail the caller's checks)
        ex.spin_once(timeout_sec=0.01)
    return got, clocks, str(out)


# --------------------------------------------------------------------------- replay

@pytest.mark.ros
@pytest.mark.slow
@needs_rclpy
def test_replay_delivers_every_message_byte_exact_in_order_to_another_process(node, small_bag):
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    bag = read_bag(small_bag)
    assert all(len(raw) % 4 == 0 for *_, raw in bag)  # stored as DDS delivers them (wire_bytes)
    got, clocks, out = collect_replay(node, small_bag, {CAMERA_TOPIC: Image, "/demo/captions": String},
                                      "--rate", "4", "--remap", f"{CAPTION_TOPIC}:=/demo/captions",
                                      "--ros-args", "-r", "__node:=replayer", expected=21)
    assert [raw for _, raw in got[CAMERA_TOPIC]] == [raw for t, _, _, raw in bag if t == CAMERA_TOPIC]
    assert [raw for _, raw in got["/demo/captions"]] == [raw for t, _, _, raw in bag if t == CAPTION_TOPIC]
    assert "/demo/captions: 7" in out and f"{CAMERA_TOPIC}: 14" in out
    # /clock carries bag time: never backwards, within the bag, and at the last message at the end.
    assert clocks == sorted(clocks)
    assert clocks[0] >= DEMO_START_NS and clocks[-1] == bag[-1][2]
    assert set(ts for _, _, ts, _ in bag) <= set(clocks)


@pytest.mark.ros
@pytest.mark.slow
@needs_rclpy
def test_replay_keeps_the_bags_timing_scaled_by_rate(node, tmp_path):
    """A sqlite3 bag whose gaps alternate 10 ms and 600 ms, replayed at rate 4: every long gap
    measured at the receiver exceeds every short one. Wall-clock numbers are printed only."""
    from std_msgs.msg import String

    gaps_ns = [10_000_000, 600_000_000] * 3 + [10_000_000]
    path = tmp_path / "timing"
    writer = Writer(path, version=9, storage_plugin=StoragePlugin.SQLITE3)
    writer.open()
    conn = writer.add_connection("/timed", "std_msgs/msg/String", typestore=STORE)
    ts = 5 * 10**9
    for i in range(len(gaps_ns) + 1):
        writer.write(conn, ts, STORE.serialize_cdr(STORE.types["std_msgs/msg/String"](data=f"m{i}"), "std_msgs/msg/String"))
        ts += gaps_ns[i] if i < len(gaps_ns) else 0
    writer.close()

    got, _, _ = collect_replay(node, path, {"/timed": String}, "--rate", "4", "--no-clock",
                               expected=len(gaps_ns) + 1, clock=False)
    arrivals = [t for t, _ in got["/timed"]]
    # rosbags writes unpadded CDR; DDS pads every payload to a multiple of 4 bytes.
    assert [raw for _, raw in got["/timed"]] == [wire_bytes(raw) for *_, raw in read_bag(path)]
    measured = np.diff(arrivals)
    short, long = measured[0::2], measured[1::2]
    print(f"rate 4: short gaps {np.round(short * 1e3, 1)} ms (bag 10 ms/4), long gaps {np.round(long * 1e3, 1)} ms "
          f"(bag 600 ms/4 = 150 ms); span {1e3 * (arrivals[-1] - arrivals[0]):.0f} ms (bag {sum(gaps_ns) / 4e6:.0f} ms)")
    assert long.min() > short.max()


# --------------------------------------------------------------------------- record

def expected_description(i: int):
    """What tests/helpers/bag_peer.py sends as Description i (written out again here on purpose)."""
    return dict(stream_id=2**33 + i, token_index=i, token_id=-1 if i % 2 else 50000 + i, text_delta=f" ünï{i}",
                text=f"猫 {i} — café ☕", is_final=i % 3 == 0, sec=1_000 + i, nanosec=7 * i, frame_id=f"cam_{i}")


TOPICS = {"/bag_test/description": "bitmar_ros/msg/Description", "/bag_test/text": "std_msgs/msg/String",
          "/bag_test/image": "sensor_msgs/msg/Image"}


def check_recorded(bag: Path, n: int) -> list[tuple[str, str, int, bytes]]:
    """The recorded bag holds exactly what bag_peer sent, readable by rosbags and by mcap_ros2."""
    from rosbags.typesys import get_types_from_msg

    store = get_typestore(Stores.ROS2_KILTED)
    store.register(get_types_from_msg((REPO / "msg" / "Description.msg").read_text(), "bitmar_ros/msg/Description"))
    with AnyReader([bag], default_typestore=store) as reader:
        assert {c.topic: c.msgtype for c in reader.connections} == TOPICS
        assert {c.topic: c.msgcount for c in reader.connections} == {t: n for t in TOPICS}
        msgs = [(c.topic, reader.deserialize(raw, c.msgtype)) for c, _, raw in reader.messages()]
        digests = {c.msgtype: c.digest for c in reader.connections}
    descs = [m for t, m in msgs if t == "/bag_test/description"]
    for i, m in enumerate(descs):
        e = expected_description(i)
        assert (m.stream_id, m.token_index, m.token_id, m.text_delta, m.text, m.is_final) == (
            e["stream_id"], e["token_index"], e["token_id"], e["text_delta"], e["text"], e["is_final"])
        assert (m.header.stamp.sec, m.header.stamp.nanosec, m.header.frame_id) == (e["sec"], e["nanosec"], e["frame_id"])
    assert [m.data for t, m in msgs if t == "/bag_test/text"] == [f"text {i} ✓" for i in range(n)]
    assert [bytes(m.data) for t, m in msgs if t == "/bag_test/image"] == [
        bytes((i * 18 + k) % 256 for k in range(18)) for i in range(n)]
    # The schema hash is the one rosidl generated for the installed type.
    installed = REPO / ".venv" / "share" / "bitmar_ros" / "msg" / "Description.json"
    if installed.exists():
        hashes = json.loads(installed.read_text())["type_hashes"]
        assert digests["bitmar_ros/msg/Description"] == next(
            h["hash_string"] for h in hashes if h["type_name"] == "bitmar_ros/msg/Description")

    # Independently: the MCAP schema alone is enough for mcap_ros2 to decode the custom type.
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory
    with open(next(bag.glob("*.mcap")), "rb") as f:
        texts = [m.text for _, _, _, m in make_reader(f, decoder_factories=[DecoderFactory()])
                 .iter_decoded_messages(topics=["/bag_test/description"])]
    assert texts == [expected_description(i)["text"] for i in range(n)]
    return read_bag(bag)


@pytest.mark.ros
@pytest.mark.slow
@needs_rclpy
def test_record_writes_what_another_process_sent_and_replay_reproduces_it(node, tmp_path):
    from bitmar_ros.bag_tools import record
    from bitmar_ros.msg import Description
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    n = 6
    peer = start_python([PEER, "publish", str(n)])
    try:
        counts = record(tmp_path / "rec", list(TOPICS), count=3 * n, duration_s=60)
    finally:
        _stop(peer)
    assert counts == {t: n for t in TOPICS}
    bag = check_recorded(tmp_path / "rec", n)

    got, _, _ = collect_replay(node, tmp_path / "rec", dict(zip(TOPICS, (Description, String, Image))),
                               "--rate", "10", "--no-clock", expected=3 * n, clock=False)
    for topic in TOPICS:
        assert [raw for _, raw in got[topic]] == [raw for t, _, _, raw in bag if t == topic]


@pytest.mark.ros
@pytest.mark.slow
@needs_rclpy
def test_record_cli_finalises_the_bag_on_ctrl_c(tmp_path):
    n = 4
    rec = start_python([str(REPO / "bin" / "bitmar_bag_record"), str(tmp_path / "cli"), "--topics", *TOPICS])
    rec_out = Lines(rec)
    peer = start_python([PEER, "publish", str(n)])
    peer_out = Lines(peer)
    try:
        wait_for(lambda: peer_out.has("done") and rec_out.has("first message on /bag_test/image"),
                 timeout_s=60, what="the peer to send everything and the recorder to receive")
    finally:
        rc = _stop(rec)
        _stop(peer)
    assert rc == 0, str(rec_out)
    assert (tmp_path / "cli" / "metadata.yaml").exists()
    with AnyReader([tmp_path / "cli"], default_typestore=STORE) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
        texts = [reader.deserialize(raw, c.msgtype).data for c, _, raw in reader.messages()
                 if c.topic == "/bag_test/text"]
    assert set(counts) == set(TOPICS) and all(1 <= v <= n for v in counts.values()), counts
    assert texts == [f"text {i} ✓" for i in range(len(texts))]  # an in-order prefix of what was sent
    assert "recorded " in str(rec_out)
