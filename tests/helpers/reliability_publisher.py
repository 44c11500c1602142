"""A camera + caption source in its own OS process, for tests/test_reliability.py.

Publishes sensor_msgs/Image (rgb8, WIDTHxHEIGHT) on ``image`` at --image-hz and std_msgs/String
captions on ``text`` at --text-hz, each caption a unique string ``<prefix> <n> ...``. It starts once
both topics have a subscriber (prints ``ready``), prints ``caption <n> <text>`` (flushed) after
publishing each caption, so the test knows exactly what was sent even if this process is killed,
and at the end (--duration-s of captions elapsed, or SIGINT/SIGTERM) waits until the captions are
acknowledged and prints ``done frames=<n> captions=<m>``. Frames are synthetic (numpy only: starts in
< 1 s).

"Ready" means this process has matched the node's subscriptions, not that the node has matched this
process's publishers: DDS discovery is two-sided, and on a loaded machine the node's image reader
was seen to match the new camera writer over a second after its text reader had matched the caption
writer. Captions sent meanwhile have no frame in the node to pair with, and the node rightly rejects
them (text_unpaired). A test that needs every caption stored passes --text-on-signal: frames flow
from the start, captions only after SIGUSR1, which the test sends once the node counts this
process's frames (tests/test_reliability.py, Publisher.start_captions).

Usage: reliability_publisher.py --prefix P [--image-hz 30] [--text-hz 5] [--width 640]
       [--height 480] [--duration-s 0 (= until signalled)] [--text-after-frames 3 | --text-on-signal]
"""
from __future__ import annotations

import argparse
import array
import signal
import sys
import time

import numpy as np
import rclpy
from rclpy.duration import Duration
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import Image
from std_msgs.msg import String

# Words for captions: varied text so that the text encoder sees different token sequences.
_WORDS = ("red cube", "blue ball", "green cone", "yellow ring", "left of", "right of", "above", "below",
          "a robot", "the table", "near", "far from")


def caption(prefix: str, n: int) -> str:
    words = " ".join(_WORDS[(n * 7 + k * 3) % len(_WORDS)] for k in range(3 + n % 4))
    return f"{prefix} {n:06d}: {words}"


def frames(width: int, height: int, count: int = 8) -> list[array.array]:
    """``count`` distinct rgb8 frames: a gradient with a square that moves from frame to frame."""
    y, x = np.mgrid[0:height, 0:width]
    out = []
    for i in range(count):
        rgb = np.empty((height, width, 3), np.uint8)
        rgb[..., 0] = (x * 255 // max(1, width - 1) + 31 * i) % 256
        rgb[..., 1] = (y * 255 // max(1, height - 1)) % 256
        rgb[..., 2] = 40 * i % 256
        s = max(1, min(width, height) // 4)
        x0 = (i * width // count) % max(1, width - s)
        rgb[height // 3: height // 3 + s, x0: x0 + s] = (255 - 30 * i, 20 * i, 200)
        out.append(array.array("B", rgb.tobytes()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--image-hz", type=float, default=30.0)
    ap.add_argument("--text-hz", type=float, default=5.0)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--duration-s", type=float, default=0.0)
    ap.add_argument("--text-after-frames", type=int, default=3)
    ap.add_argument("--text-on-signal", action="store_true", help="start captions at SIGUSR1, not after frames")
    args = ap.parse_args()

    stop = {"now": False, "go": False}

    def on_signal(signum, frame):  # finish the current loop, then wait for acks and exit
        stop["now"] = True

    def on_go(signum, frame):  # the test saw the node receive this process's frames
        stop["go"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGUSR1, on_go)

    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node(f"reliability_publisher_{args.prefix.replace('-', '_')}")
    reliable = dict(reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
    image_pub = node.create_publisher(Image, "image", QoSProfile(depth=5, **reliable))
    text_pub = node.create_publisher(String, "text", QoSProfile(depth=200, **reliable))

    deadline = time.monotonic() + 60
    while not (image_pub.get_subscription_count() and text_pub.get_subscription_count()):
        if time.monotonic() > deadline or stop["now"]:
            print("error: no subscriber on image and text within 60 s", flush=True)
            sys.exit(1)
        time.sleep(0.02)  # polling discovery; there is no waitable for "matched" in rclpy
    print("ready", flush=True)

    datas = frames(args.width, args.height)
    msg = Image(height=args.height, width=args.width, encoding="rgb8", is_bigendian=0, step=3 * args.width)
    msg.header.frame_id = "camera"
    image_dt = 1.0 / args.image_hz
    text_dt = 1.0 / args.text_hz if args.text_hz > 0 else float("inf")
    next_image, next_text, end = time.monotonic(), float("inf"), float("inf")
    n_frames = n_captions = 0

    def start_captions(now: float) -> float:
        nonlocal end
        if args.duration_s > 0:
            end = now + args.duration_s
        return now + 0.05

    while not stop["now"]:
        now = time.monotonic()
        if now >= end:
            break
        if args.text_on_signal and stop["go"] and next_text == float("inf"):
            next_text = start_captions(now)
        if now >= next_image:
            msg.header.stamp = node.get_clock().now().to_msg()
            msg.data = datas[n_frames % len(datas)]
            image_pub.publish(msg)
            n_frames += 1
            next_image += image_dt
            if now - next_image > 1.0:  # starved of CPU: do not burst to catch up
                next_image = now + image_dt
            if n_frames == args.text_after_frames and not args.text_on_signal:
                next_text = start_captions(now)
        if now >= next_text:
            n_captions += 1
            text = caption(args.prefix, n_captions)
            text_pub.publish(String(data=text))
            print(f"caption {n_captions} {text}", flush=True)
            next_text += text_dt
            if now - next_text > 1.0:
                next_text = now + text_dt
        time.sleep(max(0.0, min(next_image, next_text, end) - time.monotonic()))
    text_pub.wait_for_all_acked(Duration(seconds=20))
    print(f"done frames={n_frames} captions={n_captions}", flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


if __name__ == "__main__":
    main()
