"""A corpus of good, odd and broken catalog images, written as real files, for decode and embed tests.

Real catalogs hold every one of these: JPEGs named .png, phone photos stored sideways with an EXIF
rotation, 16-bit PNGs out of Photoshop, CMYK JPEGs from print workflows, cut-outs on transparent
backgrounds, CDN error pages saved as .jpg, half-uploaded files. Each case says what must happen to it, so
a test (here, or a Spark embed-stage test building a catalog from these paths) can check that good ones
decode and bad ones land in quarantine with the right `error_kind`.

Files are tiny and generated deterministically in well under a second.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Limits the expected kinds assume. They hold for any max_pixels from 60,000 (the largest good image) up to
# 143,999,999 (the smaller bomb has 144 Mpx, between Pillow's warning and error thresholds, so that our own
# header check is what stops it), and any max_bytes from 200 KB up.
CORPUS_MAX_PIXELS = 50_000_000
CORPUS_MAX_BYTES = 10_000_000

# A pixel of the source drawing that was transparent, so it must come out white after decoding.
TRANSPARENT_PIXEL = (0, 0)
# EXIF orientation 6: stored 40 wide x 20 high, displayed rotated 90 degrees clockwise, so 20 x 40. The
# stored top-left corner is red and ends up top-right once upright.
ROTATED_STORED_SIZE = (40, 20)


@dataclass(frozen=True)
class CorpusCase:
    """One corpus file: `expected_kind` None means it must decode, to an image of `size` (width, height)."""

    name: str
    path: Path
    expected_kind: str | None
    size: tuple[int, int] | None = None


def make_corpus(folder: Path) -> list[CorpusCase]:
    """Write every case under `folder` (created if needed) and describe them.

    The unreadable-by-permission case is left out when running as root, where file modes do not stop reads.
    """
    folder.mkdir(parents=True, exist_ok=True)
    cases = [
        _write(folder, name, filename, make, expected_kind, size)
        for name, filename, make, expected_kind, size in _FILE_CASES
    ]
    cases.append(CorpusCase("missing", folder / "missing.jpg", "missing"))
    directory = folder / "directory.jpg"
    directory.mkdir(exist_ok=True)
    cases.append(CorpusCase("directory", directory, "not_a_file"))
    if os.geteuid() != 0:
        (folder / "no_permission.jpg").unlink(missing_ok=True)  # a previous run's copy cannot be rewritten
        locked = _write(folder, "no_permission", "no_permission.jpg", _jpeg, "unreadable", None)
        locked.path.chmod(0)
        cases.append(locked)
    return cases


def _write(
    folder: Path,
    name: str,
    filename: str,
    make: Callable[[], bytes],
    expected_kind: str | None,
    size: tuple[int, int] | None,
) -> CorpusCase:
    path = folder / filename
    path.write_bytes(make())
    return CorpusCase(name, path, expected_kind, size)


def _encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB picture: smooth gradients plus noise, so encoders produce realistic streams."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) * 127 / max(width + height - 2, 1)], axis=-1
    )
    noise = np.random.default_rng(seed).normal(0, 12, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _jpeg() -> bytes:
    return _encode(photo(64, 48), "JPEG", quality=90)


def _png() -> bytes:
    return _encode(photo(48, 64, seed=1), "PNG")


def _exif_rotated_jpeg() -> bytes:
    img = photo(*ROTATED_STORED_SIZE, seed=2)
    img.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(img, "JPEG", quality=95, exif=exif.tobytes())


def _grey_jpeg() -> bytes:
    return _encode(photo(32, 24, seed=3).convert("L"), "JPEG")


def _bilevel_png() -> bytes:
    return _encode(photo(30, 20, seed=4).convert("1"), "PNG")


def _grey16_png() -> bytes:
    """Columns of 0, 32768 and 65535: they must become 0, ~128 and 255, not 0, 255 and 255."""
    return _encode(Image.fromarray(np.repeat(np.array([[0, 32768, 65535]], dtype=np.uint16), 4, axis=0)), "PNG")


def _float_tiff() -> bytes:
    """32-bit float samples in 0..1, as scientific and HDR tools write them."""
    return _encode(Image.fromarray(np.linspace(0, 1, 16 * 8, dtype=np.float32).reshape(8, 16)), "TIFF")


def _cut_out() -> Image.Image:
    """A product cut-out: an opaque square on a fully transparent background whose stored colour is black."""
    img = Image.new("RGBA", (24, 24), (0, 0, 0, 0))
    img.paste((200, 30, 30, 255), (6, 6, 18, 18))
    return img


def _rgba_png() -> bytes:
    return _encode(_cut_out(), "PNG")


def _grey_alpha_png() -> bytes:
    return _encode(_cut_out().convert("LA"), "PNG")


def _palette_transparent_png() -> bytes:
    img = _cut_out().convert("RGB").quantize(colors=4)
    transparent_index = img.getpixel(TRANSPARENT_PIXEL)
    return _encode(img, "PNG", transparency=transparent_index)


def _palette_png() -> bytes:
    return _encode(photo(20, 20, seed=5).quantize(colors=16), "PNG")


def _cmyk_jpeg() -> bytes:
    """Pure cyan in CMYK, from a print workflow: must come out close to RGB (0, 255, 255)."""
    return _encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)


def _frames() -> list[Image.Image]:
    """Two frames, red then blue: only the first (red) may be decoded."""
    return [Image.new("RGB", (16, 12), colour) for colour in ((255, 0, 0), (0, 0, 255))]


def _animated(fmt: str, **options: object) -> Callable[[], bytes]:
    def make() -> bytes:
        first, *rest = _frames()
        return _encode(first, fmt, save_all=True, append_images=rest, duration=100, loop=0, **options)

    return make


def _tiny_png() -> bytes:
    return _encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")


def _wide_png() -> bytes:
    return _encode(photo(20000, 3, seed=6), "PNG")


def _webp() -> bytes:
    return _encode(photo(40, 30, seed=7), "WEBP", quality=80)


def _tiff() -> bytes:
    return _encode(photo(30, 40, seed=8), "TIFF", compression="tiff_lzw")


def _bmp() -> bytes:
    return _encode(photo(10, 7, seed=9), "BMP")


def _html() -> bytes:
    return (
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
        b"<body><h1>Not Found</h1><p>The requested image was not found.</p></body></html>\n"
    )


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("image.jpg", _jpeg())
    return buffer.getvalue()


def _truncated_jpeg() -> bytes:
    """The first half of a JPEG, as left by an interrupted upload: the header parses, the scan data ends."""
    data = _encode(photo(128, 96, seed=10), "JPEG", quality=90)
    return data[: len(data) // 2]


def _jpeg_stub() -> bytes:
    """A JPEG magic number and nothing usable: a damaged image, not 'not an image'."""
    return _jpeg()[:12]


def _corrupt_png() -> bytes:
    """A PNG whose compressed pixel data is overwritten in the middle (the header stays valid).

    A smooth picture, so the data is Huffman-coded rather than stored: flipped bytes then break the
    deflate stream (or its checksum) instead of silently turning into other pixel values.
    """
    y, x = np.mgrid[0:64, 0:64]
    smooth = Image.fromarray(((x * 4 + y * 2) % 256).astype(np.uint8)).convert("RGB")
    data = bytearray(_encode(smooth, "PNG"))
    start = data.index(b"IDAT") + 4
    (length,) = struct.unpack(">I", data[start - 8 : start - 4])
    middle = start + length // 2
    data[middle : middle + 16] = bytes(byte ^ 0xFF for byte in data[middle : middle + 16])
    return bytes(data)


def _png_bomb(width: int, height: int) -> Callable[[], bytes]:
    """A valid 1-bit PNG of `width` x `height` zero pixels, built row by row without ever holding them.

    Deflate squeezes the all-zero rows ~1000:1, so a 30000x30000 bomb is ~110 KB on disk and 900 Mpx
    (2.7 GB as RGB) once decoded: exactly what the header check must stop.
    """

    def make() -> bytes:
        row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
        deflate = zlib.compressobj(9)
        pixels = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
        header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
        return (
            b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")
        )

    return make


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


# (name, file name, bytes factory, expected kind, decoded (width, height) for good ones)
_FILE_CASES: list[tuple[str, str, Callable[[], bytes], str | None, tuple[int, int] | None]] = [
    ("jpeg", "good.jpg", _jpeg, None, (64, 48)),
    ("png", "good.png", _png, None, (48, 64)),
    ("jpeg_named_png", "jpeg_inside.png", _jpeg, None, (64, 48)),
    ("png_named_jpg", "png_inside.jpg", _png, None, (48, 64)),
    ("exif_rotated_jpeg", "rotated.jpg", _exif_rotated_jpeg, None, ROTATED_STORED_SIZE[::-1]),
    ("grey_jpeg", "grey.jpg", _grey_jpeg, None, (32, 24)),
    ("bilevel_png", "bilevel.png", _bilevel_png, None, (30, 20)),
    ("grey16_png", "grey16.png", _grey16_png, None, (3, 4)),
    ("float_tiff", "float.tif", _float_tiff, None, (16, 8)),
    ("palette_png", "palette.png", _palette_png, None, (20, 20)),
    ("palette_transparent_png", "palette_transparent.png", _palette_transparent_png, None, (24, 24)),
    ("rgba_png", "cut_out.png", _rgba_png, None, (24, 24)),
    ("grey_alpha_png", "grey_alpha.png", _grey_alpha_png, None, (24, 24)),
    ("cmyk_jpeg", "cmyk.jpg", _cmyk_jpeg, None, (16, 16)),
    ("animated_gif", "animated.gif", _animated("GIF"), None, (16, 12)),
    ("animated_webp", "animated.webp", _animated("WEBP", lossless=True), None, (16, 12)),
    ("animated_png", "animated.png", _animated("PNG"), None, (16, 12)),
    ("tiny_png", "tiny.png", _tiny_png, None, (1, 1)),
    ("wide_png", "wide.png", _wide_png, None, (20000, 3)),
    ("webp", "good.webp", _webp, None, (40, 30)),
    ("tiff", "good.tif", _tiff, None, (30, 40)),
    ("bmp", "good.bmp", _bmp, None, (10, 7)),
    ("empty", "empty.jpg", lambda: b"", "not_an_image", None),
    ("html_named_jpg", "error_page.jpg", _html, "not_an_image", None),
    ("text_named_png", "notes.png", lambda: b"just some text, no pixels here\n", "not_an_image", None),
    ("zip_named_jpg", "archive.jpg", _zip, "not_an_image", None),
    ("truncated_jpeg", "truncated.jpg", _truncated_jpeg, "decode_error", None),
    ("jpeg_stub", "stub.jpg", _jpeg_stub, "decode_error", None),
    ("corrupt_png", "corrupt.png", _corrupt_png, "decode_error", None),
    ("bomb_png", "bomb.png", _png_bomb(12_000, 12_000), "too_large", None),
    ("bomb_png_huge", "bomb_huge.png", _png_bomb(30_000, 30_000), "too_large", None),
]
