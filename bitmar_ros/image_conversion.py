"""sensor_msgs/Image and CompressedImage ⇄ numpy, done right (the PyPI cv-bridge is broken here).

Honours ``step`` (row padding) and ``is_bigendian``; message → array is zero-copy when the data
is in native byte order. Works on any object with the sensor_msgs field names (duck typing).

Conversions to the model's ``(H, W, 3)`` uint8 RGB (``image_to_rgb8``), with ROS cv_bridge's
meaning of every encoding (``toCvCopy(msg, "rgb8")``: one OpenCV conversion each):
- ``rgb8``/``rgba8`` are copied, ``bgr8``/``bgra8`` reordered; alpha is dropped.
- ``8UC3``/``8UC4`` (what OpenCV code publishes with cv_bridge's default passthrough encoding) are
  BGR/BGRA, as cv_bridge documents them: read like ``bgr8``/``bgra8``.
- ``rgb16``/``bgr16``/``rgba16``/``bgra16``: reordered as their 8-bit forms, then the fixed
  full-range scale of cv_bridge (``convertTo`` with alpha 255/65535): ``round(v * 255 / 65535)``
  = ``(v + 128) // 257``, so 65535 → 255 (no ties occur).
- ``yuv422_yuy2`` (YUYV, usb_cam's default) and ``yuv422`` (UYVY): 4:2:2 packed, 2 bytes a pixel,
  converted by OpenCV (``COLOR_YUV2RGB_YUY2`` / ``COLOR_YUV2RGB_UYVY``: BT.601, video range
  Y 16–235). Two pixels share one U and V, so the width must be even (an odd width is refused).
- ``bayer_{rggb,bggr,gbrg,grbg}{8,16}``: a one-channel mosaic, demosaiced bilinearly by OpenCV
  (``COLOR_Bayer{BG,RG,GR,GB}2RGB``, cv_bridge's codes); the 16-bit forms are demosaiced at 16 bits
  and then scaled like ``rgb16``. OpenCV cannot demosaic fewer than 3 rows or columns (it returns
  black), so such frames are refused.
- ``mono8``/``8UC1`` are repeated into three channels.
- ``mono16`` is an intensity image: fixed full-range scale ``round(v * 255 / 65535)``.
- ``16UC1`` is depth (mm by convention): scaled by the frame's own maximum,
  ``floor(v * 255 / max(v) + 1/2)``, so that near-range depth stays visible; an all-zero frame is
  black. (A fixed 65535 → 255 scale would map a 0–10 m scene to 0–39.)
- ``32FC1`` is depth (m): NaN/±inf (no return) become 0, negatives are clipped to 0, the rest
  is scaled by the largest finite value, ``rint(v * 255 / max)``; no positive value gives black.

Compressed images are decoded with ``IMREAD_IGNORE_ORIENTATION``: a JPEG's EXIF Orientation tag is
not applied (as in cv_bridge), so the model sees the frame the camera sent.
Error messages quote at most ~100 characters of a foreign string (encoding, format).
"""

from __future__ import annotations

import array

import numpy as np

MAX_SIDE = 8192  # pixels per side; larger images are refused as corrupt or hostile
# Pixels a compressed image may decode to (4096², beyond 4K video): OpenCV allocates the whole
# buffer before it finds a lying header out, so a 1 KB file claiming 8192² would cost 200 MB.
MAX_COMPRESSED_PIXELS = 4096 * 4096
MAX_STEP = MAX_SIDE * 16  # bytes per row: the widest encoding (rgba16, 8 bytes/pixel) with ample padding
MAX_COMPRESSED_BYTES = 64 * 1024 * 1024

_U8, _U16 = np.dtype(np.uint8), np.dtype(np.uint16)
# encoding -> (dtype of one channel, channels); YUV 4:2:2 is stored as 2 bytes a pixel
ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    "rgb8": (_U8, 3),
    "bgr8": (_U8, 3),
    "rgba8": (_U8, 4),
    "bgra8": (_U8, 4),
    "rgb16": (_U16, 3),
    "bgr16": (_U16, 3),
    "rgba16": (_U16, 4),
    "bgra16": (_U16, 4),
    "mono8": (_U8, 1),
    "mono16": (_U16, 1),
    "8UC1": (_U8, 1),
    "8UC3": (_U8, 3),
    "8UC4": (_U8, 4),
    "16UC1": (_U16, 1),
    "32FC1": (np.dtype(np.float32), 1),
    "yuv422": (_U8, 2),
    "yuv422_yuy2": (_U8, 2),
    **{f"bayer_{p}{bits}": (_U8 if bits == 8 else _U16, 1)
       for p in ("rggb", "bggr", "gbrg", "grbg") for bits in (8, 16)},
}
_ENCODING_LIST = ("rgb8, bgr8, rgba8, bgra8, rgb16, bgr16, rgba16, bgra16, mono8, mono16, 8UC1, 8UC3, "
                  "8UC4, 16UC1, 32FC1, yuv422, yuv422_yuy2, bayer_{rggb,bggr,gbrg,grbg}{8,16}")
# OpenCV's conversion codes, as ROS cv_bridge uses them (OpenCV 4 names, also in OpenCV 5).
_YUV422 = {"yuv422": "COLOR_YUV2RGB_UYVY", "yuv422_yuy2": "COLOR_YUV2RGB_YUY2"}
_BAYER = {"rggb": "COLOR_BayerBG2RGB", "bggr": "COLOR_BayerRG2RGB",
          "gbrg": "COLOR_BayerGR2RGB", "grbg": "COLOR_BayerGB2RGB"}
_QUOTE_CHARS = 100  # of a foreign string quoted in an error message
_FROM_RGB = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")


class ImageConversionError(ValueError):
    """A message or array cannot be converted; the message names the field and the expectation."""


def bytes_per_pixel(encoding: str) -> int:
    """Bytes of one pixel in ``encoding``."""
    dtype, channels = _encoding(encoding)
    return dtype.itemsize * channels


def image_to_array(msg, copy: bool = False) -> np.ndarray:
    """The pixels of a sensor_msgs/Image as ``(H, W)`` or ``(H, W, C)`` in native byte order
    (a Bayer mosaic is ``(H, W)``; YUV 4:2:2 is ``(H, W, 2)``, the bytes of each pixel as sent).

    Without ``copy`` the result is a view of ``msg.data`` whenever the data is native-endian
    (read-only if the buffer is); row padding is skipped through strides, not copied.
    """
    dtype, channels = _encoding(getattr(msg, "encoding", None))
    height = _dimension("height", getattr(msg, "height", None))
    width = _dimension("width", getattr(msg, "width", None))
    _check_width(msg.encoding, width)
    step = getattr(msg, "step", None)
    row_bytes = width * channels * dtype.itemsize
    if not _is_int(step) or not row_bytes <= step <= MAX_STEP:
        raise ImageConversionError(
            f"step: expected an int in [width*bytes_per_pixel = {row_bytes}, {MAX_STEP}], got {step!r}")
    bigendian = getattr(msg, "is_bigendian", None)
    if not (_is_int(bigendian) or isinstance(bigendian, bool)) or int(bigendian) not in (0, 1):
        raise ImageConversionError(f"is_bigendian: expected 0 or 1, got {bigendian!r}")
    buf = _as_bytes_array("data", getattr(msg, "data", None))
    needed = step * height
    if buf.size < needed:
        raise ImageConversionError(
            f"data: expected at least step*height = {step}*{height} = {needed} bytes, got {buf.size}")

    rows = buf[:needed].reshape(height, step)[:, :row_bytes]  # a view: padding skipped by the stride
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if bigendian else "<")
        if step % dtype.itemsize:  # rows would be misaligned for the element type
            rows = np.ascontiguousarray(rows)
    pixels = rows.view(dtype)
    shape = (height, width) if channels == 1 else (height, width, channels)
    pixels = pixels.reshape(shape)
    if not pixels.dtype.isnative:
        return pixels.astype(pixels.dtype.newbyteorder("="))
    return pixels.copy() if copy else pixels


def image_to_rgb8(msg) -> np.ndarray:
    """A fresh, writable, C-contiguous ``(H, W, 3)`` uint8 RGB array for the model (rules above)."""
    pixels = image_to_array(msg)
    encoding = msg.encoding  # valid: image_to_array checked it
    if encoding in ("rgb8", "rgba8"):
        return np.array(pixels[..., :3], order="C", copy=True)
    if encoding in ("bgr8", "bgra8", "8UC3", "8UC4"):
        return np.array(pixels[..., 2::-1], order="C", copy=True)
    if encoding in ("rgb16", "rgba16"):
        return _scale16(pixels[..., :3])
    if encoding in ("bgr16", "bgra16"):
        return _scale16(pixels[..., 2::-1])
    if encoding in _YUV422:
        import cv2

        return _contiguous(cv2.cvtColor(pixels, getattr(cv2, _YUV422[encoding])))
    if encoding.startswith("bayer_"):
        import cv2

        height, width = pixels.shape
        if height < 3 or width < 3:
            raise ImageConversionError(f"height x width: a Bayer mosaic ({encoding}) needs at least 3x3 pixels "
                                       f"to demosaic, got {height}x{width}")
        rgb = cv2.cvtColor(pixels, getattr(cv2, _BAYER[encoding[6:10]]))
        return _contiguous(rgb) if rgb.dtype == np.uint8 else _scale16(rgb)
    if encoding in ("mono8", "8UC1"):
        gray = pixels
    elif encoding == "mono16":
        gray = _scale16(pixels)
    elif encoding == "16UC1":
        peak = int(pixels.max())
        gray = np.zeros(pixels.shape, np.uint8) if peak == 0 else \
            ((pixels.astype(np.uint64) * 510 + peak) // (2 * peak)).astype(np.uint8)  # half up
    else:  # 32FC1
        depth = np.where(np.isfinite(pixels), pixels, 0.0).astype(np.float64)
        depth = np.maximum(depth, 0.0)
        peak = float(depth.max())
        gray = np.zeros(pixels.shape, np.uint8) if peak <= 0.0 else \
            np.rint(depth * (255.0 / peak)).clip(0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _scale16(pixels: np.ndarray) -> np.ndarray:
    """uint16 → uint8 as cv_bridge's ``convertTo(..., 255.0 / 65535)``: v*255/65535 = v/257, rounded
    (never a tie), C-contiguous."""
    return ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _contiguous(rgb: np.ndarray) -> np.ndarray:
    return rgb if rgb.flags.c_contiguous and rgb.flags.writeable else np.array(rgb, order="C", copy=True)


def array_to_image(pixels: np.ndarray, encoding: str, stamp=None, frame_id: str = "",
                   step: int | None = None, is_bigendian: bool = False):
    """A sensor_msgs/Image holding ``pixels`` exactly (dtype and channels must fit ``encoding``).

    ``step`` > width*bytes_per_pixel pads each row with zeros; ``stamp`` is a
    builtin_interfaces/Time, an int of nanoseconds, or None (zero).
    """
    from sensor_msgs.msg import Image

    dtype, channels = _encoding(encoding)
    expected = f"a {dtype} array of shape (H, W{', ' + str(channels) if channels > 1 else ''})"
    if not isinstance(pixels, np.ndarray) or pixels.dtype != dtype:
        raise ImageConversionError(f"pixels: expected {expected} for {encoding}, got {_describe(pixels)}")
    if channels == 1 and pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.shape[2:] != ((channels,) if channels > 1 else ()) or pixels.ndim != (3 if channels > 1 else 2):
        raise ImageConversionError(f"pixels: expected {expected} for {encoding}, got shape {pixels.shape}")
    height = _dimension("height (pixels.shape[0])", pixels.shape[0])
    width = _dimension("width (pixels.shape[1])", pixels.shape[1])
    _check_width(encoding, width)
    row_bytes = width * channels * dtype.itemsize
    step = row_bytes if step is None else step
    if not _is_int(step) or not row_bytes <= step <= MAX_STEP:
        raise ImageConversionError(f"step: expected an int in [{row_bytes}, {MAX_STEP}], got {step!r}")
    if not isinstance(is_bigendian, (bool, int)) or int(is_bigendian) not in (0, 1):
        raise ImageConversionError(f"is_bigendian: expected 0 or 1, got {is_bigendian!r}")

    body = np.ascontiguousarray(pixels, dtype=dtype.newbyteorder(">" if is_bigendian else "<"))
    rows = body.view(np.uint8).reshape(height, row_bytes)
    if step > row_bytes:
        padded = np.zeros((height, step), np.uint8)
        padded[:, :row_bytes] = rows
        rows = padded

    msg = Image()
    _fill_header(msg, stamp, frame_id)
    msg.height, msg.width, msg.encoding = height, width, encoding
    msg.is_bigendian = int(is_bigendian)
    msg.step = int(step)
    msg.data = array.array("B", rows.tobytes())  # array.array skips rclpy's per-element check
    return msg


def rgb8_to_image(rgb: np.ndarray, encoding: str = "rgb8", stamp=None, frame_id: str = ""):
    """A sensor_msgs/Image of an ``(H, W, 3)`` uint8 RGB array in rgb8/bgr8/rgba8/bgra8/mono8.

    Alpha is set to 255; mono8 is the ITU-R BT.601 luma (OpenCV's RGB2GRAY).
    """
    _check_rgb8("rgb", rgb)
    if encoding not in _FROM_RGB:
        raise ImageConversionError(f"encoding: expected one of {list(_FROM_RGB)}, got {_quote(encoding)}")
    if encoding == "rgb8":
        pixels = rgb
    elif encoding == "bgr8":
        pixels = rgb[..., ::-1]
    elif encoding == "mono8":
        import cv2

        pixels = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    else:
        order = rgb if encoding == "rgba8" else rgb[..., ::-1]
        pixels = np.concatenate([order, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    return array_to_image(np.ascontiguousarray(pixels), encoding, stamp, frame_id)


def compressed_to_rgb8(msg) -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage (JPEG, PNG, anything OpenCV reads) to ``(H, W, 3)`` uint8 RGB."""
    import cv2

    fmt = getattr(msg, "format", "")
    if isinstance(fmt, str) and "compresseddepth" in fmt.lower():
        raise ImageConversionError(f"format: compressedDepth ({_quote(fmt)}) is not supported; "
                                   "expected a plain JPEG/PNG image")
    buf = _as_bytes_array("data", getattr(msg, "data", None))
    if buf.size == 0:
        raise ImageConversionError("data: expected compressed image bytes, got 0 bytes")
    if buf.size > MAX_COMPRESSED_BYTES:
        raise ImageConversionError(f"data: expected at most {MAX_COMPRESSED_BYTES} bytes, got {buf.size}")
    size = _header_size(buf)
    if size is not None:  # refuse decompression bombs before decoding
        _dimension("width (in the compressed header)", size[0])
        _dimension("height (in the compressed header)", size[1])
        if size[0] * size[1] > MAX_COMPRESSED_PIXELS:
            raise ImageConversionError(f"data: the compressed header claims {size[0]}x{size[1]} pixels; "
                                       f"expected at most {MAX_COMPRESSED_PIXELS} pixels")
    try:
        # IGNORE_ORIENTATION: an EXIF Orientation tag is not applied (cv_bridge does not apply it either)
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as e:
        raise ImageConversionError(f"data: expected an image OpenCV can decode (format {_quote(fmt)}): "
                                   f"{str(e)[:200]}") from e
    if bgr is None or bgr.size == 0:
        raise ImageConversionError(
            f"data: expected an image OpenCV can decode (format {_quote(fmt)}), got {buf.size} undecodable bytes")
    _dimension("height", bgr.shape[0])
    _dimension("width", bgr.shape[1])
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def rgb8_to_compressed(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 90, stamp=None, frame_id: str = ""):
    """A sensor_msgs/CompressedImage of an ``(H, W, 3)`` uint8 RGB array, as image_transport writes it."""
    import cv2
    from sensor_msgs.msg import CompressedImage

    _check_rgb8("rgb", rgb)
    if fmt not in ("jpeg", "png"):
        raise ImageConversionError(f"fmt: expected 'jpeg' or 'png', got {fmt!r}")
    if not _is_int(quality) or not 1 <= quality <= 100:
        raise ImageConversionError(f"quality: expected an int in [1, 100], got {quality!r}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if fmt == "jpeg" else []
    ok, buf = cv2.imencode(".jpg" if fmt == "jpeg" else ".png",
                           cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ImageConversionError(f"rgb: OpenCV could not encode it as {fmt}")
    msg = CompressedImage()
    _fill_header(msg, stamp, frame_id)
    msg.format = f"rgb8; {fmt} compressed bgr8"
    msg.data = array.array("B", buf.tobytes())
    return msg


# ---------------------------------------------------------------------- helpers
def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _describe(x) -> str:
    return f"ndarray dtype={x.dtype} shape={x.shape}" if isinstance(x, np.ndarray) else type(x).__name__


def _encoding(encoding) -> tuple[np.dtype, int]:
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        raise ImageConversionError(f"encoding: expected one of {_ENCODING_LIST}, got {_quote(encoding)}")
    return ENCODINGS[encoding]


def _check_width(encoding: str, width: int) -> None:
    if encoding in _YUV422 and width % 2:
        raise ImageConversionError(f"width: {encoding} is YUV 4:2:2 (two pixels share one U and V); "
                                   f"expected an even width, got {width}")


def _quote(value) -> str:
    """``repr(value)``, cut to about ``_QUOTE_CHARS`` characters for a foreign string or object."""
    text = repr(value)
    if len(text) <= _QUOTE_CHARS:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
    return f"{text[:_QUOTE_CHARS]}... ({size})"


def _dimension(name: str, value) -> int:
    if not _is_int(value) or not 1 <= value <= MAX_SIDE:
        raise ImageConversionError(f"{name}: expected an int in [1, {MAX_SIDE}], got {_quote(value)}")
    return int(value)


def _check_rgb8(name: str, rgb) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageConversionError(f"{name}: expected a (H, W, 3) uint8 RGB array, got {_describe(rgb)}")
    _dimension(f"{name}.shape[0] (height)", rgb.shape[0])
    _dimension(f"{name}.shape[1] (width)", rgb.shape[1])


def _as_bytes_array(name: str, data) -> np.ndarray:
    """A 1-D uint8 view of a message's byte field (bytes, array('B'), memoryview, ndarray, list)."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise ImageConversionError(f"{name}: expected a 1-D uint8 buffer, got {_describe(data)}")
        return data
    if isinstance(data, (list, tuple)):
        try:
            return np.frombuffer(bytes(data), np.uint8)
        except (TypeError, ValueError) as e:
            raise ImageConversionError(f"{name}: expected a sequence of ints in [0, 255]: {e}") from e
    if isinstance(data, array.array) and data.typecode not in ("B", "b"):
        raise ImageConversionError(f"{name}: expected array('B'), got array({data.typecode!r})")
    try:
        view = memoryview(data)
    except TypeError:
        raise ImageConversionError(f"{name}: expected a bytes-like buffer, got {type(data).__name__}") from None
    if view.itemsize != 1:  # e.g. a memoryview of float64
        raise ImageConversionError(f"{name}: expected a byte buffer, got items of {view.itemsize} bytes")
    return np.frombuffer(view.cast("B") if view.ndim != 1 or view.format != "B" else view, np.uint8)


def _header_size(buf: np.ndarray) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or JPEG SOF header, or None if neither is found."""
    head = buf[: 64 * 1024].tobytes()
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24 and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head.startswith(b"\xff\xd8"):
        i = 2
        while i + 9 <= len(head):
            if head[i] != 0xFF:
                return None
            marker = head[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            length = int.from_bytes(head[i + 2:i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return int.from_bytes(head[i + 7:i + 9], "big"), int.from_bytes(head[i + 5:i + 7], "big")
            i += 2 + length
    return None


def _fill_header(msg, stamp, frame_id: str) -> None:
    if not isinstance(frame_id, str):
        raise ImageConversionError(f"frame_id: expected a str, got {type(frame_id).__name__}")
    msg.header.frame_id = frame_id
    if stamp is None:
        return
    if _is_int(stamp):
        if not 0 <= stamp < 2**31 * 10**9:
            raise ImageConversionError(f"stamp: expected nanoseconds in [0, 2**31 s), got {stamp}")
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp), 10**9)
    elif hasattr(stamp, "sec") and hasattr(stamp, "nanosec"):
        msg.header.stamp.sec, msg.header.stamp.nanosec = int(stamp.sec), int(stamp.nanosec)
    else:
        raise ImageConversionError(f"stamp: expected builtin_interfaces/Time, int nanoseconds or None, "
                                   f"got {type(stamp).__name__}")

