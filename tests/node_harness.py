"""Drive a BitMar node running in another OS process: publish frames and captions, collect
descriptions, episodes and diagnostics, call its services. Used by the node and reliability tests."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import ros_helpers  # noqa: F401  (ROS environment first)
from ros_helpers import REPO, child_env, wait_for

import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
from rclpy.executors import SingleThreadedExecutor
from std_msgs.msg import String
from std_srvs.srv import Trigger
from sensor_msgs.msg import Image

from bitmar_ros.msg import Description, Episode
from bitmar_ros.srv import Forget, QueryMemory

NODE_EXE = str(REPO / "bin" / "bitmar_node")
_ACK = re.compile(r"\]: episode (\d+) committed ")


def write_tiny_checkpoint(path: Path, **overrides) -> Path:
    """A small random BitMar with the real tokenizer and the EfficientNet-Lite0 feature width, so a
    node starts in seconds; behaviour tests do not need a trained model."""
    from bitmar_core.inference.checkpoint import save_checkpoint
    from bitmar_core.model.config import BitMarConfig
    from bitmar_core.model.bitmar import BitMar

    cfg = dict(d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=1, max_text_len=64,
               vision_feature_dim=1280, vision_hidden=64, n_fusion_queries=2, memory_slots=32, memory_dim=32,
               sink_tokens=4, window=60)
    cfg.update(overrides)
    torch.manual_seed(0)
    save_checkpoint(BitMar(BitMarConfig(**cfg)), path, packed=True)
    return path


def replay_bag(bag: Path, rate: float = 2.0) -> None:
    """Replay a demo-layout bag (camera on /camera/image_raw, captions on /captions) into the node's
    ``image`` and ``text`` topics with bin/bitmar_bag_replay, once the node subscribes; fails the
    test with the replayer's output if it does not exit 0."""
    replay = subprocess.run(
        [sys.executable, str(REPO / "bin" / "bitmar_bag_replay"), str(bag), "--rate", str(rate),
         "--remap", "/camera/image_raw:=/image", "/captions:=/text", "--wait-for-subscribers"],
        env=child_env(), cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stdout + replay.stderr


class ChildProcess:
    """A child OS process (ROS environment, repo on PYTHONPATH) whose output is collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=child_env(**(env or {})), cwd=str(REPO))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))


class NodeProcess(ChildProcess):
    """The node as a child process with its stdout collected line by line (acks, warnings)."""

    def __init__(self, checkpoint: Path, store_dir: Path, *params: str, name: str = "bitmar",
                 exe: str = NODE_EXE, env: dict[str, str] | None = None) -> None:
        args = [sys.executable, exe, "--ros-args", "-r", f"__node:={name}",
                "-p", f"checkpoint:={checkpoint}", "-p", f"store_dir:={store_dir}"]
        for p in params:
            args += ["-p", p]
        super().__init__(args, env=env)

    def output(self) -> str:
        return "\n".join(self.lines)

    def acked_ids(self) -> list[int]:
        return [int(m.group(1)) for line in list(self.lines) if (m := _ACK.search(line))]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 30) -> int:
        if self.alive():
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._reader.join(timeout=5)


class Harness:
    """A test-side ROS node talking to the BitMar node's topics and services."""

    def __init__(self, node_name: str = "bitmar") -> None:
        self.ctx = rclpy.context.Context()
        rclpy.init(context=self.ctx)
        self.node = rclpy.create_node("bitmar_test_harness", context=self.ctx)
        self.ex = SingleThreadedExecutor(context=self.ctx)
        self.ex.add_node(self.node)
        n = self.node
        self.image_pub = n.create_publisher(Image, "image", 10)
        self.text_pub = n.create_publisher(String, "text", 10)
        self.descriptions: list[Description] = []
        self.finals: list[str] = []
        self.episodes: list[Episode] = []
        self.diagnostics: list[DiagnosticArray] = []
        n.create_subscription(Description, "description_stream", self.descriptions.append, 1000)
        n.create_subscription(String, "description", lambda m: self.finals.append(m.data), 100)
        n.create_subscription(Episode, "episodes", self.episodes.append, 100)
        n.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        self.query = n.create_client(QueryMemory, f"/{node_name}/query_memory")
        self.save = n.create_client(Trigger, f"/{node_name}/save_memory")
        self.clear = n.create_client(Trigger, f"/{node_name}/clear_memory")
        self.forget = n.create_client(Forget, f"/{node_name}/forget")
        self.goals: list[PoseStamped] = []
        n.create_subscription(PoseStamped, f"/{node_name}/goal_pose", self.goals.append, 10)

    def spin(self) -> None:
        self.ex.spin_once(timeout_sec=0.02)

    def wait(self, predicate, timeout_s: float = 60.0, what: str = "condition") -> None:
        wait_for(predicate, timeout_s=timeout_s, what=what, spin=self.spin)

    def wait_connected(self, proc: NodeProcess | None = None, timeout_s: float = 60.0) -> None:
        def ready() -> bool:
            if proc is not None and not proc.alive():
                raise AssertionError(f"node exited early:\n{proc.output()}")
            return (self.image_pub.get_subscription_count() > 0 and self.text_pub.get_subscription_count() > 0
                    and self.query.service_is_ready())
        self.wait(ready, timeout_s, "the node's subscriptions and services")

    def call(self, client, request, timeout_s: float = 60.0):
        fut = client.call_async(request)
        self.wait(fut.done, timeout_s, f"response of {client.srv_name}")
        return fut.result()

    def ask(self, text: str = "", k: int = 3, image: Image | None = None, **fields) -> QueryMemory.Response:
        req = QueryMemory.Request(text=text, k=k, **fields)
        if image is not None:
            req.image = image
        return self.call(self.query, req)

    def latest_status(self):
        """The newest diagnostic_msgs/DiagnosticStatus received, or None."""
        for arr in reversed(self.diagnostics):
            for st in arr.status:
                return st
        return None

    def latest_stat(self, key: str) -> float | None:
        for arr in reversed(self.diagnostics):
            for st in arr.status:
                for kv in st.values:
                    if kv.key == key:
                        return float(kv.value)
        return None

    def close(self) -> None:
        self.ex.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.ctx)


def scene_frame(seed: int, size: int = 224):
    """(rgb, caption) of a generated scene."""
    from bitmar_core.data.scenes import make_scene
    rgb, scene = make_scene(seed, size=size)
    return rgb, scene.caption


def frame_message(rgb, harness: Harness, encoding: str = "rgb8") -> Image:
    from bitmar_ros.image_conversion import rgb8_to_image
    msg = rgb8_to_image(rgb, encoding=encoding, frame_id="camera")
    msg.header.stamp = harness.node.get_clock().now().to_msg()
    return msg

