"""Rosbag2 tools without `ros2 bag`: replay a bag into live topics, record live topics into a bag,
and write the demo bag (captioned scenes and real photos) that the README's main command plays.

Bags are read and written with `rosbags` (pure Python, MCAP or sqlite3); messages travel as raw
CDR bytes in both directions, so nothing is deserialised on the way and replay is byte-exact.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import signal
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import Writer, WriterError
from rosbags.rosbag2.enums import CompressionFormat, CompressionMode, StoragePlugin
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

CAMERA_TOPIC = "/camera/image_raw"
CAPTION_TOPIC = "/captions"
ODOM_TOPIC = "/odom"
ODOM_OFFSET_NS = 13_000_000  # odometry stamps fall between the frames' (a frame's pose is interpolated)
CLOCK_TOPIC = "/clock"
DEMO_START_NS = 1_700_000_000 * 10**9  # fixed bag start: the demo bag is deterministic
_REPO_MSG_DIR = Path(__file__).resolve().parents[1] / "msg"

# Real photos shipped with scikit-image, with hand-written captions (the data has none).
PHOTOS: dict[str, str] = {
    "chelsea": "A tabby cat with green eyes looking at the camera.",
    "astronaut": "An astronaut in an orange suit smiling in front of a flag and a space shuttle model.",
    "coffee": "A cup of coffee on a red saucer on a wooden table.",
    "rocket": "A white rocket on the launch pad at night between tall towers.",
}


# --------------------------------------------------------------------------- message types

def message_class(msgtype: str) -> type:
    """The generated Python class of a ROS type name such as ``sensor_msgs/msg/Image``."""
    try:
        from rosidl_runtime_py.utilities import get_message
        return get_message(msgtype)
    except ImportError:
        pass
    parts = msgtype.split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"message type {msgtype!r} is not of the form 'pkg/msg/Type'")
    try:
        return getattr(importlib.import_module(f"{parts[0]}.{parts[1]}"), parts[2])
    except (ImportError, AttributeError) as err:
        raise ValueError(f"message type {msgtype!r} is not installed here (no Python module "
                         f"{parts[0]}.{parts[1]}.{parts[2]}): {err}") from err


def _msg_file(msgtype: str) -> Path:
    pkg, _, name = msgtype.split("/")
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory
        candidates.append(Path(get_package_share_directory(pkg)) / "msg" / f"{name}.msg")
    except Exception:  # not on the ament index (AMENT_PREFIX_PATH unset, or not installed)
        pass
    candidates.append(Path(sys.prefix) / "share" / pkg / "msg" / f"{name}.msg")
    if pkg == "bitmar_ros":
        candidates.append(_REPO_MSG_DIR / f"{name}.msg")
    for path in candidates:
        if path.is_file():
            return path
    raise ValueError(f"no .msg definition of {msgtype!r} found (looked in {[str(c) for c in candidates]})")


def _type_names(tree) -> Iterable[str]:
    """Message type names referenced anywhere in a rosbags parse tree."""
    if isinstance(tree, str):
        if tree.count("/") == 2:
            yield tree
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            yield from _type_names(item)


def typestore_for(msgtypes: Iterable[str]) -> Typestore:
    """The Kilted typestore plus every type in ``msgtypes`` it lacks (and their dependencies),
    parsed from the packages' installed ``.msg`` files, so bag schemas describe custom types."""
    store = get_typestore(Stores.ROS2_KILTED)
    found: dict = {}
    pending = list(msgtypes)
    while pending:
        msgtype = pending.pop()
        if msgtype in store.types or msgtype in found:
            continue
        found.update(get_types_from_msg(_msg_file(msgtype).read_text(), msgtype))
        pending.extend(_type_names(found[msgtype]))
    if found:
        store.register(found)
    return store


# --------------------------------------------------------------------------- rclpy plumbing

# Set by SIGINT/SIGTERM in the command-line tools; their loops poll it. A signal handler that
# raised KeyboardInterrupt could land inside rclpy (an executor mid-task), and its shutdown then
# waits for that task forever (the recorder was seen to hang on Ctrl-C under load).
_STOP = threading.Event()
_CLI_SIGNALS = {"installed": False}


def _stop_on_signals() -> None:
    """Command-line tools: Ctrl-C and SIGTERM (how a launch system stops nodes) end the loops at
    their next poll (<= 0.1 s), so the bag is finalised and the process exits 0."""
    def on_signal(signum, frame):
        _STOP.set()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    _CLI_SIGNALS["installed"] = True


def _stopping(ctx) -> bool:
    return _STOP.is_set() or not ctx.ok()


def _start_node(name: str, ros_args: Sequence[str] | None):
    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions
    ctx = Context()
    # Under the command-line tools our handlers alone see the signals (no rclpy handler to race).
    opts = SignalHandlerOptions.NO if _CLI_SIGNALS["installed"] else SignalHandlerOptions.ALL
    rclpy.init(args=list(ros_args) if ros_args else None, context=ctx, signal_handler_options=opts)
    return ctx, rclpy.create_node(name, context=ctx)


def _stop_node(ctx, node) -> None:
    import rclpy
    node.destroy_node()
    rclpy.try_shutdown(context=ctx)


def _qos(reliable: bool, depth: int, transient_local: bool = False):
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if transient_local else DurabilityPolicy.VOLATILE)


def _wait(predicate: Callable[[], bool], ctx, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if _stopping(ctx):
            raise KeyboardInterrupt
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


# --------------------------------------------------------------------------- replay

def replay(bag_path: str | Path, rate: float = 1.0, topics: Sequence[str] | None = None,
           remap: dict[str, str] | None = None, publish_clock: bool = True, loop: bool = False,
           start_delay_s: float = 0.0, wait_for_subscribers: Sequence[str] | None = None,
           wait_timeout_s: float = 30.0, best_effort: bool = False, depth: int = 100,
           clock_rate_hz: float = 50.0, ros_args: Sequence[str] | None = None) -> dict[str, int]:
    """Publish a rosbag2's messages on live topics with the bag's timing divided by ``rate``.

    Messages go out as the bag's raw CDR bytes. ``remap`` maps bag topics to published ones;
    ``wait_for_subscribers`` names published topics that must each have a subscriber before the
    first message (nothing lost to discovery). With ``publish_clock``, ``/clock`` carries bag time
    before every message and at ``clock_rate_hz`` in between, for ``use_sim_time`` nodes (with
    ``loop`` it jumps back at each pass). At the end it waits (at most 5 s; Fast DDS acknowledges
    on its ~3 s heartbeat) until subscribers have acknowledged every message, so a process that
    exits right after loses nothing. Ctrl-C stops early. Returns the number of messages published
    per published topic.
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    remap = dict(remap or {})
    typestore = get_typestore(Stores.ROS2_KILTED)
    with AnyReader([Path(bag_path)], default_typestore=typestore) as reader:
        if not reader.is2:
            raise ValueError(f"{bag_path} is not a rosbag2 (MCAP or sqlite3) bag")
        available = sorted({c.topic for c in reader.connections})
        if topics is not None:
            missing = sorted(set(topics) - set(available))
            if missing:
                raise ValueError(f"topics {missing} are not in {bag_path}; it has {available}")
        conns = [c for c in reader.connections if topics is None or c.topic in topics]
        unknown = sorted(set(remap) - set(available))
        if unknown:
            raise ValueError(f"remapped topics {unknown} are not in {bag_path}; it has {available}")
        if not conns:
            return {}

        ctx, node = _start_node("bitmar_bag_replay", ros_args)
        counts: dict[str, int] = defaultdict(int)
        try:
            qos = _qos(not best_effort, depth)
            by_topic: dict[str, tuple[str, object]] = {}
            out_topic: dict[int, str] = {}
            for c in conns:
                out = remap.get(c.topic, c.topic)
                if out in by_topic and by_topic[out][0] != c.msgtype:
                    raise ValueError(f"topic {out} would carry both {by_topic[out][0]} and {c.msgtype}")
                if out not in by_topic:
                    by_topic[out] = (c.msgtype, node.create_publisher(message_class(c.msgtype), out, qos))
                out_topic[c.id] = out
            clock = None
            if publish_clock:
                from rosgraph_msgs.msg import Clock
                clock = node.create_publisher(Clock, CLOCK_TOPIC, _qos(True, 10))

            for t in wait_for_subscribers or ():
                name = remap.get(t, t)
                if name not in by_topic:
                    raise ValueError(f"cannot wait for subscribers on {t}: not replayed (replayed: {sorted(by_topic)})")
                pub = by_topic[name][1]
                _wait(lambda: pub.get_subscription_count() > 0, ctx, wait_timeout_s, f"a subscriber on {name}")
            if start_delay_s > 0:
                time.sleep(start_delay_s)

            pubs = {cid: by_topic[t][1] for cid, t in out_topic.items()}
            while not _stopping(ctx):
                _play_once(reader, conns, pubs, out_topic, counts, rate, clock, clock_rate_hz, ctx)
                if not loop:
                    break
            for _, pub in by_topic.values():  # reliable messages still in flight reach their readers
                pub.wait_for_all_acked(_duration(5.0))
        except KeyboardInterrupt:
            pass
        finally:
            _stop_node(ctx, node)
    return dict(counts)


def _duration(seconds: float):
    from rclpy.duration import Duration
    return Duration(nanoseconds=int(seconds * 1e9))


def _play_once(reader, conns, pubs, out_topic, counts, rate, clock, clock_rate_hz, ctx) -> None:
    # Each message is due at an absolute monotonic time (no cumulative sleeps, so no drift).
    t0 = time.monotonic()
    start_ns = reader.start_time
    tick_s = 1.0 / clock_rate_hz if clock is not None and clock_rate_hz > 0 else math.inf
    next_tick = t0 if clock is not None else math.inf

    def publish_clock(bag_ns: int) -> None:
        from rosgraph_msgs.msg import Clock
        msg = Clock()
        msg.clock.sec, msg.clock.nanosec = divmod(int(bag_ns), 10**9)
        clock.publish(msg)

    for conn, ts, raw in reader.messages(connections=conns):
        due = t0 + (ts - start_ns) / 1e9 / rate
        while True:
            if _stopping(ctx):
                raise KeyboardInterrupt
            now = time.monotonic()
            if now >= due:
                break
            if now >= next_tick:
                publish_clock(start_ns + (now - t0) * rate * 1e9)
                next_tick = now + tick_s
            time.sleep(min(due, next_tick, now + 0.1) - now)  # polls the stop flag
        if clock is not None:
            publish_clock(ts)
        pubs[conn.id].publish(bytes(raw))
        counts[out_topic[conn.id]] += 1


# --------------------------------------------------------------------------- record

_STORAGE = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}


def record(out_path: str | Path, topics: Sequence[str], duration_s: float | None = None,
           count: int | None = None, until: Callable[[dict[str, int]], bool] | None = None,
           storage: str = "mcap", compress: bool = False, type_timeout_s: float = 20.0,
           depth: int = 100, ros_args: Sequence[str] | None = None) -> dict[str, int]:
    """Record live ``topics`` into a new rosbag2 at ``out_path`` as raw CDR bytes.

    Each topic's type comes from the ROS graph (waiting up to ``type_timeout_s`` for a publisher);
    custom types get their schema from the package's ``.msg`` files. Recording ends after
    ``duration_s``, after ``count`` messages in total, when ``until(counts)`` is true, or on
    Ctrl-C, whichever comes first; the bag is finalised in every case. Message timestamps are the
    node clock at reception (bag time = ROS time, sim time under ``use_sim_time``).
    Returns the number of messages recorded per topic.
    """
    if storage not in _STORAGE:
        raise ValueError(f"storage {storage!r} unknown; expected one of {sorted(_STORAGE)}")
    if not topics:
        raise ValueError("record needs at least one topic")
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, ReliabilityPolicy

    ctx, node = _start_node("bitmar_bag_record", ros_args)
    counts: dict[str, int] = {}
    writer = None
    try:
        names = [node.resolve_topic_name(t) for t in topics]
        graph: dict[str, list[str]] = {}

        def types_known() -> bool:
            graph.update(node.get_topic_names_and_types())
            return all(n in graph for n in names)

        try:
            _wait(types_known, ctx, type_timeout_s, "publishers")
        except TimeoutError:
            missing = [n for n in names if n not in graph]
            raise TimeoutError(f"no publisher of {missing} appeared within {type_timeout_s} s; "
                               f"the graph has {sorted(graph)}") from None
        msgtypes = {}
        for n in names:
            if len(graph[n]) != 1:
                raise ValueError(f"topic {n} has several types {graph[n]}; cannot record it")
            msgtypes[n] = graph[n][0]
        typestore = typestore_for(msgtypes.values())

        writer = Writer(Path(out_path), version=9, storage_plugin=_STORAGE[storage])
        if compress:
            writer.set_compression(CompressionMode.STORAGE if storage == "mcap" else CompressionMode.FILE,
                                   CompressionFormat.ZSTD)
        writer.open()
        state = {"total": 0, "done": False}
        log = node.get_logger()
        for n in names:
            conn = writer.add_connection(n, msgtypes[n], typestore=typestore)
            counts[n] = 0
            # Match the publishers: best effort if any offers only that, latched if all are.
            infos = node.get_publishers_info_by_topic(n)
            reliable = all(i.qos_profile.reliability != ReliabilityPolicy.BEST_EFFORT for i in infos)
            latched = bool(infos) and all(i.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL
                                          for i in infos)

            def on_message(raw: bytes, topic: str = n, conn=conn) -> None:
                if state["done"]:
                    return
                writer.write(conn, node.get_clock().now().nanoseconds, raw)
                counts[topic] += 1
                state["total"] += 1
                if counts[topic] == 1:
                    log.info(f"first message on {topic}")
                if (count is not None and state["total"] >= count) or (until is not None and until(dict(counts))):
                    state["done"] = True

            node.create_subscription(message_class(msgtypes[n]), n, on_message,
                                     _qos(reliable, depth, latched), raw=True)
            log.info(f"recording {n} [{msgtypes[n]}] into {out_path}")

        executor = SingleThreadedExecutor(context=ctx)
        executor.add_node(node)
        deadline = math.inf if duration_s is None else time.monotonic() + duration_s
        try:
            while not _stopping(ctx) and not state["done"]:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                executor.spin_once(timeout_sec=min(0.1, left))
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        finally:
            executor.shutdown(timeout_sec=5.0)
    finally:
        if writer is not None:
            writer.close()
        _stop_node(ctx, node)
    return counts


# --------------------------------------------------------------------------- demo bag

def wire_bytes(cdr: bytes | memoryview) -> bytes:
    """CDR as DDS delivers it: zero-padded to a multiple of 4 bytes. A ros2 bag recording holds
    these bytes, so a bag written with them replays byte-exact to what subscribers receive."""
    return bytes(cdr) + bytes(-len(cdr) % 4)


def demo_scenes(n_scenes: int, seed: int, width: int, height: int, photos: bool = True) -> list[dict]:
    """The demo's scenes in play order: ``n_scenes`` procedural test-split scenes (indices drawn
    from ``seed``) with the scikit-image photos spread evenly among them. Each item has
    ``image`` (height, width, 3) uint8 RGB, ``caption`` and ``source``."""
    from bitmar_core.data import scenes

    size = max(width, height)
    indices = np.random.default_rng(seed).choice(1_000_000, size=n_scenes, replace=False)
    items = []
    for idx in indices:
        image, scene = scenes.make_scene(scenes.split_seed("test", int(idx)), size=size)
        top, left = (size - height) // 2, (size - width) // 2
        items.append({"image": image[top:top + height, left:left + width], "caption": scene.caption,
                      "source": f"scenes:test:{int(idx)}"})
    if photos:
        n_photos = len(PHOTOS)
        for k, (name, caption) in enumerate(PHOTOS.items()):
            at = round((k + 1) * n_scenes / (n_photos + 1)) + k  # k photos already inserted before
            items.insert(at, {"image": photo(name, width, height), "caption": caption,
                                               "source": f"skimage:{name}"})
    return items


def photo(name: str, width: int, height: int) -> np.ndarray:
    """A scikit-image sample photo, centre-cropped to the aspect ratio and resized (area)."""
    import cv2
    import skimage.data

    img = getattr(skimage.data, name)()
    h, w = img.shape[:2]
    if w * height > h * width:  # too wide: crop the sides
        cw = round(h * width / height)
        img = img[:, (w - cw) // 2:(w - cw) // 2 + cw]
    else:
        ch = round(w * height / width)
        img = img[(h - ch) // 2:(h - ch) // 2 + ch]
    return np.ascontiguousarray(cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA))


def make_demo_bag(out_path: str | Path, n_scenes: int = 12, frames_per_scene: int = 5, fps: float = 5.0,
                  width: int = 224, height: int = 224, seed: int = 0, photos: bool = True,
                  caption_delay_s: float = 0.1, odometry_hz: float = 0.0) -> Path:
    """Write the demo bag: each scene shown for ``frames_per_scene`` frames on ``/camera/image_raw``
    (rgb8, stamp = bag time, frame 'camera'), and its caption on ``/captions`` ``caption_delay_s``
    after the scene's first frame (at 5 fps, between the scene's first two frames, so the nearest
    frame in time always shows the captioned scene). MCAP with zstd chunks; messages are stored
    as DDS delivers them (`wire_bytes`); the same seed gives the same bytes.
    A sidecar ``scenes.jsonl`` in the bag directory lists each scene's caption and stamps.
    ``odometry_hz`` > 0 adds ``/odom`` (nav_msgs/Odometry, frame 'odom' ← 'base_link') sampled at that
    rate along ``demo_trajectory``, from 0.5 s before the first frame to 0.5 s after the last, its
    stamps ``ODOM_OFFSET_NS`` off the frames' so that a frame's pose is interpolated.
    Returns the bag directory.
    """
    if frames_per_scene < 1 or fps <= 0 or n_scenes < 0 or width < 1 or height < 1:
        raise ValueError(f"need frames_per_scene >= 1, fps > 0, n_scenes >= 0 and a positive size; got "
                         f"{frames_per_scene}, {fps}, {n_scenes}, {width}x{height}")
    period_ns = round(1e9 / fps)
    delay_ns = round(caption_delay_s * 1e9)
    if not 0 <= delay_ns < frames_per_scene * period_ns:
        raise ValueError(f"caption_delay_s={caption_delay_s} must be within the scene's "
                         f"{frames_per_scene / fps} s")
    out = Path(out_path)
    store = get_typestore(Stores.ROS2_KILTED)
    Image, Header, Time, String = (store.types[t] for t in (
        "sensor_msgs/msg/Image", "std_msgs/msg/Header", "builtin_interfaces/msg/Time", "std_msgs/msg/String"))

    items = demo_scenes(n_scenes, seed, width, height, photos)
    sidecar = []
    writer = Writer(out, version=9, storage_plugin=StoragePlugin.MCAP)
    writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)  # zstd MCAP chunks
    writer.open()
    try:
        cam = writer.add_connection(CAMERA_TOPIC, "sensor_msgs/msg/Image", typestore=store)
        cap = writer.add_connection(CAPTION_TOPIC, "std_msgs/msg/String", typestore=store)
        if odometry_hz > 0:
            end_ns = DEMO_START_NS + len(items) * frames_per_scene * period_ns
            odom = writer.add_connection(ODOM_TOPIC, "nav_msgs/msg/Odometry", typestore=store)
            for ts in odometry_stamps(DEMO_START_NS - 500_000_000, end_ns + 500_000_000, odometry_hz):
                writer.write(odom, ts, wire_bytes(store.serialize_cdr(
                    _odometry(store, ts), "nav_msgs/msg/Odometry")))
        for k, item in enumerate(items):
            first_ns = DEMO_START_NS + k * frames_per_scene * period_ns
            caption_ns = first_ns + delay_ns
            data = item["image"].reshape(-1)
            frames = [first_ns + f * period_ns for f in range(frames_per_scene)]
            # Messages in time order; a caption at a frame's stamp follows that frame.
            events = [(ts, 0) for ts in frames] + [(caption_ns, 1)]
            for ts, kind in sorted(events):
                if kind == 0:
                    sec, nsec = divmod(ts, 10**9)
                    msg = Image(header=Header(stamp=Time(sec=sec, nanosec=nsec), frame_id="camera"),
                                height=height, width=width, encoding="rgb8", is_bigendian=0,
                                step=width * 3, data=data)
                    writer.write(cam, ts, wire_bytes(store.serialize_cdr(msg, "sensor_msgs/msg/Image")))
                else:
                    writer.write(cap, ts, wire_bytes(store.serialize_cdr(String(data=item["caption"]),
                                                                         "std_msgs/msg/String")))
            sidecar.append({"caption": item["caption"], "stamp_ns": first_ns, "caption_stamp_ns": caption_ns,
                            "source": item["source"]})
    finally:
        writer.close()
    with open(out / "scenes.jsonl", "w", encoding="utf-8") as f:
        for row in sidecar:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def demo_trajectory(t_ns: int) -> tuple[float, float, float]:
    """(x, y, yaw) of the demo robot at a bag time: a circle of 2 m radius about the odom origin at
    0.2 rad/s from DEMO_START_NS, heading along it (yaw = angle + π/2)."""
    a = 0.2 * (t_ns - DEMO_START_NS) / 1e9
    return 2.0 * math.cos(a), 2.0 * math.sin(a), a + math.pi / 2


def odometry_stamps(start_ns: int, end_ns: int, rate_hz: float) -> list[int]:
    """The /odom stamps of a demo bag: every 1/rate_hz from start_ns + ODOM_OFFSET_NS to end_ns."""
    period = round(1e9 / rate_hz)
    return list(range(start_ns + ODOM_OFFSET_NS, end_ns + 1, period))


def _odometry(store, ts: int):
    Odometry, Header, Time = (store.types[t] for t in (
        "nav_msgs/msg/Odometry", "std_msgs/msg/Header", "builtin_interfaces/msg/Time"))
    P, Pc, Q, Pt = (store.types[t] for t in ("geometry_msgs/msg/Pose", "geometry_msgs/msg/PoseWithCovariance",
                                              "geometry_msgs/msg/Quaternion", "geometry_msgs/msg/Point"))
    Tw, Twc, V3 = (store.types[t] for t in ("geometry_msgs/msg/Twist", "geometry_msgs/msg/TwistWithCovariance",
                                             "geometry_msgs/msg/Vector3"))
    x, y, yaw = demo_trajectory(ts)
    sec, nsec = divmod(ts, 10**9)
    zero = np.zeros(36, np.float64)
    return Odometry(header=Header(stamp=Time(sec=sec, nanosec=nsec), frame_id="odom"), child_frame_id="base_link",
                    pose=Pc(pose=P(position=Pt(x=x, y=y, z=0.0), orientation=Q(x=0.0, y=0.0, z=math.sin(yaw / 2),
                                                                              w=math.cos(yaw / 2))), covariance=zero),
                    twist=Twc(twist=Tw(linear=V3(x=0.4, y=0.0, z=0.0), angular=V3(x=0.0, y=0.0, z=0.2)),
                              covariance=zero))


# --------------------------------------------------------------------------- command lines

def _split_ros_args(argv: Sequence[str] | None) -> tuple[list[str], list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ros-args" in argv:
        i = argv.index("--ros-args")
        return argv[:i], argv[i:]
    return argv, []


def _parse_remap(items: Sequence[str]) -> dict[str, str]:
    remap = {}
    for item in items:
        old, sep, new = item.partition(":=")
        if not sep or not old or not new:
            raise SystemExit(f"--remap {item!r}: expected OLD:=NEW")
        remap[old] = new
    return remap


def replay_main(argv: Sequence[str] | None = None) -> None:
    """``bitmar_bag_replay BAG [--rate R] [--topics ...] [--remap old:=new ...] [--no-clock]
    [--wait-for-subscribers [TOPIC ...]] [--loop] [--ros-args ...]``"""
    _stop_on_signals()
    args, ros_args = _split_ros_args(argv)
    p = argparse.ArgumentParser(prog="bitmar_bag_replay", description="Replay a rosbag2 into live topics.")
    p.add_argument("bag")
    p.add_argument("--rate", type=float, default=1.0, help="playback speed factor (2 = twice as fast)")
    p.add_argument("--topics", nargs="+", help="only these bag topics (default: all)")
    p.add_argument("--remap", nargs="+", default=[], metavar="OLD:=NEW")
    p.add_argument("--no-clock", action="store_true", help="do not publish /clock")
    p.add_argument("--loop", action="store_true")
    p.add_argument("--start-delay", type=float, default=0.0, metavar="S")
    p.add_argument("--wait-for-subscribers", nargs="*", metavar="TOPIC",
                   help="wait until these (default: all replayed) topics have a subscriber")
    p.add_argument("--wait-timeout", type=float, default=30.0, metavar="S")
    p.add_argument("--best-effort", action="store_true", help="best-effort QoS (default reliable)")
    a = p.parse_args(args)
    remap = _parse_remap(a.remap)
    wait = a.wait_for_subscribers
    if wait is not None and not wait:
        with AnyReader([Path(a.bag)]) as reader:
            wait = sorted({c.topic for c in reader.connections if a.topics is None or c.topic in a.topics})
    try:
        counts = replay(a.bag, rate=a.rate, topics=a.topics, remap=remap, publish_clock=not a.no_clock,
                        loop=a.loop, start_delay_s=a.start_delay, wait_for_subscribers=wait,
                        wait_timeout_s=a.wait_timeout, best_effort=a.best_effort,
                        ros_args=["bitmar_bag_replay", *ros_args])
    except (ValueError, TimeoutError, FileNotFoundError) as err:
        raise SystemExit(f"bitmar_bag_replay: {err}") from None
    print("replayed " + ", ".join(f"{t}: {n}" for t, n in sorted(counts.items())), flush=True)


def record_main(argv: Sequence[str] | None = None) -> None:
    """``bitmar_bag_record OUT --topics a b [--duration S] [--count N] [--storage mcap|sqlite3]``"""
    _stop_on_signals()
    args, ros_args = _split_ros_args(argv)
    p = argparse.ArgumentParser(prog="bitmar_bag_record", description="Record live topics into a rosbag2.")
    p.add_argument("out")
    p.add_argument("--topics", nargs="+", required=True)
    p.add_argument("--duration", type=float, metavar="S")
    p.add_argument("--count", type=int, metavar="N", help="stop after N messages in total")
    p.add_argument("--storage", choices=sorted(_STORAGE), default="mcap")
    p.add_argument("--compress", action="store_true", help="zstd (MCAP chunks, or the sqlite3 file)")
    p.add_argument("--type-timeout", type=float, default=20.0, metavar="S")
    a = p.parse_args(args)
    try:
        counts = record(a.out, a.topics, duration_s=a.duration, count=a.count, storage=a.storage,
                        compress=a.compress, type_timeout_s=a.type_timeout,
                        ros_args=["bitmar_bag_record", *ros_args])
    except (ValueError, TimeoutError, WriterError) as err:
        raise SystemExit(f"bitmar_bag_record: {err}") from None
    print("recorded " + ", ".join(f"{t}: {n}" for t, n in sorted(counts.items())), flush=True)


def make_demo_bag_main(argv: Sequence[str] | None = None) -> None:
    """``bitmar_make_demo_bag OUT [--scenes N] [--seed S] [--frames-per-scene F] [--fps R] [--size W H]``"""
    p = argparse.ArgumentParser(prog="bitmar_make_demo_bag", description="Write the demo rosbag2 (MCAP).")
    p.add_argument("out")
    p.add_argument("--scenes", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames-per-scene", type=int, default=5)
    p.add_argument("--fps", type=float, default=5.0)
    p.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("W", "H"))
    p.add_argument("--no-photos", action="store_true")
    p.add_argument("--odometry-hz", type=float, default=0.0,
                   help="also write /odom (nav_msgs/Odometry) at this rate along a circle (0 = none)")
    a = p.parse_args(argv)
    out = make_demo_bag(a.out, n_scenes=a.scenes, frames_per_scene=a.frames_per_scene, fps=a.fps,
                        width=a.size[0], height=a.size[1], seed=a.seed, photos=not a.no_photos,
                        odometry_hz=a.odometry_hz)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.2f} MB)", flush=True)
