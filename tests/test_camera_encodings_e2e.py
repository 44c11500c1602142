"""End to end with raw camera encodings (issue 17): rosbag2s recorded from a YUYV webcam
(`yuv422_yuy2`, usb_cam's default) and from an industrial Bayer camera (`bayer_rggb8`) are replayed
(another OS process) into one node (a third), which must store one episode per caption, each with
a thumbnail of the scene the camera saw in the right colours.

The camera side is written here in numpy (BT.601 forward matrix with 4:2:2 chroma averaging; an RGGB
colour filter array), independently of bitmar_ros.image_conversion.
"""
from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

import ros_helpers  # noqa: F401  (ROS environment first)
from node_harness import Harness, NodeProcess, write_tiny_checkpoint
from ros_helpers import REPO, child_env

pytestmark = [pytest.mark.ros, pytest.mark.slow]

FPS = 8.0
FRAMES_PER_SCENE = 4
CAPTION_DELAY_NS = 100_000_000
START_NS = 1_700_000_000 * 10**9


def rgb_to_yuyv(rgb: np.ndarray) -> bytes:
    """YUYV 4:2:2 as a webcam sends it: BT.601 video range, one U and V per pixel pair (their mean)."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128 + 0.439 * r - 0.368 * g - 0.071 * b

    def u8(c):
        return np.clip(np.rint(c), 0, 255).astype(np.uint8)

    h, w = y.shape
    quad = np.empty((h, w // 2, 4), np.uint8)  # Y0 U Y1 V
    quad[..., 0], quad[..., 2] = u8(y[:, 0::2]), u8(y[:, 1::2])
    quad[..., 1], quad[..., 3] = u8((u[:, 0::2] + u[:, 1::2]) / 2), u8((v[:, 0::2] + v[:, 1::2]) / 2)
    return quad.tobytes()


def rgb_to_bayer_rggb(rgb: np.ndarray) -> bytes:
    """The raw mosaic behind an RGGB colour filter array: R G on even rows, G B on odd rows."""
    m = np.empty(rgb.shape[:2], np.uint8)
    m[0::2, 0::2] = rgb[0::2, 0::2, 0]
    m[0::2, 1::2] = rgb[0::2, 1::2, 1]
    m[1::2, 0::2] = rgb[1::2, 0::2, 1]
    m[1::2, 1::2] = rgb[1::2, 1::2, 2]
    return m.tobytes()


CAMERAS = {  # encoding -> (bag topic, bytes per pixel, encoder)
    "yuv422_yuy2": ("/usb_cam/image_raw", 2, rgb_to_yuyv),
    "bayer_rggb8": ("/industrial_cam/image_raw", 1, rgb_to_bayer_rggb),
}


def write_camera_bag(path, encoding: str, items: list[dict]):
    """A rosbag2 (MCAP) of one camera in ``encoding`` showing each item for FRAMES_PER_SCENE frames,
    and each caption on /captions CAPTION_DELAY_NS after its scene's first frame."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    from bitmar_ros.bag_tools import wire_bytes

    topic, bpp, encode = CAMERAS[encoding]
    store = get_typestore(Stores.ROS2_KILTED)
    Image, Header, Time, String = (store.types[t] for t in (
        "sensor_msgs/msg/Image", "std_msgs/msg/Header", "builtin_interfaces/msg/Time", "std_msgs/msg/String"))
    period_ns = round(1e9 / FPS)
    writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
    writer.open()
    try:
        cam = writer.add_connection(topic, "sensor_msgs/msg/Image", typestore=store)
        cap = writer.add_connection("/captions", "std_msgs/msg/String", typestore=store)
        for k, item in enumerate(items):
            h, w = item["image"].shape[:2]
            data = np.frombuffer(encode(item["image"]), np.uint8)
            first = START_NS + k * FRAMES_PER_SCENE * period_ns
            events = [(first + f * period_ns, 0) for f in range(FRAMES_PER_SCENE)] + [(first + CAPTION_DELAY_NS, 1)]
            for ts, kind in sorted(events):
                if kind == 0:
                    sec, nsec = divmod(ts, 10**9)
                    msg = Image(header=Header(stamp=Time(sec=sec, nanosec=nsec), frame_id="camera"),
                                height=h, width=w, encoding=encoding, is_bigendian=0, step=w * bpp, data=data)
                    writer.write(cam, ts, wire_bytes(store.serialize_cdr(msg, "sensor_msgs/msg/Image")))
                else:
                    writer.write(cap, ts, wire_bytes(store.serialize_cdr(String(data=item["caption"]),
                                                                         "std_msgs/msg/String")))
    finally:
        writer.close()
    return path


@pytest.fixture(scope="module")
def cameras(tmp_path_factory):
    """encoding -> (bag path, items): a 320x240 webcam and a 224x224 industrial camera, each showing a
    colourful photo and a generated scene."""
    from bitmar_ros.bag_tools import demo_scenes

    root = tmp_path_factory.mktemp("camera_bags")
    webcam = demo_scenes(2, 7, 320, 240, photos=True)[0:2]       # chelsea (photo), a generated scene
    industrial = demo_scenes(2, 7, 224, 224, photos=True)[3:5]   # coffee (photo), a generated scene
    return {enc: (write_camera_bag(root / enc, enc, items), items)
            for enc, items in (("yuv422_yuy2", webcam), ("bayer_rggb8", industrial))}


def _replay(bag, topic: str) -> None:
    replay = subprocess.run(
        [sys.executable, str(REPO / "bin" / "bitmar_bag_replay"), str(bag), "--rate", "1",
         "--remap", f"{topic}:=/image", "/captions:=/text", "--wait-for-subscribers"],
        env=child_env(), cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stdout + replay.stderr


def _rejected(node: NodeProcess) -> list[str]:
    return [line for line in list(node.lines) if "rejected frame" in line]


def test_yuyv_and_bayer_cameras_become_episodes(cameras, tmp_path):
    from bitmar_ros.image_conversion import compressed_to_rgb8

    ckpt = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    h = Harness()
    node = NodeProcess(ckpt, tmp_path / "store", "describe_rate_hz:=0.0")
    try:
        h.wait_connected(node)
        expected = []
        for encoding, (bag, items) in cameras.items():
            _replay(bag, CAMERAS[encoding][0])
            expected += [(encoding, it) for it in items]
            h.wait(lambda: len(h.episodes) >= len(expected) or not node.alive() or _rejected(node), 120,
                   f"one episode per caption from the {encoding} camera")
            assert node.alive(), node.output()
            assert not _rejected(node), _rejected(node)
        assert [e.caption for e in h.episodes] == [it["caption"] for _, it in expected]

        assert all(e.source == "caption" for e in h.episodes)

        # the stored thumbnails (the query service returns them) show what each camera saw
        resp = h.ask(expected[-1][1]["caption"], k=len(expected))
        assert resp.success and len(resp.episodes) == len(expected), resp.message
        thumbnails = {e.caption: e.thumbnail for e in resp.episodes}
        for encoding, item in expected:
            thumb = compressed_to_rgb8(thumbnails[item["caption"]]).astype(int)
            ref = cv2.resize(item["image"], thumb.shape[1::-1], interpolation=cv2.INTER_AREA).astype(int)
            err, swapped = np.abs(thumb - ref).mean(), np.abs(thumb - ref[..., ::-1]).mean()
            # close to the scene (JPEG, 4:2:2 chroma and demosaicing cost a few levels), and in the right
            # colour order: red and blue swapped is far off
            assert err < 10 and swapped > 2 * err, (encoding, item["source"], err, swapped)
    finally:
        node.stop()
        h.close()
