"""The README's main job: the node on the bundled demo bag with the bundled checkpoint.

Starts the node (its own OS process, a fresh store unless --store-dir), replays the bag into it
with original timing, prints the descriptions as they stream token by token and every stored
episode, then asks the memory-query service a few questions and prints the top episodes.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor

from bitmar_browser.cli import DEFAULT_PORT as BROWSER_PORT
from bitmar_ros.msg import Description, Episode
from bitmar_ros.node import default_checkpoint
from bitmar_ros.srv import QueryMemory

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_QUERIES = ("a red circle", "a blue square", "a cat")


def default_bag() -> Path:
    try:
        from ament_index_python.packages import get_package_share_directory
        p = Path(get_package_share_directory("bitmar_ros")) / "data" / "demo_bag"
        if p.is_dir():
            return p
    except Exception:  # not installed through ament
        pass
    return REPO_ROOT / "data" / "demo_bag"


def _exe(name: str) -> list[str]:
    local = REPO_ROOT / "bin" / name
    return [sys.executable, str(local)]


class _Listener:
    """Prints what the node publishes while the bag plays."""

    def __init__(self, node) -> None:
        self.streams: dict[int, str] = {}
        self.episodes: list[Episode] = []
        self.stats: dict[str, str] = {}
        self._open: int | None = None
        node.create_subscription(Description, "description_stream", self.on_description, 1000)
        node.create_subscription(Episode, "episodes", self.on_episode, 100)
        node.create_subscription(DiagnosticArray, "/diagnostics", self.on_diagnostics, 10)

    def on_description(self, msg: Description) -> None:
        if self._open != msg.stream_id:
            self._end_line()
            print(f"  [description {msg.stream_id}] ", end="", flush=True)
            self._open = msg.stream_id
        print(msg.text_delta, end="", flush=True)
        if msg.is_final:
            self.streams[msg.stream_id] = msg.text
            self._end_line()

    def on_episode(self, msg: Episode) -> None:
        self._end_line()
        self.episodes.append(msg)
        print(f"  [episode {msg.id} stored] {msg.caption}", flush=True)

    def on_diagnostics(self, msg: DiagnosticArray) -> None:
        for st in msg.status:
            self.stats = {kv.key: kv.value for kv in st.values}

    def _end_line(self) -> None:
        if self._open is not None:
            print(flush=True)
            self._open = None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bag", type=Path, default=None, help="rosbag2 to replay (default: the bundled demo bag)")
    ap.add_argument("--checkpoint", default=None, help="checkpoint (default: the bundled one)")
    ap.add_argument("--store-dir", type=Path, default=None, help="episodic store (default: a fresh temp dir)")
    ap.add_argument("--rate", type=float, default=1.0, help="replay rate factor")
    ap.add_argument("--describe-rate-hz", type=float, default=1.0)
    ap.add_argument("--query", action="append", default=None, help="memory query text (repeatable)")
    args = ap.parse_args(argv)

    bag = args.bag or default_bag()
    if not bag.exists():
        from bitmar_ros.bag_tools import make_demo_bag
        print(f"demo bag {bag} missing: generating it from the scene generator", flush=True)
        make_demo_bag(bag)
    checkpoint = args.checkpoint or default_checkpoint()
    store_dir = args.store_dir or Path(tempfile.mkdtemp(prefix="bitmar-demo-")) / "store"
    log_path = Path(tempfile.mkdtemp(prefix="bitmar-demo-log-")) / "node.log"
    print(f"BitMar demo\n  bag        {bag}\n  checkpoint {checkpoint}\n  store      {store_dir}\n"
          f"  node log   {log_path}\n", flush=True)
    log = open(log_path, "w")

    node_proc = subprocess.Popen(
        _exe("bitmar_node") + ["--ros-args", "-r", "__node:=bitmar", "-r", "image:=/camera/image_raw",
                               "-r", "text:=/captions", "-p", f"checkpoint:={checkpoint}",
                               "-p", f"store_dir:={store_dir}", "-p", f"describe_rate_hz:={args.describe_rate_hz}",
                               "-p", "diagnostics_rate_hz:=2.0"],
        stdout=log, stderr=subprocess.STDOUT, text=True)
    rclpy.init()
    node = rclpy.create_node("bitmar_demo")
    ex = SingleThreadedExecutor()
    ex.add_node(node)
    listener = _Listener(node)
    query = node.create_client(QueryMemory, "/bitmar/query_memory")
    rc = 0
    try:
        deadline = time.monotonic() + 120
        while not query.service_is_ready():
            if node_proc.poll() is not None:
                print(log_path.read_text(), file=sys.stderr)
                raise SystemExit(f"the node exited with code {node_proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise SystemExit("the node did not come up within 120 s")
            ex.spin_once(timeout_sec=0.1)
        print("node ready; replaying the bag\n", flush=True)
        replay = subprocess.Popen(_exe("bitmar_bag_replay") + [str(bag), "--rate", str(args.rate),
                                                                "--wait-for-subscribers"])
        while replay.poll() is None:
            ex.spin_once(timeout_sec=0.05)
        n_captions = _count_captions(bag)
        deadline = time.monotonic() + 60
        while len(listener.episodes) < n_captions and time.monotonic() < deadline:
            ex.spin_once(timeout_sec=0.05)
        end = time.monotonic() + 3  # let the last description finish streaming
        while time.monotonic() < end:
            ex.spin_once(timeout_sec=0.05)

        print(f"\n{len(listener.episodes)} episodes stored, {len(listener.streams)} descriptions streamed\n")
        for text in args.query or DEFAULT_QUERIES:
            fut = query.call_async(QueryMemory.Request(text=text, k=3, generate_answer=True))
            while not fut.done():
                ex.spin_once(timeout_sec=0.05)
            resp = fut.result()
            print(f"query {text!r}: {resp.message}")
            for e in resp.episodes:
                print(f"    #{e.id}  [{e.matched_by}: words {e.lexical_score:.2f}, model {e.embedding_score:+.3f}]  "
                      f"{e.caption}")
            print(f"    answer from memory: {resp.answer!r} (given with episodes {list(resp.answer_episode_ids)})")
        s = listener.stats
        if s:
            print("\nnode diagnostics: " + ", ".join(
                f"{k}={s[k]}" for k in ("frames_received", "episodes_caption", "descriptions",
                                        "first_token_latency_p50_s", "final_latency_p95_s", "rss_mb") if k in s))
    finally:
        node_proc.send_signal(signal.SIGINT)
        try:
            node_proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node_proc.kill()
            rc = 1
        ex.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        log.close()
    print(f"\nthe store at {store_dir} keeps the episodes; rerun with --store-dir {store_dir} to continue from them")
    print(f"browse and search it in a web page:\n  {browser_command(store_dir, checkpoint)}\n"
          f"  then open http://127.0.0.1:{BROWSER_PORT}/")
    return rc


def browser_command(store_dir: Path, checkpoint: str | None = None) -> str:
    """The command that opens the memory browser (bitmar_browser) on the demo's store, with the
    checkpoint that wrote it (the store only opens with its own model)."""
    cmd = [sys.executable, "-m", "bitmar_browser", "--store", str(store_dir)]
    if checkpoint:
        cmd += ["--checkpoint", str(checkpoint)]
    return shlex.join(cmd)


def _count_captions(bag: Path) -> int:
    sidecar = bag / "scenes.jsonl"
    if sidecar.is_file():
        return sum(1 for line in sidecar.read_text().splitlines() if line.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
