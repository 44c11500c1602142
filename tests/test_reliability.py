"""Reliability of the BitMar node as a separate OS process: sustained camera + caption load,
SIGKILL at random moments, a full disk, a publisher that vanishes, hostile and corrupt input, and
the security basics (safetensors only, owner-only files, bounded service inputs).

Every test has a short form that CI runs and, where the length matters, a long form (marked
``long``, skipped unless BITMAR_LONG=1; ``scripts/reliability.sh`` runs it and writes the figures
into tests/RELIABILITY.md). Knobs of the long form: BITMAR_LOAD_S, BITMAR_KILLS, BITMAR_FUZZ_EXAMPLES.
Times are measured and reported, never asserted: the machine is shared.
"""
from __future__ import annotations

import array
import ast
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import ros_helpers  # noqa: F401  (ROS environment first)
from node_harness import ChildProcess, Harness, NodeProcess, write_tiny_checkpoint
from ros_helpers import REPO, child_env, wait_for

from builtin_interfaces.msg import Time
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from std_srvs.srv import Trigger

from bitmar_core.episodes.service import CAPTION_SYNONYM_GROUPS
from bitmar_core.episodes.store import DB_FILENAME, EpisodeStore
from bitmar_ros import params as P
from bitmar_ros.image_conversion import (ENCODINGS, MAX_SIDE, ImageConversionError, compressed_to_rgb8,
                                         image_to_rgb8)
from bitmar_ros.srv import QueryMemory

pytestmark = [pytest.mark.ros, pytest.mark.slow]

LONG = os.environ.get("BITMAR_LONG") == "1"
PUBLISHER = REPO / "tests" / "helpers" / "reliability_publisher.py"
_ACK = re.compile(r"\]: episode (\d+) committed \[(\w+)\]: (.*)$")
_DEFAULTS = {p.name: p.default for p in P.PARAMS}


@dataclass(frozen=True)
class Profile:
    name: str
    load_s: float        # seconds of 30 Hz 640x480 camera + 5 Hz captions
    kills: int           # SIGKILLs in a row
    fuzz_examples: int   # hypothesis examples per node kind (each a batch of 1-6 hostile inputs)


SHORT = Profile("short", load_s=45.0, kills=6, fuzz_examples=60)
LONG_PROFILE = Profile("long", load_s=float(os.environ.get("BITMAR_LOAD_S", 300)),
                       kills=int(os.environ.get("BITMAR_KILLS", 25)),
                       fuzz_examples=int(os.environ.get("BITMAR_FUZZ_EXAMPLES", 500)))
# skipif is evaluated before fixtures are set up, so a skipped long test starts no node.
_LONG_MARKS = [pytest.mark.long, pytest.mark.skipif(not LONG, reason="long reliability run: set BITMAR_LONG=1 "
                                                    "(scripts/reliability.sh)")]
PROFILES = [pytest.param(SHORT, id="short"), pytest.param(LONG_PROFILE, id="long", marks=_LONG_MARKS)]


# ---------------------------------------------------------------------- figures
def record(profile: Profile, key: str, value) -> None:
    """Print a measured figure; with BITMAR_RELIABILITY_JSON set, also merge it into that file
    (scripts/reliability.sh renders the file into tests/RELIABILITY.md)."""
    print(f"[reliability:{profile.name}] {key} = {value}", flush=True)
    path = os.environ.get("BITMAR_RELIABILITY_JSON")
    if not path:
        return
    p = Path(path)
    data = json.loads(p.read_text()) if p.exists() and p.stat().st_size else {}
    data.setdefault(profile.name, {})[key] = value
    p.write_text(json.dumps(data, indent=2, sort_keys=True))


# ---------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def store_identity(checkpoint: Path) -> tuple[int, str]:
    """(embedding_dim, identity) the node gives the store of ``checkpoint`` (BitMarRuntime's rule)."""
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    return 32, f"bitmar:{digest[:16]}:efficientnet_lite0:C32"


def acks(node: NodeProcess) -> dict[int, str]:
    """episode id -> the first 80 characters of its caption, from the node's acknowledgement lines."""
    out = {}
    for line in list(node.lines):
        m = _ACK.search(line)
        if m:
            out[int(m.group(1))] = ast.literal_eval(m.group(3))
    return out


def stat(h: Harness, key: str) -> float:
    """Latest value of a diagnostics counter (counters appear at their first increment: 0 before)."""
    v = h.latest_stat(key)
    return 0.0 if v is None else v


def stat_values(h: Harness, key: str) -> list[float]:
    return [float(kv.value) for arr in h.diagnostics for s in arr.status for kv in s.values if kv.key == key]


def rss_mb(node: NodeProcess) -> float:
    return psutil.Process(node.proc.pid).memory_info().rss / 2**20


def sha256_files(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def check_store(store_dir: Path, checkpoint: Path, acked: dict[int, str], copy_to: Path | None = None) -> int:
    """Open the store (or a copy of its database and WAL, leaving the original as the node left it)
    and check it: SQLite integrity, every acknowledged episode with its caption, and memory state
    and episodes in agreement (one memory write per episode). Returns the episode count."""
    if copy_to is not None:
        shutil.rmtree(copy_to, ignore_errors=True)
        copy_to.mkdir()
        for suffix in ("", "-wal"):  # not -shm: a first opener rebuilds the WAL index from the WAL
            src = store_dir / (DB_FILENAME + suffix)
            if src.exists():
                shutil.copy2(src, copy_to / src.name)
        store_dir = copy_to
    dim, identity = store_identity(checkpoint)
    with EpisodeStore.open(store_dir, dim, identity, create=False) as s:
        assert s.integrity_check() == []
        for episode_id, caption80 in acked.items():
            episode = s.episode(episode_id)  # KeyError = an acknowledged episode was lost
            assert episode.caption[:80] == caption80
        count = s.count()
        state = s.memory_state()
        writes = 0 if state is None else int(state["n_writes"])
        assert writes == count, f"memory state holds {writes} writes, the store {count} episodes"
        return count


class Publisher(ChildProcess):
    """tests/helpers/reliability_publisher.py as a child process; collects the captions it sent."""

    def __init__(self, prefix: str, **opts) -> None:
        args = [sys.executable, str(PUBLISHER), "--prefix", prefix]
        for k, v in opts.items():
            flag = f"--{k.replace('_', '-')}"
            args += ([flag] if v else []) if isinstance(v, bool) else [flag, str(v)]
        self.prefix = prefix
        super().__init__(args)

    def captions(self) -> list[str]:
        return [line.split(" ", 2)[2] for line in list(self.lines) if line.startswith("caption ")]

    def frames_sent(self) -> int | None:
        done = [line for line in self.lines if line.startswith("done ")]
        return int(done[-1].split()[1].split("=")[1]) if done else None

    def wait_ready(self, h: Harness | None = None, timeout_s: float = 60) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"publisher {self.prefix} exited:\n" + "\n".join(self.lines))
            return "ready" in self.lines
        wait_for(ready, timeout_s, what=f"publisher {self.prefix} to see the node",
                 spin=h.spin if h is not None else None)

    def start_captions(self, h: Harness, frames_before: float, timeout_s: float = 60) -> None:
        """For a publisher started with ``text_on_signal=True``: once the node's diagnostics count
        frames beyond ``frames_before`` (the node has matched this camera, not only this camera the
        node's subscriptions), start the captions. Until then a caption would have no frame to pair with."""
        h.wait(lambda: stat(h, "frames_received") > frames_before, timeout_s,
               f"the node to receive frames from publisher {self.prefix}")
        self.proc.send_signal(signal.SIGUSR1)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def finish(self, sig: int | None = None, timeout_s: float = 60) -> int:
        if sig is not None and self.alive():
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._reader.join(timeout=5)
        return rc


def _wait_acked(h: Harness, node: NodeProcess, captions: list[str], timeout_s: float = 300) -> None:
    want = {c[:80] for c in captions}

    def done() -> bool:
        if not node.alive():
            raise AssertionError(f"node died:\n{node.output()[-4000:]}")
        return want <= set(acks(node).values())
    try:
        h.wait(done, timeout_s, f"acknowledgement of {len(want)} captions")
    except TimeoutError:
        missing = sorted(want - set(acks(node).values()))
        notes = [line for line in node.output().splitlines() if "WARN" in line or "ERROR" in line]
        raise AssertionError(f"{len(missing)} of {len(want)} captions never acknowledged, e.g. {missing[:3]}; "
                             f"node warnings and errors:\n" + "\n".join(notes[-30:])) from None


def _stop_all(*things) -> None:
    for t in things:
        if t is None:
            continue
        try:
            if isinstance(t, Publisher):
                t.finish(signal.SIGKILL, timeout_s=10)
            elif isinstance(t, NodeProcess):
                t.stop(signal.SIGKILL, timeout_s=10)
            elif isinstance(t, Harness):
                t.close()
        except Exception as exc:  # teardown must reach every process
            print(f"teardown of {t!r}: {exc}")


# ====================================================================== load
@pytest.mark.parametrize("profile", PROFILES)
def test_sustained_camera_and_caption_load(profile, checkpoint, tmp_path):
    """30 Hz 640x480 rgb8 + 5 Hz unique captions from another process, queries at ~4 Hz: queues stay
    within their bounds, RSS settles, every caption is stored exactly once, query latency reported."""
    store = tmp_path / "store"
    node = NodeProcess(checkpoint, store, "diagnostics_rate_hz:=2.0")
    h = Harness()
    pub = None
    try:
        h.wait_connected(node)
        pub = Publisher("load", duration_s=profile.load_s, image_hz=30, text_hz=5, width=640, height=480,
                        text_on_signal=True)
        pub.wait_ready(h)
        pub.start_captions(h, frames_before=0)
        t0 = time.monotonic()
        rss: list[tuple[float, float]] = []
        latencies: list[float] = []
        next_rss = t0
        while pub.alive():
            assert node.alive(), node.output()[-4000:]
            now = time.monotonic()
            if now >= next_rss:
                rss.append((now - t0, rss_mb(node)))
                next_rss += 1.0
            sent = pub.captions()
            text = random.choice(sent) if sent else "a red cube left of a blue ball"
            t_query = time.monotonic()
            resp = h.ask(text, k=5)
            latencies.append(time.monotonic() - t_query)
            assert resp.success, resp.message
            h.wait(lambda: time.monotonic() >= t_query + 0.25, 10, "the next query slot")  # pacing, not sync
        assert pub.finish() == 0, "\n".join(pub.lines[-20:])
        captions = pub.captions()
        assert len(set(captions)) == len(captions) and captions
        _wait_acked(h, node, captions)
        h.wait(lambda: stat(h, "text_received") >= len(captions), 30, "diagnostics after the last caption")
        frames_received = stat(h, "frames_received")
        queues = stat_values(h, "text_queue")
        text_dropped, text_rejected = stat(h, "text_dropped"), stat(h, "text_rejected")
        lag = {k: h.latest_stat(k) for k in ("caption_to_commit_latency_p95_s", "final_latency_p95_s", "descriptions")}
        assert node.stop() == 0
        node_output = node.output()
    finally:
        _stop_all(pub, node, h)

    # Queues: never above their bounds; no caption dropped or left without a frame.
    assert queues and max(queues) <= _DEFAULTS["text_queue_size"]
    assert text_dropped == 0 and text_rejected == 0, node_output[-4000:]
    # Exactly once: the store holds each published caption once, and nothing else.
    dim, identity = store_identity(checkpoint)
    with EpisodeStore.open(store, dim, identity, create=False) as s:
        assert s.integrity_check() == []
        episodes = s.all_episodes()
    assert Counter(e.caption for e in episodes) == Counter(captions)
    assert all(e.source == "caption" for e in episodes)
    # RSS: after warm-up (the first 20% of the run, at least 10 s) it grows < 10%.
    run_s = rss[-1][0]
    warm = max(10.0, 0.2 * run_s)
    base = [m for t, m in rss if warm <= t < warm + 10]
    last = [m for t, m in rss if t >= run_s - 10]
    growth = float(np.median(last)) / float(np.median(base)) - 1.0
    p50, p99 = (float(np.percentile(latencies, q)) for q in (50, 99))
    record(profile, "load_minutes", round(run_s / 60, 2))
    record(profile, "load_frames_sent", pub.frames_sent())
    record(profile, "load_frames_received", int(frames_received))
    record(profile, "load_captions_sent", len(captions))
    record(profile, "load_episodes_stored", len(episodes))
    record(profile, "load_episodes_lost", len(set(captions) - {e.caption for e in episodes}))
    record(profile, "load_max_text_queue", max(queues))
    record(profile, "load_caption_to_commit_p95_ms", round(1e3 * (lag["caption_to_commit_latency_p95_s"] or 0), 1))
    record(profile, "load_descriptions", int(lag["descriptions"] or 0))
    record(profile, "load_description_final_p95_ms", round(1e3 * (lag["final_latency_p95_s"] or 0), 1))
    record(profile, "load_queries", len(latencies))
    record(profile, "load_query_p50_ms", round(1e3 * p50, 1))
    record(profile, "load_query_p99_ms", round(1e3 * p99, 1))
    record(profile, "load_rss_after_warmup_mb", round(float(np.median(base)), 1))
    record(profile, "load_rss_end_mb", round(float(np.median(last)), 1))
    record(profile, "load_rss_max_mb", round(max(m for _, m in rss), 1))
    record(profile, "load_rss_growth_pct", round(100 * growth, 2))
    assert growth < 0.10, rss


# ====================================================================== faults
@pytest.mark.parametrize("profile", PROFILES)
def test_sigkill_at_random_moments_loses_no_acknowledged_episode(profile, checkpoint, tmp_path):
    """Kill the node (SIGKILL) at random moments while it writes episodes, restart it each time: the
    store opens every time, passes integrity_check() and holds every episode acknowledged before."""
    seed = int(os.environ.get("BITMAR_KILL_SEED", random.randrange(2**31)))
    rnd = random.Random(seed)
    record(profile, "kill_seed", seed)
    store = tmp_path / "store"
    acked: dict[int, str] = {}
    pub = node = None
    kills = startup_kills = 0
    try:
        for cycle in range(profile.kills):
            node = NodeProcess(checkpoint, store, "describe_rate_hz:=0.0", "diagnostics_rate_hz:=0.0")
            if pub is None:  # one camera + caption stream for all cycles; it outlives the node
                pub = Publisher("kill", image_hz=15, text_hz=20, width=320, height=240)
                pub.wait_ready()
            if cycle % 5 == 4:  # kill somewhere in start-up: imports, model, store open, first writes
                t_kill = time.monotonic() + rnd.uniform(0.5, 8.0)
                wait_for(lambda: not node.alive() or time.monotonic() >= t_kill, 30, what="the kill moment")
                startup_kills += 1
            else:  # kill while writing: after a random number of acks, a random fraction of a write later
                target = rnd.randint(1, 8)

                def enough() -> bool:
                    if not node.alive():
                        raise AssertionError(f"node exited by itself:\n{node.output()[-4000:]}")
                    return len(node.acked_ids()) >= target
                wait_for(enough, 120, what=f"{target} acknowledged episodes in cycle {cycle}")
                t_kill = time.monotonic() + rnd.uniform(0.0, 0.3)
                wait_for(lambda: time.monotonic() >= t_kill, 5, what="the kill moment")
            assert node.alive(), f"node exited by itself:\n{node.output()[-4000:]}"
            assert node.stop(signal.SIGKILL) == -signal.SIGKILL
            kills += 1
            ready = [line for line in node.lines if "]: ready:" in line]
            if ready:  # the node opened the store the last kill left, with every acked episode in it
                assert int(ready[0].rsplit("episodes=", 1)[1]) >= len(acked), ready[0]
            acked.update(acks(node))
            if (store / DB_FILENAME).exists():
                count = check_store(store, checkpoint, acked, copy_to=tmp_path / "copy")
                assert count >= len(acked)
            else:
                assert not acked
        # A last start: the store opens, the node stores again and shuts down cleanly.
        node = NodeProcess(checkpoint, store, "describe_rate_hz:=0.0", "diagnostics_rate_hz:=0.0")
        wait_for(lambda: len(node.acked_ids()) >= 2 or not node.alive(), 120, what="episodes after the last restart")
        assert node.stop() == 0, node.output()[-4000:]
        acked.update(acks(node))
        pub.finish(signal.SIGINT)
        total = check_store(store, checkpoint, acked)
    finally:
        _stop_all(pub, node)
    record(profile, "kills_survived", kills)
    record(profile, "kills_during_startup", startup_kills)
    record(profile, "kill_episodes_acknowledged", len(acked))
    record(profile, "kill_episodes_lost", 0)
    record(profile, "kill_episodes_in_store", total)
    assert kills == profile.kills and len(acked) > 0


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({r.stderr.strip() or r.returncode}); "
                    "the rlimit variant injects the same write failure")


@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_full_disk_is_a_logged_error_and_nothing_is_corrupted(how, checkpoint, tmp_path):
    """Writes start failing mid-run (a full tmpfs, or RLIMIT_FSIZE lowered on the running node):
    each lost episode is a clear logged error, the node keeps running and answering, stores again
    once space returns, and the store holds exactly the acknowledged episodes, uncorrupted."""
    base = tmp_path / "fs"
    if how == "tmpfs":
        _mount_tmpfs(base, "320k")
    else:
        base.mkdir()
    store = base / "store"
    node = h = pub = None
    try:
        node = NodeProcess(checkpoint, store, "describe_rate_hz:=0.0", "diagnostics_rate_hz:=5.0")
        h = Harness()
        h.wait_connected(node)
        pub = Publisher("disk", image_hz=10, text_hz=10, width=320, height=240)
        pub.wait_ready(h)
        h.wait(lambda: len(node.acked_ids()) >= 3, 60, "first episodes")
        proc = psutil.Process(node.proc.pid)
        if how == "rlimit":
            _, hard = proc.rlimit(psutil.RLIMIT_FSIZE)
            limit = max(p.stat().st_size for p in store.iterdir()) + 48 * 1024
            proc.rlimit(psutil.RLIMIT_FSIZE, (limit, hard))

        def failed() -> bool:
            assert node.alive(), node.output()[-4000:]
            return "episode not stored" in node.output()
        h.wait(failed, 120, "a failed write")
        errors = [line for line in node.lines if "episode not stored" in line]
        assert "[ERROR]" in errors[0] and "nothing from this call was stored" in errors[0], errors[0]
        h.wait(lambda: stat(h, "store_errors") >= 1, 30, "store_errors in diagnostics")
        resp = h.ask("red cube", k=3)  # still answering while the disk is full
        assert resp.success and resp.episodes, resp.message
        # Space comes back: the same process stores again.
        if how == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=64m", str(base)], check=True)
        else:
            proc.rlimit(psutil.RLIMIT_FSIZE, (hard, hard))
        n = len(node.acked_ids())
        h.wait(lambda: len(node.acked_ids()) >= n + 3, 60, "episodes after space came back")
        assert pub.finish(signal.SIGINT) == 0
        assert node.stop() == 0, node.output()[-4000:]
        acked = acks(node)
        n_errors = sum("episode not stored" in line for line in node.lines)
        count = check_store(store, checkpoint, acked)
        assert count == len(acked)  # nothing that failed was stored, nothing acknowledged was lost
        print(f"[reliability] full disk ({how}): {n_errors} failed writes logged, {count} episodes kept; "
              f"first error: {errors[0][-200:]}")
    finally:
        _stop_all(pub, node, h)
        if how == "tmpfs":
            subprocess.run(["umount", "-l", str(base)], capture_output=True)


def test_publisher_that_vanishes_and_comes_back(checkpoint, tmp_path):
    """SIGKILL the camera/caption process mid-stream, start another: the node keeps processing."""
    node = h = a = b = None
    try:
        # Right after the kill, the node was seen (twice in full CI runs, never with this test
        # alone) to get no frame of the new camera for over a second while its captions came
        # through: a 1 s pairing tolerance then rightly refuses those captions. This
        # test is about surviving a vanished publisher, so it pairs within 5 s, as the fuzz test
        # does; the load test keeps 1 s.
        node = NodeProcess(checkpoint, tmp_path / "store", "describe_rate_hz:=0.0", "diagnostics_rate_hz:=5.0",
                           "pair_tolerance_s:=5.0")
        h = Harness()
        h.wait_connected(node)
        a = Publisher("vanish-a", image_hz=30, text_hz=5, width=640, height=480)
        a.wait_ready(h)
        h.wait(lambda: len(node.acked_ids()) >= 3, 60, "episodes from the first publisher")
        assert a.finish(signal.SIGKILL) == -signal.SIGKILL
        h.wait(lambda: stat(h, "frames_received") > 0, 30, "diagnostics")
        frames_before = stat(h, "frames_received")
        b = Publisher("vanish-b", image_hz=30, text_hz=5, width=640, height=480, duration_s=6,
                      text_on_signal=True)
        b.wait_ready(h)
        b.start_captions(h, frames_before)  # the node has found the new camera: b's captions can pair
        assert b.finish() == 0
        captions_b = b.captions()
        assert captions_b
        _wait_acked(h, node, captions_b)
        assert node.alive()
        assert node.stop() == 0
        stored = list(acks(node).values())
    finally:
        _stop_all(a, b, node, h)
    sent_a = set(a.captions())
    from_a = [c for c in stored if c.startswith("vanish-a ")]
    assert len(from_a) >= 3 and len(set(from_a)) == len(from_a)
    # What a printed it sent is a's; at most the one caption it published but was killed before printing.
    assert len(set(from_a) - {c[:80] for c in sent_a}) <= 1
    assert Counter(c for c in stored if not c.startswith("vanish-a ")) == Counter(c[:80] for c in captions_b)


# ====================================================================== hostile input
_REL = dict(reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)


@pytest.fixture(scope="module", params=["image", "compressed"])
def fuzz_world(request, checkpoint, tmp_path_factory):
    """One node per image transport, started under umask 0 (its files must still be owner-only)."""
    kind = request.param
    store = tmp_path_factory.mktemp(f"fuzz_{kind}") / "store"
    old = os.umask(0)
    try:
        # Captions and frames travel on different topics, so under CPU contention a caption can
        # overtake the frame published just before it (behind a backlog of large hostile images);
        # a 5 s pairing tolerance keeps this test about hostile input (the load test keeps 1 s).
        node = NodeProcess(checkpoint, store, "describe_rate_hz:=0.0", "diagnostics_rate_hz:=10.0",
                           "qos_depth:=100", "pair_tolerance_s:=5.0",
                           f"use_compressed:={'true' if kind == 'compressed' else 'false'}")
    finally:
        os.umask(old)
    h = Harness()
    world = {"kind": kind, "node": node, "h": h, "store": store, "cases": 0, "n": 0}
    try:
        image_type, topic = (CompressedImage, "image/compressed") if kind == "compressed" else (Image, "image")
        world["image_pub"] = h.node.create_publisher(image_type, topic, QoSProfile(depth=200, **_REL))
        world["text_pub"] = h.node.create_publisher(String, "text", QoSProfile(depth=200, **_REL))
        h.wait(lambda: world["image_pub"].get_subscription_count() > 0 and h.query.service_is_ready()
               and world["text_pub"].get_subscription_count() > 0 or not node.alive(), 60, "the fuzz node")
        assert node.alive(), node.output()
        yield world
    finally:
        _stop_all(node, h)


def _valid_frame(kind: str, seed: int):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    if kind == "compressed":
        from bitmar_ros.image_conversion import rgb8_to_compressed
        return rgb8_to_compressed(rgb, "jpeg")
    from bitmar_ros.image_conversion import rgb8_to_image
    return rgb8_to_image(rgb)


def _wire(msg):
    """The message exactly as the node receives it (e.g. strings end at a NUL on the wire)."""
    return deserialize_message(serialize_message(msg), type(msg))


def _frame_reason(kind: str, msg) -> str | None:
    """Why the node must reject ``msg`` (the converter's message), or None if it must accept it."""
    try:
        (compressed_to_rgb8 if kind == "compressed" else image_to_rgb8)(_wire(msg))
    except ImageConversionError as exc:
        return str(exc)
    return None


def _text_reason(text: str) -> str | None:
    text = _wire(String(data=text)).data
    n = len(text.encode("utf-8", errors="surrogatepass"))
    if not text.strip():
        return "empty caption (expected non-blank text)"
    if n > _DEFAULTS["max_text_bytes"]:
        return f"caption of {n} bytes exceeds max_text_bytes={_DEFAULTS['max_text_bytes']}"
    return None


def _bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, max(0, n), dtype=np.uint8).tobytes()


_BAD_ENCODINGS = ["", "yuv422", "bayer_rggb8", "RGB8", "rgb8 ", "16SC1", "64FC1", "rgb16", "jpeg", "nv21"]


@st.composite
def hostile_image(draw) -> Image:
    """sensor_msgs/Image: random fields, or near-valid ones (off-by-a-few step, data length, flags)."""
    seed = draw(st.integers(0, 2**32 - 1))
    if draw(st.integers(0, 3)) == 0:  # anything the wire can carry
        msg = Image(height=draw(st.integers(0, 2**32 - 1) | st.integers(0, 64)),
                    width=draw(st.integers(0, 2**32 - 1) | st.integers(0, 64)),
                    encoding=draw(st.sampled_from(_BAD_ENCODINGS + list(ENCODINGS)) | st.text(max_size=16)),
                    is_bigendian=draw(st.integers(0, 255)),
                    step=draw(st.integers(0, 2**32 - 1) | st.integers(0, 512)))
        msg.data = array.array("B", draw(st.binary(max_size=2048)))
        return msg
    encoding = draw(st.sampled_from(list(ENCODINGS)))
    dtype, channels = ENCODINGS[encoding]
    bpp = dtype.itemsize * channels
    if draw(st.booleans()):
        height, width = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    else:  # a long thin image, sometimes over the 8192-pixel side limit
        long_side = draw(st.integers(1, 9000))
        short = draw(st.integers(1, max(1, min(64, 400_000 // (long_side * bpp)))))
        height, width = (long_side, short) if draw(st.booleans()) else (short, long_side)
    step = width * bpp + draw(st.sampled_from([0, 0, 0, 1, 2, 3, 8, -1, -2]))
    n = max(0, step) * height + draw(st.sampled_from([0, 0, 0, 1, 7, -1, -3, -step]))
    msg = Image(height=height, width=width, encoding=encoding, step=max(0, step),
                is_bigendian=draw(st.sampled_from([0, 0, 1, 2, 255])))
    msg.data = array.array("B", _bytes(n, seed))
    return msg


def _encoded(rgb: np.ndarray, fmt: str) -> bytes:
    import cv2
    ok, buf = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", rgb)
    assert ok
    return buf.tobytes()


@st.composite
def hostile_compressed(draw) -> CompressedImage:
    """sensor_msgs/CompressedImage: random bytes, valid/truncated/bit-flipped JPEG and PNG, headers
    claiming huge sizes, odd format strings."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    fmt = draw(st.sampled_from(["jpeg", "png", "rgb8; jpeg compressed bgr8", "16UC1; compressedDepth png", "",
                                "bmp"]) | st.text(max_size=20))
    kind = draw(st.sampled_from(["random", "valid", "truncated", "flipped", "huge_png", "huge_jpeg", "empty"]))
    rgb = rng.integers(0, 256, (draw(st.integers(1, 48)), draw(st.integers(1, 48)), 3), dtype=np.uint8)
    enc = draw(st.sampled_from(["jpeg", "png"]))
    if kind == "random":
        data = draw(st.binary(max_size=4096))
    elif kind == "empty":
        data = b""
    elif kind == "valid":
        data = _encoded(rgb, enc)
    elif kind == "truncated":
        full = _encoded(rgb, enc)
        data = full[: draw(st.integers(0, len(full) - 1))]
    elif kind == "flipped":
        buf = bytearray(_encoded(rgb, enc))
        for i in rng.integers(0, len(buf), draw(st.integers(1, 16))):
            buf[i] = int(rng.integers(0, 256))
        data = bytes(buf)
    elif kind == "huge_png":  # IHDR claims a size; the body is a tiny image (a decompression-bomb header)
        buf = bytearray(_encoded(rgb, "png"))
        buf[16:20] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
        buf[20:24] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
        data = bytes(buf)
    else:  # huge_jpeg: patch the SOF0 dimensions
        buf = bytearray(_encoded(rgb, "jpeg"))
        i = buf.find(b"\xff\xc0")
        if i > 0:
            buf[i + 5:i + 7] = draw(st.integers(0, 65535)).to_bytes(2, "big")
            buf[i + 7:i + 9] = draw(st.integers(0, 65535)).to_bytes(2, "big")
        data = bytes(buf)
    msg = CompressedImage(format=fmt)
    msg.data = array.array("B", data)
    return msg


TEXTS = st.one_of(
    st.just(""),
    st.text(max_size=200),                                              # any Unicode (no surrogates)
    st.text(st.characters(max_codepoint=31), max_size=50),              # control characters (NUL included)
    st.text(st.sampled_from(" \t\n\r\x0b\x0c\u00a0\u2003\u3000"), min_size=1, max_size=20),  # blanks
    st.sampled_from(["猫が机の上の赤い立方体を見ている", "Робот видит красный куб", "الروبوت يرى مكعبًا أحمر",
                     "रोबोट लाल घन देखता है", "🤖🟥🔵 ∑∫≠", "\u202eevil\u202c \u200b\ufeff", "a\x00hidden tail"]),
    st.integers(4090, 4100).map(lambda n: "é" * (n // 2) + "x" * (n % 2)),  # around max_text_bytes
    st.just("x" * 2**20),                                                # 1 MB
)


@st.composite
def query_request(draw, kind: str) -> QueryMemory.Request:
    req = QueryMemory.Request(
        text=draw(TEXTS | st.integers(1995, 2005).map(lambda n: "q" * n)),
        k=draw(st.integers(0, 2**32 - 1) | st.integers(0, 60)),
        generate_answer=draw(st.booleans()))
    for field in ("start", "end"):
        if draw(st.booleans()):
            setattr(req, field, Time(sec=draw(st.integers(-2**31, 2**31 - 1)), nanosec=draw(st.integers(0, 2**32 - 1))))
    if draw(st.booleans()):
        req.image = draw(hostile_image())
    return req


def _actions(kind: str):
    image = hostile_compressed() if kind == "compressed" else hostile_image()
    return st.lists(st.one_of(st.tuples(st.just("image"), image), st.tuples(st.just("image"), image),
                              st.tuples(st.just("text"), TEXTS), st.tuples(st.just("query"), query_request(kind)),
                              st.tuples(st.just("save"), st.none())), min_size=1, max_size=6)


def _check_query_response(req: QueryMemory.Request, resp) -> None:
    assert resp is not None
    if not 1 <= req.k <= _DEFAULTS["max_query_k"]:
        assert not resp.success and "k must be in" in resp.message
    elif len(_wire(req).text) > _DEFAULTS["max_query_chars"]:
        assert not resp.success and "max_query_chars" in resp.message
    if resp.success:
        assert len(resp.episodes) <= req.k
    else:
        assert resp.message and not resp.episodes


def _send_batch(world: dict, batch: list) -> None:
    """Send hostile inputs, each text right after a valid frame (so it has one to pair with), then a
    unique valid caption; wait until the node's counters show every input handled as predicted."""
    h, node, kind = world["h"], world["node"], world["kind"]
    expect = world.setdefault("expect", Counter())
    reasons = world.setdefault("reasons", {})  # "what:reason" -> first index, in order of first sight
    world["n"] += 1

    def frame(msg) -> None:
        why = _frame_reason(kind, msg)
        if why is None:
            expect["frames_received"] += 1
        else:
            expect["frame_rejected"] += 1
            reasons.setdefault(f"frame:{why}", len(reasons))
        world["image_pub"].publish(msg)

    def text(s: str) -> None:
        frame(_valid_frame(kind, world["n"]))
        why = _text_reason(s)
        if why is None:
            expect["text_received"] += 1
            expect["episodes"] += 1
        else:
            expect["text_rejected"] += 1
            reasons.setdefault(f"text:{why}", len(reasons))
        world["text_pub"].publish(String(data=s))

    for what, value in batch:
        world["cases"] += 1
        if what == "image":
            frame(value)
        elif what == "text":
            text(value)
        elif what == "query":
            _check_query_response(value, h.call(h.query, value, timeout_s=120))
        else:
            resp = h.call(h.save, Trigger.Request(), timeout_s=60)
            assert resp.success, resp.message
    check = f"fuzz check {world['kind']} {world['n']}"
    text(check)

    def handled() -> bool:
        if not node.alive():
            raise AssertionError(f"node died:\n{node.output()[-6000:]}")
        return (all(stat(h, k) == v for k, v in expect.items() if k != "episodes")
                and check in acks(node).values())
    try:
        h.wait(handled, 120, f"the node to handle batch {world['n']}")
    except TimeoutError:
        seen = {k: stat(h, k) for k in expect if k != "episodes"} | {"episodes": len(acks(node))}
        raise AssertionError(f"batch {world['n']} not handled as predicted: expected {dict(expect)}, "
                             f"node {seen}, check caption acknowledged: {check in acks(node).values()}\n"
                             + "\n".join(node.lines[-30:])) from None
    del h.diagnostics[:-20]
    assert len(acks(node)) == expect["episodes"], "a valid caption between hostile inputs was not stored"


def _check_rejections_logged_once(world: dict) -> None:
    """Each distinct rejection reason is logged once (clipped to MAX_REASON_BYTES, as the node keeps
    it); the node keeps at most 1000 distinct reasons."""
    from bitmar_ros.node import MAX_REASON_BYTES, clip

    lines = Counter(line.split("]: rejected ", 1)[1] for line in world["node"].lines
                    if "]: rejected frame: " in line or "]: rejected text: " in line)
    assert max(lines.values(), default=1) == 1, lines.most_common(3)
    for key, first in world["reasons"].items():
        what, reason = key.split(":", 1)
        if first < 950:  # well under the cap, whatever the exact interleaving of topics
            logged = f"{what}: {clip(reason, MAX_REASON_BYTES)}"
            assert lines[logged] == 1, f"rejection not logged: {logged}"


def test_identical_bad_inputs_are_logged_once_and_counted(fuzz_world):
    h, node, kind = fuzz_world["h"], fuzz_world["node"], fuzz_world["kind"]
    n = 150
    tag = uuid.uuid4().hex[:8]
    if kind == "compressed":
        bad = CompressedImage(format=f"bogus-{tag}")
        bad.data = array.array("B", b"\x00garbage" * 4)
    else:
        bad = Image(height=4, width=4, encoding=f"bogus-{tag}", step=12)
        bad.data = array.array("B", bytes(48))
    long_text = "y" * (_DEFAULTS["max_text_bytes"] + 1 + int(tag[:2], 16))
    f0, t0 = stat(h, "frame_rejected"), stat(h, "text_rejected")
    for i in range(n):
        fuzz_world["image_pub"].publish(bad)
        fuzz_world["text_pub"].publish(String(data=long_text))
        if i % 50 == 49:  # stay within the publishers' history
            h.wait(lambda: stat(h, "frame_rejected") >= f0 + i + 1 and stat(h, "text_rejected") >= t0 + i + 1,
                   60, "rejections counted")
    h.wait(lambda: stat(h, "frame_rejected") >= f0 + n and stat(h, "text_rejected") >= t0 + n, 60,
           "rejections counted")
    assert stat(h, "frame_rejected") == f0 + n and stat(h, "text_rejected") == t0 + n
    assert node.alive()
    frame_lines = [line for line in node.lines if "rejected frame" in line and tag in line]
    text_lines = [line for line in node.lines if f"caption of {len(long_text)} bytes" in line]
    assert len(frame_lines) == 1 and len(text_lines) == 1, (frame_lines, text_lines)
    assert "[WARN]" in frame_lines[0] and ("encoding" in frame_lines[0] or "decode" in frame_lines[0])
    fuzz_world.setdefault("expect", Counter())  # the fuzz test's counters start from here
    for key in ("frames_received", "frame_rejected", "text_received", "text_rejected"):
        fuzz_world["expect"][key] = stat(h, key)
    fuzz_world["expect"]["episodes"] = len(acks(node))


def _fuzz(profile: Profile, fuzz_world: dict) -> None:
    node = fuzz_world["node"]

    @settings(max_examples=profile.fuzz_examples, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure may have hurt the node
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        _send_batch(fuzz_world, data.draw(_actions(fuzz_world["kind"]), label="batch"))
        rss.append(rss_mb(node))

    rss: list[float] = []
    cases0 = fuzz_world["cases"]
    run()
    _check_rejections_logged_once(fuzz_world)
    warm = rss[min(len(rss) - 1, 10)]
    label = f"fuzz_{fuzz_world['kind']}"
    record(profile, f"{label}_cases", fuzz_world["cases"] - cases0)
    record(profile, f"{label}_examples", len(rss))
    record(profile, f"{label}_distinct_rejections", len(fuzz_world["reasons"]))
    record(profile, f"{label}_rss_after_warmup_mb", round(warm, 1))
    record(profile, f"{label}_rss_max_mb", round(max(rss), 1))
    record(profile, f"{label}_rss_end_mb", round(rss[-1], 1))
    assert node.alive()
    # Bounded: never above the warm level by more than the largest decode buffer the converters
    # allow (a 1 KB JPEG may claim MAX_SIDE x MAX_SIDE; glibc keeps such freed buffers in its heap),
    # and in long runs no upward trend once the allocator has settled.
    budget_mb = MAX_SIDE * MAX_SIDE * 3 / 2**20 + 64
    assert max(rss) < warm + budget_mb, rss
    if len(rss) >= 200 and fuzz_world["kind"] == "image":  # (JPEG-bomb buffers make the other climb to a plateau)
        q = len(rss) // 4
        assert np.mean(rss[-q:]) < 1.10 * np.mean(rss[q:2 * q]), rss


@pytest.mark.parametrize("profile", PROFILES)
def test_hostile_messages_and_requests_never_hurt_the_node(profile, fuzz_world):
    """Hypothesis-generated images, texts and service requests against the running node: it never
    dies, memory stays bounded, each rejection is counted and logged once with its reason, and the
    valid captions in between are stored."""
    _fuzz(profile, fuzz_world)


# ====================================================================== security basics
def test_store_files_are_owner_only_even_under_umask_0(fuzz_world):
    if fuzz_world["kind"] != "image":
        pytest.skip("one store is enough")
    store = fuzz_world["store"]
    assert store.stat().st_mode & 0o777 == 0o700
    files = sorted(store.iterdir())
    assert {p.name for p in files} >= {DB_FILENAME, DB_FILENAME + "-wal", DB_FILENAME + "-shm"}
    # Thumbnails live in the database: no other file may appear, and every file is owner-only.
    assert {p.name for p in files} <= {DB_FILENAME, DB_FILENAME + "-wal", DB_FILENAME + "-shm"}
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o600, f"{p.name} is {oct(p.stat().st_mode & 0o777)}"


def test_service_inputs_are_bounded(fuzz_world):
    if fuzz_world["kind"] != "image":
        pytest.skip("the service does not depend on the camera transport")
    h, node = fuzz_world["h"], fuzz_world["node"]
    max_k, max_chars = _DEFAULTS["max_query_k"], _DEFAULTS["max_query_chars"]
    rss0 = rss_mb(node)

    def ask(**fields) -> QueryMemory.Response:
        return h.call(h.query, QueryMemory.Request(**fields), timeout_s=120)

    assert ask(text="red", k=max_k).success
    r = ask(text="red", k=max_k + 1)
    assert not r.success and f"[1, {max_k}]" in r.message
    r = ask(text="red", k=2**32 - 1)
    assert not r.success and "k must be in" in r.message
    assert ask(text="é" * max_chars, k=3, generate_answer=True).success
    r = ask(text="é" * (max_chars + 1), k=3)
    assert not r.success and "max_query_chars" in r.message
    r = ask(text="x" * 2**20, k=3)
    assert not r.success and "max_query_chars" in r.message
    r = ask(text="red", k=3, start=Time(sec=20), end=Time(sec=10))
    assert not r.success and "inverted" in r.message
    r = ask(text="red", k=3, start=Time(sec=-5))
    assert not r.success and "start_ns" in r.message
    assert ask(text="red", k=3, start=Time(sec=2**31 - 1), end=Time(sec=2**31 - 1, nanosec=2**32 - 1)).success
    big = Image(height=8193, width=1, encoding="mono8", step=1)
    big.data = array.array("B", bytes(8193))
    r = ask(text="red", k=3, image=big)
    assert not r.success and "height" in r.message
    for _ in range(20):  # the largest accepted request, repeatedly: memory does not creep
        assert ask(text="q" * max_chars, k=max_k, generate_answer=True).success
    assert node.alive()
    print(f"[reliability] RSS around bounded requests: {rss0:.1f} -> {rss_mb(node):.1f} MB")
    assert rss_mb(node) < rss0 + 100


class _Payload:
    """Unpickling this runs ``touch <marker>``: proof of execution if the marker ever appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _armed(loader: str, path: Path, marker: Path) -> None:
    """Unpickle a twin of a malicious file (its payload only touches ``marker``) and check that the
    payload ran: so the refusal below proves that nothing was unpickled."""
    import torch
    if loader == "torch":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists(), f"the {loader} twin did not run its payload: the test would prove nothing"


def _corrupt_cases(checkpoint: Path, tmp: Path) -> list[dict]:
    """Malformed checkpoints and stores: each a dict with the node's checkpoint, store dir, the
    files that must stay byte-identical, expected words in the error, and a marker that must not appear."""
    import torch

    cases = []
    good = checkpoint.read_bytes()
    rng = np.random.default_rng(7)

    def ckpt_case(name: str, data: bytes, expect: str, marker: Path | None = None) -> None:
        d = tmp / name
        d.mkdir()
        path = d / "model.safetensors"
        path.write_bytes(data)
        cases.append(dict(name=name, checkpoint=path, store=d / "store", watch=d, expect=[expect, str(path)],
                          marker=marker))

    ckpt_case("ckpt_truncated", good[: len(good) // 2], "truncated")
    garbled = bytearray(good)
    garbled[8:72] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    ckpt_case("ckpt_garbled_header", bytes(garbled), "safetensors")
    ckpt_case("ckpt_random", rng.integers(0, 256, len(good), dtype=np.uint8).tobytes(), "safetensors")

    # Pickles named .safetensors, each with a live payload (checked on a twin).
    # The second one carries an 8-byte length in front, as a safetensors header would.
    for name, prefixed in (("pickle", False), ("pickle_len_prefix", True), ("torch_save", None)):
        marker, twin_marker = tmp / f"{name}_RAN", tmp / f"{name}_twin_RAN"
        if prefixed is None:
            twin = tmp / f"{name}_twin.pt"
            torch.save({"weights": _Payload(twin_marker)}, twin)
            real = tmp / f"{name}_real.pt"
            torch.save({"weights": _Payload(marker)}, real)
            data = real.read_bytes()
            real.unlink()
            _armed("torch", twin, twin_marker)
        else:
            twin = tmp / f"{name}_twin.pkl"
            twin.write_bytes(pickle.dumps(_Payload(twin_marker), protocol=4))
            _armed("pickle", twin, twin_marker)
            data = pickle.dumps(_Payload(marker), protocol=4)
            if prefixed:
                data = len(data).to_bytes(8, "little") + data
        ckpt_case(f"ckpt_{name}", data, "cannot load checkpoint", marker)

    # Stores made for this checkpoint, then damaged.
    dim, identity = store_identity(checkpoint)
    state = {"memory": np.zeros((32, 32), np.float32), "usage": np.zeros(32, np.float32), "n_writes": np.int64(3)}

    def store_case(name: str, damage, expect: list[str]) -> None:
        d = tmp / name / "store"
        # made as the node makes its stores (with the caption synonyms of its full-text index)
        with EpisodeStore.open(d, dim, identity, synonyms=CAPTION_SYNONYM_GROUPS) as s:
            for i in range(3):
                s.add_episode(1000 + i, f"episode {i}", "caption", rng.standard_normal(dim).astype(np.float32),
                              b"\xff\xd8" + bytes(3000), state)
            s.checkpoint()
        damage(d / DB_FILENAME)
        cases.append(dict(name=name, checkpoint=checkpoint, store=d, watch=d, expect=expect + [str(d)], marker=None))

    def garble_pages(db: Path) -> None:
        data = bytearray(db.read_bytes())
        data[4096:] = rng.integers(0, 256, len(data) - 4096, dtype=np.uint8).tobytes()
        db.write_bytes(bytes(data))

    def sql(statement: str, *args):
        def damage(db: Path) -> None:
            conn = sqlite3.connect(db)
            conn.execute(statement, args)
            conn.commit()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
        return damage

    store_case("store_garbled_pages", garble_pages, ["cannot open episodic store"])
    store_case("memory_wrong_length", sql("UPDATE memory_state SET data = ? WHERE name = 'memory'", _bytes(777, 1)),
               ["memory"])
    store_case("memory_wrong_shape", sql("UPDATE memory_state SET shape = '[8, 128]' WHERE name = 'memory'"),
               ["memory"])
    nan = np.zeros((32, 32), np.float32)
    nan[3, 4] = np.nan
    nan[5, 6] = np.inf
    store_case("memory_not_finite", sql("UPDATE memory_state SET data = ? WHERE name = 'memory'", nan.tobytes()),
               ["memory", "finite"])
    return cases


def test_corrupt_files_at_startup_give_clear_errors_and_stay_untouched(checkpoint, tmp_path):
    """Truncated/garbled/pickled checkpoints and garbled stores and memory matrices: a clear error
    naming the file, a non-zero exit, no traceback, the files byte-identical, no payload run."""
    cases = _corrupt_cases(checkpoint, tmp_path)
    before = {c["name"]: sha256_files(c["watch"]) for c in cases}
    results = {}
    for start in range(0, len(cases), 5):  # five start-ups at a time on a shared machine
        procs = {}
        for c in cases[start:start + 5]:
            args = [sys.executable, str(REPO / "bin" / "bitmar_node"), "--ros-args", "-r", f"__node:={c['name']}",
                    "-p", f"checkpoint:={c['checkpoint']}", "-p", f"store_dir:={c['store']}"]
            procs[c["name"]] = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                env=child_env(), cwd=str(REPO))
        for name, p in procs.items():
            try:
                out, err = p.communicate(timeout=120)  # a node that starts instead of failing runs on
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            results[name] = (p.returncode, out, err)
    problems = []
    for c in cases:
        rc, out, err = results[c["name"]]
        after = sha256_files(c["watch"])
        unchanged = {k: v for k, v in after.items() if k in before[c["name"]]}
        if rc != 1:
            problems.append(f"{c['name']}: exit code {rc}, expected 1\n{err[-2000:]}")
        if "Traceback" in err or "[bitmar_node] error:" not in err:
            problems.append(f"{c['name']}: not a clear one-line error:\n{err[-2000:]}")
        for word in c["expect"]:
            if word not in err:
                problems.append(f"{c['name']}: error does not mention {word!r}:\n{err[-1000:]}")
        changed = sorted(k for k, v in before[c["name"]].items() if unchanged.get(k) != v)
        if changed:
            problems.append(f"{c['name']}: files changed or removed: {changed}")
        if c["marker"] is not None and c["marker"].exists():
            problems.append(f"{c['name']}: the pickle payload RAN")
        print(f"[reliability] {c['name']}: rc={rc} {err.strip().splitlines()[-1][:200] if err.strip() else ''}")
    assert not problems, "\n\n".join(problems)
