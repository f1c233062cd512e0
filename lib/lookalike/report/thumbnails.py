"""Thumbnails of the items a report shows: decoded like the embed stage reads them, embedded as `data:` URIs."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from lookalike.config import Config
from lookalike.embed.catalog import fetch_settings, image_policy
from lookalike.embed.decode import ImageError, decode_image
from lookalike.embed.fetcher import Fetcher
from lookalike.embed.reader import ImagePolicy, read_bytes
from lookalike.report.data import THUMB_THREADS, ItemFacts, Thumb


def thumbnail(
    uri: str | None, size: int, max_bytes: int, max_pixels: int, policy: ImagePolicy, fetcher: Fetcher | None = None
) -> Thumb:
    """A picture no bigger than `size` px on its longest side, as a data URI; never enlarged (the browser
    scales small sources up, which costs no bytes)."""
    if not uri:
        return Thumb(None, "not in catalog")
    try:
        picture = decode_image(read_bytes(uri, max_bytes, policy, fetcher), max_pixels, target_size=size).image
    except ImageError as err:
        return Thumb(None, err.kind)
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    return Thumb(encode_data_uri(picture))


def encode_data_uri(picture: Image.Image) -> str:
    """The smaller of PNG and JPEG: PNG wins on flat or grey product shots, JPEG on photos. Grey pictures
    are stored with one channel."""
    red, green, blue = picture.split()
    if red.tobytes() == green.tobytes() == blue.tobytes():
        picture = red
    best: tuple[int, str, bytes] | None = None
    for fmt, mime, options in (("PNG", "image/png", {"optimize": True}), ("JPEG", "image/jpeg", {"quality": 82})):
        buffer = io.BytesIO()
        picture.save(buffer, fmt, **options)
        data = buffer.getvalue()
        if best is None or len(data) < best[0]:
            best = (len(data), mime, data)
    assert best is not None
    return f"data:{best[1]};base64,{base64.b64encode(best[2]).decode('ascii')}"


def load_thumbnails(ids: Iterable[str], facts: Mapping[str, ItemFacts], cfg: Config) -> dict[str, Thumb]:
    """Thumbnails of the shown items, read in threads (object-store reads wait on the network)."""
    wanted = sorted(set(ids))
    size, max_bytes, max_pixels = cfg["report.thumbnail_px"], cfg["embed.max_bytes"], cfg["embed.max_pixels"]

    policy = image_policy(cfg)  # a report shows no file that the embed stage may not read
    fetcher = Fetcher(fetch_settings(cfg))  # URLs within the same per-host limits as the embed stage

    def one(item: str) -> Thumb:
        found = facts.get(item)
        return thumbnail(found.image_uri if found else None, size, max_bytes, max_pixels, policy, fetcher)

    try:
        with ThreadPoolExecutor(THUMB_THREADS) as pool:
            return dict(zip(wanted, pool.map(one, wanted)))
    finally:
        fetcher.close()
