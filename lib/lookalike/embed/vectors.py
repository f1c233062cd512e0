"""What each item's embedding is made of in one embed run (Spark, driver side): image vectors the run
computed, vectors re-derived from stored backbone vectors, and with `embed.input: image+title` the title fused
in (`models.fusion`).

The backbone's own vector of every image is kept: in `embeddings` itself while the embeddings are those
vectors, else in `features` (with a head, or fused with titles), together with the title's vector and the
sha256 it was made from. So a new head, a new title weight, or an edited title re-derives an item's embedding
without reading or decoding its image, and an unchanged title is not embedded again.

`staged` (the embed UDF's rows) carries, besides the UDF's columns: `current` (the item's embedding is this
run's model version and, when fused, of its current title), `title` and `title_sha256` (fused runs; null
for a missing or blank title), `had_image` (its embedding came from an image).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf

from lookalike.embed.models import fusion
from lookalike.embed.models.cache import get_embedder, get_head
from lookalike.embed.models.head import TEXT_MODEL
from lookalike.embed.task import EMBEDDED, FAILED, STILL_FAILED, UNCHANGED, EmbedSettings
from lookalike.storage import tables

# What an item's embedding is made from, with the backbone vector behind it and (fused) its title's parts.
VECTOR_COLUMNS = ("item_id", "shard", "embedding", "feature", "image_sha256", "width", "height")
TITLE_COLUMNS = ("title_sha256", "title_feature")
TITLE_BATCH = 64  # titles per text-model call


def title_sha(title: Column, text_version: str) -> Column:
    """The sha256 of the text model's version and a usable title (null for a null or blank one): an unchanged
    title embedded by the same text model is not embedded again."""
    usable = title.isNotNull() & (F.trim(title) != "")
    return F.when(usable, F.sha2(F.concat(F.lit(f"{text_version}\n"), title), 256))


def stored_features(spark: SparkSession, existing: DataFrame | None, path: str, backbone: str) -> DataFrame | None:
    """Every backbone vector of `backbone` kept so far (item_id, feature, image_sha256, width, height):
    `embeddings` rows made from the plain backbone (their vector is the backbone's), else `features` rows."""
    columns = ("feature", "image_sha256", "width", "height")
    own = (
        None
        if existing is None
        else existing.filter(F.col("model") == backbone).select(
            "item_id", F.col("embedding").alias("feature"), *columns[1:]
        )
    )
    if not tables.exists(path):
        return own
    kept = (
        tables.read(spark, path)
        .filter((F.col("model") == backbone) & F.col("feature").isNotNull())
        .select("item_id", *columns)
    )
    return kept if own is None else own.unionByName(kept.join(own.select("item_id"), "item_id", "left_anti"))


def stored_titles(spark: SparkSession, path: str) -> DataFrame | None:
    """(item_id, stored_title_sha, stored_title) of every title vector kept in `features`."""
    if not tables.exists(path):
        return None
    return (
        tables.read(spark, path)
        .filter(F.col("title_sha256").isNotNull())
        .select(
            "item_id", F.col("title_sha256").alias("stored_title_sha"), F.col("title_feature").alias("stored_title")
        )
    )


def stale() -> Column:
    """Rows whose bytes are unchanged but whose embedding is not this run's (another head or title, or none)."""
    return (F.col("status") == UNCHANGED) & ~F.col("current")


def title_only(settings: EmbedSettings) -> Column:
    """Fused runs: rows whose image cannot be used but whose title can (their embedding is the title alone)."""
    if settings.title_weight is None:
        return F.lit(False)
    return F.col("status").isin(FAILED, STILL_FAILED) & F.col("title_sha256").isNotNull()


def keeps_vector(settings: EmbedSettings) -> Column:
    """Rows whose embedding stays as it is: unchanged and current, or title-only and already so."""
    return ((F.col("status") == UNCHANGED) & F.col("current")) | (
        title_only(settings) & F.col("current") & ~F.col("had_image")
    )


def new_vectors(
    staged: DataFrame, stored: DataFrame | None, titles: DataFrame | None, settings: EmbedSettings
) -> DataFrame:
    """VECTOR_COLUMNS + TITLE_COLUMNS of every item whose embedding this run writes: images embedded now,
    unchanged images re-derived from their stored backbone vector (through the head, if any), and with
    fused input the title fused in (embedded only when new or edited), title-only items included."""
    image = staged.filter(F.col("status") == EMBEDDED).select(*VECTOR_COLUMNS)
    if stored is not None:
        restored = staged.filter(stale()).select("item_id", "shard").join(stored, "item_id")
        image = image.unionByName(restored.select("item_id", "shard", _through_head(settings), *VECTOR_COLUMNS[3:]))
    if settings.title_weight is None:
        return image.select(*VECTOR_COLUMNS, *(F.lit(None).cast(t).alias(c) for c, t in _TITLE_TYPES.items()))
    only_title = staged.filter(title_only(settings) & ~keeps_vector(settings)).select(
        "item_id",
        "shard",
        *(F.lit(None).cast(t).alias(c) for c, t in _VECTOR_TYPES.items()),
    )
    rows = image.unionByName(only_title).join(staged.select("item_id", "title", "title_sha256"), "item_id")
    if titles is not None:
        rows = rows.join(titles, "item_id", "left")
    else:
        rows = rows.select("*", *(F.lit(None).cast(t).alias(c) for c, t in _STORED_TYPES.items()))
    fused = fuse_task(settings)("embedding", "title", "title_sha256", "stored_title_sha", "stored_title")
    return rows.select(
        "item_id",
        "shard",
        fused["embedding"].alias("embedding"),
        *VECTOR_COLUMNS[3:],
        "title_sha256",
        fused["title_feature"].alias("title_feature"),
    )


_VECTOR_TYPES = {
    "embedding": "array<float>",
    "feature": "array<float>",
    "image_sha256": "string",
    "width": "int",
    "height": "int",
}
_TITLE_TYPES = {"title_sha256": "string", "title_feature": "array<float>"}
_STORED_TYPES = {"stored_title_sha": "string", "stored_title": "array<float>"}


def feature_rows(vectors: DataFrame, settings: EmbedSettings, run_id: str) -> DataFrame:
    """The `features` rows behind `new_vectors`: backbone vector (null for a title-only item), image facts,
    title parts."""
    return vectors.select(
        "item_id",
        "feature",
        F.lit(settings.backbone_version).alias("model"),
        *VECTOR_COLUMNS[4:],
        *TITLE_COLUMNS,
        F.lit(run_id).alias("run_id"),
    )


def _through_head(settings: EmbedSettings) -> Column:
    """The `embedding` column made from stored backbone vectors (`feature`): through the head, if any."""
    if settings.head_version is None:
        return F.col("feature").alias("embedding")  # stored backbone vectors are unit already
    assert settings.head_root is not None
    return head_task(settings.head_root, settings.head_version)("feature").alias("embedding")


def head_task(output_root: str, version: str):
    """A pandas UDF: backbone vectors through the head `models/<version>` (loaded once per Python worker)."""

    @pandas_udf("array<float>")  # type: ignore[call-overload]
    def through_head(features: pd.Series) -> pd.Series:
        if features.empty:
            return pd.Series([], dtype=object)
        head = get_head(output_root, version)
        return pd.Series(list(head.apply(np.stack(features.to_numpy()))))

    return through_head


def fuse_task(settings: EmbedSettings):
    """A pandas UDF: (image vector or null, title, its sha, the stored title's sha and vector) -> the fused
    embedding and the title vector used. The text model loads (once per Python worker) only when a title
    is new or edited."""
    weight, image_dim, text_dim = settings.title_weight, settings.image_dim, settings.text_dim
    assert weight is not None and image_dim is not None and text_dim is not None  # a fused run's settings

    @pandas_udf("embedding array<float>, title_feature array<float>")  # type: ignore[call-overload]
    def fuse(
        image: pd.Series, title: pd.Series, sha: pd.Series, stored_sha: pd.Series, stored: pd.Series
    ) -> pd.DataFrame:
        n = len(image)
        images = np.zeros((n, image_dim), dtype=np.float32)
        titles = np.zeros((n, text_dim), dtype=np.float32)
        for i, vector in enumerate(image):
            if vector is not None:
                images[i] = vector
        usable = sha.notna().to_numpy()
        reuse = usable & (sha == stored_sha).to_numpy() & stored.notna().to_numpy()
        for i in np.flatnonzero(reuse):
            titles[i] = stored.iloc[i]
        todo = sorted(np.flatnonzero(usable & ~reuse), key=lambda i: len(title.iloc[i]))  # batches pad less
        if todo:
            encoder = get_embedder(TEXT_MODEL)
            for start in range(0, len(todo), TITLE_BATCH):
                batch = todo[start : start + TITLE_BATCH]
                titles[batch] = encoder.embed([title.iloc[i] for i in batch])
        vectors = fusion.fuse(images, titles, weight)
        return pd.DataFrame(
            {"embedding": list(vectors), "title_feature": [titles[i] if usable[i] else None for i in range(n)]}
        )

    return fuse
