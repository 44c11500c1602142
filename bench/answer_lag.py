"""Benchmark 9: how late the node's camera callbacks run while memory-query answers are being
generated, for the node before issue 12 (answers decoded on the executor thread) and the node now
(answers on the query thread), in the same run with the same load.

    .venv/bin/python -m bench.answer_lag [--seconds 12] [--before-rev f3fb74f] [--checkpoint PATH] [--write]

Two models: the checkpoint (whose answers may end after a few tokens), and a random init of the
deployed architecture, which rarely emits end-of-text and so decodes all 256 tokens of each answer.
Each node runs in its own OS process with describe_rate_hz 0 and answer_max_new_tokens 256. This
process publishes 320×240 frames at 30 Hz and keeps one generate_answer query in flight the whole
time; the figure is the node's own ``camera_callback_latency_*`` (frame received → its callback
ran) from /diagnostics at the end. The "before" node is bitmar_ros/*.py at ``--before-rev``, run
against today's bitmar_core and interfaces.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"  # DDS stays on this machine
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
os.environ.setdefault("ROS_HOME", tempfile.mkdtemp(prefix="bitmar-bench-ros-"))
os.environ.setdefault("ROS_LOG_DIR", os.path.join(os.environ["ROS_HOME"], "log"))

BEFORE_REV = "f3fb74f"  # the last node.py that decoded answers on its executor thread
SECTION_TITLE = "9. Camera callbacks while answers are generated (bench/answer_lag.py)"


def _old_node_tree(rev: str) -> Path:
    """A directory holding bitmar_ros/*.py as of ``rev`` (put before the repo on PYTHONPATH; the
    generated interfaces still resolve from the installed package through ``extend_path``)."""
    out = Path(tempfile.mkdtemp(prefix="bitmar-node-before-"))
    (out / "bitmar_ros").mkdir()
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, "bitmar_ros/"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        if name.endswith(".py"):
            text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=REPO, check=True, capture_output=True,
                                  text=True).stdout
            (out / name).write_text(text)
    return out


def measure(checkpoint: str, seconds: float, pythonpath: list[str]) -> dict[str, float]:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from bitmar_core.data.scenes import make_scene
    from bitmar_ros.image_conversion import rgb8_to_image
    from bitmar_ros.srv import QueryMemory

    store = Path(tempfile.mkdtemp(prefix="bitmar-lag-store-"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath), PYTHONUNBUFFERED="1")
    node = subprocess.Popen([sys.executable, str(REPO / "bin" / "bitmar_node"), "--ros-args", "-r", "__node:=bitmar",
                             "-p", f"checkpoint:={checkpoint}", "-p", f"store_dir:={store}",
                             "-p", "describe_rate_hz:=0.0", "-p", "answer_max_new_tokens:=256",
                             "-p", "diagnostics_rate_hz:=2.0"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx = rclpy.context.Context()
    rclpy.init(context=ctx)
    h = rclpy.create_node("bitmar_lag_bench", context=ctx)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(h)
    diags: list[dict[str, float]] = []
    h.create_subscription(DiagnosticArray, "/diagnostics",
                          lambda m: diags.append({kv.key: float(kv.value) for st in m.status for kv in st.values}), 10)
    image_pub = h.create_publisher(Image, "image", 10)
    text_pub = h.create_publisher(String, "text", 10)
    client = h.create_client(QueryMemory, "/bitmar/query_memory")
    frames = [make_scene(7_000 + i, size=240)[0] for i in range(6)]
    msgs = [rgb8_to_image(np.ascontiguousarray(np.concatenate([f, f[:, :80]], axis=1))) for f in frames]  # 320×240

    def spin_until(pred, timeout_s: float, what: str) -> None:
        end = time.monotonic() + timeout_s
        while not pred():
            if node.poll() is not None:
                raise SystemExit(f"the node exited ({node.returncode}) while waiting for {what}")
            if time.monotonic() > end:
                raise SystemExit(f"timed out waiting for {what}")
            ex.spin_once(timeout_sec=0.01)

    answers = 0
    try:
        spin_until(lambda: client.service_is_ready() and image_pub.get_subscription_count() > 0 and diags, 120,
                   "the node")
        for i, m in enumerate(msgs[:5]):  # a few episodes for the answers to read
            image_pub.publish(m)
            text_pub.publish(String(data=f"scene {i}: a red circle and a blue star"))
            spin_until(lambda i=i: diags[-1].get("episodes_caption", 0) > i, 60, f"episode {i}")
        h.create_timer(1 / 30, lambda: image_pub.publish(msgs[int(time.monotonic() * 30) % len(msgs)]))
        future = None
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if future is None or future.done():
                if future is not None:
                    answers += 1
                future = client.call_async(QueryMemory.Request(text="where is the red circle", k=3,
                                                               generate_answer=True))
            ex.spin_once(timeout_sec=0.005)
        n = len(diags)
        spin_until(lambda: len(diags) > n + 1, 10, "fresh diagnostics")
    finally:
        node.send_signal(signal.SIGINT)
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
        ex.shutdown()
        h.destroy_node()
        rclpy.try_shutdown(context=ctx)
        shutil.rmtree(store, ignore_errors=True)
    last = diags[-1]
    return {"p50": last.get("camera_callback_latency_p50_s", float("nan")),
            "p95": last.get("camera_callback_latency_p95_s", float("nan")),
            "max": last.get("camera_callback_latency_max_s", float("nan")),
            "answers": answers, "frames": last.get("frames_received", 0), "seconds": seconds}


def random_checkpoint() -> str:
    """A random init of the deployed architecture, packed (its answers run to the token limit)."""
    import torch

    from bitmar_core.inference.checkpoint import save_checkpoint
    from bitmar_core.model.bitmar import BitMar

    from .common import bitmar_config

    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp(prefix="bitmar-lag-ckpt-")) / "random.safetensors"
    save_checkpoint(BitMar(bitmar_config()).eval(), path, packed=True)
    return str(path)


def table(results: list[tuple[str, dict, dict]], rev: str) -> str:
    ms = lambda s: f"{1e3 * s:.0f}" if s == s else "n/a"  # noqa: E731
    out = [f"### {SECTION_TITLE}", "",
           "| model | node | camera callback lag p50 / p95 / max ms | answers generated | frames handled |",
           "| --- | --- | ---: | ---: | ---: |"]
    for model, before, after in results:
        for name, r in ((f"before (node.py at {rev}: answers on the executor thread)", before),
                        ("after (answers on the query thread)", after)):
            out.append(f"| {model} | {name} | {ms(r['p50'])} / {ms(r['p95'])} / {ms(r['max'])} | "
                       f"{r['answers']} in {r['seconds']:.0f} s | {r['frames']:.0f} |")
    out += ["", "- lag = the node's own figure: middleware reception of a frame → its callback ran (the last "
                "512 frames); 30 Hz 320×240 frames, one generate_answer query (256 tokens at most) always in "
                "flight, descriptions off; both nodes in the same run, one after the other"]
    return "\n".join(out)


def main_table(checkpoint: str, seconds: float = 12.0, rev: str = BEFORE_REV) -> str:
    """Both nodes, both models: the section's markdown."""
    old = _old_node_tree(rev)
    random_ckpt = random_checkpoint()
    results = []
    try:
        for model, ckpt in ((Path(checkpoint).name, checkpoint), ("random init (256-token answers)", random_ckpt)):
            results.append((model, measure(ckpt, seconds, [str(old), str(REPO)]), measure(ckpt, seconds, [str(REPO)])))
    finally:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(Path(random_ckpt).parent, ignore_errors=True)
    return table(results, rev)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.answer_lag", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--before-rev", default=BEFORE_REV)
    ap.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "bitmar_default.safetensors"))
    ap.add_argument("--write", action="store_true", help="replace this section of bench/RESULTS.md")
    a = ap.parse_args(argv)
    text = main_table(a.checkpoint, a.seconds, a.before_rev)
    print(text)
    if a.write:
        from .retrieval import replace_section
        replace_section(SECTION_TITLE, text + "\n\n- run: " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                        + ", `python -m bench.answer_lag " + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
