"""The train stage (`lookalike train`): stored backbone vectors, catalog labels and shoppers' sessions -> a
head (and its text map) under `<output.root>/models/<run_id>/`, then `models/LATEST`.

Spark gathers; the driver trains. The backbone vectors are the ones the embed stage keeps (`embeddings` rows
made without a head, else `features`: `embed.vectors.stored_features`), so training never reads an image; up
to `train.max_items` of them (a seeded sample) come to the driver with their labels, 5 KB each at 1280-d.
Behaviour pairs are two items of one user's session (events no more than `train.session_gap_minutes`
apart), each event paired with the next `train.pair_window` of its session. The text map learns from up to
`train.text_pairs` of the trained items' titles, embedded here with all-MiniLM-L6-v2.

Nothing is published unless training finished: the artefact is written whole, `head.json` last, then
`LATEST`; a run killed before leaves an incomplete folder that the next publish prunes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from lookalike.config import Config
from lookalike.embed import catalog, vectors
from lookalike.embed import stage as embed
from lookalike.embed.models import cache, head, registry
from lookalike.recommend.history import read_events
from lookalike.results import StageResult
from lookalike.storage import tables
from lookalike.train import fit, textmap

log = logging.getLogger(__name__)

SCHEDULE_DAYS = {"nightly": 1.0, "weekly": 7.0, "monthly": 30.0}
# A scheduled train counts as due this long before its period is over, so a nightly that starts a little
# earlier than last week's still trains.
SCHEDULE_SLACK = dt.timedelta(hours=2)


def options_from(cfg: Config) -> fit.TrainOptions:
    return fit.TrainOptions(
        kind=cfg["train.kind"],
        dim=cfg["train.dim"],
        loss=cfg["train.loss"],
        behaviour_weight=cfg["train.behaviour_weight"] if cfg["events.path"] is not None else 0.0,
        temperature=cfg["train.temperature"],
        max_epochs=cfg["train.max_epochs"],
        patience=cfg["train.patience"],
        validation_fraction=cfg["train.validation_fraction"],
        seed=cfg["train.seed"],
    )


def backbone_version(cfg: Config) -> str:
    """The version of the vectors a head for this config reads (the model without any head)."""
    spec = registry.get_spec(cfg["model.name"])
    return registry.model_version(spec.name, cfg["model.weights"], cfg["embed.image_size"] or spec.image_size)


def due(cfg: Config, now: dt.datetime | None = None) -> bool:
    """Whether `nightly` should train first: `train.schedule` is not `never`, and the newest head is older
    than its period (or there is none, or it cannot be used)."""
    schedule = cfg["train.schedule"]
    if schedule == "never":
        return False
    latest = head.resolve_version(cfg["output.root"], "latest")
    if latest is None:
        return True
    try:
        trained_at = head.load(cfg["output.root"], latest).metadata.get("trained_at")
    except head.HeadError as err:  # a broken newest head is replaced by training a new one
        log.warning("train: the newest head cannot be used, training a new one: %s", err)
        return True
    if trained_at is None:
        return True
    trained = dt.datetime.fromisoformat(trained_at)
    return (now or dt.datetime.now(dt.UTC)) - trained >= dt.timedelta(days=SCHEDULE_DAYS[schedule]) - SCHEDULE_SLACK


def session_pairs(events: DataFrame, gap_minutes: float, window: int) -> DataFrame:
    """Distinct (a, b) item pairs, a < b, of items one user visited within one session (Spark)."""
    by_user = Window.partitionBy("user_id").orderBy("ts", "item_id")
    gap = F.col("ts").cast("double") - F.lag(F.col("ts").cast("double")).over(by_user)
    sessions = events.select("user_id", "item_id", "ts").withColumn(
        "session", F.sum(F.coalesce((gap > gap_minutes * 60).cast("int"), F.lit(0))).over(by_user)
    )
    ordered = sessions.withColumn(
        "pos", F.row_number().over(Window.partitionBy("user_id", "session").orderBy("ts", "item_id"))
    )
    a, b = ordered.alias("a"), ordered.alias("b")
    joined = a.join(
        b,
        (F.col("a.user_id") == F.col("b.user_id"))
        & (F.col("a.session") == F.col("b.session"))
        & (F.col("b.pos") > F.col("a.pos"))
        & (F.col("b.pos") <= F.col("a.pos") + window)
        & (F.col("a.item_id") != F.col("b.item_id")),
    )
    return joined.select(
        F.least("a.item_id", "b.item_id").alias("a"), F.greatest("a.item_id", "b.item_id").alias("b")
    ).distinct()


def gather(cfg: Config, spark: SparkSession, backbone: str) -> tuple[pd.DataFrame, np.ndarray, fit.TrainData]:
    """(items with their titles, feature matrix, training data) for the config's catalog and events."""
    root = cfg["output.root"]
    paths = {name: tables.table_path(root, name) for name in (embed.EMBEDDINGS, embed.FEATURES)}
    existing = tables.read(spark, paths[embed.EMBEDDINGS]) if tables.exists(paths[embed.EMBEDDINGS]) else None
    stored = vectors.stored_features(spark, existing, paths[embed.FEATURES], backbone)
    if stored is None:
        raise fit.TrainError(f"no backbone vectors of {backbone} under {root}: run `lookalike embed` first")
    label_columns = list(cfg["train.label_columns"])
    raw = catalog.load_table(spark, cfg["catalog.path"], cfg["catalog.format"])
    items = catalog.validate(raw, cfg["catalog.path"], keep=tuple(label_columns), keep_from="train.label_columns")
    joined = stored.select("item_id", "feature").join(
        items.select("item_id", "title", *[F.col(c).cast("string").alias(f"label_{c}") for c in label_columns]),
        "item_id",
    )
    sample = joined.orderBy(F.xxhash64("item_id", F.lit(cfg["train.seed"]))).limit(cfg["train.max_items"])
    table = sample.toArrow()
    if table.num_rows < 10:
        raise fit.TrainError(f"only {table.num_rows} catalog items have backbone vectors of {backbone}: need 10")
    features = np.stack(table.column("feature").to_numpy(zero_copy_only=False)).astype(np.float32)
    frame = table.drop(["feature"]).to_pandas()
    labels = {c: _codes(frame[f"label_{c}"]) for c in label_columns}
    pairs = np.empty((0, 2), dtype=np.int64)
    if cfg["events.path"] is not None and cfg["train.behaviour_weight"] > 0:
        found = (
            session_pairs(
                read_events(spark, cfg["events.path"]), cfg["train.session_gap_minutes"], cfg["train.pair_window"]
            )
            .toArrow()
            .to_pandas()
        )
        position = pd.Series(np.arange(len(frame)), index=frame["item_id"])
        found = found[found["a"].isin(position.index) & found["b"].isin(position.index)]
        pairs = np.stack([position[found["a"]].to_numpy(), position[found["b"]].to_numpy()], axis=1).astype(np.int64)
    log.info("train: %d items, %d behaviour pairs, labels %s", len(frame), len(pairs), label_columns)
    return frame, features, fit.TrainData(features, labels, pairs)


def _codes(values: pd.Series) -> np.ndarray:
    """Label values as codes 0..n-1, null or blank as -1."""
    cleaned = values.where(values.notna() & (values.astype("string").str.strip() != ""), None)
    codes, _ = pd.factorize(cleaned, use_na_sentinel=True)
    return codes.astype(np.int64)


def learn_text_map(cfg: Config, titles: pd.Series, tuned: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The text map's tensors and metrics, from the items' titles and their tuned vectors ({} without titles)."""
    method = cfg["train.text_map"]
    usable = np.flatnonzero(titles.notna().to_numpy() & (titles.fillna("").str.strip() != "").to_numpy())
    if method == "none" or len(usable) < 10:
        if method != "none":
            log.warning("train: %d items have a title: no text map (search --text needs one)", len(usable))
        return {}, {}
    rng = np.random.default_rng(cfg["train.seed"])
    chosen = np.sort(rng.choice(usable, size=min(len(usable), cfg["train.text_pairs"]), replace=False))
    started = time.perf_counter()
    encoder = cache.get_embedder(head.TEXT_MODEL)
    text = np.concatenate([encoder.embed(list(titles.iloc[chosen[i : i + 256]])) for i in range(0, len(chosen), 256)])
    val = textmap.held_out(len(chosen), cfg["train.validation_fraction"], cfg["train.seed"])
    image = tuned[chosen]
    if method == "ridge":
        w, b, metrics = textmap.fit_ridge(text, image, val)
    else:
        w, b, metrics = textmap.fit_contrastive(text, image, val, cfg["train.temperature"], seed=cfg["train.seed"])
    metrics["text_pairs"] = float(len(chosen))
    metrics["text_seconds"] = round(time.perf_counter() - started, 3)
    return {"text_w": w, "text_b": b}, metrics


def run(cfg: Config, spark: SparkSession, run_id: str) -> StageResult:
    started = time.time()
    if cfg["embed.input"] == "title":
        raise fit.TrainError("lookalike train tunes image vectors, but embed.input is 'title': nothing to train on")
    root = cfg["output.root"]
    backbone = backbone_version(cfg)
    frame, features, data = gather(cfg, spark, backbone)
    options = options_from(cfg)
    fitted = fit.fit(data, options)
    candidate = head.Head(run_id, backbone, options.kind, fitted.tensors)
    text_tensors, text_metrics = learn_text_map(cfg, frame["title"], candidate.apply(features))
    data_version = {name: tables.version(tables.table_path(root, name)) for name in (embed.EMBEDDINGS, embed.FEATURES)}
    metrics = {**fitted.metrics, **text_metrics}
    trained = head.Head(
        run_id,
        backbone,
        options.kind,
        {**fitted.tensors, **text_tensors},
        {
            "trained_at": dt.datetime.now(dt.UTC).isoformat(),
            "run_id": run_id,
            "loss": options.loss,
            "temperature": options.temperature,
            "label_columns": sorted(fit.usable_labels(data.labels)),
            "behaviour_weight": options.behaviour_weight,
            "text_map_method": cfg["train.text_map"] if text_tensors else "none",
            "data": {"table_versions": data_version, "items": len(frame), "pairs": int(len(data.pairs))},
            "metrics": metrics,
        },
    )
    folder = head.save(root, run_id, trained)
    log.info("train %s: head %s written to %s: %s", run_id, run_id, folder, json.dumps(metrics))
    metrics["seconds_total"] = round(time.time() - started, 3)
    return StageResult("train", rows_in=len(frame), rows_out=1, metrics=metrics)
