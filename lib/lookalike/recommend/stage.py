"""The recommend stage: `events` + `embeddings` -> every user's `recommend.n` items in `recommendations`.

Flow (Spark unless named otherwise):
1. History (`history.py`): events weighted by type and age, one row per (user, item), the heaviest
   `recommend.history_limit` items per user for taste and candidates, `recommend.covisit_history` for
   co-visitation pairs; items a user bought (any type in `recommend.exclude_events`) are remembered so that
   they are never offered back. Only items with a vector in `embeddings` can shape a taste; every item a
   user touched still counts for co-visitation.
2. Profiles: per user (in tasks over partitions sorted by user, `distributor.key_groups`: one Python call
   per batch of users, not one pandas DataFrame per user), the history's vectors become up to
   `recommend.max_interests` interest vectors (`taste.interests`), each with its weight share, its member
   items and the shards its members live in (the shards it will search: a taste for sneakers searches the
   shoe shard).
3. Co-visitation candidates: items co-visited with the user's history (`history.covisit_candidates`); each
   user's pairs are counted in NumPy inside the tasks (`covisit.pair_counts`), not as Spark rows.
4. Scoring units (shard, user chunk), one per Spark task (`mapInArrow`), sorted by shard so that a reused
   Python worker keeps one FAISS shard loaded (the one-entry cache of the similar stage's design; its vectors
   read straight from the files of the `embeddings` version the driver read): every interest that targets
   the shard asks it for `recommend.candidates` items (index search, exact re-rank); every candidate, found
   there or co-visited and living there, gets its cosine to each of the user's interests and joins the best
   one; items the user bought and items not offered (staged per shard and chunk like the co-visited ones)
   leave, and so do candidates that can never reach the user's list (`scoring.contenders`: behind n others
   of their interest on looks alone); the rest name the members of their interest that resemble them most.
5. Per user (again over partitions sorted by user): the visual cosine and the co-visitation score are
   blended (`taste.blend`) and the interests share the list (`taste.fair_merge`). `because` holds the
   history items with the largest blended contributions.
6. Users with no usable history, or fewer than n candidates left, are filled from the most popular items
   they have not bought, with an empty `because`.
A run whose inputs are unchanged since the last one (the events and catalog files, the `embeddings` table
version and the settings, recorded in `<output.root>/state/recommendations.json` with the table version it
wrote) does nothing. Otherwise only the users whose list may have changed are recomputed (`incremental`
says which; everyone on a first run) and their rows replaced by `user_id` in one commit; the state that
decides the next run is written before that commit and pointed at after it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, Row, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from lookalike import distributor
from lookalike.config import Config
from lookalike.embed import catalog, shards
from lookalike.errors import LookalikeError
from lookalike.index import builds, shard_index
from lookalike.recommend import history, incremental
from lookalike.recommend.scoring import (
    best_interest,
    contenders,
    entry_score,
    explain,
    profile_rows,
    rank_user,
    reasons,
)
from lookalike.results import StageResult
from lookalike.storage import files, tables

log = logging.getLogger(__name__)

RECOMMENDATIONS, EMBEDDINGS = "recommendations", "embeddings"
PROFILE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("interest", pa.int32()),
        ("share", pa.float64()),
        ("vector", pa.list_(pa.float32())),
        ("targets", pa.list_(pa.string())),
        ("members", pa.list_(pa.string())),
        ("member_weights", pa.list_(pa.float32())),
        ("member_vectors", pa.list_(pa.float32())),
    ]
)
PROFILE_COLUMNS = ["user_id", "interest", "vector", "targets", "members", "member_weights", "member_vectors"]
CANDIDATE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("interest", pa.int32()),
        ("visual", pa.float32()),
        ("visual_because", pa.list_(pa.string())),
        ("visual_contrib", pa.list_(pa.float32())),
    ]
)
RESULT_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("rank", pa.int32()),
        ("item_id", pa.string()),
        ("score", pa.float32()),
        ("because", pa.list_(pa.string())),
    ]
)
RANKED_SCHEMA = RESULT_SCHEMA.append(pa.field("entry", pa.float64()))
MAX_POPULAR = 10_000
"""Most popular items broadcast for the fill: a user who excluded more than this many of them may end short."""


class RecommendError(LookalikeError):
    """The recommend stage cannot run: no events configured, or no usable input."""


@dataclass(frozen=True)
class Settings:
    n: int
    event_weights: Mapping[str, float]
    half_life_days: float | None
    max_interests: int
    covisit_weight: float
    exclude_events: tuple[str, ...]
    in_stock_only: bool
    history_limit: int
    covisit_history: int
    candidates: int
    covisit_neighbours: int
    because: int
    chunk_size: int
    incremental: bool

    @classmethod
    def from_config(cls, cfg: Config) -> Settings:
        return cls(
            n=cfg["recommend.n"],
            event_weights=dict(cfg["recommend.event_weights"]),
            half_life_days=cfg["recommend.half_life_days"],
            max_interests=cfg["recommend.max_interests"],
            covisit_weight=cfg["recommend.covisit_weight"],
            exclude_events=tuple(cfg["recommend.exclude_events"]),
            in_stock_only=cfg["recommend.in_stock_only"],
            history_limit=cfg["recommend.history_limit"],
            covisit_history=cfg["recommend.covisit_history"],
            candidates=cfg["recommend.candidates"],
            covisit_neighbours=cfg["recommend.covisit_neighbours"],
            because=cfg["recommend.because"],
            chunk_size=cfg["recommend.chunk_size"],
            incremental=cfg["recommend.incremental"],
        )


@dataclass(frozen=True)
class Job(builds.SearchJob):
    """What every scoring task needs, pickled into its closure: `embeddings` lists the files of the
    `embeddings` version the driver read."""

    candidates: int
    because: int
    n: int
    covisit_weight: float
    embeddings: tuple[str, ...]


@dataclass(frozen=True, order=True)
class Unit:
    """Score the users of one chunk against one shard."""

    shard: str
    chunk: int


# ----------------------------------------------------------------------------------------- executors


@dataclass(frozen=True)
class Target:
    """A shard as scoring tasks use it: its index, its vectors in FAISS id order, and each position's rank in
    item id order (`scoring.contenders` breaks ties by it)."""

    loaded: shard_index.LoadedShard
    vectors: np.ndarray
    id_order: np.ndarray


def _load_target(job: Job, shard: str) -> Target:
    """A shard's `Target`, its vectors read from the `embeddings` files, for `distributor.worker_cached`."""
    table = tables.read_files(job.embeddings, ["item_id", "embedding"], pc.field("shard") == shard)
    loaded = builds.load_shard(job.output_root, job.build, shard, model=job.model, dim=job.dim)
    vectors = loaded.align(table["item_id"].combine_chunks(), shard_index.matrix(table["embedding"], job.dim))
    id_order = np.empty(len(loaded.item_ids), dtype=np.int64)
    id_order[pc.sort_indices(loaded.item_ids).to_numpy()] = np.arange(len(id_order))
    return Target(loaded, vectors, id_order)


def _staged_part(job: Job, part: str, unit: Unit, columns: list[str], per_chunk: bool = True) -> pa.Table | None:
    """The unit's rows of a part `_recompute` staged by shard (and user chunk), or None where it has none."""
    folder = f"{job.staging}/{part}/shard_dir={shards.folder_name(unit.shard)}"
    return distributor.read_staged_if_any(f"{folder}/chunk={unit.chunk}" if per_chunk else folder, columns)


def _pairs(staged: pa.Table | None, item_ids: pa.Array) -> dict[str, set[int]]:
    """Staged (user_id, item_id) rows of one shard as each user's set of positions in it."""
    pairs: dict[str, set[int]] = {}
    if staged is not None:
        positions = pc.index_in(staged["item_id"], value_set=item_ids)
        for user, position in zip(staged["user_id"].to_pylist(), positions.to_pylist()):
            if position is not None:  # always, for an index built from the current embeddings
                pairs.setdefault(user, set()).add(position)
    return pairs


def _score_unit(job: Job, unit: Unit) -> pa.RecordBatch:
    """Candidates of one chunk's users in one shard (module docstring, step 4): found by the user's
    interests or co-visited, less what the user bought and what is not offered, less what cannot reach the
    user's list (`scoring.contenders`)."""
    target, _ = distributor.worker_cached(job.cache_key(unit.shard), lambda: _load_target(job, unit.shard))
    loaded, vectors = target.loaded, target.vectors
    profiles = distributor.read_staged(f"{job.staging}/profiles/chunk={unit.chunk}", PROFILE_COLUMNS)
    requests = _staged_part(job, "requests", unit, ["user_id", "item_id"])
    bought = _staged_part(job, "excluded", unit, ["user_id", "item_id"])
    unavailable = _staged_part(job, "unavailable", unit, ["item_id"], per_chunk=False)
    covisited = _pairs(requests, loaded.item_ids)
    dropped = _pairs(bought, loaded.item_ids)
    offered = np.ones(len(vectors), dtype=bool)
    if unavailable is not None:
        offered[pc.index_in(unavailable["item_id"], value_set=loaded.item_ids).drop_null().to_numpy()] = False
    found: dict[str, set[int]] = {user: set(positions) for user, positions in covisited.items()}
    asks = profiles.filter(_targets(profiles, unit.shard))
    if asks.num_rows:
        queries = shard_index.matrix(asks.column("vector"), job.dim)
        _, ids = loaded.search(vectors, queries, min(job.candidates, len(vectors)))
        for user, row in zip(asks.column("user_id").to_pylist(), ids):
            found.setdefault(user, set()).update(row[row >= 0].tolist())
    asking = profiles.filter(pc.is_in(profiles.column("user_id"), value_set=pa.array(list(found), pa.string())))
    asking = asking.sort_by([("user_id", "ascending"), ("interest", "ascending")])
    users, members = asking.column("user_id").to_pylist(), asking.column("members").to_pylist()
    interests = shard_index.matrix(asking.column("vector"), job.dim)
    weights = [w[:, 0] for w in shard_index.matrices(asking.column("member_weights"), 1)]
    member_vectors = shard_index.matrices(asking.column("member_vectors"), job.dim)
    columns: dict[str, list] = {name: [] for name in CANDIDATE_SCHEMA.names}
    positions_of: list[np.ndarray] = []
    bounds = distributor.group_bounds(asking.column("user_id"))
    for a, b in zip(bounds[:-1], bounds[1:]):
        user = users[a]
        positions = np.array(sorted(found[user]), dtype=np.int64)
        best, visual = best_interest(interests[a:b], vectors[positions])
        usable = offered[positions] & ~np.isin(positions, np.fromiter(dropped.get(user, ()), dtype=np.int64))
        positions, best, visual = positions[usable], best[usable], visual[usable]
        is_covisited = np.isin(positions, np.fromiter(covisited.get(user, ()), dtype=np.int64))
        keep = contenders(best, visual, target.id_order[positions], is_covisited, job.n, job.covisit_weight)
        positions, best, visual = positions[keep], best[keep], visual[keep]
        names, contribs = explain(
            best, members[a:b], weights[a:b], member_vectors[a:b], vectors[positions], job.because
        )
        positions_of.append(positions)
        columns["user_id"] += [users[a]] * len(positions)
        columns["interest"] += best.tolist()
        columns["visual"] += visual.tolist()
        columns["visual_because"] += names
        columns["visual_contrib"] += contribs
    taken = np.concatenate(positions_of) if positions_of else np.zeros(0, dtype=np.int64)
    columns["item_id"] = loaded.item_ids.take(pa.array(taken))
    return pa.record_batch([pa.array(columns[f.name], type=f.type) for f in CANDIDATE_SCHEMA], schema=CANDIDATE_SCHEMA)


def _targets(profiles: pa.Table, shard: str) -> pa.Array:
    """A mask of the profile rows whose `targets` hold `shard`."""
    targets = profiles.column("targets").combine_chunks()
    hits = pc.list_parent_indices(targets).to_numpy()[pc.equal(pc.list_flatten(targets), shard).to_numpy(False)]
    mask = np.zeros(profiles.num_rows, dtype=bool)
    mask[hits] = True
    return pa.array(mask)


def score_task(job: Job) -> Callable[[Unit], Iterator[pa.RecordBatch]]:
    """The task body for `distributor.run_tasks`: one unit's candidates."""

    def score_unit(unit: Unit) -> Iterator[pa.RecordBatch]:
        yield _score_unit(job, unit)

    return score_unit


def profiles_task(max_interests: int, dim: int) -> Callable[[Iterable[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The `mapInArrow` body of step 2: usable history rows sorted by user and item -> PROFILE_SCHEMA rows."""

    def profiles(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for table, bounds in distributor.key_groups(batches, "user_id"):
            users, items = table.column("user_id").to_pylist(), table.column("item_id").to_pylist()
            weights = table.column("weight").to_numpy().astype(np.float64)
            shard_of = table.column("shard").to_pylist()
            vectors = shard_index.matrix(table.column("embedding"), dim)
            rows = [
                row
                for a, b in zip(bounds[:-1], bounds[1:])
                for row in profile_rows(users[a], items[a:b], weights[a:b], shard_of[a:b], vectors[a:b], max_interests)
            ]
            yield pa.RecordBatch.from_pylist(rows, schema=PROFILE_SCHEMA)

    return profiles


def rank_task(settings: Settings) -> Callable[[Iterable[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The `mapInArrow` body of step 5: scored candidates sorted by user and item -> RANKED_SCHEMA rows (the
    table's, and each user's `scoring.entry_score` for the incremental state)."""
    weight = settings.covisit_weight

    def rank(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for table, bounds in distributor.key_groups(batches, "user_id"):
            interest = table.column("interest").to_numpy()
            visual = table.column("visual").to_numpy().astype(np.float64)
            covisit = table.column("covisit").fill_null(0.0).to_numpy().astype(np.float64)
            shares = table.column("shares")
            kept, scores, ranks, tops, entries = [], [], [], [], []
            for a, b in zip(bounds[:-1], bounds[1:]):
                user_shares = np.asarray(shares[int(a)].as_py())
                keep, score = rank_user(interest[a:b], visual[a:b], covisit[a:b], user_shares, settings.n, weight)
                kept.append(a + keep)
                scores.append(score)
                ranks.append(np.arange(1, len(keep) + 1, dtype=np.int32))
                tops.append(np.full(len(keep), covisit[a:b].max()))
                entries.append(np.full(len(keep), entry_score(interest[a:b], score, user_shares, settings.n)))
            rows = table.take(pa.array(np.concatenate(kept)))
            because = [
                reasons(v_names, v_parts, c_names, c_parts, float(top), weight, settings.because)
                for v_names, v_parts, c_names, c_parts, top in zip(
                    rows.column("visual_because").to_pylist(),
                    rows.column("visual_contrib").to_pylist(),
                    rows.column("covisit_because").to_pylist(),
                    rows.column("covisit_contrib").to_pylist(),
                    np.concatenate(tops),
                )
            ]
            yield pa.record_batch(
                [
                    rows.column("user_id").combine_chunks(),
                    pa.array(np.concatenate(ranks)),
                    rows.column("item_id").combine_chunks(),
                    pa.array(np.concatenate(scores), type=pa.float32()),
                    pa.array(because, type=pa.list_(pa.string())),
                    pa.array(np.concatenate(entries)),
                ],
                schema=RANKED_SCHEMA,
            )

    return rank


# ---------------------------------------------------------------------------------------------- driver


def _popular(weighted: DataFrame, items: DataFrame, limit: int) -> DataFrame:
    """The `limit` most popular recommendable items, with a score in (0, 1] relative to the best."""
    ranked = history.popularity(weighted).join(items, "item_id").orderBy(F.desc("popularity"), "item_id").limit(limit)
    top = ranked.agg(F.max("popularity").alias("top"))  # one row, joined to every item: no global window
    return ranked.crossJoin(F.broadcast(top)).select(
        "item_id", "popularity", (F.col("popularity") / F.col("top")).cast("float").alias("pop_score")
    )


def _fill(users: DataFrame, ranked: DataFrame, popular: DataFrame, excluded: DataFrame, n: int) -> DataFrame:
    """Popular items for every user short of n rows (none at all for users with no usable history)."""
    have = ranked.groupBy("user_id").agg(F.count("*").alias("have"))
    short = users.join(have, "user_id", "left").fillna(0, ["have"]).filter(F.col("have") < n)
    offered = ranked.select("user_id", "item_id")
    order = Window.partitionBy("user_id").orderBy(F.desc("popularity"), "item_id")
    return (
        short.crossJoin(F.broadcast(popular))
        .join(excluded, ["user_id", "item_id"], "left_anti")
        .join(offered, ["user_id", "item_id"], "left_anti")
        .withColumn("rank", (F.col("have") + F.row_number().over(order)).cast("int"))
        .filter(F.col("rank") <= n)
        .select(
            "user_id",
            "rank",
            "item_id",
            F.col("pop_score").alias("score"),
            F.array().cast("array<string>").alias("because"),
        )
    )


def _only_row(aggregate: DataFrame) -> Row:
    """The one row of a global aggregation (never empty, even over no rows)."""
    row = aggregate.first()
    assert row is not None
    return row


def inputs_fingerprint(cfg: Config, settings: Settings) -> dict[str, Any]:
    """What the table's content depends on, as JSON-ready values (module docstring)."""
    return json.loads(
        json.dumps(
            {
                "settings": asdict(settings),
                "events": files.listing_digest(cfg["events.path"]),
                "catalog": files.listing_digest(cfg["catalog.path"]) if settings.in_stock_only else None,
                "embeddings": tables.version(tables.table_path(cfg["output.root"], EMBEDDINGS)),
            }
        )
    )


def _reusable_state(
    previous: Any, inputs: dict[str, Any], model: str, table_version: int | None
) -> incremental.State | None:
    """The previous run's per-user state, where this run may start from it (`incremental`): same settings
    and model, the table as that run left it, its state folders all there."""

    def results_settings(settings: dict[str, Any]) -> dict[str, Any]:  # the flag changes no list
        return {key: value for key, value in settings.items() if key != "incremental"}

    if (
        previous is None
        or not inputs["settings"]["incremental"]
        or results_settings(previous.get("inputs", {}).get("settings", {})) != results_settings(inputs["settings"])
        or previous.get("model") != model
        or previous.get("table_version") != table_version
        or "state" not in previous
        or not all(files.exists(f"{previous['state'][part]}/_SUCCESS") for part in incremental.PARTS)
    ):
        return None
    return incremental.State(previous["state"], previous["popular"])


def _scope(
    spark: SparkSession,
    run_id: str,
    settings: Settings,
    state: incremental.State | None,
    same_events: bool,
    popular_rows: list[list],
    digests: DataFrame,
    n_all: int,
    covisits: DataFrame,
    items_now: DataFrame,
    embeddings: DataFrame,
    items: DataFrame,
) -> tuple[DataFrame | None, DataFrame | None]:
    """The users this run recomputes (None: everyone) and the users whose rows leave the table (None: none)."""
    if state is None:
        log.info(
            "recommend %s: every user recomputed (first run, settings or model changed, table not as the last run "
            "left it, or recommend.incremental off)",
            run_id,
        )
        return None, None
    changed = incremental.changed_items(items_now, state, spark).cache()
    n_changed = changed.count()
    if n_changed > incremental.MAX_CHANGED_ITEMS:
        log.info("recommend %s: every user recomputed (%d items changed)", run_id, n_changed)
        changed.unpersist()
        return None, None
    fresh = (
        changed.join(embeddings.select("item_id", "shard", "embedding"), "item_id")
        .join(items.select("item_id"), "item_id")
        .collect()
    )
    vectors = np.array([r["embedding"] for r in fresh], dtype=np.float32) if fresh else np.zeros((0, 0), np.float32)
    dirty, gone = incremental.dirty_users(
        spark,
        state,
        digests,
        changed,
        (vectors, [r["shard"] for r in fresh]),
        covisits,
        None if same_events else incremental.covisit_changes(covisits, state, spark),
        popular_rows != state.popular,
        settings.covisit_weight,
        spark.sparkContext.defaultParallelism,
    )
    dirty = dirty.join(digests, "user_id", "left_semi").cache()
    gone = gone.cache()
    n_dirty, n_gone = dirty.count(), gone.count()
    changed.unpersist()
    if n_dirty > incremental.MAX_DIRTY_SHARE * n_all:
        log.info("recommend %s: every user recomputed (%d of %d changed)", run_id, n_dirty, n_all)
        dirty.unpersist()
        gone.unpersist()
        return None, None
    log.info(
        "recommend %s: %d of %d users to recompute, %d gone (%d items changed%s%s)",
        run_id,
        n_dirty,
        n_all,
        n_gone,
        n_changed,
        "" if same_events else ", events changed",
        ", popular list changed" if popular_rows != state.popular else "",
    )
    if not n_gone:
        gone.unpersist()
    return dirty, gone if n_gone else None


def _user_state(n: int, digests: DataFrame, limited: DataFrame, ranked: DataFrame, rows: DataFrame) -> DataFrame:
    """The state rows (`incremental`) of the users this run recomputed: their history digest, history and
    listed items, entry score (-inf for lists that take any newcomer) and whether popular items filled them."""
    history_of = limited.groupBy("user_id").agg(F.sort_array(F.collect_list("item_id")).alias("history"))
    listed = rows.groupBy("user_id").agg(F.sort_array(F.collect_list("item_id")).alias("listed"))
    entries = ranked.groupBy("user_id").agg(F.first("entry").alias("entry"), F.count("*").alias("_mine"))
    return (
        digests.join(rows.select("user_id").distinct(), "user_id", "left_semi")
        .join(history_of, "user_id", "left")
        .join(listed, "user_id", "left")
        .join(entries, "user_id", "left")
        .select(
            "user_id",
            "digest",
            F.coalesce("history", F.array().cast("array<string>")).alias("history"),
            F.coalesce("listed", F.array().cast("array<string>")).alias("listed"),
            F.coalesce("entry", F.lit(float("-inf"))).alias("entry"),
            (F.coalesce("_mine", F.lit(0)) < n).alias("filled"),
        )
    )


def _write_state(
    spark: SparkSession,
    root: str,
    run_id: str,
    state: incremental.State | None,
    redone: DataFrame | None,
    parts: dict[str, DataFrame | str],
) -> dict[str, str]:
    """This run's state (`incremental`): each part's folder, written under this run's own folder when it is
    a frame (a string is a folder already written: the state's, carried over). Written before the commit it
    describes; the JSON that points at it after. With `redone` (the users recomputed or gone) `users` and
    `profiles` hold the recomputed users' rows, or the state's folder when none was, and the other users' rows
    are kept."""
    if state is not None and redone is not None:
        for part in ("users", "profiles"):
            kept = state.read(spark, part).join(redone, "user_id", "left_anti")
            new = parts[part]
            parts[part] = kept if isinstance(new, str) else kept.unionByName(new)
    folders = {}
    for part in incremental.PARTS:
        frame = parts[part]
        if isinstance(frame, str):
            folders[part] = frame
        else:
            folders[part] = incremental.folder(root, run_id, part)
            frame.write.mode("overwrite").parquet(folders[part])
    return folders


@dataclass(frozen=True)
class Pieces:
    """What steps 2-6 read, restricted to the users they recompute (`users`; everyone on a full run)."""

    users: DataFrame
    limited: DataFrame
    excluded: DataFrame
    embeddings: DataFrame
    items: DataFrame
    covisits: DataFrame
    popular: DataFrame


def _recompute(
    spark: SparkSession,
    run_id: str,
    settings: Settings,
    job: Job,
    pieces: Pieces,
    n_users: int,
    shard_names: list[str],
    started: float,
) -> tuple[DataFrame, DataFrame, DataFrame, int]:
    """Steps 2-6 for `pieces.users`, in `job.staging`: (staged profiles, ranked rows with entry scores, the
    table's rows, scoring tasks)."""
    n_chunks = max(
        1,
        math.ceil(n_users / settings.chunk_size),
        min(2 * spark.sparkContext.defaultParallelism, math.ceil(n_users / 50)),
    )
    vectors = pieces.embeddings.select("item_id", "shard", "embedding")
    usable = pieces.limited.join(vectors, "item_id").select("user_id", "item_id", "weight", "shard", "embedding")
    profiles = distributor.by_key(usable, n_chunks, "user_id", "item_id").mapInArrow(
        profiles_task(settings.max_interests, job.dim), from_arrow_schema(PROFILE_SCHEMA)
    )
    located = vectors.select("item_id", "shard")
    requests = history.covisit_candidates(pieces.limited, pieces.covisits, settings.candidates, settings.because)
    staging = job.staging
    chunk = F.pmod(F.xxhash64("user_id"), F.lit(n_chunks)).cast("int")
    staged = distributor.stage(profiles.withColumn("chunk", chunk), f"{staging}/profiles", ["chunk"])
    log.info("recommend %s: %d users' interests staged (%.1f s in)", run_id, n_users, time.time() - started)

    def by_shard(part: str, frame: DataFrame, per_chunk: bool = True) -> DataFrame:
        """`frame`'s rows where `_staged_part` reads them: by shard folder (and by user chunk)."""
        if per_chunk:
            frame = frame.withColumn("chunk", chunk)
        folders = shards.with_folder(spark, frame, shard_names)
        return distributor.stage(folders, f"{staging}/{part}", ["shard_dir", "chunk"] if per_chunk else ["shard_dir"])

    staged_requests = by_shard("requests", requests.join(located, "item_id"))
    by_shard("excluded", pieces.excluded.join(located, "item_id"))
    if settings.in_stock_only:
        by_shard("unavailable", located.join(pieces.items, "item_id", "left_anti"), per_chunk=False)
    log.info("recommend %s: co-visited candidates and exclusions staged (%.1f s in)", run_id, time.time() - started)
    asked = (
        staged.select(F.explode("targets").alias("shard"), "chunk")
        .unionByName(staged_requests.select("shard", "chunk"))
        .distinct()
        .collect()
    )
    units = sorted(Unit(r["shard"], r["chunk"]) for r in asked)
    log.info(
        "recommend %s: %d users in %d chunks, %d (shard, chunk) scoring tasks", run_id, n_users, n_chunks, len(units)
    )
    distributor.run_tasks(spark, units, score_task(job), CANDIDATE_SCHEMA).write.parquet(f"{staging}/candidates")
    candidates = spark.read.parquet(f"{staging}/candidates")
    log.info("recommend %s: candidates scored (%.1f s in)", run_id, time.time() - started)
    shares = staged.groupBy("user_id").agg(
        F.transform(F.sort_array(F.collect_list(F.struct("interest", "share"))), lambda s: s["share"]).alias("shares")
    )
    scored = candidates.join(staged_requests.drop("shard", "shard_dir", "chunk"), ["user_id", "item_id"], "left").join(
        shares, "user_id"
    )
    ranked = distributor.by_key(scored, n_chunks, "user_id", "item_id").mapInArrow(
        rank_task(settings), from_arrow_schema(RANKED_SCHEMA)
    )
    ranked.write.parquet(f"{staging}/ranked")
    ranked = spark.read.parquet(f"{staging}/ranked")
    log.info("recommend %s: lists ranked (%.1f s in)", run_id, time.time() - started)
    listed = ranked.drop("entry")
    filled = _fill(pieces.users, listed, pieces.popular, pieces.excluded, settings.n)
    listed.unionByName(filled).withColumn("run_id", F.lit(run_id)).write.parquet(f"{staging}/rows")
    return staged, ranked, spark.read.parquet(f"{staging}/rows"), len(units)


def run(cfg: Config, spark: SparkSession, run_id: str) -> StageResult:
    started = time.time()
    settings = Settings.from_config(cfg)
    root, events_path = cfg["output.root"], cfg["events.path"]
    if events_path is None:
        raise RecommendError("events.path is not set: recommendations need interaction events")
    state_path, table_path = files.state_path(root, RECOMMENDATIONS), tables.table_path(root, RECOMMENDATIONS)
    inputs = inputs_fingerprint(cfg, settings)
    previous = files.read_json(state_path)
    table_version = tables.version(table_path)
    if previous is not None and previous["inputs"] == inputs and previous["table_version"] == table_version:
        log.info(
            "recommend %s: events, catalog, embeddings and settings unchanged since run %s, nothing to do",
            run_id,
            previous["run_id"],
        )
        return StageResult(
            "recommend", rows_in=0, rows_out=0, metrics={"unchanged": 1.0, "seconds": round(time.time() - started, 3)}
        )
    build = builds.latest_build(root)
    summary = builds.build_summary(root, build)
    dim = summary["dim"]
    embeddings_path = tables.table_path(root, EMBEDDINGS)
    embeddings_version = tables.version(embeddings_path)  # the scoring tasks read this version's files
    embeddings = tables.read(spark, embeddings_path, embeddings_version)
    per_shard = embeddings.groupBy("shard").agg(F.count("*").alias("n"), F.collect_set("model").alias("models"))
    stats = per_shard.collect()
    shard_names = sorted(r["shard"] for r in stats)
    builds.check_fresh(
        {r["shard"]: r["n"] for r in stats},
        [m for r in stats for m in r["models"]],
        summary,
        build,
        "lookalike recommend",
    )
    items = embeddings.select("item_id", "shard")
    if settings.in_stock_only:
        stock = catalog.read_catalog(spark, cfg).filter(F.col("in_stock")).select("item_id")
        items = items.join(stock, "item_id")

    events = history.read_events(spark, events_path)
    unknown = sorted(
        r["event_type"]
        for r in events.select("event_type")
        .distinct()
        .filter(~F.col("event_type").isin(list(settings.event_weights)))
        .limit(20)
        .collect()
    )
    if unknown:
        log.warning(
            "recommend %s: events of type(s) %s have no weight in recommend.event_weights and are ignored",
            run_id,
            unknown,
        )
    weighted = history.weighted(events, settings.event_weights, settings.half_life_days).cache()
    pairs = history.user_items(weighted, settings.exclude_events).cache()
    excluded = pairs.filter("excluded").select("user_id", "item_id")
    limited = history.limit_history(pairs, settings.history_limit).cache()
    long_history = history.limit_history(pairs, max(settings.history_limit, settings.covisit_history))
    # Enough popular items that every user has n left after their own exclusions and their list.
    most_excluded = _only_row(excluded.groupBy("user_id").count().agg(F.max("count")))[0] or 0
    top = _popular(weighted, items.select("item_id"), 2 * settings.n + min(most_excluded, MAX_POPULAR)).collect()
    popular = spark.createDataFrame(top, "item_id string, popularity double, pop_score float")
    popular_rows = [[r["item_id"], round(float(r["pop_score"]), 6)] for r in top]  # what the state compares

    state = _reusable_state(previous, inputs, summary["model"], table_version)
    same_events = state is not None and previous["inputs"]["events"] == inputs["events"]
    if state is not None and same_events:
        covisits_folder = state.folders["covisits"]
    else:  # read by the state's checks, the candidates and the next run: computed once, into the state
        covisits_folder = incremental.folder(root, run_id, "covisits")
        history.covisitation(
            long_history, settings.covisit_neighbours, spark.sparkContext.defaultParallelism
        ).write.mode("overwrite").parquet(covisits_folder)
    covisits = spark.read.parquet(covisits_folder)
    digests = (
        state.read(spark, "users").select("user_id", "digest")
        if state is not None and same_events
        else incremental.user_digests(events.select("user_id").distinct(), pairs)
    ).cache()
    n_all = digests.count()
    items_now = incremental.item_keys(embeddings, items)
    scope, gone = _scope(
        spark,
        run_id,
        settings,
        state,
        same_events,
        popular_rows,
        digests,
        n_all,
        covisits,
        items_now,
        embeddings,
        items,
    )
    n_users = n_all if scope is None else scope.count()
    staging = files.staging_dir(root, run_id, "recommend")
    units = 0
    try:
        parts: dict[str, DataFrame | str] = {"items": items_now, "covisits": covisits_folder}
        if state is not None:  # kept unless users were recomputed or left
            parts.update(users=state.folders["users"], profiles=state.folders["profiles"])
        rows = None
        if scope is None or n_users:
            pieces = Pieces(
                users=digests.select("user_id") if scope is None else scope,
                limited=limited if scope is None else limited.join(scope, "user_id", "left_semi"),
                excluded=excluded if scope is None else excluded.join(scope, "user_id", "left_semi"),
                embeddings=embeddings,
                items=items,
                covisits=covisits,
                popular=popular,
            )
            job = Job(
                output_root=root,
                build=build,
                model=summary["model"],
                dim=dim,
                staging=staging,
                candidates=settings.candidates,
                because=settings.because,
                n=settings.n,
                covisit_weight=settings.covisit_weight,
                embeddings=tuple(tables.current_files(embeddings_path, embeddings_version)),
            )
            staged, ranked, rows, units = _recompute(
                spark, run_id, settings, job, pieces, n_users, shard_names, started
            )
            parts["users"] = _user_state(settings.n, digests, pieces.limited, ranked, rows)
            parts["profiles"] = staged.select("user_id", "interest", "vector", "targets")
        redone = None if scope is None or (not n_users and gone is None) else scope
        if redone is not None and gone is not None:
            redone = redone.unionByName(gone)
        folders = _write_state(spark, root, run_id, state, redone, parts)
        if scope is None:
            assert rows is not None
            result = tables.write(rows, table_path, mode="overwrite")
        elif rows is not None or gone is not None:
            empty = spark.createDataFrame([], tables.spark_schema(table_path))
            result = tables.replace_by_key(rows if rows is not None else empty, table_path, "user_id", gone)
        else:
            assert table_version is not None  # a reusable state recorded this version of the table
            result = tables.CommitResult(table_version, 0, 0, 0)
        files.write_text(
            state_path,
            json.dumps(
                {
                    "run_id": run_id,
                    "inputs": inputs,
                    "table_version": result.version,
                    "model": summary["model"],
                    "state": folders,
                    "popular": popular_rows,
                },
                indent=2,
            ),
        )
        incremental.remove_unused(root, folders.values())
        written = tables.read(spark, table_path)
        personal, distinct_items = _only_row(
            written.agg(F.countDistinct(F.when(F.size("because") > 0, F.col("user_id"))), F.countDistinct("item_id"))
        )
    finally:
        files.remove_dir(staging)
        for frame in (weighted, pairs, limited, digests, scope, gone):
            if frame is not None:
                frame.unpersist()
    n_items = sum(r["n"] for r in stats)
    metrics = {
        "users": float(n_all),
        "users_recomputed": float(n_users),
        "users_personalised": float(personal),
        "users_popularity_only": float(n_all - personal),
        "catalog_coverage": round(distinct_items / n_items, 4) if n_items else 0.0,
        "scoring_tasks": float(units),
        "seconds": round(time.time() - started, 3),
    }
    log.info("recommend %s: %d rows for %d of %d users; %s", run_id, result.rows_added, n_users, n_all, metrics)
    return StageResult("recommend", rows_in=n_users, rows_out=result.rows_added, metrics=metrics)
