"""Benchmark 5: the node end to end on a replayed bag (30 Hz 640×480 camera, 5 Hz captions,
descriptions at 1 Hz): frame-to-first-token and frame-to-final latency p50/p95, input rate handled
without backlog, process RSS. Baseline, measured in the same run: the same model called directly
(no ROS, no queues) on the same frames, so the table shows what the node adds.

    .venv/bin/python -m bench.node_e2e [--seconds 30] [--checkpoint PATH]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"  # DDS stays on this machine
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
os.environ.setdefault("ROS_HOME", tempfile.mkdtemp(prefix="bitmar-bench-ros-"))
os.environ.setdefault("ROS_LOG_DIR", os.path.join(os.environ["ROS_HOME"], "log"))


def _pct(values, q):
    return float(np.percentile(values, q)) if len(values) else float("nan")


def baseline_latencies(checkpoint: str, frames: list[np.ndarray], max_new_tokens: int) -> dict[str, float]:
    """The model alone, in this process: frame → first token and → final, per frame."""
    from bitmar_core.inference.runtime import BitMarRuntime

    rt = BitMarRuntime.from_checkpoint(checkpoint, num_threads=1)
    first, final = [], []
    for rgb in frames:
        t0 = time.perf_counter()
        code = rt.embed_frame(rgb)
        t_first = None
        for _ in rt.describe(code, max_new_tokens=max_new_tokens):
            if t_first is None:
                t_first = time.perf_counter()
        t1 = time.perf_counter()
        first.append((t_first or t1) - t0)
        final.append(t1 - t0)
    return {"first_p50": _pct(first, 50), "first_p95": _pct(first, 95), "final_p50": _pct(final, 50),
            "final_p95": _pct(final, 95)}


def run(seconds: float, checkpoint: str, max_new_tokens: int = 24) -> dict:
    import psutil
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor

    from bitmar_ros.bag_tools import demo_scenes, make_demo_bag

    tmp = Path(tempfile.mkdtemp(prefix="bitmar-bench-"))
    fps, caption_hz = 30.0, 5.0
    per_scene = int(fps / caption_hz)
    n_scenes = int(seconds * caption_hz)
    t = time.perf_counter()
    bag = make_demo_bag(tmp / "bag", n_scenes=n_scenes, frames_per_scene=per_scene, fps=fps, width=640,
                        height=480, seed=5, photos=False, caption_delay_s=0.05)
    print(f"bag: {n_scenes * per_scene} frames 640x480 @ {fps:.0f} Hz + {n_scenes} captions @ {caption_hz:.0f} Hz "
          f"({time.perf_counter() - t:.1f} s to write)", flush=True)
    frames = [it["image"] for it in demo_scenes(min(n_scenes, 20), 5, 640, 480, photos=False)]
    base = baseline_latencies(checkpoint, frames, max_new_tokens)

    env = dict(os.environ, PYTHONPATH=str(REPO))
    node = subprocess.Popen([sys.executable, str(REPO / "bin" / "bitmar_node"), "--ros-args",
                             "-r", "__node:=bitmar", "-r", "image:=/camera/image_raw", "-r", "text:=/captions",
                             "-p", f"checkpoint:={checkpoint}", "-p", f"store_dir:={tmp / 'store'}",
                             "-p", "describe_rate_hz:=1.0", "-p", f"max_new_tokens:={max_new_tokens}",
                             "-p", "diagnostics_rate_hz:=4.0", "-p", "qos_depth:=2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rclpy.init()
    h = rclpy.create_node("bitmar_bench")
    ex = SingleThreadedExecutor()
    ex.add_node(h)
    diags: list[dict[str, float]] = []
    h.create_subscription(DiagnosticArray, "/diagnostics",
                          lambda m: diags.append({kv.key: float(kv.value) for st in m.status for kv in st.values}), 50)
    rss: list[float] = []
    stop = threading.Event()

    def sample_rss():
        p = psutil.Process(node.pid)
        while not stop.is_set():
            try:
                rss.append(p.memory_info().rss / 2**20)
            except psutil.Error:
                return
            time.sleep(0.25)

    try:
        while not diags:
            if node.poll() is not None:
                raise SystemExit("node exited during start-up")
            ex.spin_once(timeout_sec=0.1)
        threading.Thread(target=sample_rss, daemon=True).start()
        replay = subprocess.Popen([sys.executable, str(REPO / "bin" / "bitmar_bag_replay"), str(bag),
                                   "--wait-for-subscribers", "--no-clock"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t_start = time.monotonic()
        while replay.poll() is None:
            ex.spin_once(timeout_sec=0.05)
        t_replay = time.monotonic() - t_start
        end = time.monotonic() + 10
        while time.monotonic() < end and (not diags or diags[-1].get("episodes_caption", 0) < n_scenes):
            ex.spin_once(timeout_sec=0.05)
        end = time.monotonic() + 0.6
        while time.monotonic() < end:
            ex.spin_once(timeout_sec=0.05)
    finally:
        stop.set()
        node.send_signal(signal.SIGINT)
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
        ex.shutdown()
        h.destroy_node()
        rclpy.try_shutdown()
    last = diags[-1]
    warm = rss[len(rss) // 5:] or rss
    return {
        "seconds": t_replay, "frames_published": n_scenes * per_scene, "captions_published": n_scenes,
        "frames_received": last.get("frames_received", 0), "frames_rejected": last.get("frame_rejected", 0),
        "episodes": last.get("episodes_caption", 0), "descriptions": last.get("descriptions", 0),
        "text_queue_max": max(d.get("text_queue", 0) for d in diags), "text_dropped": last.get("text_dropped", 0),
        "first_p50": last.get("first_token_latency_p50_s"), "first_p95": last.get("first_token_latency_p95_s"),
        "final_p50": last.get("final_latency_p50_s"), "final_p95": last.get("final_latency_p95_s"),
        "episode_p95": last.get("episode_latency_p95_s"),
        "caption_commit_p95": last.get("caption_to_commit_latency_p95_s", float("nan")),
        "camera_cb_p95": last.get("camera_callback_latency_p95_s", float("nan")),
        "rss_max_mb": max(rss) if rss else float("nan"), "rss_growth_pct": 100 * (warm[-1] / warm[0] - 1) if warm else 0,
        "baseline": base,
    }


def table(r: dict) -> str:
    b = r["baseline"]
    ms = lambda s: f"{1e3 * s:.0f} ms" if s == s else "n/a"  # noqa: E731
    rows = [
        ("frame → first token p50 / p95", f"{ms(r['first_p50'])} / {ms(r['first_p95'])}",
         f"{ms(b['first_p50'])} / {ms(b['first_p95'])}"),
        ("frame → final description p50 / p95", f"{ms(r['final_p50'])} / {ms(r['final_p95'])}",
         f"{ms(b['final_p50'])} / {ms(b['final_p95'])}"),
        ("caption received → episode committed p95", ms(r["caption_commit_p95"]), "—"),
        ("camera frame received → its callback p95", ms(r["camera_cb_p95"]), "—"),
        ("camera frames received / published", f"{r['frames_received']:.0f} / {r['frames_published']}", "—"),
        ("captions stored as episodes / published", f"{r['episodes']:.0f} / {r['captions_published']}", "—"),
        ("caption queue max (bound 64) / dropped", f"{r['text_queue_max']:.0f} / {r['text_dropped']:.0f}", "—"),
        ("descriptions in the run", f"{r['descriptions']:.0f} in {r['seconds']:.1f} s", "—"),
        ("node RSS max / growth after warm-up", f"{r['rss_max_mb']:.0f} MB / {r['rss_growth_pct']:+.1f}%", "—"),
    ]
    out = ["| node end to end (30 Hz 640×480 + 5 Hz captions, describe 1 Hz) | node | model alone (baseline) |",
           "| --- | ---: | ---: |"]
    out += [f"| {a} | {b_} | {c} |" for a, b_, c in rows]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "bitmar_default.safetensors"))
    a = ap.parse_args(argv)
    print(table(run(a.seconds, a.checkpoint)))


if __name__ == "__main__":
    main()
