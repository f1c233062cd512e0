"""Image bytes -> upright RGB picture, or an `ImageError` whose `kind` lands in the quarantine table.

The embed stage calls `decode_image` inside a pandas UDF, one catalog image at a time, so this module is
written for that setting:

* Every failure caused by the input becomes `ImageError` with one of `ERROR_KINDS`; a single odd file must
  never kill a Spark task (a task failure retries the whole partition, then fails the job).
* Nothing here mutates global state per call (no `LOAD_TRUNCATED_IMAGES`, no `MAX_IMAGE_PIXELS` juggling,
  no `warnings.catch_warnings`, which is not thread-safe before Python 3.14), so it is safe in threads.
* The pixel budget is checked from the header, before any pixel is decoded: a 100-byte PNG can claim
  30000x30000 pixels and would otherwise allocate gigabytes on an executor.
* The format is decided by content, never by file suffix: catalogs are full of JPEGs named `.png`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

ERROR_KINDS: tuple[str, ...] = (
    "bad_uri",  # not a usable path or URI at all: a NUL byte, a malformed URL (reader)
    "forbidden",  # outside the catalog's image access policy (reader, `ImagePolicy`)
    "missing",  # the path or object does not exist (reader)
    "not_a_file",  # a folder, FIFO, socket or device, not a regular file (reader)
    "unreadable",  # it exists but cannot be read: permissions, a filesystem error (reader)
    "not_an_image",  # the bytes are not a supported image: empty, an HTML error page, text, an archive
    "too_large",  # over the byte limit (reader) or the pixel limit, judged from the header (decode)
    "decode_error",  # a recognised image that fails to decode: truncated, corrupt, an unsupported variant
    # http(s) URIs (fetcher); the first four are transient, retried within the run and on later nights
    "http_error",  # an HTTP status other than 200/304, named in the message (5xx and 429 are transient)
    "timeout",  # no connection, or no bytes, within fetch.timeout_s; or the whole body took too long
    "connection_error",  # refused, reset, a name that does not resolve
    "truncated",  # the body ended before its Content-Length
    "tls_error",  # the certificate is not trusted (see fetch.ca_bundle) or the handshake failed
    "redirect_error",  # a redirect loop, more than fetch.max_redirects, or a redirect to a non-http URI
)

# Raster formats a product catalog plausibly holds. An allow-list rather than everything Pillow knows,
# because some plugins hand the bytes to other programs (EPS runs Ghostscript) and others accept nearly
# any prefix, which would turn an HTML error page into a confusing decode_error.
# JPEG covers MPO too (multi-picture JPEGs from phones), which Pillow opens through its JPEG plugin.
# Image.init() registers every plugin now, at import, which also keeps Pillow's lazy first-use
# registration out of executor threads.
Image.init()
SUPPORTED_FORMATS: tuple[str, ...] = tuple(
    name for name in ("JPEG", "PNG", "WEBP", "GIF", "AVIF", "TIFF", "BMP") if name in Image.OPEN
)
# Formats whose decoder can scale down while decoding (libjpeg's DCT scaling); MPO is Pillow's name for
# multi-picture JPEGs.
_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})

# Modes whose samples do not fit in 8 bits. Pillow's own convert() clips them at 255, which turns a
# normal 16-bit photo into a white sheet, so they are rescaled by hand (see `_rescaled_to_8bit`).
_WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})

_WHITE = (255, 255, 255)
_ORIENTATION_TAG = 0x0112
_ORIENTATIONS_THAT_SWAP_AXES = frozenset({5, 6, 7, 8})
_MAX_MESSAGE_CHARS = 500

# `decode_image` enforces its own `max_pixels` before Pillow's check matters, so Pillow's warning (issued
# between MAX_IMAGE_PIXELS and twice that) is pure noise in executor logs. Installed once, at import,
# because per-call `catch_warnings` races between threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageError(Exception):
    """A bad input image: `kind` is one of ERROR_KINDS, `message` one line naming the reason.

    The message is squashed to a single line and capped, because it goes verbatim into the quarantine
    table's `error_message` column and into logs, where library errors (pyarrow's especially) arrive
    multi-line and long. `transient` marks a failure that may pass by itself (a server error, a timeout):
    it is retried, and an unchanged item keeps its previous embedding meanwhile. `retry_after_s` is the
    wait a server asked for (`Retry-After`).
    """

    def __init__(self, kind: str, message: str, transient: bool = False, retry_after_s: float | None = None):
        message = " ".join(str(message).split())
        if len(message) > _MAX_MESSAGE_CHARS:
            message = message[: _MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.transient = transient
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type[ImageError], tuple[str, str, bool, float | None]]:
        # Exceptions pickle through `self.args` (the message alone) by default; Spark ships exceptions
        # between processes, so keep the kind.
        return type(self), (self.kind, self.message, self.transient, self.retry_after_s)


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image plus the ORIGINAL size (after EXIF orientation, before any draft scaling).

    `width`/`height` describe the catalog's image, not the possibly draft-reduced `image`, because the
    embeddings table reports the real size (useful to find thumbnails posing as product photos).
    """

    image: Image.Image
    width: int
    height: int


def decode_image(data: bytes, max_pixels: int, target_size: int | None = None) -> DecodedImage:
    """Decode image bytes to an upright RGB image; raise ImageError for anything a catalog can throw at it.

    `max_pixels` bounds width*height, checked from the header before decoding. Pillow's own hard limit
    (2 * Image.MAX_IMAGE_PIXELS, about 179 Mpx) still applies above that and also yields `too_large`.
    `target_size`, the model's input size, lets JPEGs decode at 1/2, 1/4 or 1/8 scale in libjpeg (never
    below `target_size` on either side): 1/4 to 1/64 of the pixel memory and less time (a noisy 12 Mpx
    JPEG went from 127 to 74 ms here; smoother real photos gain more)."""
    if not data:
        raise ImageError("not_an_image", "empty file (0 bytes)")
    img = _open(data)
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            "too_large", f"{img.format} of {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )
    if target_size and img.format in _DRAFT_FORMATS:
        img.draft("RGB", (target_size, target_size))
    try:
        img.load()
        if _orientation(img) in _ORIENTATIONS_THAT_SWAP_AXES:
            width, height = height, width
        ImageOps.exif_transpose(img, in_place=True)
        rgb = to_rgb(img)
    except Image.DecompressionBombError as err:  # a GIF frame or TIFF tile bigger than the header said
        raise ImageError("too_large", f"{img.format}: {err}") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure is a property of this input
        raise ImageError(
            "decode_error", f"{img.format} {width}x{height} {img.mode}: {type(err).__name__}: {err}"
        ) from None
    return DecodedImage(image=rgb, width=width, height=height)


def _open(data: bytes) -> ImageFile.ImageFile:
    """Identify the format from the bytes and read the header only (Pillow opens lazily)."""
    try:
        return Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as err:
        raise ImageError("too_large", f"over Pillow's decompression-bomb limit: {err}") from None
    except Image.UnidentifiedImageError:
        claimed = _claimed_format(data)
        if claimed is None:
            raise ImageError(
                "not_an_image",
                f"not a supported image ({', '.join(SUPPORTED_FORMATS)}): {len(data)} bytes of {content_type(data)}",
            ) from None
        raise ImageError(
            "decode_error", f"starts like {claimed} but its header is unreadable ({len(data)} bytes)"
        ) from None
    except Exception as err:  # noqa: BLE001 - a plugin accepted the magic number, then choked on the header
        raise ImageError("decode_error", f"unreadable header: {type(err).__name__}: {err}") from None


# What a file that is no image usually is, by its first bytes. The quarantine message names the type only:
# the bytes themselves may be anything the job can read (a catalog row pointing at /etc/passwd).
_SIGNATURES = (
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x1f\x8b", "gzip data"),
    (b"BZh", "bzip2 data"),
    (b"\xfd7zXZ", "xz data"),
    (b"7z\xbc\xaf", "7-Zip archive"),
    (b"\x7fELF", "ELF executable"),
    (b"\x00\x00\x00\x00", "zero bytes"),
)


def content_type(data: bytes) -> str:
    """A name for what non-image bytes look like (HTML, SVG, JSON, text, PDF, ...), never the bytes."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "HTML"
    if b"<svg" in head:
        return "SVG (vector images are not supported)"
    if head.startswith(b"<?xml") or head.startswith(b"<"):
        return "XML or markup"
    if head.startswith((b"{", b"[")):
        return "JSON or text"
    try:
        data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return "binary data"
    return "text"


def _claimed_format(data: bytes) -> str | None:
    """The supported format whose magic number `data` starts with, if any.

    Separates a corrupt image (decode_error: the upstream file is damaged) from something that never was
    one (not_an_image: usually an HTML error page saved under an image name), which need different fixes.
    """
    prefix = data[:16]
    for name in SUPPORTED_FORMATS:
        accept = Image.OPEN[name][1]
        verdict = accept(prefix) if accept is not None else False
        if verdict and not isinstance(verdict, str):  # a str is Pillow's "maybe, but unsupported"
            return name
    return None


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1 = upright), read the same way `ImageOps.exif_transpose` reads it."""
    value = img.getexif().get(_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) else 1


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, with transparency flattened onto white (how shops display product cut-outs).

    Pillow's default convert() would drop alpha and reveal whatever colour the transparent pixels happen to
    store, often black, which moves the embedding of every cut-out product towards "dark image".
    """
    if img.mode in _WIDE_MODES:
        return _rescaled_to_8bit(img).convert("RGB")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, _WHITE)
        flat.paste(rgba, mask=rgba)
        return flat
    return img if img.mode == "RGB" else img.convert("RGB")


def _rescaled_to_8bit(img: Image.Image) -> Image.Image:
    """A greyscale image of 16-bit, 32-bit int or float samples -> 8-bit L, keeping relative brightness."""
    values = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = _sample_range(img.mode, float(values.min()), float(values.max()))
    scaled = (values - low) * (255.0 / (high - low)) + 0.5
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))


def _sample_range(mode: str, low: float, high: float) -> tuple[float, float]:
    """The value range that maps to 0..255 for a wide mode.

    The declared depth when the samples fit it (16-bit: 0..65535, float: 0..1), so a dark photo stays dark;
    otherwise (32-bit ints, unnormalised floats) the samples' own range, the only scale they carry.
    """
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        return 0.0, 65535.0
    if mode == "F" and low >= 0 and high <= 1:
        return 0.0, 1.0
    return low, max(high, low + 1.0)
