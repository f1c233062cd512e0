"""Demo data: a real image catalog from Fashion-MNIST plus simulated shoppers whose tastes are known.

`lookalike demo-data --out DIR` turns the 70,000 labelled Fashion-MNIST product photos (Debian package
`dataset-fashion-mnist`) into the inputs the pipeline reads:

- `DIR/images/<category_slug>/<item_id>.png`: every photo as a real PNG file, so `embed` exercises the same
  path-reading code it uses on a production catalog. Item `fm-00012` is always image 12 (train then test
  order), whatever `--limit` is, so ids stay stable between builds.
- `DIR/catalog.parquet`: `item_id`, `image_uri` (relative to DIR), `category` (the class name), `title`,
  `in_stock`.
- `DIR/users.parquet`: the simulated users and the tastes the simulation gave them.
- `DIR/events.parquet`: their views, carts and purchases over 60 days.

Why simulate instead of shipping a real clickstream: recommendation quality can only be judged against a
known truth. Every user here has one to three favourite categories and a `taste_strength` (the share of
their shopping sessions spent in those categories, the rest being spread uniformly over all categories),
and that taste never drifts. Both are written to `users.parquet`, so a check can ask "how many of this
user's recommendations fall in their favourite categories?" and compare the answer with the rate the
simulation used, instead of trusting a plausible-looking list.

The behaviour model is deliberately small but keeps the signals recommenders rely on:

- Sessions: each user shops in 1-8 sessions on distinct days in the 60 days before `SIMULATION_END` (a fixed
  date, so the output is the same on every machine). A session browses one category: a favourite one with
  probability `taste_strength`, otherwise any category. It holds 3-7 views a few seconds to minutes apart.
- Popularity: within a category, items have Zipf-like popularity (weight 1/rank over a seeded ranking), so
  a few items are viewed by many users and co-visitation counts carry signal, as in real shops.
- Funnel: a view leads to a cart with probability `P_CART`, a cart to a purchase with `P_PURCHASE`, each
  strictly later than the step before, so every purchase has a cart and a view of the same item before it.
- Scale: `max(20, n_items // 25)` users with 3 to about 65 events each (26 on average).
- Titles ("Slim black sandal") are drawn from seeded adjective and colour lists plus the class noun, so a
  text model embedding titles can find the category; about 90% of items are in stock.

All randomness comes from `numpy.random.Generator`s spawned from one `seed`, one stream per table, so the
same seed gives identical tables, and changing the event model leaves the catalog's titles untouched.
Simulation (pure functions returning Arrow tables) is kept apart from writing files. Every file is written
under a temporary name and moved into place, and images of an earlier, larger build are pruned, so
re-running on an existing DIR never leaves a half-written file or a stale image behind.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from lookalike.errors import LookalikeError

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Train first, then test: item ids follow this order.
IDX_FILES = (
    ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
)
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# The noun a shop would put in a title; several per class where shops use several words.
TITLE_NOUNS = {
    "T-shirt/top": ("T-shirt", "top"),
    "Trouser": ("trousers",),
    "Pullover": ("pullover",),
    "Dress": ("dress",),
    "Coat": ("coat",),
    "Sandal": ("sandal",),
    "Shirt": ("shirt",),
    "Sneaker": ("sneaker",),
    "Bag": ("bag",),
    "Ankle boot": ("ankle boot",),
}
TITLE_ADJECTIVES = (
    "Classic",
    "Slim",
    "Relaxed",
    "Everyday",
    "Vintage",
    "Lightweight",
    "Soft",
    "Essential",
    "Modern",
    "Casual",
    "Minimal",
    "Cosy",
    "Tailored",
    "Urban",
    "Premium",
    "Sporty",
)
TITLE_COLOURS = (
    "black",
    "white",
    "grey",
    "navy",
    "beige",
    "olive",
    "burgundy",
    "charcoal",
    "cream",
    "khaki",
    "red",
    "blue",
    "green",
    "brown",
    "pink",
    "camel",
)

P_IN_STOCK = 0.9
SIMULATION_END = datetime(2025, 1, 1, tzinfo=UTC)
WINDOW_DAYS = 60
SESSIONS_PER_USER = (1, 8)  # inclusive range
VIEWS_PER_SESSION = (3, 7)  # inclusive range
FAVOURITES_PER_USER = (1, 3)  # inclusive range
TASTE_STRENGTH = (0.75, 0.95)  # uniform range of the per-user share of sessions in favourite categories
ZIPF_EXPONENT = 1.0
P_CART = 0.12
P_PURCHASE = 0.35
USERS_PER_ITEM = 1 / 25
MIN_USERS = 20
# Sessions start between 06:00 and 22:00 and the capped gaps below keep one under two hours, so sessions on
# distinct days never overlap.
SESSION_START_SECONDS = (6 * 3600, 22 * 3600)
VIEW_GAP_SECONDS = (5, 40, 600)  # (minimum, mean of the exponential part, cap)
CART_GAP_SECONDS = (2, 20, 600)
PURCHASE_GAP_SECONDS = (30, 120, 1800)
# Below this many images, starting worker processes costs more than it saves.
PARALLEL_MIN_IMAGES = 2000
# What `write_images` leaves in a category folder: images and, after an interruption, their temp files.
_IMAGE_NAME = re.compile(r"fm-\d{5}\.png(\.tmp)?")

CATALOG_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("image_uri", pa.string()),
        ("category", pa.string()),
        ("title", pa.string()),
        ("in_stock", pa.bool_()),
    ]
)
USERS_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("favourite_categories", pa.list_(pa.string())), ("taste_strength", pa.float64())]
)
EVENTS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("event_type", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
    ]
)


class DemoDataError(LookalikeError, ValueError):
    """A bad argument or a corrupt dataset file; the CLI prints it as one line."""


class DatasetMissingError(LookalikeError, FileNotFoundError):
    """Fashion-MNIST is not where we look; the one-line message says how to install it."""


@dataclass(frozen=True)
class DemoSummary:
    """What `build_demo_data` wrote: paths (absolute) and row counts, for the CLI to report."""

    out: Path
    images_dir: Path
    catalog_path: Path
    users_path: Path
    events_path: Path
    n_items: int
    n_users: int
    n_events: int

    def __str__(self) -> str:
        return f"{self.n_items} items, {self.n_users} users, {self.n_events} events in {self.out}"


# --- reading Fashion-MNIST ------------------------------------------------------------------------------


def _read_idx(path: Path, limit: int | None) -> np.ndarray:
    """The first `limit` records of a gzipped idx file (the MNIST format: a 4-byte magic with the dtype code
    and rank, big-endian int32 dimensions, then raw uint8 data); reads no further than it needs."""
    with gzip.open(path, "rb") as f:
        zeros, dtype_code, ndim = np.frombuffer(f.read(4), dtype=np.uint8)[[0, 2, 3]]
        if zeros != 0 or dtype_code != 0x08:
            raise DemoDataError(f"{path}: not a uint8 idx file")
        dims = [int(d) for d in np.frombuffer(f.read(4 * int(ndim)), dtype=">u4")]
        count = dims[0] if limit is None else min(limit, dims[0])
        record = math.prod(dims[1:])
        data = f.read(count * record)
    if len(data) != count * record:
        raise DemoDataError(f"{path}: truncated (expected {count} records)")
    return np.frombuffer(data, dtype=np.uint8).reshape(count, *dims[1:])


def load_fashion_mnist(
    dataset_dir: Path = FASHION_MNIST_DIR, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` (default all 70,000) images, shape (n, 28, 28) uint8, and labels (n,) uint8."""
    dataset_dir = Path(dataset_dir)
    for names in IDX_FILES:
        for name in names:
            if not (dataset_dir / name).is_file():
                raise DatasetMissingError(
                    f"Fashion-MNIST file {dataset_dir / name} not found: install it with "
                    "`apt-get install dataset-fashion-mnist`"
                )
    images, labels = [], []
    remaining = limit
    for image_name, label_name in IDX_FILES:
        if remaining is not None and remaining <= 0:
            break
        part_images = _read_idx(dataset_dir / image_name, remaining)
        part_labels = _read_idx(dataset_dir / label_name, remaining)
        if len(part_images) != len(part_labels):
            raise DemoDataError(f"{dataset_dir / image_name}: {len(part_images)} images but {len(part_labels)} labels")
        images.append(part_images)
        labels.append(part_labels)
        if remaining is not None:
            remaining -= len(part_images)
    return np.concatenate(images), np.concatenate(labels)


# --- simulation (pure: arrays and a Generator in, Arrow tables out) --------------------------------------


def category_slug(category: str) -> str:
    """A safe folder name for a class name: "T-shirt/top" -> "t-shirt-top", "Ankle boot" -> "ankle-boot"."""
    return re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-")


def item_id(index: int) -> str:
    """Stable id of the image at `index` in train-then-test order, zero-padded so ids sort like indexes."""
    return f"fm-{index:05d}"


def make_catalog(labels: np.ndarray, rng: np.random.Generator) -> pa.Table:
    """One catalog row per image: id, relative PNG path, class name, a seeded title carrying the class noun,
    and a seeded in-stock flag."""
    n = len(labels)
    ids = [item_id(i) for i in range(n)]
    categories = [CLASS_NAMES[label] for label in labels]
    adjectives = rng.integers(0, len(TITLE_ADJECTIVES), n)
    colours = rng.integers(0, len(TITLE_COLOURS), n)
    noun_draws = rng.random(n)
    titles = []
    for category, adjective, colour, noun_draw in zip(categories, adjectives, colours, noun_draws):
        nouns = TITLE_NOUNS[category]
        noun = nouns[int(noun_draw * len(nouns))]
        titles.append(f"{TITLE_ADJECTIVES[adjective]} {TITLE_COLOURS[colour]} {noun}")
    uris = [f"images/{category_slug(c)}/{i}.png" for c, i in zip(categories, ids)]
    in_stock = rng.random(n) < P_IN_STOCK
    return pa.table([ids, uris, categories, titles, in_stock], schema=CATALOG_SCHEMA)


def n_users_for(n_items: int) -> int:
    """Users scale with the catalog so that each item gets a similar amount of traffic at any `limit`."""
    return max(MIN_USERS, int(n_items * USERS_PER_ITEM))


def simulate_users(categories: list[str], n_users: int, rng: np.random.Generator) -> pa.Table:
    """Users with 1-3 distinct favourite categories (listed in `categories` order) and a taste strength."""
    low, high = FAVOURITES_PER_USER
    counts = np.minimum(rng.integers(low, high + 1, n_users), len(categories))
    # A random permutation of the categories per user; its first `count` entries are the favourites.
    orders = np.argsort(rng.random((n_users, len(categories))), axis=1)
    favourites = [[categories[c] for c in sorted(order[:count])] for order, count in zip(orders, counts)]
    taste = rng.uniform(*TASTE_STRENGTH, n_users)
    width = len(str(n_users - 1))
    user_ids = [f"u-{i:0{width}d}" for i in range(n_users)]
    return pa.table([user_ids, favourites, taste], schema=USERS_SCHEMA)


def _gaps(rng: np.random.Generator, n: int, spec: tuple[int, int, int]) -> np.ndarray:
    """`n` whole-second delays: a minimum plus a capped exponential, so each step is strictly later."""
    minimum, mean, cap = spec
    return minimum + np.minimum(rng.exponential(mean, n), cap).astype(np.int64)


def _zipf_cdfs(
    item_categories: np.ndarray, n_categories: int, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per category: its item indexes and the cumulative distribution of a Zipf-like popularity that puts
    weight 1/rank^ZIPF_EXPONENT on a seeded ranking of those items."""
    cdfs = []
    for c in range(n_categories):
        items = np.flatnonzero(item_categories == c)
        weights = np.empty(len(items))
        weights[rng.permutation(len(items))] = 1.0 / np.arange(1, len(items) + 1) ** ZIPF_EXPONENT
        cdf = np.cumsum(weights)
        cdfs.append((items, cdf / cdf[-1]))
    return cdfs


def _within_group_offsets(group_sizes: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """Cumulative gaps restarted at each group: the time of each view since its session started."""
    starts = np.concatenate(([0], np.cumsum(group_sizes)[:-1]))
    gaps = gaps.copy()
    gaps[starts] = 0
    total = np.cumsum(gaps)
    return total - np.repeat(total[starts], group_sizes)


def simulate_events(catalog: pa.Table, users: pa.Table, rng: np.random.Generator) -> pa.Table:
    """Views, carts and purchases of `users` on `catalog` items (model in the module docstring), sorted by
    user and time."""
    item_category_names = catalog.column("category").to_numpy(zero_copy_only=False)
    categories, item_categories = np.unique(item_category_names, return_inverse=True)
    code = {c: i for i, c in enumerate(categories)}
    favourites = [[code[c] for c in favs] for favs in users.column("favourite_categories").to_pylist()]
    n_users, n_categories = len(favourites), len(categories)
    fav_count = np.array([len(f) for f in favourites])
    fav_table = np.zeros((n_users, max(fav_count)), dtype=np.int64)
    for u, favs in enumerate(favourites):
        fav_table[u, : len(favs)] = favs
    taste = users.column("taste_strength").to_numpy()

    # Sessions: which user, which day (distinct per user), when in the day, which category.
    sessions_per_user = rng.integers(SESSIONS_PER_USER[0], SESSIONS_PER_USER[1] + 1, n_users)
    session_user = np.repeat(np.arange(n_users), sessions_per_user)
    n_sessions = len(session_user)
    session_rank = np.arange(n_sessions) - np.repeat(
        np.cumsum(sessions_per_user) - sessions_per_user, sessions_per_user
    )
    days = np.argsort(rng.random((n_users, WINDOW_DAYS)), axis=1)[session_user, session_rank]
    window_start = int(SIMULATION_END.timestamp()) - WINDOW_DAYS * 86400
    session_start = window_start + days * 86400 + rng.integers(*SESSION_START_SECONDS, n_sessions)
    loyal = rng.random(n_sessions) < taste[session_user]
    favourite_pick = fav_table[session_user, (rng.random(n_sessions) * fav_count[session_user]).astype(int)]
    session_category = np.where(loyal, favourite_pick, rng.integers(0, n_categories, n_sessions))

    # Views: a few per session, a few seconds to minutes apart, items by popularity within the category.
    views_per_session = rng.integers(VIEWS_PER_SESSION[0], VIEWS_PER_SESSION[1] + 1, n_sessions)
    view_session = np.repeat(np.arange(n_sessions), views_per_session)
    n_views = len(view_session)
    view_ts = session_start[view_session] + _within_group_offsets(
        views_per_session, _gaps(rng, n_views, VIEW_GAP_SECONDS)
    )
    view_category = session_category[view_session]
    view_item = np.empty(n_views, dtype=np.int64)
    for c, (items, cdf) in enumerate(_zipf_cdfs(item_categories, n_categories, rng)):
        in_category = np.flatnonzero(view_category == c)
        draws = np.searchsorted(cdf, rng.random(len(in_category)), side="right")
        view_item[in_category] = items[np.minimum(draws, len(items) - 1)]
    view_user = session_user[view_session]

    # Funnel: some views lead to a cart, some carts to a purchase, each strictly later.
    carted = np.flatnonzero(rng.random(n_views) < P_CART)
    cart_ts = view_ts[carted] + _gaps(rng, len(carted), CART_GAP_SECONDS)
    bought = np.flatnonzero(rng.random(len(carted)) < P_PURCHASE)
    purchase_ts = cart_ts[bought] + _gaps(rng, len(bought), PURCHASE_GAP_SECONDS)

    user = np.concatenate([view_user, view_user[carted], view_user[carted][bought]])
    item = np.concatenate([view_item, view_item[carted], view_item[carted][bought]])
    ts = np.concatenate([view_ts, cart_ts, purchase_ts])
    kind = np.repeat(np.array(["view", "cart", "purchase"]), [n_views, len(carted), len(bought)])
    order = np.lexsort((ts, user))  # stable, so equal times keep view-before-cart-before-purchase
    user_ids = users.column("user_id").take(pa.array(user[order]))
    item_ids = catalog.column("item_id").take(pa.array(item[order]))
    timestamps = pa.array(ts[order] * 1_000_000, type=EVENTS_SCHEMA.field("ts").type)
    return pa.table([user_ids, item_ids, kind[order], timestamps], schema=EVENTS_SCHEMA)


# --- writing files ----------------------------------------------------------------------------------------


def _png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of a grey image; PIL writes no timestamps, so the same pixels give the same bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_png_chunk(root: str, uris: list[str], pixels: np.ndarray) -> int:
    """Write one chunk of images as PNGs under `root`; returns how many files it had to (re)write.

    Runs in a worker process, hence plain arguments. A file that already holds the same bytes is left alone,
    so a rebuild writes nothing: on this project's machine a full rebuild took 5-7 s this way, against
    10-90 s (depending on the disk's other load) when it rewrote every file. Other files are written under a
    temporary name and moved into place, so a reader (or a crash) never sees a truncated PNG.
    """
    written = 0
    for uri, image in zip(uris, pixels):
        path = os.path.join(root, uri)
        data = _png_bytes(image)
        try:
            with open(path, "rb") as existing:
                if existing.read() == data:
                    continue
        except FileNotFoundError:
            pass
        with open(path + ".tmp", "wb") as tmp:
            tmp.write(data)
        os.replace(path + ".tmp", path)
        written += 1
    return written


def write_images(root: Path, uris: list[str], images: np.ndarray, workers: int) -> int:
    """Write `images[i]` to `root/uris[i]` as PNG, in `workers` processes when there are enough images;
    returns how many files were (re)written.

    PNG encoding and small-file writes are CPU-bound and hold the GIL for much of the time, so the work is
    split over processes, not threads. They are spawned, not forked, because the caller may already run
    threads (Arrow, a JVM) that a fork would copy mid-state; as always with spawn, a script calling this
    directly needs an `if __name__ == "__main__":` guard (the `lookalike` console script has one).
    """
    for folder in sorted({os.path.dirname(uri) for uri in uris}):
        (root / folder).mkdir(parents=True, exist_ok=True)
    if workers <= 1 or len(uris) < PARALLEL_MIN_IMAGES:
        return _write_png_chunk(str(root), uris, images)
    size = math.ceil(len(uris) / (workers * 4))  # a few chunks per worker evens out their finishing times
    chunks = [(str(root), uris[i : i + size], images[i : i + size]) for i in range(0, len(uris), size)]
    with get_context("spawn").Pool(workers) as pool:
        return sum(pool.starmap(_write_png_chunk, chunks))


def prune_stale_images(root: Path, uris: list[str]) -> int:
    """Delete demo images (and temp files of an interrupted run) under `root/images` that `uris` no longer
    lists, e.g. after a rebuild with a smaller `limit`; returns how many were deleted.

    Images are updated in place rather than rebuilt in a fresh folder because deleting 70,000 files alone
    took 30 s to 3 min on this project's machine. Only names this module writes are touched.
    """
    keep = set(uris)
    removed = 0
    for slug in sorted({category_slug(c) for c in CLASS_NAMES}):
        folder = root / "images" / slug
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            if _IMAGE_NAME.fullmatch(entry.name) and f"images/{slug}/{entry.name}" not in keep:
                os.unlink(entry.path)
                removed += 1
        if not any(folder.iterdir()):
            folder.rmdir()
    return removed


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet file under a temporary name and move it into place, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def build_demo_data(
    out: Path,
    limit: int | None = None,
    seed: int = 7,
    dataset_dir: Path = FASHION_MNIST_DIR,
    workers: int | None = None,
) -> DemoSummary:
    """Build the demo catalog, images, users and events under `out` (see the module docstring).

    `limit` keeps the first N images (train then test order; None = all 70,000). `workers` is the number of
    processes writing PNGs (default: the CPU count, at most 8). Deterministic: the same arguments give
    identical files, and re-running over an existing `out` replaces its contents safely. Images are written
    before the catalog that lists them and stale ones pruned after it, so the catalog on disk never names a
    missing image (item ids map to the same image in every build).
    """
    if limit is not None and limit < 1:
        raise DemoDataError(f"limit must be at least 1, got {limit}")
    out = Path(out).resolve()
    started = time.perf_counter()
    images, labels = load_fashion_mnist(dataset_dir, limit)
    logger.info("loaded %d Fashion-MNIST images from %s", len(images), dataset_dir)

    streams = np.random.SeedSequence(seed).spawn(3)
    catalog_rng, users_rng, events_rng = (np.random.default_rng(s) for s in streams)
    catalog = make_catalog(labels, catalog_rng)
    present = set(catalog.column("category").to_pylist())
    users = simulate_users([c for c in CLASS_NAMES if c in present], n_users_for(len(catalog)), users_rng)
    events = simulate_events(catalog, users, events_rng)
    logger.info("simulated %d users and %d events", len(users), len(events))

    out.mkdir(parents=True, exist_ok=True)
    uris = catalog.column("image_uri").to_pylist()
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    written = write_images(out, uris, images, workers)
    logger.info(
        "images under %s: %d written, %d already up to date (%.1fs)",
        out / "images",
        written,
        len(uris) - written,
        time.perf_counter() - started,
    )
    paths = {name: out / f"{name}.parquet" for name in ("catalog", "users", "events")}
    for name, table in (("catalog", catalog), ("users", users), ("events", events)):
        write_parquet_atomic(table, paths[name])
    removed = prune_stale_images(out, uris)
    if removed:
        logger.info("removed %d stale images of an earlier build", removed)
    logger.info("demo data in %s ready after %.1fs", out, time.perf_counter() - started)
    return DemoSummary(
        out=out,
        images_dir=out / "images",
        catalog_path=paths["catalog"],
        users_path=paths["users"],
        events_path=paths["events"],
        n_items=len(catalog),
        n_users=len(users),
        n_events=len(events),
    )
