"""bitmar_memory_export (bitmar_ros/memory_export.py): a store exported to JSON lines and to an MCAP
bag and imported back holds the same episodes byte for byte (caption, time, pose, thumbnail,
embedding); the bag is read independently by the ``mcap`` library as Foxglove reads it (ros2msg
schemas, CDR); a bad file imports nothing."""
import json
import subprocess
import sys

import numpy as np
import pytest

from bitmar_core.episodes.pose import Pose
from bitmar_core.episodes.store import EpisodeStore
from bitmar_core.episodes.store_api import NewEpisode, make_thumbnail
from bitmar_ros import memory_export as X

DIM, IDENTITY = 16, "bitmar-test/v1 C=16"
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture
def source(tmp_path):
    rng = np.random.default_rng(11)
    with EpisodeStore.open(tmp_path / "src", DIM, IDENTITY) as s:
        for i in range(12):
            rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
            pose = None if i % 3 == 0 else Pose("map", (0.5 * i, -1.25 * i, 0.1), (0, 0, np.sin(i / 5), np.cos(i / 5)))
            s.add_episode(1_700_000_000 * 10**9 + i * 250_000_000, f"a red cube number {i} — café", "caption",
                          rng.standard_normal(DIM).astype(np.float32), make_thumbnail(rgb, max_side=32), pose=pose)
        s.forget(ids=[4])  # ids need not be contiguous
    return tmp_path / "src"


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.stamp_ns, x.caption, x.source, x.thumbnail_jpeg) == (y.stamp_ns, y.caption, y.source, y.thumbnail_jpeg)
        assert x.embedding.tobytes() == y.embedding.tobytes()
        assert x.pose == y.pose


@pytest.mark.parametrize("kind", ["jsonl", "mcap"])
def test_export_import_round_trip_is_exact(source, tmp_path, kind):
    out = tmp_path / ("episodes.jsonl" if kind == "jsonl" else "bag")
    code = X.main([str(source), f"--{kind}", str(out)])
    assert code == 0
    assert X.main(["--import", str(out), "--into", str(tmp_path / "dst")]) == 0
    with EpisodeStore.open(source, DIM, IDENTITY) as a, EpisodeStore.open(tmp_path / "dst", DIM, IDENTITY) as b:
        _same(a.all_episodes(), b.all_episodes())
        assert b.integrity_check() == []
        assert b.memory_state() is None  # episodes only: the memory matrix is the model's
        assert [h.episode.caption for h in b.search("cube number 7", k=1)] == ["a red cube number 7 — café"]


def test_mcap_bag_reads_independently_as_foxglove_does(source, tmp_path):
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    X.main([str(source), "--mcap", str(tmp_path / "bag")])
    (mcap_file,) = (tmp_path / "bag").glob("*.mcap")
    with open(mcap_file, "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        summary = reader.get_summary()
        schemas = {s.name: s.encoding for s in summary.schemas.values()}
        assert schemas == {"bitmar_ros/msg/Episode": "ros2msg", "sensor_msgs/msg/CompressedImage": "ros2msg",
                           "geometry_msgs/msg/PoseStamped": "ros2msg", "std_msgs/msg/String": "ros2msg"}
        assert {c.message_encoding for c in summary.channels.values()} == {"cdr"}
        got = {}
        for _, channel, _, msg in reader.iter_decoded_messages():
            got.setdefault(channel.topic, []).append(msg)
    with EpisodeStore.open(source, DIM, IDENTITY) as s:
        episodes = s.all_episodes()
    assert [m.caption for m in got[X.EPISODE_TOPIC]] == [e.caption for e in episodes]
    assert [bytes(m.data) for m in got[X.THUMBNAIL_TOPIC]] == [e.thumbnail_jpeg for e in episodes]
    posed = [e for e in episodes if e.pose]
    assert [(m.header.frame_id, m.pose.position.x, m.pose.position.y) for m in got[X.POSE_TOPIC]] == \
        [(e.pose.frame_id, e.pose.position[0], e.pose.position[1]) for e in posed]
    assert [m.has_pose for m in got[X.EPISODE_TOPIC]] == [e.pose is not None for e in episodes]


def test_bad_export_imports_nothing_and_says_where(source, tmp_path):
    out = tmp_path / "episodes.jsonl"
    X.main([str(source), "--jsonl", str(out)])
    lines = out.read_text(encoding="utf-8").splitlines()
    rec = json.loads(lines[3])
    rec["embedding_f32le"] = rec["embedding_f32le"][:8]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:3] + [json.dumps(rec)] + lines[4:]) + "\n", encoding="utf-8")
    with EpisodeStore.open(tmp_path / "dst", DIM, IDENTITY) as s:
        s.add_episodes([NewEpisode(1, "kept", "caption", np.ones(DIM, np.float32))])
    with pytest.raises(X.ExportError, match=r"bad.jsonl:4: .*embedding"):
        X.import_records(bad, tmp_path / "dst")
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:-2]) + "\n", encoding="utf-8")
    with pytest.raises(X.ExportError, match="header says"):
        X.import_records(cut, tmp_path / "dst")
    with EpisodeStore.open(tmp_path / "dst", DIM, IDENTITY) as s:
        assert [e.caption for e in s.all_episodes()] == ["kept"]
    not_ours = tmp_path / "other.jsonl"
    not_ours.write_text('{"hello": 1}\n')
    with pytest.raises(X.ExportError, match="not a bitmar_memory_export"):
        X.import_records(not_ours, tmp_path / "dst")


def test_command_line_exits_1_with_a_message(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "bin" / "bitmar_memory_export"), str(tmp_path / "none"),
                        "--jsonl", str(tmp_path / "x.jsonl")], capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 1 and "no episode store" in r.stderr
