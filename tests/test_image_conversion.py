"""sensor_msgs/Image ⇄ numpy: every encoding against hand-built message bytes, padding, endianness;
the colour conversions (16-bit, YUV 4:2:2, Bayer) against references written out here in numpy."""

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
    "rgb16": ("H", 3), "bgr16": ("H", 3), "rgba16": ("H", 4), "bgra16": ("H", 4),
    "yuv422": ("B", 2), "yuv422_yuy2": ("B", 2),
    **{f"bayer_{p}8": ("B", 1) for p in ("rggb", "bggr", "gbrg", "grbg")},
    **{f"bayer_{p}16": ("H", 1) for p in ("rggb", "bggr", "gbrg", "grbg")},
}


def _width(encoding, w):
    """YUV 4:2:2 shares U and V between two pixels: its width must be even."""
    return w + w % 2 if encoding.startswith("yuv422") else w


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
    h, w = 5, _width(encoding, 7)
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
    w = _width(encoding, 9)
    _, _, pixels = _hand_built(encoding, 6, w, 0, 0, rng)
    row_bytes = bytes_per_pixel(encoding) * w
    msg = array_to_image(pixels, encoding, stamp=1_700_000_000_123_456_789, frame_id="camera",
                         step=row_bytes + pad, is_bigendian=bigendian)
    assert isinstance(msg, Image)
    assert (msg.height, msg.width, msg.step, msg.is_bigendian) == (6, w, row_bytes + pad, int(bigendian))
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (1_700_000_000, 123_456_789)
    assert msg.header.frame_id == "camera" and len(msg.data) == (row_bytes + pad) * 6
    back = image_to_array(msg)
    assert back.dtype == pixels.dtype and np.array_equal(back, pixels, equal_nan=True)
    # and the message bytes are exactly what the hand-built layout says
    fmt, c = SPEC[encoding]
    row = bytes(msg.data[:row_bytes])
    vals = pixels.reshape(6, -1)[0].tolist()
    assert row == struct.pack(f"{'>' if bigendian else '<'}{w * c}{fmt}", *vals)


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
    # OpenCV's type-only encodings are BGR/BGRA, as cv_bridge documents them
    assert np.array_equal(_rgb8("8UC3", np.ascontiguousarray(rgb[..., ::-1]), pad=3), rgb)
    assert np.array_equal(_rgb8("8UC4", bgra), rgb)


def test_8uc3_from_opencv_is_bgr_not_a_silent_swap():
    """A blue pixel as OpenCV holds it (B, G, R bytes) published as 8UC3 must reach the model blue."""
    msg = _msg("8UC3", 1, 2, 6, bytes([255, 0, 0, 0, 0, 255]))  # blue, red in BGR byte order
    assert image_to_rgb8(msg).tolist() == [[[0, 0, 255], [255, 0, 0]]]
    msg = _msg("8UC4", 1, 1, 4, bytes([255, 0, 0, 9]))
    assert image_to_rgb8(msg).tolist() == [[[0, 0, 255]]]


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
    (dict(encoding="nv21"), "encoding"),
    (dict(encoding="yuv420"), "encoding"),
    (dict(encoding="yuv422_yuy2", width=3, step=6, data=bytes(12)), "width: yuv422_yuy2 is YUV 4:2:2"),
    (dict(encoding="yuv422", width=1, step=2, data=bytes(4)), "expected an even width, got 1"),
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
ENCODING_OR_JUNK = st.sampled_from(ALL + ["yuv420", "", "RGB8", "16SC1", "bayer_rggb12", "nv21"])
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
    if encoding.startswith("bayer_") and min(height, width) < 3:
        with pytest.raises(ImageConversionError, match="at least 3x3"):
            image_to_rgb8(msg)
        return
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


# ---------------------------------------------------------------------- cv_bridge's camera encodings
# Expected values below come from formulas written out here (numpy / fractions), never from
# image_conversion; the message bytes are built with struct or numpy byte layouts.
def _pack_rows(values, fmt, h, per_row, pad, bigendian):
    order = ">" if bigendian else "<"
    return b"".join(struct.pack(f"{order}{per_row}{fmt}", *values[r * per_row:(r + 1) * per_row]) + b"\xcd" * pad
                    for r in range(h))


def _scale_16_to_8(v):
    """cv_bridge: convertTo(CV_8U, 255.0 / 65535) = round to nearest of v * 255 / 65535 (never a tie)."""
    from fractions import Fraction
    return int(Fraction(int(v) * 255, 65535) + Fraction(1, 2))


@pytest.mark.parametrize("encoding, order, channels", [
    ("rgb16", (0, 1, 2), 3), ("bgr16", (2, 1, 0), 3), ("rgba16", (0, 1, 2), 4), ("bgra16", (2, 1, 0), 4)])
@pytest.mark.parametrize("pad", [0, 1, 6])
@pytest.mark.parametrize("bigendian", [0, 1])
def test_rgb8_from_16bit_colour_scales_as_cv_bridge(encoding, order, channels, pad, bigendian):
    rng = np.random.default_rng(zlib.crc32(f"{encoding}{pad}{bigendian}".encode()))
    h, w = 3, 5
    special = [0, 1, 128, 129, 256, 257, 385, 386, 32767, 32768, 65279, 65407, 65408, 65534, 65535]
    values = [int(v) for v in rng.integers(0, 65536, h * w * channels)]
    values[:len(special)] = special
    data = _pack_rows(values, "H", h, w * channels, pad, bigendian)
    out = image_to_rgb8(_msg(encoding, h, w, w * channels * 2 + pad, data, bigendian))
    assert out.dtype == np.uint8 and out.shape == (h, w, 3) and out.flags.c_contiguous
    for i in range(h * w):
        r, c = divmod(i, w)
        px = values[i * channels:(i + 1) * channels]
        assert out[r, c].tolist() == [_scale_16_to_8(px[order[k]]) for k in range(3)], (r, c, px)
    assert [_scale_16_to_8(v) for v in (0, 128, 129, 65535)] == [0, 0, 1, 255]


def _bt601(y, u, v):
    """BT.601 video-range YUV → RGB (the matrix of ITU-R BT.601 with Y in 16..235, U/V centred on
    128), as OpenCV (and so cv_bridge) computes it: Y - 16 is clamped at 0 before the matrix."""
    y = np.maximum(y.astype(np.float64) - 16.0, 0.0)
    u = u.astype(np.float64) - 128.0
    v = v.astype(np.float64) - 128.0
    rgb = np.stack([1.164 * y + 1.596 * v, 1.164 * y - 0.391 * u - 0.813 * v, 1.164 * y + 2.018 * u], axis=-1)
    return np.clip(np.rint(rgb), 0, 255)


def _yuv422_bytes(Y, U, V, encoding):
    """Row bytes of a 4:2:2 image: YUYV (yuv422_yuy2) is Y0 U Y1 V, UYVY (yuv422) is U Y0 V Y1."""
    h, w = Y.shape
    quad = np.zeros((h, w // 2, 4), np.uint8)
    y0, u, y1, v = (0, 1, 2, 3) if encoding == "yuv422_yuy2" else (1, 0, 3, 2)
    quad[..., y0], quad[..., u], quad[..., y1], quad[..., v] = Y[:, 0::2], U, Y[:, 1::2], V
    return quad.reshape(h, 2 * w)


@pytest.mark.parametrize("encoding", ["yuv422_yuy2", "yuv422"])
@pytest.mark.parametrize("pad", [0, 3, 8])
def test_rgb8_from_yuv422_is_bt601(encoding, pad):
    rng = np.random.default_rng(zlib.crc32(f"{encoding}{pad}".encode()))
    h, w = 6, 10
    Y = rng.integers(0, 256, (h, w), dtype=np.uint8)
    U = rng.integers(0, 256, (h, w // 2), dtype=np.uint8)
    V = rng.integers(0, 256, (h, w // 2), dtype=np.uint8)
    rows = _yuv422_bytes(Y, U, V, encoding)
    data = b"".join(row.tobytes() + b"\xee" * pad for row in rows)
    out = image_to_rgb8(_msg(encoding, h, w, 2 * w + pad, data))
    assert out.dtype == np.uint8 and out.shape == (h, w, 3) and out.flags.c_contiguous
    expected = _bt601(Y, np.repeat(U, 2, axis=1), np.repeat(V, 2, axis=1))
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1  # OpenCV works in fixed point


@pytest.mark.parametrize("encoding", ["yuv422_yuy2", "yuv422"])
def test_yuv422_from_a_known_rgb_image_comes_back(encoding):
    """Camera-side: a smooth RGB image encoded to 4:2:2 with the BT.601 forward matrix (chroma
    averaged over each pixel pair) comes back within the quantisation and subsampling error."""
    yy, xx = np.mgrid[0:16, 0:32]
    rgb = np.stack([40 + xx * 5, 60 + yy * 8, np.full_like(xx, 180)], axis=2).astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    Y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    U = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    V = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    pair = lambda c: (c[:, 0::2] + c[:, 1::2]) / 2  # noqa: E731
    as_u8 = lambda c: np.clip(np.rint(c), 0, 255).astype(np.uint8)  # noqa: E731
    rows = _yuv422_bytes(as_u8(Y), as_u8(pair(U)), as_u8(pair(V)), encoding)
    out = image_to_rgb8(_msg(encoding, 16, 32, 64, rows.tobytes()))
    diff = np.abs(out.astype(int) - rgb.astype(int))
    assert diff.max() <= 6 and diff.mean() < 2.5, (diff.max(), diff.mean())
    # and the colour order is right: red rises along x, green along y, blue stays
    assert out[0, -1, 0] > out[0, 0, 0] + 100 and out[-1, 0, 1] > out[0, 0, 1] + 100


def test_odd_width_yuv422_is_refused_clearly():
    for encoding in ("yuv422_yuy2", "yuv422"):
        with pytest.raises(ImageConversionError, match=f"width: {encoding} is YUV 4:2:2.*even width, got 7"):
            image_to_rgb8(_msg(encoding, 2, 7, 14, bytes(28)))
        with pytest.raises(ImageConversionError, match="even width"):
            array_to_image(np.zeros((2, 7, 2), np.uint8), encoding)
        assert image_to_rgb8(_msg(encoding, 2, 8, 16, bytes(32))).shape == (2, 8, 3)


PATTERNS = ["rggb", "bggr", "gbrg", "grbg"]


def _mosaic(rgb, pattern):
    """Sample an (H, W, 3) image through the colour filter array ``pattern`` (top-left 2x2, row by row)."""
    out = np.zeros(rgb.shape[:2], rgb.dtype)
    for k, letter in enumerate(pattern):
        dy, dx = divmod(k, 2)
        out[dy::2, dx::2] = rgb[dy::2, dx::2, "rgb".index(letter)]
    return out


def _bilinear_demosaic(mosaic, pattern):
    """Bilinear demosaicing: each missing colour is the mean of the same-colour samples among the 8
    neighbours (2 or 4 of them), rounded half up; the outermost rows and columns copy their inner
    neighbours (OpenCV's border rule)."""
    h, w = mosaic.shape
    m = mosaic.astype(np.float64)
    out = np.zeros((h, w, 3))
    for c, letter in enumerate("rgb"):
        mask = np.zeros((h, w), bool)
        for k, l in enumerate(pattern):
            if l == letter:
                mask[k // 2::2, k % 2::2] = True
        total, count = np.zeros((h - 2, w - 2)), np.zeros((h - 2, w - 2))
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    total += np.where(mask, m, 0)[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx]
                    count += mask[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx]
        inner = np.where(mask[1:-1, 1:-1], m[1:-1, 1:-1], np.floor(total / np.maximum(count, 1) + 0.5))
        out[..., c] = np.pad(inner, 1, mode="edge")
    return out


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("h, w", [(3, 3), (6, 8), (7, 9)])
def test_bayer_uniform_patches_are_exact(pattern, bits, h, w):
    """A uniform colour through any filter pattern demosaics to exactly that colour, at every
    pixel: this pins each pattern name to the right OpenCV code (a swap turns red into blue)."""
    for colour in [(200, 100, 30), (0, 255, 7), (255, 255, 255)]:
        if bits == 8:
            rgb, want = np.array(colour, np.uint8), list(colour)
        else:
            rgb = np.array([min(c * 257 + 3, 65535) for c in colour], np.uint16)  # scales back to c
            want = [_scale_16_to_8(v) for v in rgb]
            assert want == list(colour)
        mosaic = _mosaic(np.broadcast_to(rgb, (h, w, 3)), pattern)
        out = image_to_rgb8(array_to_image(mosaic, f"bayer_{pattern}{bits}"))
        assert out.shape == (h, w, 3) and out.dtype == np.uint8
        assert (out == np.array(want, np.uint8)).all(), (pattern, bits, colour, out[0, 0])


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("pad", [0, 5])
def test_bayer8_random_mosaic_equals_bilinear_reference(pattern, pad):
    rng = np.random.default_rng(zlib.crc32(f"{pattern}{pad}".encode()))
    h, w = 9, 12
    mosaic = rng.integers(0, 256, (h, w), dtype=np.uint8)
    data = b"".join(row.tobytes() + b"\x77" * pad for row in mosaic)
    out = image_to_rgb8(_msg(f"bayer_{pattern}8", h, w, w + pad, data))
    assert np.array_equal(out, _bilinear_demosaic(mosaic, pattern).astype(np.uint8))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("pad", [0, 1, 4])  # an odd pad misaligns the 16-bit rows
@pytest.mark.parametrize("bigendian", [0, 1])
def test_bayer16_both_endiannesses_and_padding(pattern, pad, bigendian):
    rng = np.random.default_rng(zlib.crc32(f"{pattern}{pad}{bigendian}".encode()))
    h, w = 8, 10
    mosaic = rng.integers(0, 65536, (h, w), dtype=np.uint16)
    data = _pack_rows([int(v) for v in mosaic.reshape(-1)], "H", h, w, pad, bigendian)
    out = image_to_rgb8(_msg(f"bayer_{pattern}16", h, w, 2 * w + pad, data, bigendian))
    # cv_bridge: demosaic at 16 bits, then convertTo 255/65535
    ref16 = _bilinear_demosaic(mosaic, pattern)
    expected = np.vectorize(_scale_16_to_8)(ref16.astype(np.int64))
    assert np.array_equal(out.astype(int), expected)
    # the other byte order reads different numbers: the flag is honoured, not guessed
    other = image_to_rgb8(_msg(f"bayer_{pattern}16", h, w, 2 * w + pad, data, 1 - bigendian))
    assert not np.array_equal(other, out)


def test_tiny_bayer_is_refused_not_black():
    for h, w in [(1, 1), (2, 2), (2, 8), (8, 2)]:
        with pytest.raises(ImageConversionError, match=f"at least 3x3 pixels to demosaic, got {h}x{w}"):
            image_to_rgb8(_msg("bayer_grbg8", h, w, w, bytes(range(h * w))))


# ---------------------------------------------------------------------- EXIF orientation
def _exif_app1(orientation: int, endian: str) -> bytes:
    """A JPEG APP1 segment: 'Exif\\0\\0', a TIFF header, IFD0 holding one entry, Orientation (0x0112,
    SHORT, count 1)."""
    tiff = (b"MM" if endian == ">" else b"II") + struct.pack(f"{endian}HI", 42, 8)
    ifd = struct.pack(f"{endian}H", 1) + struct.pack(f"{endian}HHIHH", 0x0112, 3, 1, orientation, 0) \
        + struct.pack(f"{endian}I", 0)
    payload = b"Exif\x00\x00" + tiff + ifd
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("endian", [">", "<"])
def test_jpeg_exif_orientation_is_not_applied(orientation, endian):
    rgb = np.zeros((16, 32, 3), np.uint8)
    rgb[:, :16] = (230, 20, 20)   # left half red
    rgb[:, 16:] = (20, 20, 230)   # right half blue
    jpeg = bytes(rgb8_to_compressed(rgb, "jpeg", quality=95).data)
    tagged = jpeg[:2] + _exif_app1(orientation, endian) + jpeg[2:]
    # the tag is effective: OpenCV's default decoding turns the frame
    plain = cv2.imdecode(np.frombuffer(tagged, np.uint8), cv2.IMREAD_COLOR)
    assert plain.shape[:2] == ((16, 32) if orientation == 3 else (32, 16))
    if orientation == 3:
        assert plain[8, 4, 0] > 150  # BGR: blue now on the left
    out = compressed_to_rgb8(CompressedImage(format="jpeg", data=tagged))
    assert out.shape == (16, 32, 3)
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 8  # JPEG; the sharp edge costs most
    assert out[8, 4, 0] > 150 and out[8, 28, 2] > 150


# ---------------------------------------------------------------------- short error messages
@pytest.mark.parametrize("encoding", ["x" * 5000, "\U000e0001" * 3000, "yuv" + "\x00" * 1000])
def test_foreign_encoding_is_quoted_briefly(encoding):
    with pytest.raises(ImageConversionError) as e:
        image_to_rgb8(_good(encoding=encoding))
    text = str(e.value)
    assert text.startswith("encoding: expected one of rgb8, ") and "bayer_{rggb,bggr,gbrg,grbg}{8,16}" in text
    assert len(text) < 400, len(text)
    assert f"({len(encoding)} characters)" in text


def test_foreign_compressed_format_is_quoted_briefly():
    with pytest.raises(ImageConversionError) as e:
        compressed_to_rgb8(SimpleNamespace(format="f" * 10_000, data=b"\x00garbage" * 50))
    assert len(str(e.value)) < 300 and "(10000 characters)" in str(e.value)
    with pytest.raises(ImageConversionError) as e:
        compressed_to_rgb8(SimpleNamespace(format="compressedDepth " * 1000, data=b"x"))
    assert len(str(e.value)) < 300


def test_every_accepted_encoding_is_named_in_the_readme():
    from pathlib import Path

    row = next(line for line in (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines() if line.startswith("| `image`"))
    expand = {"bayer_{rggb,bggr,gbrg,grbg}{8,16}": [f"bayer_{p}{b}" for p in PATTERNS for b in (8, 16)]}
    named = set()
    for pattern, names in expand.items():
        if pattern in row:
            row = row.replace(pattern, " ")
            named.update(names)
    named.update(row.replace("`", " ").replace(",", " ").replace(";", " ").split())
    assert set(ENCODINGS) <= named, sorted(set(ENCODINGS) - named)
