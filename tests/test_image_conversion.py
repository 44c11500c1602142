"""sensor_msgs/Image ⇄ numpy: every encoding against hand-built message bytes, padding, endianness."""

import array
import struct
import zlib
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sensor_msgs.msg import CompressedImage, Image

from bitmar_ros.image_conversion import (
    ENCODINGS,
    MAX_SIDE,
    ImageConversionError,
    array_to_image,
    bytes_per_pixel,
    compressed_to_rgb8,
    image_to_array,
    image_to_rgb8,
    rgb8_to_compressed,
    rgb8_to_image,
)

# encoding -> (struct format of one channel, channels); written out again here, independently.
SPEC = {
    "rgb8": ("B", 3), "bgr8": ("B", 3), "rgba8": ("B", 4), "bgra8": ("B", 4), "mono8": ("B", 1),
    "8UC1": ("B", 1), "8UC3": ("B", 3), "8UC4": ("B", 4),
    "mono16": ("H", 1), "16UC1": ("H", 1), "32FC1": ("f", 1),
}


def _values(encoding, h, w, rng):
    fmt, c = SPEC[encoding]
    n = h * w * c
    if fmt == "B":
        return [int(v) for v in rng.integers(0, 256, n)]
    if fmt == "H":
        return [int(v) for v in rng.integers(0, 65536, n)]
    # float32-representable values, including the ones depth cameras send
    vals = [float(np.float32(v)) for v in rng.uniform(-5, 50, n)]
    vals[:3] = [float("nan"), float("inf"), 0.0][: len(vals[:3])]
    return vals


def _hand_built(encoding, h, w, pad, bigendian, rng):
    """(message bytes built with struct, step, expected values as nested lists/array)."""
    fmt, c = SPEC[encoding]
    vals = _values(encoding, h, w, rng)
    order = ">" if bigendian else "<"
    row_bytes = w * c * struct.calcsize(fmt)
    step = row_bytes + pad
    data = b""
    per_row = w * c
    for r in range(h):
        data += struct.pack(f"{order}{per_row}{fmt}", *vals[r * per_row:(r + 1) * per_row])
        data += bytes([0xAB]) * pad  # junk padding that must never show up in the pixels
    dtype = {"B": np.uint8, "H": np.uint16, "f": np.float32}[fmt]
    expected = np.array(vals, dtype=dtype).reshape((h, w) if c == 1 else (h, w, c))
    return data, step, expected


def _msg(encoding, h, w, step, data, bigendian=0, real=True):
    if real:
        msg = Image(height=h, width=w, encoding=encoding, is_bigendian=bigendian, step=step)
        msg.data = array.array("B", data)
        return msg
    return SimpleNamespace(height=h, width=w, encoding=encoding, is_bigendian=bigendian, step=step, data=data)


ALL = sorted(SPEC)
MULTIBYTE = ["mono16", "16UC1", "32FC1"]


@pytest.mark.parametrize("encoding", ALL)
@pytest.mark.parametrize("pad", [0, 1, 3, 8])
@pytest.mark.parametrize("bigendian", [0, 1])
@pytest.mark.parametrize("real", [True, False])
def test_image_to_array_equals_hand_built(encoding, pad, bigendian, real):
    rng = np.random.default_rng(zlib.crc32(f"{encoding}{pad}{bigendian}".encode()))
    h, w = 5, 7
    data, step, expected = _hand_built(encoding, h, w, pad, bigendian, rng)
    got = image_to_array(_msg(encoding, h, w, step, data, bigendian, real))
    assert got.shape == expected.shape and got.dtype == expected.dtype and got.dtype.isnative
    assert np.array_equal(got, expected, equal_nan=True)
    assert bytes_per_pixel(encoding) * w + pad == step


def test_supported_encodings_are_the_documented_ones():
    assert set(ENCODINGS) == set(SPEC)


def test_native_endian_is_zero_copy_and_padding_skipped_by_strides():
    rng = np.random.default_rng(0)
    data, step, expected = _hand_built("16UC1", 4, 6, 4, 0, rng)
    msg = _msg("16UC1", 4, 6, step, data)
    view = image_to_array(msg)
    assert np.shares_memory(view, np.frombuffer(msg.data, np.uint8))
    assert view.strides == (step, 2)
    copy = image_to_array(msg, copy=True)
    assert not np.shares_memory(copy, np.frombuffer(msg.data, np.uint8)) and np.array_equal(copy, expected)
    big_data, big_step, _ = _hand_built("16UC1", 4, 6, 4, 1, np.random.default_rng(0))
    assert np.array_equal(image_to_array(_msg("16UC1", 4, 6, big_step, big_data, 1)), expected)


def test_longer_data_than_needed_is_accepted():
    data, step, expected = _hand_built("rgb8", 2, 3, 0, 0, np.random.default_rng(1))
    assert np.array_equal(image_to_array(_msg("rgb8", 2, 3, step, data + b"extra")), expected)


@pytest.mark.parametrize("encoding", ALL)
@pytest.mark.parametrize("pad", [0, 5])
@pytest.mark.parametrize("bigendian", [False, True])
def test_round_trip_array_msg_array(encoding, pad, bigendian):
    rng = np.random.default_rng(3)
    _, _, pixels = _hand_built(encoding, 6, 9, 0, 0, rng)
    row_bytes = bytes_per_pixel(encoding) * 9
    msg = array_to_image(pixels, encoding, stamp=1_700_000_000_123_456_789, frame_id="camera",
                         step=row_bytes + pad, is_bigendian=bigendian)
    assert isinstance(msg, Image)
    assert (msg.height, msg.width, msg.step, msg.is_bigendian) == (6, 9, row_bytes + pad, int(bigendian))
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (1_700_000_000, 123_456_789)
    assert msg.header.frame_id == "camera" and len(msg.data) == (row_bytes + pad) * 6
    back = image_to_array(msg)
    assert back.dtype == pixels.dtype and np.array_equal(back, pixels, equal_nan=True)
    # and the message bytes are exactly what the hand-built layout says
    fmt, c = SPEC[encoding]
    row = bytes(msg.data[:row_bytes])
    vals = pixels.reshape(6, -1)[0].tolist()
    assert row == struct.pack(f"{'>' if bigendian else '<'}{9 * c}{fmt}", *vals)


# ---------------------------------------------------------------------- to rgb8
def _rgb8(encoding, pixels, pad=0):
    msg = array_to_image(pixels, encoding, step=bytes_per_pixel(encoding) * pixels.shape[1] + pad)
    out = image_to_rgb8(msg)
    assert out.dtype == np.uint8 and out.shape == pixels.shape[:2] + (3,)
    assert out.flags.c_contiguous and out.flags.writeable
    return out


def test_rgb8_from_colour_encodings():
    rgb = np.random.default_rng(4).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    alpha = np.full((4, 5, 1), 17, np.uint8)
    assert np.array_equal(_rgb8("rgb8", rgb, pad=2), rgb)
    assert np.array_equal(_rgb8("bgr8", np.ascontiguousarray(rgb[..., ::-1]), pad=1), rgb)
    assert np.array_equal(_rgb8("rgba8", np.concatenate([rgb, alpha], 2)), rgb)
    bgra = np.concatenate([rgb[..., 2:3], rgb[..., 1:2], rgb[..., 0:1], alpha], 2)
    assert np.array_equal(_rgb8("bgra8", bgra), rgb)
    assert np.array_equal(_rgb8("8UC3", rgb), rgb)  # type-only: copied channel for channel
    assert np.array_equal(_rgb8("8UC4", np.concatenate([rgb, alpha], 2)), rgb)


def test_rgb8_from_mono8():
    gray = np.array([[0, 1, 128], [200, 254, 255]], np.uint8)
    for enc in ("mono8", "8UC1"):
        out = _rgb8(enc, gray, pad=3)
        assert all(np.array_equal(out[..., ch], gray) for ch in range(3))


def test_rgb8_from_mono16_fixed_scale():
    v = np.array([[0, 128, 129, 257], [65535, 32767, 32768, 1000]], np.uint16)
    expected = np.array([[0, 0, 1, 1], [255, 127, 128, 4]], np.uint8)  # round(v * 255 / 65535)
    out = _rgb8("mono16", v)
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 2], expected)


def test_rgb8_from_16uc1_scaled_by_frame_max():
    v = np.array([[0, 1, 2], [3, 4, 1000]], np.uint16)
    expected = [[0, 0, 1], [1, 1, 255]]  # floor(v * 255 / 1000 + 1/2)
    assert _rgb8("16UC1", v)[..., 1].tolist() == expected
    v = np.array([[0, 1, 2]], np.uint16)
    assert _rgb8("16UC1", v)[..., 0].tolist() == [[0, 128, 255]]  # 127.5 rounds half up
    assert _rgb8("16UC1", np.zeros((2, 2), np.uint16)).max() == 0


def test_rgb8_from_32fc1_depth_with_nan():
    d = np.array([[np.nan, 0.0, 1.0, 2.0], [4.0, -1.0, np.inf, -np.inf]], np.float32)
    expected = [[0, 0, 64, 128], [255, 0, 0, 0]]  # v/4*255 = 63.75, 127.5 -> 128 (rint)
    assert _rgb8("32FC1", d, pad=4)[..., 0].tolist() == expected
    assert _rgb8("32FC1", np.full((2, 3), np.nan, np.float32)).max() == 0
    assert _rgb8("32FC1", np.full((2, 3), -2.0, np.float32)).max() == 0


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_rgb8_to_image_round_trip(encoding):
    rgb = np.random.default_rng(5).integers(0, 256, (7, 3, 3), dtype=np.uint8)
    msg = rgb8_to_image(rgb, encoding, stamp=None, frame_id="cam")
    assert msg.encoding == encoding and msg.header.frame_id == "cam"
    assert np.array_equal(image_to_rgb8(msg), rgb)
    if encoding.endswith("a8"):
        assert np.all(image_to_array(msg)[..., 3] == 255)


def test_rgb8_to_mono8_is_luma():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], np.uint8)
    msg = rgb8_to_image(rgb, "mono8")
    expected = np.rint(rgb.astype(float) @ [0.299, 0.587, 0.114]).astype(int)
    assert np.abs(image_to_array(msg).astype(int) - expected).max() <= 1


def test_stamp_from_time_message():
    from builtin_interfaces.msg import Time

    msg = rgb8_to_image(np.zeros((1, 1, 3), np.uint8), stamp=Time(sec=5, nanosec=7))
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (5, 7)


# ---------------------------------------------------------------------- bad input
def _good(**over):
    fields = dict(height=2, width=3, encoding="rgb8", is_bigendian=0, step=9, data=bytes(18))
    fields.update(over)
    return SimpleNamespace(**fields)


@pytest.mark.parametrize("over, field", [
    (dict(encoding="yuv422"), "encoding"),
    (dict(encoding=None), "encoding"),
    (dict(encoding="RGB8"), "encoding"),
    (dict(height=0), "height"),
    (dict(width=0), "width"),
    (dict(height=MAX_SIDE + 1, step=9, data=bytes(9 * (MAX_SIDE + 1))), "height"),
    (dict(width=MAX_SIDE + 1), "width"),
    (dict(height=-2), "height"),
    (dict(width=2.0), "width"),
    (dict(step=8), "step"),
    (dict(step=None), "step"),
    (dict(step=10**9), "step"),
    (dict(data=bytes(17)), "data"),
    (dict(data=None), "data"),
    (dict(data="not bytes"), "data"),
    (dict(data=np.zeros(18, np.float32)), "data"),
    (dict(data=[0] * 17 + [256]), "data"),
    (dict(data=array.array("H", [0] * 18)), "data"),
    (dict(is_bigendian=2), "is_bigendian"),
    (dict(is_bigendian="yes"), "is_bigendian"),
])
def test_bad_image_raises_naming_field(over, field):
    with pytest.raises(ImageConversionError, match=field):
        image_to_array(_good(**over))
    with pytest.raises(ImageConversionError, match=field):
        image_to_rgb8(_good(**over))


def test_data_shorter_than_step_times_height_message():
    with pytest.raises(ImageConversionError, match=r"data: expected at least step\*height = 12\*2 = 24 bytes, got 18"):
        image_to_array(_good(step=12))


def test_missing_attributes_raise_conversion_error():
    with pytest.raises(ImageConversionError, match="encoding"):
        image_to_array(object())


@pytest.mark.parametrize("kwargs, field", [
    (dict(pixels=np.zeros((2, 2, 3), np.float32), encoding="rgb8"), "pixels"),
    (dict(pixels=np.zeros((2, 2), np.uint8), encoding="rgb8"), "pixels"),
    (dict(pixels=np.zeros((2, 2, 3), np.uint8), encoding="mono8"), "pixels"),
    (dict(pixels=np.zeros((0, 2), np.uint8), encoding="mono8"), "height"),
    (dict(pixels=np.zeros((2, 2), np.uint8), encoding="nope"), "encoding"),
    (dict(pixels=np.zeros((2, 2), np.uint8), encoding="mono8", step=1), "step"),
    (dict(pixels=np.zeros((2, 2), np.uint8), encoding="mono8", stamp=-1), "stamp"),
    (dict(pixels=np.zeros((2, 2), np.uint8), encoding="mono8", stamp="now"), "stamp"),
    (dict(pixels=np.zeros((2, 2), np.uint8), encoding="mono8", frame_id=3), "frame_id"),
    (dict(pixels=[[0]], encoding="mono8"), "pixels"),
])
def test_bad_array_to_image_raises_naming_field(kwargs, field):
    with pytest.raises(ImageConversionError, match=field):
        array_to_image(**kwargs)


def test_bad_rgb8_to_image():
    with pytest.raises(ImageConversionError, match="rgb"):
        rgb8_to_image(np.zeros((2, 2, 4), np.uint8))
    with pytest.raises(ImageConversionError, match="encoding"):
        rgb8_to_image(np.zeros((2, 2, 3), np.uint8), "16UC1")


# ---------------------------------------------------------------------- compressed
def test_compressed_png_round_trip_is_exact():
    rgb = np.random.default_rng(6).integers(0, 256, (31, 17, 3), dtype=np.uint8)
    msg = rgb8_to_compressed(rgb, "png", frame_id="cam")
    assert isinstance(msg, CompressedImage) and msg.format == "rgb8; png compressed bgr8"
    assert np.array_equal(compressed_to_rgb8(msg), rgb)


def test_compressed_jpeg_round_trip_is_close():
    y, x = np.mgrid[0:48, 0:64]
    rgb = np.stack([x * 4, y * 5, np.full_like(x, 60)], axis=2).astype(np.uint8)  # smooth: JPEG-friendly
    msg = rgb8_to_compressed(rgb, "jpeg", quality=95)
    assert bytes(msg.data[:2]) == b"\xff\xd8"
    out = compressed_to_rgb8(msg)
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 2.0
    assert abs(int(out[..., 0].mean()) - int(rgb[..., 0].mean())) <= 2  # channels not swapped


def test_compressed_from_plain_bytes_and_grayscale():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    ok, png = cv2.imencode(".png", gray)
    out = compressed_to_rgb8(SimpleNamespace(format="png", data=png.tobytes()))
    assert all(np.array_equal(out[..., c], gray) for c in range(3))


def _png_header_claiming(width, height):
    ok, png = cv2.imencode(".png", np.zeros((2, 2, 3), np.uint8))
    data = bytearray(png.tobytes())
    data[16:24] = struct.pack(">II", width, height)
    return bytes(data)


def _jpeg_claiming(width, height):
    ok, jpg = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    data = bytearray(jpg.tobytes())
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("data, fmt, fragment", [
    (b"", "jpeg", "data: expected compressed image bytes, got 0"),
    (b"\x00garbage" * 50, "jpeg", "data: expected an image OpenCV can decode"),
    (b"\xff\xd8\xff\xe0broken", "jpeg", "data"),
    (_png_header_claiming(100_000, 100_000), "png", "width \\(in the compressed header\\)"),
    (_png_header_claiming(10, 0), "png", "height \\(in the compressed header\\)"),
    (_jpeg_claiming(20_000, 10), "jpeg", "width \\(in the compressed header\\)"),
    (_jpeg_claiming(10, 9_000), "jpeg", "height \\(in the compressed header\\)"),
    (bytes(10), "16UC1; compressedDepth png", "format"),
])
def test_bad_compressed_raises_naming_field(data, fmt, fragment):
    with pytest.raises(ImageConversionError, match=fragment):
        compressed_to_rgb8(SimpleNamespace(format=fmt, data=data))


def test_bad_rgb8_to_compressed():
    with pytest.raises(ImageConversionError, match="fmt"):
        rgb8_to_compressed(np.zeros((2, 2, 3), np.uint8), "gif")
    with pytest.raises(ImageConversionError, match="quality"):
        rgb8_to_compressed(np.zeros((2, 2, 3), np.uint8), "jpeg", quality=101)


# ---------------------------------------------------------------------- property
ENCODING_OR_JUNK = st.sampled_from(ALL + ["yuv422", "", "RGB8", "16SC1", "bayer_rggb8"])
DIMS = st.one_of(st.integers(-3, 12), st.sampled_from([MAX_SIDE, MAX_SIDE + 1, 2**31, 2**32 - 1]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encoding=ENCODING_OR_JUNK, height=DIMS, width=DIMS, step_delta=st.integers(-4, 9),
       step_override=st.one_of(st.none(), st.integers(-5, 2**32)), bigendian=st.sampled_from([0, 1, 2, True]),
       data_delta=st.integers(-20, 20), as_array=st.booleans())
def test_property_converts_or_raises_conversion_error(encoding, height, width, step_delta, step_override,
                                                      bigendian, data_delta, as_array):
    bpp = bytes_per_pixel(encoding) if encoding in ENCODINGS else 3
    step = max(0, width) * bpp + step_delta if step_override is None else step_override
    size = max(0, min(max(0, step) * max(0, height), 200_000) + data_delta)
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    data = array.array("B", payload) if as_array else payload
    msg = SimpleNamespace(height=height, width=width, encoding=encoding, is_bigendian=bigendian,
                          step=step, data=data)
    try:
        pixels = image_to_array(msg)
    except ImageConversionError:
        return
    channels = ENCODINGS[encoding][1]
    assert pixels.shape == ((height, width) if channels == 1 else (height, width, channels))
    assert image_to_rgb8(msg).shape == (height, width, 3)


def test_compressed_header_claiming_too_many_pixels_is_refused_before_decoding():
    """A 1 KB PNG whose IHDR claims 5000×5000 (each side within MAX_SIDE, the area not) is refused
    from its header, so OpenCV never allocates the 75 MB it claims."""
    from bitmar_ros.image_conversion import MAX_COMPRESSED_PIXELS

    ok, png = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))
    data = bytearray(png.tobytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", 5000, 5000)
    assert 5000 * 5000 > MAX_COMPRESSED_PIXELS
    with pytest.raises(ImageConversionError, match="claims 5000x5000"):
        compressed_to_rgb8(CompressedImage(format="png", data=bytes(data)))
