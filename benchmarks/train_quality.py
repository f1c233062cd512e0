"""Training quality (issue 17): what a head tuned by `lookalike train` gains over the frozen backbone.

Every number compares the tuned head with the frozen backbone (the baseline) on the same items, measured in
this run. Backbone vectors come from the library's own embedder (EfficientNet-Lite0, `--image-size`, the
runtime the embed stage uses on this machine); heads from `lookalike.train.fit.fit`, the function the train
stage calls, with its defaults except where a row names what it varies.

1. Labels on half of the items only: the other half are new items (same classes, never labelled); printed
   is precision@10 by class among the new items, frozen against each head (linear or MLP; supervised
   contrastive or proxy loss). On `--fashion` Fashion-MNIST images (28x28 grey, 10 classes) and on the
   harder set `photo_sources.labelled_images` (~1,030 real colour images in ~70 labels: Tux Paint stamps
   by folder, several crops of each GCompris painting or monument by subject). Target: +0.05 on the harder
   set, nothing lost on Fashion-MNIST.
2. Behaviour only (no labels): the demo's simulated shoppers (`demo_data`, one category per session) over
   the labelled half of Fashion-MNIST, pairs made by `train.stage.session_pairs` in Spark; the head is
   judged by precision@10 by class among the new half, which no event touched.
3. Text to image: titles of the labelled half train the map (ridge and contrastive); on the new half, each
   title is the query and the hit is its own item, searched among the new half's tuned image vectors;
   baseline: the same query searched among the new half's title vectors (title-vs-title, ties ranked
   fairly). Printed: recall@10 of the item and precision@10 of its class.
4. Training time per 100,000 items: the default head trained on 100,000 vectors (Fashion-MNIST vectors with
   fresh noise, 10 classes), seconds and epochs.

    .venv/bin/python benchmarks/train_quality.py                 # 6000 Fashion-MNIST items, the colour set
    .venv/bin/python benchmarks/train_quality.py --fashion 2000 --skip-100k
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import photo_sources  # noqa: E402

from lookalike import demo_data  # noqa: E402
from lookalike.embed.models import cache, head  # noqa: E402
from lookalike.train import fit, textmap  # noqa: E402

HEADS = [("linear", "supcon"), ("linear", "proxy"), ("mlp", "supcon"), ("mlp", "proxy")]


def embed_images(images: list[Image.Image], image_size: int) -> np.ndarray:
    embedder = cache.get_embedder("efficientnet-lite0", image_size=image_size)
    return np.concatenate([embedder.embed(images[i : i + 64]) for i in range(0, len(images), 64)])


def embed_titles(titles: list[str]) -> np.ndarray:
    encoder = cache.get_embedder(head.TEXT_MODEL)
    return np.concatenate([encoder.embed(titles[i : i + 256]) for i in range(0, len(titles), 256)])


def halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def codes_of(labels: list[str] | np.ndarray) -> np.ndarray:
    _, codes = np.unique(np.asarray(labels), return_inverse=True)
    return codes.astype(np.int64)


def tuned(features: np.ndarray, fitted: fit.Fitted, kind: str) -> np.ndarray:
    return head.Head("bench", "bench", kind, fitted.tensors).apply(features)


def label_gain(name: str, features: np.ndarray, codes: np.ndarray) -> dict[tuple[str, str], fit.Fitted]:
    """Section 1 for one set; returns the fitted heads (section 3 reuses the default one)."""
    known, new = halves(len(codes))
    train_codes = codes.copy()
    train_codes[new] = -1
    frozen = fit.precision_at_k(features[new], codes[new])
    print(f"\n{name}: {len(codes)} items, {codes.max() + 1} classes, labels on {len(known)}, judged on {len(new)}")
    print(f"  {'head':<16} {'p@10 new items':>15} {'gain':>7} {'epochs':>7} {'seconds':>8}")
    print(f"  {'frozen':<16} {frozen:>15.4f}")
    heads = {}
    for kind, loss in HEADS:
        fitted = fit.fit(
            fit.TrainData(features, {"label": train_codes}, NO_PAIRS), fit.TrainOptions(kind=kind, loss=loss)
        )
        score = fit.precision_at_k(tuned(features[new], fitted, kind), codes[new])
        m = fitted.metrics
        print(
            f"  {kind + ' ' + loss:<16} {score:>15.4f} {score - frozen:>+7.4f} {m['epochs']:>7.0f} {m['seconds']:>8.1f}"
        )
        heads[(kind, loss)] = fitted
    return heads


NO_PAIRS = np.empty((0, 2), dtype=np.int64)


def behaviour_gain(features: np.ndarray, labels: np.ndarray) -> None:
    """Section 2: the demo's shoppers browse the labelled half; no label is given to training."""
    from lookalike import config
    from lookalike.session import get_spark
    from lookalike.train.stage import session_pairs

    known, new = halves(len(labels))
    rng = np.random.default_rng(7)
    catalog = demo_data.make_catalog(labels[known], rng)
    users = demo_data.simulate_users(list(demo_data.CLASS_NAMES), demo_data.n_users_for(len(known)) * 4, rng)
    events = demo_data.simulate_events(catalog, users, rng)
    with tempfile.TemporaryDirectory() as tmp:
        values = {"catalog.path": tmp, "output.root": tmp, "spark.master": "local[2]"}
        spark = get_spark(config.validate(values, Path(tmp), need_paths=()))
        frame = spark.createDataFrame(events.select(["user_id", "item_id", "event_type", "ts"]).to_pandas())
        found = session_pairs(frame, 30.0, 5).toPandas()
    position = {f"fm-{i:05d}": int(known[i]) for i in range(len(known))}  # catalog ids number the known half
    pairs = np.array([(position[a], position[b]) for a, b in zip(found["a"], found["b"])], dtype=np.int64)
    frozen = fit.precision_at_k(features[new], labels[new])
    fitted = fit.fit(fit.TrainData(features, {}, pairs), fit.TrainOptions())
    score = fit.precision_at_k(tuned(features[new], fitted, "linear"), labels[new])
    print(f"\nbehaviour only: {len(events)} events of {len(users)} simulated shoppers, {len(pairs)} session pairs")
    print(f"  p@10 by class of new items: frozen {frozen:.4f}, head from behaviour {score:.4f} ({score - frozen:+.4f})")
    m = fitted.metrics
    print(
        f"  held-out pair recall@10: frozen {m['pair_recall_at_10_frozen']:.4f}, head {m['pair_recall_at_10_head']:.4f}"
    )


def text_to_image(
    name: str, features: np.ndarray, codes: np.ndarray, titles: list[str | None], fitted: fit.Fitted
) -> None:
    """Section 3 for one set, with the default head of section 1."""
    known, new = halves(len(codes))
    has_title = np.array([t is not None and t.strip() != "" for t in titles])
    known, new = known[has_title[known]], new[has_title[new]]
    text = embed_titles([titles[i] for i in np.concatenate([known, new])])
    text_known, text_new = text[: len(known)], text[len(known) :]
    image = tuned(features, fitted, "linear")
    val = textmap.held_out(len(known), 0.1, 0)
    print(f"\n{name} text to image: map learned on {len(known)} (title, image) pairs, {len(new)} new items searched")
    print(f"  {'query -> searched':<32} {'item recall@10':>15} {'class p@10':>11}")

    def report(label: str, queries: np.ndarray, targets: np.ndarray) -> None:
        scores = head.l2_normalise(queries) @ head.l2_normalise(targets).T
        top = np.argsort(-scores, axis=1)[:, :10]
        precision = float((codes[new][top] == codes[new][:, None]).mean())
        print(f"  {label:<32} {textmap.recall_at_k(queries, targets):>15.4f} {precision:>11.4f}")

    report("title -> titles (baseline)", text_new, text_new)
    for method in ("ridge", "contrastive"):
        if method == "ridge":
            w, b, _ = textmap.fit_ridge(text_known, image[known], val)
        else:
            w, b, _ = textmap.fit_contrastive(text_known, image[known], val, 0.1)
        report(f"title -> images ({method} map)", text_new @ w + b, image[new])


def training_time(features: np.ndarray, labels: np.ndarray) -> None:
    """Section 4: the default head on 100,000 vectors."""
    rng = np.random.default_rng(3)
    rows = rng.integers(0, len(features), 100_000)
    big = head.l2_normalise(
        features[rows] + rng.standard_normal((100_000, features.shape[1])).astype(np.float32) * 0.01
    )
    started = time.perf_counter()
    fitted = fit.fit(fit.TrainData(big, {"label": labels[rows].astype(np.int64)}, NO_PAIRS), fit.TrainOptions())
    seconds = time.perf_counter() - started
    epochs = fitted.metrics["epochs"]
    print(
        f"\ntraining time: 100,000 items x {features.shape[1]}-d, default head: {seconds:.1f} s for {epochs:.0f} "
        f"epochs ({seconds / epochs:.1f} s per epoch) on this CPU"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion", type=int, default=6000, help="Fashion-MNIST items (default 6000)")
    parser.add_argument("--image-size", type=int, default=112, help="backbone input size (conf/local.yaml's 112)")
    parser.add_argument("--skip-100k", action="store_true", help="skip the 100,000-item training time")
    args = parser.parse_args()

    images, labels = demo_data.load_fashion_mnist(limit=args.fashion)
    started = time.perf_counter()
    fm_features = embed_images([Image.fromarray(image) for image in images], args.image_size)
    fm_codes = labels.astype(np.int64)
    colour = photo_sources.labelled_images()
    colour_features = embed_images([item.image for item in colour], args.image_size)
    colour_codes = codes_of([item.label for item in colour])
    seconds = time.perf_counter() - started
    print(f"embedded {len(fm_features)} + {len(colour_features)} images at {args.image_size} px in {seconds:.0f} s")

    fm_heads = label_gain("Fashion-MNIST", fm_features, fm_codes)
    colour_heads = label_gain("colour set", colour_features, colour_codes)
    behaviour_gain(fm_features, labels)
    catalog = demo_data.make_catalog(labels, np.random.default_rng(11))
    text_to_image(
        "Fashion-MNIST (demo titles)",
        fm_features,
        fm_codes,
        catalog.column("title").to_pylist(),
        fm_heads[("linear", "supcon")],
    )
    text_to_image(
        "colour set (Tux Paint descriptions)",
        colour_features,
        colour_codes,
        [item.title for item in colour],
        colour_heads[("linear", "supcon")],
    )
    if not args.skip_100k:
        training_time(fm_features, fm_codes)


if __name__ == "__main__":
    main()
