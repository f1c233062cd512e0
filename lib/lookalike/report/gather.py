"""Gathering the report: each section asks Spark for a handful of keys (a seeded hash order plus `limit`,
spread over categories where that helps), then fetches only the rows of those keys, then the catalog facts
and thumbnails of exactly the items shown. A table that is missing or unreadable becomes a note."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, Row, SparkSession, Window
from pyspark.sql import functions as F

from lookalike.config import Config
from lookalike.embed import catalog as catalog_mod
from lookalike.errors import LookalikeError
from lookalike.index import builds
from lookalike.report.data import (
    BAD_STATUSES,
    EVENT_STRENGTH,
    GROUP_MEMBERS,
    HISTORY_ITEMS,
    SEED,
    WARN_STATUSES,
    WRITERS,
    Absent,
    Card,
    DuplicateGroup,
    DuplicateSample,
    HistoryEntry,
    ItemFacts,
    Neighbour,
    QuarantineSample,
    Recommendation,
    ReportData,
    StageRun,
    UserSample,
    UserView,
)
from lookalike.report.render import fmt_int
from lookalike.report.thumbnails import load_thumbnails
from lookalike.storage import tables

log = logging.getLogger(__name__)


@dataclass
class Sources:
    """The report's view of the output: its tables (opened on demand) and the validated catalog."""

    cfg: Config
    spark: SparkSession
    catalog: DataFrame | None
    catalog_problem: str | None

    @property
    def root(self) -> str:
        return self.cfg["output.root"]

    def path(self, name: str) -> str:
        return tables.table_path(self.root, name)

    def table(self, name: str) -> DataFrame | Absent:
        path = self.path(name)
        if not tables.exists(path):
            return Absent(
                f"The {name} table does not exist yet ({path}); `lookalike {WRITERS.get(name, 'nightly')}` writes it."
            )
        return tables.read(self.spark, path)


def open_sources(cfg: Config, spark: SparkSession) -> Sources:
    """The catalog is optional for the report: without it tiles lose titles and pictures, nothing more."""
    try:
        return Sources(cfg, spark, catalog_mod.read_catalog(spark, cfg), None)
    except Exception as err:  # noqa: BLE001 - gone, empty, corrupt: whatever it is, the tables still show
        log.warning("report: catalog not readable, tiles will have no pictures: %s", _first_line(err))
        return Sources(cfg, spark, None, _first_line(err))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def hash_order(*keys: str) -> list[Column]:
    """A seeded pseudo-random order with a tie-breaker: the same sample every time, spread over the keys."""
    return [F.xxhash64(F.lit(SEED), *keys), *[F.col(k) for k in keys]]


def spread_sample(df: DataFrame, key: str, group: str, n: int) -> list[Row]:
    """`n` rows of `df` taken round-robin over `group` values in seeded hash order: every category shows up
    before any shows twice, which a plain hash sample of a skewed catalog would not give."""
    turn = F.row_number().over(Window.partitionBy(group).orderBy(*hash_order(key)))
    return df.withColumn("_turn", turn).orderBy("_turn", *hash_order(key)).limit(n).collect()


def sample_neighbours(src: Sources, n: int) -> dict[str, list[Neighbour]] | Absent:
    """A few items spread over categories, each with its whole neighbour list."""
    similar = src.table("similar_items")
    if isinstance(similar, Absent):
        return similar
    firsts = similar.filter(F.col("rank") == 1).select("item_id")
    if src.catalog is not None:
        firsts = firsts.join(src.catalog.select("item_id", "category"), "item_id", "left")
    else:
        firsts = firsts.withColumn("category", F.lit(None).cast("string"))
    picked = [row["item_id"] for row in spread_sample(firsts, "item_id", "category", n)]
    if not picked:
        return Absent("The similar_items table is empty.")
    lists: dict[str, list[Neighbour]] = {item: [] for item in picked}
    rows = (
        similar.filter(F.col("item_id").isin(picked))
        .select("item_id", "rank", "similar_item_id", "score")
        .orderBy("item_id", "rank")
        .collect()
    )
    for row in rows:
        lists[row["item_id"]].append(Neighbour(int(row["rank"]), row["similar_item_id"], float(row["score"])))
    return lists


def sample_users(src: Sources, n: int) -> UserSample | Absent:
    """Users with recommendations (or, before the recommend stage exists, users with events)."""
    recs = src.table("recommendations")
    events = _events(src)
    notes = [recs.message] if isinstance(recs, Absent) else []
    if isinstance(recs, Absent) and isinstance(events, Absent):
        return Absent(f"{recs.message} {events.message}")
    if isinstance(events, Absent):
        notes.append(events.message)
    if isinstance(recs, Absent):
        assert not isinstance(events, Absent)  # both absent returned above
        pool = events.select("user_id").distinct()
    else:
        pool = recs.filter(F.col("rank") == 1).select("user_id")
    users = [row["user_id"] for row in pool.orderBy(*hash_order("user_id")).limit(n).collect()]
    if not users:
        return Absent("There are no users to show: the recommendations table and the events are empty.")
    histories, counts = ({}, {}) if isinstance(events, Absent) else _histories(events, users)
    lists = {} if isinstance(recs, Absent) else _recommendations(recs, users)
    views = tuple(
        UserView(u, counts.get(u, 0), tuple(histories.get(u, ())), tuple(lists.get(u, ()))) for u in sorted(users)
    )
    return UserSample(views, tuple(notes), with_recommendations=not isinstance(recs, Absent))


def _events(src: Sources) -> DataFrame | Absent:
    path = src.cfg["events.path"]
    if path is None:
        return Absent("No events are configured (`events.path`), so no user history is shown.")
    try:
        return src.spark.read.parquet(path)
    except AnalysisException as err:
        return Absent(f"The events at {path} cannot be read: {_first_line(err)}")


def _histories(events: DataFrame, users: list[str]) -> tuple[dict[str, list[HistoryEntry]], dict[str, int]]:
    """Per user: the most recent distinct items, each named by its strongest event (purchase > cart > view)."""
    mine = events.filter(F.col("user_id").isin(users))
    strength = F.coalesce(
        *[F.when(F.col("event_type") == name, F.lit(v)) for name, v in EVENT_STRENGTH.items()], F.lit(0)
    )
    per_item = mine.groupBy("user_id", "item_id").agg(
        F.max("ts").alias("last_ts"),
        F.count(F.lit(1)).alias("events"),
        F.max(F.struct(strength.alias("s"), F.col("event_type").alias("t"))).alias("top"),
    )
    recent = F.row_number().over(Window.partitionBy("user_id").orderBy(F.desc("last_ts"), "item_id"))
    rows = per_item.withColumn("_n", recent).filter(F.col("_n") <= HISTORY_ITEMS).orderBy("user_id", "_n").collect()
    histories: dict[str, list[HistoryEntry]] = {}
    for row in rows:
        histories.setdefault(row["user_id"], []).append(
            HistoryEntry(row["item_id"], row["top"]["t"] or "", int(row["events"]), row["last_ts"])
        )
    counts = {row["user_id"]: int(row["count"]) for row in mine.groupBy("user_id").count().collect()}
    return histories, counts


def _recommendations(recs: DataFrame, users: list[str]) -> dict[str, list[Recommendation]]:
    rows = (
        recs.filter(F.col("user_id").isin(users))
        .select("user_id", "rank", "item_id", "score", "because")
        .orderBy("user_id", "rank")
        .collect()
    )
    lists: dict[str, list[Recommendation]] = {}
    for row in rows:
        lists.setdefault(row["user_id"], []).append(
            Recommendation(int(row["rank"]), row["item_id"], float(row["score"]), tuple(row["because"] or ()))
        )
    return lists


def sample_duplicates(src: Sources, n_groups: int) -> DuplicateSample | Absent:
    """The biggest groups of identical images (`kind` exact): a placeholder shared by many listings matters most."""
    dups = src.table("duplicates")
    if isinstance(dups, Absent):
        return dups
    if "kind" in dups.columns:  # near pairs are chains of look-alikes, not groups of one image
        dups = dups.filter(F.col("kind") == "exact")
    sizes = dups.groupBy("duplicate_of").agg(F.count(F.lit(1)).alias("size")).cache()
    try:
        rows, n = dups.count(), sizes.count()
        top = sizes.orderBy(F.desc("size"), "duplicate_of").limit(n_groups)
        place = F.row_number().over(Window.partitionBy("duplicate_of").orderBy("item_id"))
        members = (
            dups.join(top.select("duplicate_of"), "duplicate_of", "left_semi")
            .withColumn("_m", place)
            .filter(F.col("_m") <= GROUP_MEMBERS)
        )
        listed: dict[str, list[str]] = {}
        for row in members.orderBy("duplicate_of", "_m").collect():
            listed.setdefault(row["duplicate_of"], []).append(row["item_id"])
        groups = tuple(
            DuplicateGroup(r["duplicate_of"], int(r["size"]), tuple(listed.get(r["duplicate_of"], ())))
            for r in top.orderBy(F.desc("size"), "duplicate_of").collect()
        )
    finally:
        sizes.unpersist()
    return DuplicateSample(rows, n, groups)


def sample_quarantine(src: Sources, per_kind: int) -> QuarantineSample | Absent:
    quarantine = src.table("quarantine")
    if isinstance(quarantine, Absent):
        return quarantine
    counts = tuple(
        (r["error_kind"] or "(none)", int(r["count"]))
        for r in quarantine.groupBy("error_kind").count().orderBy(F.desc("count"), "error_kind").collect()
    )
    place = F.row_number().over(Window.partitionBy("error_kind").orderBy("item_id"))
    examples = tuple(
        r.asDict()
        for r in (
            quarantine.withColumn("_n", place)
            .filter(F.col("_n") <= per_kind)
            .select("item_id", "image_uri", "error_kind", "error_message", "run_id", "seen_at")
            .orderBy("error_kind", "item_id")
            .collect()
        )
    )
    return QuarantineSample(counts, examples)


def recent_runs(src: Sources, n: int) -> list[StageRun] | Absent:
    """Every stage row of the `n` most recent runs, newest run first, its stages in the order they ran."""
    runs = src.table("runs")
    if isinstance(runs, Absent):
        return runs
    last = (
        runs.groupBy("run_id")
        .agg(F.min("started_at").alias("_run_start"))
        .orderBy(F.desc_nulls_last("_run_start"), F.desc("run_id"))
        .limit(n)
    )
    rows = (
        runs.join(last, "run_id")
        .orderBy(F.desc_nulls_last("_run_start"), F.desc("run_id"), "started_at", "stage")
        .collect()
    )
    return [
        StageRun(
            r["run_id"],
            r["stage"],
            r["status"] or "",
            r["started_at"],
            r["finished_at"],
            r["rows_in"],
            r["rows_out"],
            dict(sorted((r["metrics"] or {}).items())),
        )
        for r in rows
    ]


def overview(src: Sources, data: ReportData) -> list[Card]:
    """Headline numbers: how much of the catalog made it through each step, and how the last run went.
    Sections that already counted something (quarantine, duplicates, runs) lend their numbers."""
    return [
        _catalog_card(src),
        _embeddings_card(src),
        _quarantine_card(data.quarantine),
        _index_card(src),
        _rank_one_card(src, "similar_items", "Items with neighbours"),
        _duplicates_card(data.duplicates),
        _rank_one_card(src, "recommendations", "Users with recommendations"),
        _last_run_card(data.runs),
    ]


def _catalog_card(src: Sources) -> Card:
    if src.catalog is None:
        return Card("Catalog items", "–", src.catalog_problem or "")
    return Card("Catalog items", fmt_int(src.catalog.count()))


def _rank_one_card(src: Sources, name: str, label: str) -> Card:
    """Keys with a list (`rank` 1 rows) and the rows of all lists."""
    df = src.table(name)
    if isinstance(df, Absent):
        return Card(label, "–", "not built yet")
    return Card(label, fmt_int(df.filter(F.col("rank") == 1).count()), f"{fmt_int(df.count())} rows")


def _quarantine_card(quarantine: QuarantineSample | Absent) -> Card:
    if isinstance(quarantine, Absent):
        return Card("Quarantined images", "–", "not built yet")
    kinds = len(quarantine.counts)
    return Card(
        "Quarantined images", fmt_int(sum(n for _, n in quarantine.counts)), f"{kinds} kind{'' if kinds == 1 else 's'}"
    )


def _duplicates_card(duplicates: DuplicateSample | Absent) -> Card:
    if isinstance(duplicates, Absent):
        return Card("Duplicate listings", "–", "not built yet")
    groups = duplicates.n_groups
    return Card("Duplicate listings", fmt_int(duplicates.rows), f"{fmt_int(groups)} group{'' if groups == 1 else 's'}")


def _embeddings_card(src: Sources) -> Card:
    df = src.table("embeddings")
    if isinstance(df, Absent):
        return Card("Embedded items", "–", "not built yet")
    models = [r["model"] for r in df.select("model").distinct().orderBy("model").limit(3).collect()]
    return Card("Embedded items", fmt_int(df.count()), ", ".join(m or "?" for m in models))


def _index_card(src: Sources) -> Card:
    try:
        build = builds.latest_build(src.root)
        shards = builds.build_summary(src.root, build)["shards"]
    except (LookalikeError, OSError, ValueError, KeyError, TypeError):  # none yet, or an unreadable summary
        return Card("Index shards", "–", "no index build yet")
    recall = min((float(s.get("recall_at_10", 1.0)) for s in shards), default=1.0)
    return Card("Index shards", fmt_int(len(shards)), f"build {build} · recall@10 ≥ {recall:.3f}")


def _last_run_card(runs: list[StageRun] | Absent) -> Card:
    """A run failed (or was interrupted) if any of its stages did; otherwise it says what its last stage says."""
    if isinstance(runs, Absent) or not runs:
        return Card("Last run", "–", "no runs recorded yet")
    last = [r for r in runs if r.run_id == runs[0].run_id]
    failed = [r for r in last if r.status.lower() in BAD_STATUSES | WARN_STATUSES]
    status = failed[0].status if failed else last[-1].status or "?"
    return Card("Last run", status, f"{last[0].run_id} · {', '.join(r.stage for r in last)}")


def item_facts(src: Sources, ids: Iterable[str]) -> dict[str, ItemFacts]:
    """Catalog rows of exactly the items the page mentions (an `isin` filter, never the whole catalog)."""
    wanted = sorted(set(ids))
    if src.catalog is None or not wanted:
        return {}
    rows = (
        src.catalog.filter(F.col("item_id").isin(wanted)).select("item_id", "category", "title", "image_uri").collect()
    )
    return {r["item_id"]: ItemFacts(r["item_id"], r["category"], r["title"], r["image_uri"]) for r in rows}


def _guarded(what: str, fn: Callable[[], Any]) -> Any:
    """A section whose table exists but cannot be read as the contract says becomes a note, not a crash."""
    try:
        return fn()
    except (LookalikeError, AnalysisException) as err:
        log.warning("report: %s could not be read: %s", what, err)
        return Absent(f"The {what} could not be read: {_first_line(err)}")


def gather(cfg: Config, spark: SparkSession) -> ReportData:
    """Read every section's sample, then the catalog facts and thumbnails of exactly the items shown."""
    src = open_sources(cfg, spark)
    data = ReportData(
        output_root=src.root,
        cards=[],
        items=_guarded("similar_items table", lambda: sample_neighbours(src, cfg["report.items"])),
        users=_guarded("recommendations and events", lambda: sample_users(src, cfg["report.users"])),
        duplicates=_guarded("duplicates table", lambda: sample_duplicates(src, cfg["report.examples"])),
        quarantine=_guarded("quarantine table", lambda: sample_quarantine(src, cfg["report.examples"])),
        runs=_guarded("runs table", lambda: recent_runs(src, cfg["report.runs"])),
        versions={name: tables.version(src.path(name)) for name in WRITERS},
    )
    data.cards = overview(src, data)
    tiles, mentioned = shown_items(data)
    data.facts = item_facts(src, mentioned)
    data.thumbs = load_thumbnails(tiles, data.facts, cfg)
    return data


def shown_items(data: ReportData) -> tuple[set[str], set[str]]:
    """(items drawn as tiles, items named anywhere): tiles need pictures, names need catalog facts."""
    tiles: set[str] = set()
    named: set[str] = set()
    if isinstance(data.items, dict):
        for item, neighbours in data.items.items():
            tiles.add(item)
            tiles.update(n.item_id for n in neighbours)
    if isinstance(data.users, UserSample):
        for user in data.users.users:
            tiles.update(h.item_id for h in user.history)
            tiles.update(r.item_id for r in user.recommendations)
            for rec in user.recommendations:
                named.update(rec.because)
    if isinstance(data.duplicates, DuplicateSample):
        for group in data.duplicates.groups:
            tiles.add(group.duplicate_of)
            tiles.update(group.members)
    return tiles, tiles | named
