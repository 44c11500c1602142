"""Export a robot's episodic store and import it back: each episode (caption, time, pose, thumbnail,
and the embedding that makes it searchable) as a JSON line, and as an MCAP rosbag2 that Foxglove
opens (episodes, their thumbnails as images, their poses in 3D). No rclpy: ``rosbags`` writes the bag.

The memory matrix (the model's memory state) is not exported: it belongs to the model that wrote it,
and an import writes episodes only (new ids, in the exported order).
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bitmar_core.episodes.pose import Pose
from bitmar_core.episodes.store import EpisodeStore
from bitmar_core.episodes.store_api import Episode, NewEpisode, StoreError

FORMAT = "bitmar_memory_export"
FORMAT_VERSION = 1
EPISODE_TOPIC = "/bitmar/episodes"               # bitmar_ros/msg/Episode: caption, time, pose, thumbnail
THUMBNAIL_TOPIC = "/bitmar/episodes/thumbnail"   # sensor_msgs/msg/CompressedImage (Foxglove's Image panel)
POSE_TOPIC = "/bitmar/episodes/pose"             # geometry_msgs/msg/PoseStamped (Foxglove's 3D panel)
RECORD_TOPIC = "/bitmar/episodes/record"         # std_msgs/msg/String: the JSON line, lossless (import reads it)
BATCH = 1000                                     # episodes per import transaction


class ExportError(Exception):
    """A file that is not an export of this format, or one that does not fit the target store."""


def episode_record(e: Episode) -> dict:
    """One episode as a JSON-able dict (the JSON lines' and the record topic's content)."""
    return {"id": e.id, "stamp_ns": e.stamp_ns, "caption": e.caption, "source": e.source, "robot_id": e.robot_id,
            "pose": None if e.pose is None else {"frame_id": e.pose.frame_id, "position": list(e.pose.position),
                                                 "orientation": list(e.pose.orientation)},
            "embedding_f32le": base64.b64encode(np.asarray(e.embedding, "<f4").tobytes()).decode(),
            "thumbnail_jpeg": base64.b64encode(e.thumbnail_jpeg).decode()}


def record_episode(rec: dict, dim: int, where: str) -> NewEpisode:
    """The episode of a record, checked (the message names the record and the field)."""
    try:
        raw = base64.b64decode(rec["embedding_f32le"], validate=True)
        if len(raw) != 4 * dim:
            raise ValueError(f"embedding_f32le of {len(raw)} bytes, expected {4 * dim} ({dim} float32)")
        emb = np.frombuffer(raw, "<f4").astype(np.float32)
        pose = rec.get("pose")
        return NewEpisode(int(rec["stamp_ns"]), str(rec["caption"]), str(rec["source"]), emb,
                          base64.b64decode(rec.get("thumbnail_jpeg", ""), validate=True),
                          None if pose is None else Pose(pose["frame_id"], tuple(pose["position"]),
                                                         tuple(pose["orientation"])))
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{where}: not an episode record of {FORMAT} ({type(e).__name__}: {e})") from None


def header(store: EpisodeStore, count: int) -> dict:
    return {"format": FORMAT, "version": FORMAT_VERSION, "embedding_dim": store.embedding_dim,
            "identity": store.identity, "count": count}


def export_jsonl(store: EpisodeStore, out: Path) -> int:
    """A header line, then one line per episode, oldest id first. Written to a temporary name and
    renamed, so a killed export leaves no half file under ``out``. Returns the episode count."""
    episodes = store.all_episodes()
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(header(store, len(episodes))) + "\n")
        for e in episodes:
            f.write(json.dumps(episode_record(e), ensure_ascii=False) + "\n")
    tmp.replace(out)
    return len(episodes)


def export_mcap(store: EpisodeStore, out: Path) -> int:
    """A rosbag2 directory with one MCAP file: per episode, at its stamp, the Episode message, its
    thumbnail, its pose (when it has one) and the lossless record. Returns the episode count."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    from bitmar_ros.bag_tools import typestore_for, wire_bytes

    ts = typestore_for(["bitmar_ros/msg/Episode"])
    T = ts.types
    Time, Header = T["builtin_interfaces/msg/Time"], T["std_msgs/msg/Header"]
    episodes = store.all_episodes()
    if out.exists():
        raise ExportError(f"{out}: exists; choose a new directory for the bag")
    writer = Writer(out, version=9, storage_plugin=StoragePlugin.MCAP)
    writer.open()
    try:
        conns = {topic: writer.add_connection(topic, msgtype, typestore=ts) for topic, msgtype in (
            (EPISODE_TOPIC, "bitmar_ros/msg/Episode"), (THUMBNAIL_TOPIC, "sensor_msgs/msg/CompressedImage"),
            (POSE_TOPIC, "geometry_msgs/msg/PoseStamped"), (RECORD_TOPIC, "std_msgs/msg/String"))}
        # The header travels as the first record message (a bag has no place of its own for it).
        writer.write(conns[RECORD_TOPIC], episodes[0].stamp_ns if episodes else 0, wire_bytes(ts.serialize_cdr(
            T["std_msgs/msg/String"](data=json.dumps(header(store, len(episodes)))), "std_msgs/msg/String")))
        for e in episodes:
            sec, nsec = divmod(e.stamp_ns, 10**9)
            stamp = Time(sec=sec, nanosec=nsec)
            thumb = T["sensor_msgs/msg/CompressedImage"](header=Header(stamp=stamp, frame_id="camera"), format="jpeg",
                                                         data=np.frombuffer(e.thumbnail_jpeg, np.uint8))
            pose = _pose_msg(T, e, stamp)
            msg = T["bitmar_ros/msg/Episode"](
                id=e.id, stamp=stamp, caption=e.caption, source=e.source, robot_id=e.robot_id, score=1.0,
                matched_by="", lexical_score=0.0, lexical_rank=0, embedding_score=0.0, embedding_rank=0,
                thumbnail=thumb, has_pose=e.pose is not None, pose=pose)
            for topic, m, msgtype in ((EPISODE_TOPIC, msg, "bitmar_ros/msg/Episode"),
                                      (THUMBNAIL_TOPIC, thumb, "sensor_msgs/msg/CompressedImage"),
                                      (POSE_TOPIC, pose, "geometry_msgs/msg/PoseStamped") if e.pose else (None,) * 3,
                                      (RECORD_TOPIC, T["std_msgs/msg/String"](data=json.dumps(episode_record(e))),
                                       "std_msgs/msg/String")):
                if topic:
                    writer.write(conns[topic], e.stamp_ns, wire_bytes(ts.serialize_cdr(m, msgtype)))
    finally:
        writer.close()
    return len(episodes)


def _pose_msg(T, e: Episode, stamp):
    P = T["geometry_msgs/msg/PoseStamped"]
    pose = e.pose or Pose("none", (0.0, 0.0, 0.0))
    return P(header=T["std_msgs/msg/Header"](stamp=stamp, frame_id=pose.frame_id if e.pose else ""),
             pose=T["geometry_msgs/msg/Pose"](position=T["geometry_msgs/msg/Point"](*pose.position),
                                              orientation=T["geometry_msgs/msg/Quaternion"](*pose.orientation)))


def read_records(path: Path) -> tuple[dict, Iterator[tuple[str, dict]]]:
    """(header, records with where each came from) of a JSON-lines file or an MCAP bag directory."""
    if path.is_dir() or path.suffix == ".mcap":
        lines = _bag_lines(path)
    elif path.is_file():
        lines = ((f"{path}:{n}", line) for n, line in enumerate(path.open(encoding="utf-8"), 1) if line.strip())
    else:
        raise ExportError(f"{path}: no such file or bag directory")

    def parsed() -> Iterator[tuple[str, dict]]:
        for where, line in lines:
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ExportError(f"{where}: not JSON ({e})") from None

    it = parsed()
    first = next(it, None)
    if first is None or not isinstance(first[1], dict) or first[1].get("format") != FORMAT:
        raise ExportError(f"{path}: not a {FORMAT} file (its first record must be the header naming the format)")
    if first[1].get("version") != FORMAT_VERSION:
        raise ExportError(f"{path}: {FORMAT} version {first[1].get('version')!r}, this code reads {FORMAT_VERSION}")
    return first[1], it


def _bag_lines(path: Path) -> Iterator[tuple[str, str]]:
    from rosbags.highlevel import AnyReader

    bag = path if path.is_dir() else path.parent
    with AnyReader([bag]) as reader:
        conns = [c for c in reader.connections if c.topic == RECORD_TOPIC]
        if not conns:
            raise ExportError(f"{bag}: a bag without {RECORD_TOPIC} (not written by bitmar_memory_export)")
        for n, (conn, _, raw) in enumerate(reader.messages(connections=conns)):
            yield f"{bag} {RECORD_TOPIC} #{n}", reader.deserialize(raw, conn.msgtype).data


def import_records(path: Path, store_dir: Path) -> list[int]:
    """Add every episode of an export to the store under ``store_dir`` (created if missing, for the
    export's model identity and embedding size; an existing store must match them), ``BATCH`` per
    transaction. Every record is checked before the first is written: a bad file adds nothing.
    Returns the new ids, in the export's order."""
    head, records = read_records(path)
    dim, identity = int(head["embedding_dim"]), str(head["identity"])
    episodes = [record_episode(rec, dim, where) for where, rec in records]
    if head.get("count") is not None and len(episodes) != head["count"]:
        raise ExportError(f"{path}: {len(episodes)} episodes, its header says {head['count']} (a cut file?)")
    with EpisodeStore.open(store_dir, dim, identity) as store:
        ids: list[int] = []
        for start in range(0, len(episodes), BATCH):
            ids += store.add_episodes(episodes[start:start + BATCH])
        store.checkpoint()
    return ids


def main(argv: list[str] | None = None) -> int:
    """``bitmar_memory_export STORE_DIR --jsonl OUT.jsonl --mcap OUT_BAG_DIR`` and
    ``bitmar_memory_export --import FILE_OR_BAG --store STORE_DIR``."""
    p = argparse.ArgumentParser(prog="bitmar_memory_export", description=__doc__.split("\n\n")[0])
    p.add_argument("store", nargs="?", help="store directory to export (store_dir of the node)")
    p.add_argument("--jsonl", type=Path, help="write JSON lines here")
    p.add_argument("--mcap", type=Path, help="write an MCAP rosbag2 into this new directory")
    p.add_argument("--import", dest="import_from", type=Path, help="read an export (JSON lines or bag) ...")
    p.add_argument("--into", type=Path, help="... into this store directory (created if missing)")
    a = p.parse_args(argv)
    try:
        if a.import_from:
            if not a.into:
                p.error("--import needs --into STORE_DIR")
            ids = import_records(a.import_from, a.into)
            print(f"imported {len(ids)} episodes into {a.into}", flush=True)
            return 0
        if not a.store or not (a.jsonl or a.mcap):
            p.error("give a store directory and --jsonl and/or --mcap (or --import FILE --into STORE_DIR)")
        dim, identity = EpisodeStore.describe(a.store)
        with EpisodeStore.open_read_only(a.store, dim, identity) as store:
            if a.jsonl:
                print(f"wrote {export_jsonl(store, a.jsonl)} episodes to {a.jsonl}", flush=True)
            if a.mcap:
                print(f"wrote {export_mcap(store, a.mcap)} episodes to {a.mcap}", flush=True)
        return 0
    except (ExportError, StoreError) as e:
        print(f"bitmar_memory_export: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
