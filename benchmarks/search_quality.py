"""Search quality: altered copies of catalog images find their originals, through the Searcher and exactly.

A catalog of `--fashion` Fashion-MNIST images (28x28 grey product photos) and every real colour photo of
`photo_sources.colour_photos` (~560 object photos; `photo_sources.INSTALL` installs them) goes through the
real embed and index stages (the model's native input size; `index.flat_below` lowered so that both shards
are IVF-PQ, tuned as the nightly tunes them). `--fashion-size 112` stores the Fashion-MNIST listings upscaled
4x (bicubic), as a shop would show them, instead of at the 28 px they ship at. Then `--queries` images of each
source are altered, with seeded random amounts, in two ways:

  shopper   a shopper's photo of the listing (issue 16), all at once: crop to 80-95% of each side,
            brightness +-15%, rescale to 40-70%, a border of 3-8% in white, grey or black, JPEG quality 50-70.
  reupload  a merchant re-uploading a listed photo: crop to 85-100% of each side, rescale to 50-100%,
            JPEG quality 60-90.

Each copy is searched against the whole catalog (both shards, merged) with `lookalike.Searcher`, and exactly
by brute force over the same embeddings (the baseline: the model's own ceiling). Printed per source and
alteration: recall@1 and recall@5 of the original item for both, and their ratio. Target (issue 16):
recall@1 >= 0.9 for shopper photos.

Near-duplicate calibration (`search.duplicate_score`): the cosine of each re-upload with its original (what
the flag must catch) and of each shopper photo, against each catalog item's cosine with its most similar
*other* item (different products that look alike, what it must not flag): the share of each above a few
thresholds, and the lowest threshold that flags at most 1% of the distinct look-alikes.

    .venv/bin/python benchmarks/search_quality.py                  # 1000 + ~560 items, 500 + 500 queries
    .venv/bin/python benchmarks/search_quality.py --fashion 2000 --queries 300
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
import photo_sources  # noqa: E402

from lookalike import config  # noqa: E402
from lookalike.embed import stage as embed  # noqa: E402
from lookalike.index import shard_index  # noqa: E402
from lookalike.index import stage as index  # noqa: E402
from lookalike.search.searcher import Searcher  # noqa: E402
from lookalike.session import get_spark  # noqa: E402
from lookalike.storage import tables  # noqa: E402

THRESHOLDS = (0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.96)
FALSE_FLAGS = 0.01  # the calibrated threshold flags at most this share of distinct look-alikes


def alter(image: Image.Image, rng: np.random.Generator, how: str) -> bytes:
    """A shopper's photo of the listing, or a merchant's re-upload of it (module docstring)."""
    image = image.convert("RGB")
    width, height = image.size
    low, high = (0.80, 0.95) if how == "shopper" else (0.85, 1.0)
    cw, ch = (max(1, round(side * rng.uniform(low, high))) for side in (width, height))
    left, top = int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1))
    image = image.crop((left, top, left + cw, top + ch))
    if how == "shopper":
        image = ImageEnhance.Brightness(image).enhance(1 + rng.uniform(-0.15, 0.15))
    scale = rng.uniform(0.40, 0.70) if how == "shopper" else rng.uniform(0.5, 1.0)
    image = image.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BILINEAR)
    if how == "shopper":
        border = max(1, round(max(image.size) * rng.uniform(0.03, 0.08)))
        image = ImageOps.expand(image, border, fill=("white", "grey", "black")[int(rng.integers(0, 3))])
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(50, 71) if how == "shopper" else rng.integers(60, 91)))
    return buffer.getvalue()


def recall(found: list[list[str]], originals: list[str], k: int) -> float:
    return float(np.mean([original in row[:k] for row, original in zip(found, originals)]))


def write_catalog(folder: Path, sources: dict[str, list[Image.Image]]) -> Path:
    (folder / "img").mkdir(parents=True)
    rows = []
    for source, images in sources.items():
        for i, image in enumerate(images):
            item = f"{source}-{i:05d}"
            image.save(folder / "img" / f"{item}.png")
            rows.append({"item_id": item, "image_uri": f"img/{item}.png", "category": source})
    pd.DataFrame(rows).to_parquet(folder / "catalog.parquet")
    return folder / "catalog.parquet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion", type=int, default=1000, help="Fashion-MNIST items in the catalog")
    parser.add_argument("--fashion-size", type=int, default=28, help="side of the Fashion-MNIST listings, px")
    parser.add_argument("--queries", type=int, default=500, help="altered copies searched per source and kind")
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    fashion = photo_sources.fashion_mnist(args.fashion)
    if args.fashion_size != 28:
        size = (args.fashion_size, args.fashion_size)
        fashion = [image.resize(size, Image.Resampling.BICUBIC) for image in fashion]
    sources = {"fashion": fashion, "photo": photo_sources.colour_photos()}
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="search-quality-") as tmp:
        work = Path(tmp)
        cfg = config.validate(
            {
                "catalog.path": str(write_catalog(work, sources)),
                "output.root": str(work / "out"),
                "index.flat_below": 256,
                "spark.conf": {"spark.ui.enabled": "false"},
            },
            base_dir=work,
        )
        spark = get_spark(cfg)
        started = time.perf_counter()
        embed.run(cfg, spark, "b1")
        built = index.run(cfg, spark, "b1")
        spark.stop()
        print(
            f"catalog: {', '.join(f'{len(v)} {k}' for k, v in sources.items())}; embedded and indexed in "
            f"{time.perf_counter() - started:.0f} s; shards {built.metrics}"
        )
        searcher = Searcher.open(cfg["output.root"])
        table = tables.read_arrow(tables.table_path(cfg["output.root"], "embeddings"), ["item_id", "embedding"])
        ids = np.array(table["item_id"].to_pylist())
        vectors = shard_index.matrix(table["embedding"], searcher.dim)
        position = {item: row for row, item in enumerate(ids)}
        print(f"model {searcher.model}, build {searcher.build}\n")
        columns = ("lookalike r@1", 13), ("r@5", 6), ("exact r@1", 9), ("r@5", 6), ("ratio", 6)
        print(f"{'source':8} {'copies':8} {'n':>4} " + " ".join(f"{name:>{width}}" for name, width in columns))
        copy_scores: dict[tuple[str, str], np.ndarray] = {}
        checked = 0
        for source, images in sources.items():
            chosen = rng.choice(len(images), size=min(args.queries, len(images)), replace=False)
            originals = [f"{source}-{i:05d}" for i in chosen]
            for how in ("shopper", "reupload"):
                copies = [alter(images[i], rng, how) for i in chosen]
                queries = np.concatenate([searcher.embed(copies[i : i + 64]) for i in range(0, len(copies), 64)])
                found = [[h.item_id for h in hits] for hits in searcher.search_vectors(queries, 5)]
                for copy, row in list(zip(copies, found))[:10]:  # the bytes path gives the same answers
                    checked += [h.item_id for h in searcher.search(copy, k=5)] == row
                scores = queries @ vectors.T
                exact = [list(ids[np.argsort(-row, kind="stable")[:5]]) for row in scores]
                copy_scores[source, how] = scores[np.arange(len(chosen)), [position[o] for o in originals]]
                r1, r5, e1, e5 = (recall(f, originals, k) for f in (found, exact) for k in (1, 5))
                ratio = r1 / max(e1, 1e-9)
                print(f"{source:8} {how:8} {len(chosen):4d} {r1:13.3f} {r5:6.3f} {e1:9.3f} {e5:6.3f} {ratio:6.3f}")
        print(f"(the bytes path agreed with the vector path on {checked} of {10 * len(copy_scores)} queries)\n")
        calibrate(ids, vectors, copy_scores)


def calibrate(ids: np.ndarray, vectors: np.ndarray, copy_scores: dict[tuple[str, str], np.ndarray]) -> None:
    """Copies' cosine with their originals against distinct items' cosine with their nearest other item."""
    nearest = {}
    for source in sorted({source for source, _ in copy_scores}):
        rows = np.flatnonzero(np.char.startswith(ids.astype(str), f"{source}-"))
        sims = vectors[rows] @ vectors.T
        sims[np.arange(rows.size), rows] = -np.inf
        nearest[source] = sims.max(axis=1)
    print("share at or above each threshold: of the copies (to flag) / of items' nearest other item (not to flag)")
    print(f"{'source':8} {'copies':8} " + " ".join(f"{t:>11.2f}" for t in THRESHOLDS))
    for (source, how), scores in copy_scores.items():
        cells = [f"{np.mean(scores >= t):.2f}/{np.mean(nearest[source] >= t):.3f}" for t in THRESHOLDS]
        print(f"{source:8} {how:8} " + " ".join(f"{c:>11}" for c in cells))
    distinct = np.concatenate(list(nearest.values()))
    threshold = float(np.quantile(distinct, 1 - FALSE_FLAGS))
    print(f"\nlowest threshold flagging <= {FALSE_FLAGS:.0%} of distinct look-alikes (all sources): {threshold:.3f}")
    for (source, how), scores in copy_scores.items():
        print(
            f"  {source} {how}: flags {np.mean(scores >= threshold):.1%} of the copies; copies' cosine p5/p50 "
            f"{np.quantile(scores, 0.05):.3f}/{np.median(scores):.3f}; items' nearest other p50/p99 "
            f"{np.median(nearest[source]):.3f}/{np.quantile(nearest[source], 0.99):.3f}"
        )


if __name__ == "__main__":
    main()
