"""decode_image over the image corpus: good images decode faithfully, bad ones fail with the right kind."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from lookalike.embed.decode import ERROR_KINDS, DecodedImage, ImageError, decode_image
from lookalike.embed.reader import read_bytes
from tests.image_corpus import (
    CORPUS_MAX_BYTES,
    CORPUS_MAX_PIXELS,
    ROTATED_STORED_SIZE,
    TRANSPARENT_PIXEL,
    CorpusCase,
    make_corpus,
    photo,
)

# lookalike.embed.decode silences DecompressionBombWarning once, at import; pytest restores the warning filters
# around every test, dropping that. test_bombs_are_rejected_from_the_header_without_decoding checks the real
# behaviour in a fresh interpreter.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CorpusCase]:
    return {case.name: case for case in make_corpus(tmp_path_factory.mktemp("corpus"))}


def load(case: CorpusCase, **options: object) -> DecodedImage:
    """What the embed stage does per catalog row."""
    return decode_image(read_bytes(str(case.path), CORPUS_MAX_BYTES), CORPUS_MAX_PIXELS, **options)


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_error_kinds_are_the_quarantine_contract() -> None:
    assert ERROR_KINDS == (
        "bad_uri",
        "forbidden",
        "missing",
        "not_a_file",
        "unreadable",
        "not_an_image",
        "too_large",
        "decode_error",
        "http_error",
        "timeout",
        "connection_error",
        "truncated",
        "tls_error",
        "redirect_error",
    )


FETCH_KINDS = ("http_error", "timeout", "connection_error", "truncated", "tls_error", "redirect_error")


def test_corpus_covers_every_error_kind_a_file_can_cause(corpus: dict[str, CorpusCase]) -> None:
    # bad_uri and forbidden come from the URI and the access policy, not the file: tests/test_reader.py.
    # The unreadable case is a file without read permission, which root reads anyway (tests/image_corpus.py).
    # The http(s) kinds come from servers: tests/test_fetcher.py.
    not_from_files = {"bad_uri", "forbidden", *FETCH_KINDS} | ({"unreadable"} if os.geteuid() == 0 else set())
    assert {case.expected_kind for case in corpus.values()} == {None, *ERROR_KINDS} - not_from_files


def test_good_cases_decode_to_rgb_at_original_size(corpus: dict[str, CorpusCase]) -> None:
    good = [case for case in corpus.values() if case.expected_kind is None]
    assert len(good) >= 20
    for case in good:
        decoded = load(case)
        assert decoded.image.mode == "RGB", case.name
        assert (decoded.width, decoded.height) == case.size, case.name
        assert decoded.image.size == case.size, case.name


def test_bad_cases_raise_their_kind_with_a_one_line_message(corpus: dict[str, CorpusCase]) -> None:
    bad = [case for case in corpus.values() if case.expected_kind is not None]
    for case in bad:
        with pytest.raises(ImageError) as caught:
            load(case)
        assert caught.value.kind == case.expected_kind, f"{case.name}: {caught.value}"
        assert caught.value.message and "\n" not in caught.value.message
        assert str(caught.value) == caught.value.message


def test_content_decides_the_format_not_the_suffix(corpus: dict[str, CorpusCase]) -> None:
    assert load(corpus["jpeg_named_png"]).image.tobytes() == load(corpus["jpeg"]).image.tobytes()
    assert load(corpus["png_named_jpg"]).image.tobytes() == load(corpus["png"]).image.tobytes()


@pytest.mark.parametrize("name", ["rgba_png", "grey_alpha_png", "palette_transparent_png"])
def test_transparency_is_flattened_onto_white(corpus: dict[str, CorpusCase], name: str) -> None:
    image = load(corpus[name]).image
    assert image.getpixel(TRANSPARENT_PIXEL) == (255, 255, 255)
    assert image.getpixel((12, 12)) != (255, 255, 255)  # the opaque product itself is kept


def test_16_bit_samples_are_scaled_not_clipped(corpus: dict[str, CorpusCase]) -> None:
    image = load(corpus["grey16_png"]).image
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_big_endian_16_bit_is_scaled_like_little_endian() -> None:
    samples = np.array([[0, 32768, 65535]], dtype=">u2")
    image = decode_image(encode(Image.fromarray(samples), "TIFF"), CORPUS_MAX_PIXELS).image
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_in_unit_range_keeps_its_scale(corpus: dict[str, CorpusCase]) -> None:
    image = load(corpus["float_tiff"]).image
    assert image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((15, 7)) == (255, 255, 255)


@pytest.mark.parametrize(
    "samples", [np.array([[0, 100_000, 200_000]], dtype=np.int32), np.array([[-1.0, 0.0, 1.0]], dtype=np.float32)]
)
def test_samples_beyond_the_declared_depth_scale_by_their_range(samples: np.ndarray) -> None:
    image = decode_image(encode(Image.fromarray(samples), "TIFF"), CORPUS_MAX_PIXELS).image
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_turns_the_image_upright(corpus: dict[str, CorpusCase]) -> None:
    decoded = load(corpus["exif_rotated_jpeg"])
    stored_width, stored_height = ROTATED_STORED_SIZE
    assert (decoded.width, decoded.height) == (stored_height, stored_width)
    red, green, blue = decoded.image.getpixel((stored_height - 2, 1))  # stored top-left is now top-right
    assert red > 200 and green < 60 and blue < 60


def test_cmyk_jpeg_converts_to_rgb(corpus: dict[str, CorpusCase]) -> None:
    red, green, blue = load(corpus["cmyk_jpeg"]).image.getpixel((8, 8))
    assert red < 20 and green > 235 and blue > 235


@pytest.mark.parametrize("name", ["animated_gif", "animated_webp", "animated_png"])
def test_animations_decode_their_first_frame(corpus: dict[str, CorpusCase], name: str) -> None:
    red, green, blue = load(corpus[name]).image.getpixel((8, 6))
    assert red > 240 and green < 15 and blue < 15


def test_draft_decodes_big_jpegs_small_but_reports_the_original_size() -> None:
    data = encode(photo(2400, 1600), "JPEG", quality=85)
    decoded = decode_image(data, CORPUS_MAX_PIXELS, target_size=224)
    assert (decoded.width, decoded.height) == (2400, 1600)
    assert min(decoded.image.size) >= 224
    assert decoded.image.size == (600, 400)  # libjpeg's 1/4 scale: the largest not below 224 on a side
    assert decode_image(data, CORPUS_MAX_PIXELS).image.size == (2400, 1600)


def test_draft_of_a_rotated_jpeg_reports_the_upright_original_size() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(photo(1600, 800), "JPEG", exif=exif.tobytes())
    decoded = decode_image(data, CORPUS_MAX_PIXELS, target_size=100)
    assert (decoded.width, decoded.height) == (800, 1600)
    assert decoded.image.size == (100, 200)


def test_target_size_leaves_other_formats_alone(corpus: dict[str, CorpusCase]) -> None:
    assert load(corpus["wide_png"], target_size=2).image.size == (20000, 3)


def test_max_pixels_is_inclusive() -> None:
    data = encode(photo(10, 10), "PNG")
    assert decode_image(data, max_pixels=100).width == 10
    with pytest.raises(ImageError) as caught:
        decode_image(data, max_pixels=99)
    assert caught.value.kind == "too_large"
    assert "10x10" in caught.value.message


def test_pillow_hard_limit_still_reads_as_too_large(corpus: dict[str, CorpusCase]) -> None:
    with pytest.raises(ImageError) as caught:
        decode_image(corpus["bomb_png_huge"].path.read_bytes(), max_pixels=10**12)
    assert caught.value.kind == "too_large"
    assert "Pillow" in caught.value.message


# Run in a fresh interpreter: its peak RSS starts low, so pixels decoded by mistake would show. tracemalloc
# cannot see them (Pillow allocates pixel buffers with C malloc). DecompressionBombWarning is made an
# error before lookalike.embed.decode is imported: had the warning escaped, the result would not be too_large.
_BOMB_PROBE = textwrap.dedent("""
    import json, resource, sys, warnings
    from PIL import Image
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    from lookalike.embed.decode import ImageError, decode_image
    data = open(sys.argv[1], "rb").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        decode_image(data, max_pixels=int(sys.argv[2]))
        kind = None
    except ImageError as err:
        kind = err.kind
    print(json.dumps({"kind": kind, "grown_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
""")


@pytest.mark.parametrize("name", ["bomb_png", "bomb_png_huge"])
def test_bombs_are_rejected_from_the_header_without_decoding(corpus: dict[str, CorpusCase], name: str) -> None:
    path: Path = corpus[name].path
    assert path.stat().st_size < 200_000  # a real bomb: tiny file, 144-900 Mpx
    run = subprocess.run(
        [sys.executable, "-c", _BOMB_PROBE, str(path), str(CORPUS_MAX_PIXELS)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    probe = json.loads(run.stdout)
    assert probe["kind"] == "too_large"
    assert probe["grown_kib"] < 20_000  # decoding even the smaller bomb would take 140,000 KiB


def test_threads_decode_the_same_as_one(corpus: dict[str, CorpusCase]) -> None:
    cases = [case for case in corpus.values() if case.expected_kind is None] * 4

    def fingerprint(case: CorpusCase) -> tuple[int, int, bytes]:
        decoded = load(case)
        return decoded.width, decoded.height, decoded.image.tobytes()

    serial = [fingerprint(case) for case in cases]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(fingerprint, cases)) == serial


def test_image_error_survives_pickling_and_keeps_one_line() -> None:
    error = ImageError("decode_error", "line one\n  line two")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.kind, copy.message, str(copy)) == ("decode_error", "line one line two", "line one line two")


def test_long_messages_are_capped() -> None:
    assert len(ImageError("unreadable", "x" * 10_000).message) == 500


@settings(max_examples=200, deadline=None)
@example(data=b"7z\xbc\xaf")  # found by CI: a type name with a hyphen ("7-Zip archive")
@given(
    data=st.one_of(
        st.binary(max_size=2048),
        st.builds(
            lambda magic, rest: magic + rest,
            st.sampled_from(
                [
                    b"\xff\xd8\xff",
                    b"\x89PNG\r\n\x1a\n",
                    b"GIF89a",
                    b"RIFF\x00\x00\x00\x00WEBP",
                    b"II*\x00",
                    b"BM",
                    b"\x00\x00\x00\x1cftypavif",
                ]
            ),
            st.binary(max_size=2048),
        ),
    )
)
def test_any_bytes_decode_or_raise_an_image_error(data: bytes) -> None:
    try:
        decoded = decode_image(data, max_pixels=CORPUS_MAX_PIXELS, target_size=32)
    except ImageError as err:
        assert err.kind in ERROR_KINDS and "\n" not in err.message
        if err.kind == "not_an_image":  # the type is named, the bytes never are
            assert re.search(r"(\d+ bytes of [\w ()-]+|empty file \(0 bytes\))$", err.message), err.message
    else:
        assert decoded.image.mode == "RGB"


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"root:x:0:0:root:/root:/bin/bash\n", "text"),
        (b"<!DOCTYPE html><html>token</html>", "HTML"),
        (b'{"secret": 1}', "JSON or text"),
        (b"%PDF-1.7 secret", "PDF"),
        (bytes([0x80, 0x81, 0xFE]) * 20, "binary data"),
    ],
)
def test_non_images_are_named_by_type_not_content(data: bytes, named: str) -> None:
    with pytest.raises(ImageError) as caught:
        decode_image(data, max_pixels=CORPUS_MAX_PIXELS)
    assert caught.value.kind == "not_an_image" and caught.value.message.endswith(f"bytes of {named}")
    assert not any(word in caught.value.message for word in ("root:x", "token", "secret"))
