"""Real catalog-like images that install offline, for the quality benchmarks.

- Fashion-MNIST (Debian `dataset-fashion-mnist`): product photos, 28x28 grey, 10 classes.
- Real colour photos of objects (Debian `tuxpaint-stamps-default` 2022.06.04 and `gcompris-qt-data` 3.1,
  about 560 distinct photos: fruit, tools, kitchenware, instruments, vehicles, animals, monuments; cut-outs on
  transparent backgrounds composited on white, like packshots). Install with
  `apt-get install --no-install-recommends tuxpaint-stamps-default gcompris-qt-data` (no dependencies).
  Tux Paint mixes clip-art with its photos in the same folders: a stamp counts as a photo when under 12% of
  its neighbouring opaque pixels are exactly equal and it has at least 150 colours (drawings are flat). The
  GCompris photos sit in Qt resource bundles (`.rcc`), read here with the format's documented layout.
  Near-identical images (mirrored stamps, the same photo twice) are dropped by an 8x8 average hash.

Debian's openclipart packages are reserved for checks outside this repository and never used here.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from lookalike.demo_data import load_fashion_mnist

TUXPAINT = Path("/usr/share/tuxpaint/stamps")
GCOMPRIS = Path("/usr/share/gcompris-qt/rcc")
INSTALL = "apt-get install --no-install-recommends tuxpaint-stamps-default gcompris-qt-data"
_TUXPAINT_SKIP = ("cartoon", "alphabets", "symbols/faces", "seasonal/easter", "party-hat", "clothes/button", "_mirror")
_GCOMPRIS_BUNDLES = {  # bundle -> folders of photos in it (None: all of it)
    "categorization": ("/fishes/", "/monuments/", "/others/", "/renewable/", "/tools/"),
    "explore_monuments": None,
    "explore_world_animals": None,
    "explore_farm_animals": None,
    "erase": None,
}
_PAINTINGS = ("Bosschaert", "Gauguin")  # reproductions of paintings in `erase`: not photos
MAX_SIDE = 512


def fashion_mnist(n: int) -> list[Image.Image]:
    """The first `n` Fashion-MNIST images (28x28, grey)."""
    images, _ = load_fashion_mnist(limit=n)
    return [Image.fromarray(image) for image in images]


def colour_photos(n: int | None = None) -> list[Image.Image]:
    """Up to `n` distinct real colour photos (RGB, longest side at most 512), in a fixed order."""
    if not TUXPAINT.is_dir() or not GCOMPRIS.is_dir():
        raise SystemExit(f"the colour photos are not installed: {INSTALL}")
    seen: set[bytes] = set()
    photos = []
    for image in (*_tuxpaint_photos(), *_gcompris_photos()):
        image.thumbnail((MAX_SIDE, MAX_SIDE))
        keys = [_average_hash(image), _average_hash(ImageOps.mirror(image))]
        if seen.isdisjoint(keys):
            seen.update(keys)
            photos.append(image)
            if n is not None and len(photos) == n:
                break
    return photos


@dataclass(frozen=True)
class Labelled:
    image: Image.Image
    label: str
    title: str | None  # a human description where the source has one


# GCompris bundles of several pictures of one subject (pieces of a painting, details of a monument) and the
# categorisation activity's folders: the subject, or the folder, is the label.
_GCOMPRIS_LABELLED = {
    "paintings": "subject",
    "details": "subject",
    "categorization": "folder",
    "explore_monuments": "folder",  # by country
}
_LABELLED_SKIP = ("alphabets", "_mirror")  # glyphs, and mirrored copies of other stamps
MIN_PER_LABEL = 6


def labelled_images() -> list[Labelled]:
    """Every distinct colour image (photos and drawings) of the two packages that carries a label.

    Tux Paint stamps by their folder (`animals/mammals`, `food/fruit`, `cartoon/animals`, ...; their `.txt`
    description is the title); GCompris paintings and monument details by their subject (several crops of one
    picture: the same product in different shots), its categorisation pictures by folder and monuments by
    country. Labels with under MIN_PER_LABEL images are dropped."""
    if not TUXPAINT.is_dir() or not GCOMPRIS.is_dir():
        raise SystemExit(f"the colour images are not installed: {INSTALL}")
    found: list[Labelled] = []
    for path in sorted(TUXPAINT.rglob("*.png")):
        if any(skip in str(path) for skip in _LABELLED_SKIP):
            continue
        image = Image.open(path).convert("RGBA")
        if min(image.size) < 32:
            continue
        white = Image.new("RGBA", image.size, "white")
        white.alpha_composite(image)
        folder = path.parent.relative_to(TUXPAINT).parts
        found.append(Labelled(white.convert("RGB"), "/".join(folder[:2]), _tuxpaint_title(path)))
    for bundle, by in _GCOMPRIS_LABELLED.items():
        for name, data in sorted(_rcc_files(GCOMPRIS / f"{bundle}.rcc")):
            if not name.endswith((".webp", ".jpg", ".png")):
                continue
            stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            label = stem.rsplit("_", 1)[0] if by == "subject" else name.split("/")[-2]
            image = Image.open(io.BytesIO(data)).convert("RGB")
            if min(image.size) >= 32:
                found.append(Labelled(image, f"{bundle}/{label}", None))
    seen: set[bytes] = set()
    distinct = []
    for item in found:
        item.image.thumbnail((MAX_SIDE, MAX_SIDE))
        key = _average_hash(item.image) + item.label.encode()
        if key not in seen:
            seen.add(key)
            distinct.append(item)
    counts = Counter(item.label for item in distinct)
    return [item for item in distinct if counts[item.label] >= MIN_PER_LABEL]


def _tuxpaint_title(path: Path) -> str | None:
    """The first line of a stamp's `.txt` (its English description), if any."""
    text = path.with_suffix(".txt")
    if not text.is_file():
        return None
    first = text.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return first[0].strip() if first and first[0].strip() else None


def _tuxpaint_photos() -> Iterator[Image.Image]:
    for path in sorted(TUXPAINT.rglob("*.png")):
        if any(skip in str(path) for skip in _TUXPAINT_SKIP):
            continue
        image = Image.open(path).convert("RGBA")
        if min(image.size) >= 32 and _is_photo(np.asarray(image)):
            white = Image.new("RGBA", image.size, "white")
            white.alpha_composite(image)
            yield white.convert("RGB")


def _is_photo(rgba: np.ndarray) -> bool:
    """Photos have few exactly equal neighbouring pixels and many colours; drawings have flat areas."""
    pixels = rgba.astype(np.int16)
    opaque = pixels[..., 3] == 255
    pairs = opaque[:, 1:] & opaque[:, :-1]
    if pairs.sum() < 200:
        return False
    flat = (np.abs(np.diff(pixels[..., :3], axis=1)).sum(axis=2) == 0)[pairs].mean()
    coarse = pixels[..., :3][opaque] >> 2
    return bool(flat < 0.12 and np.unique(coarse[:, 0] * 4096 + coarse[:, 1] * 64 + coarse[:, 2]).size >= 150)


def _gcompris_photos() -> Iterator[Image.Image]:
    for bundle, folders in _GCOMPRIS_BUNDLES.items():
        for name, data in sorted(_rcc_files(GCOMPRIS / f"{bundle}.rcc")):
            if not name.endswith((".webp", ".jpg", ".png")) or any(p in name for p in _PAINTINGS):
                continue
            if folders is not None and not any(folder in name for folder in folders):
                continue
            image = Image.open(io.BytesIO(data)).convert("RGB")
            if min(image.size) >= 64:
                yield image


def _rcc_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of every file in a Qt resource bundle: a header (magic, version, tree, data and names
    offsets), a tree of 14-byte (version 1) or 22-byte entries, names as UTF-16, data zlib-compressed when
    flagged."""
    blob = path.read_bytes()
    version, tree, data, names = struct.unpack(">IIII", blob[4:20])
    entry_size = 14 if version == 1 else 22

    def name_at(offset: int) -> str:
        (length,) = struct.unpack(">H", blob[names + offset : names + offset + 2])
        return blob[names + offset + 6 : names + offset + 6 + 2 * length].decode("utf-16-be")

    stack = [(0, "")]
    while stack:
        node, prefix = stack.pop()
        entry = tree + node * entry_size
        name_offset, flags = struct.unpack(">IH", blob[entry : entry + 6])
        here = f"{prefix}/{name_at(name_offset)}" if node else ""
        if flags & 2:  # a directory: its children are consecutive entries
            count, first = struct.unpack(">II", blob[entry + 6 : entry + 14])
            stack += [(child, here) for child in range(first, first + count)]
        elif not flags & 4:
            (offset,) = struct.unpack(">I", blob[entry + 10 : entry + 14])
            (size,) = struct.unpack(">I", blob[data + offset : data + offset + 4])
            payload = blob[data + offset + 4 : data + offset + 4 + size]
            yield here, zlib.decompress(payload[4:]) if flags & 1 else payload


def _average_hash(image: Image.Image) -> bytes:
    small = np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
    return np.packbits(small > small.mean()).tobytes()
