"""The `report` command: one self-contained HTML page that shows an analyst what the pipeline produced.

Why one file with everything inside: the report is mailed, attached to tickets and opened from object stores
and laptops without network access, so it must not depend on anything but itself. Thumbnails are embedded as
`data:` URIs, the CSS is inline, there is no JavaScript, and a Content-Security-Policy forbids the browser to
fetch anything at all (a stray external reference would show as a broken image instead of a silent leak).

Why sampling happens in Spark: the tables can hold hundreds of millions of rows. Every section asks Spark
for a handful of keys (a seeded hash order plus `limit`, spread over categories where that helps), then
fetches only the rows of those keys. The driver never holds more than a few hundred rows and decodes only the
images it shows. The same tables and config give the same bytes: the seed is fixed, every order has a
tie-breaker, and the page carries table versions instead of a clock time.

Why a missing table is a note and not an error: stages ship at different times (`recommendations` and
`runs` may not exist yet), and a report that crashes on the first gap shows nothing about what does exist.
Every string that comes from the data is HTML-escaped, because catalog titles are typed by people.
"""
from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image
from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, Row, SparkSession, Window
from pyspark.sql import functions as F

from lookalike import catalog as catalog_mod
from lookalike import index as index_mod
from lookalike import tables
from lookalike.config import Config
from lookalike.decode import ImageError, decode_image
from lookalike.errors import LookalikeError
from lookalike.reader import read_bytes

log = logging.getLogger(__name__)

SEED = 7  # the sampling seed: fixed, so the same tables always show the same sample
HISTORY_ITEMS = 12  # most recent distinct items shown per sampled user
GROUP_MEMBERS = 8  # members shown per duplicate group
THUMB_THREADS = 8  # image reads are I/O bound (object stores): overlap them
EVENT_STRENGTH = {"purchase": 3, "cart": 2, "view": 1}  # the strongest event names a history tile
OK_STATUSES = frozenset({"ok", "success", "succeeded", "done", "completed", "complete", "finished"})
BAD_STATUSES = frozenset({"failed", "failure", "error", "errored", "aborted", "killed"})
WARN_STATUSES = frozenset({"interrupted", "running", "skipped"})  # `interrupted`: killed, found by the next run
WRITERS = {  # table -> the command that writes it, for "does not exist yet" notes
    "embeddings": "embed", "quarantine": "embed", "similar_items": "similar", "duplicates": "similar",
    "recommendations": "recommend", "runs": "nightly",
}


# --- data shapes -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Absent:
    """A section that cannot be shown, and why, in words an analyst can act on."""

    message: str


@dataclass(frozen=True)
class ItemFacts:
    """What the catalog says about one item: enough to caption a tile and find its image."""

    item_id: str
    category: str | None = None
    title: str | None = None
    image_uri: str | None = None


@dataclass(frozen=True)
class Thumb:
    """An embedded picture (`data:` URI), or the reason there is none."""

    data_uri: str | None
    problem: str | None = None


@dataclass(frozen=True)
class Neighbour:
    rank: int
    item_id: str
    score: float


@dataclass(frozen=True)
class HistoryEntry:
    item_id: str
    event_type: str
    events: int
    last_ts: datetime | None


@dataclass(frozen=True)
class Recommendation:
    rank: int
    item_id: str
    score: float
    because: tuple[str, ...]


@dataclass(frozen=True)
class UserView:
    user_id: str
    n_events: int
    history: tuple[HistoryEntry, ...]
    recommendations: tuple[Recommendation, ...]


@dataclass(frozen=True)
class UserSample:
    users: tuple[UserView, ...]
    notes: tuple[str, ...]  # e.g. recommendations not built yet: history is still worth showing
    with_recommendations: bool = True


@dataclass(frozen=True)
class DuplicateGroup:
    duplicate_of: str
    size: int  # listings that point at the canonical item (the canonical one not counted)
    members: tuple[str, ...]


@dataclass(frozen=True)
class DuplicateSample:
    rows: int
    n_groups: int
    groups: tuple[DuplicateGroup, ...]


@dataclass(frozen=True)
class QuarantineSample:
    counts: tuple[tuple[str, int], ...]
    examples: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class StageRun:
    run_id: str
    stage: str
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    rows_in: int | None
    rows_out: int | None
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class Card:
    """One overview number."""

    label: str
    value: str
    detail: str = ""


@dataclass
class ReportData:
    """Everything the page shows, gathered before any HTML is written (rendering is pure)."""

    output_root: str
    cards: list[Card]
    items: dict[str, list[Neighbour]] | Absent
    users: UserSample | Absent
    duplicates: DuplicateSample | Absent
    quarantine: QuarantineSample | Absent
    runs: list[StageRun] | Absent
    versions: dict[str, int | None]
    facts: dict[str, ItemFacts] = field(default_factory=dict)
    thumbs: dict[str, Thumb] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportSummary:
    """What `write_report` produced, for the log line and for tests."""

    path: Path
    bytes: int
    thumbnails: int
    absent: tuple[str, ...]  # sections shown as "not available" notes


# --- reading: small samples, chosen in Spark ---------------------------------------------------------------

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
            return Absent(f"The {name} table does not exist yet ({path}); "
                          f"`lookalike {WRITERS.get(name, 'nightly')}` writes it.")
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
    rows = (similar.filter(F.col("item_id").isin(picked))
            .select("item_id", "rank", "similar_item_id", "score").orderBy("item_id", "rank").collect())
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
    pool = (recs.filter(F.col("rank") == 1) if not isinstance(recs, Absent) else events).select("user_id")
    if isinstance(recs, Absent):
        pool = pool.distinct()
    users = [row["user_id"] for row in pool.orderBy(*hash_order("user_id")).limit(n).collect()]
    if not users:
        return Absent("There are no users to show: the recommendations table and the events are empty.")
    histories, counts = ({}, {}) if isinstance(events, Absent) else _histories(events, users)
    lists = {} if isinstance(recs, Absent) else _recommendations(recs, users)
    views = tuple(UserView(u, counts.get(u, 0), tuple(histories.get(u, ())), tuple(lists.get(u, ())))
                  for u in sorted(users))
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
    strength = F.coalesce(*[F.when(F.col("event_type") == name, F.lit(v)) for name, v in EVENT_STRENGTH.items()],
                          F.lit(0))
    per_item = (mine.groupBy("user_id", "item_id")
                .agg(F.max("ts").alias("last_ts"), F.count(F.lit(1)).alias("events"),
                     F.max(F.struct(strength.alias("s"), F.col("event_type").alias("t"))).alias("top")))
    recent = F.row_number().over(Window.partitionBy("user_id").orderBy(F.desc("last_ts"), "item_id"))
    rows = (per_item.withColumn("_n", recent).filter(F.col("_n") <= HISTORY_ITEMS)
            .orderBy("user_id", "_n").collect())
    histories: dict[str, list[HistoryEntry]] = {}
    for row in rows:
        histories.setdefault(row["user_id"], []).append(
            HistoryEntry(row["item_id"], row["top"]["t"] or "", int(row["events"]), row["last_ts"]))
    counts = {row["user_id"]: int(row["count"]) for row in mine.groupBy("user_id").count().collect()}
    return histories, counts


def _recommendations(recs: DataFrame, users: list[str]) -> dict[str, list[Recommendation]]:
    rows = (recs.filter(F.col("user_id").isin(users)).select("user_id", "rank", "item_id", "score", "because")
            .orderBy("user_id", "rank").collect())
    lists: dict[str, list[Recommendation]] = {}
    for row in rows:
        lists.setdefault(row["user_id"], []).append(
            Recommendation(int(row["rank"]), row["item_id"], float(row["score"]), tuple(row["because"] or ())))
    return lists


def sample_duplicates(src: Sources, n_groups: int) -> DuplicateSample | Absent:
    """The biggest duplicate groups: a placeholder image shared by many listings matters most."""
    dups = src.table("duplicates")
    if isinstance(dups, Absent):
        return dups
    sizes = dups.groupBy("duplicate_of").agg(F.count(F.lit(1)).alias("size")).cache()
    try:
        rows, n = dups.count(), sizes.count()
        top = sizes.orderBy(F.desc("size"), "duplicate_of").limit(n_groups)
        place = F.row_number().over(Window.partitionBy("duplicate_of").orderBy("item_id"))
        members = (dups.join(top.select("duplicate_of"), "duplicate_of", "left_semi")
                   .withColumn("_m", place).filter(F.col("_m") <= GROUP_MEMBERS))
        listed: dict[str, list[str]] = {}
        for row in members.orderBy("duplicate_of", "_m").collect():
            listed.setdefault(row["duplicate_of"], []).append(row["item_id"])
        groups = tuple(DuplicateGroup(r["duplicate_of"], int(r["size"]), tuple(listed.get(r["duplicate_of"], ())))
                       for r in top.orderBy(F.desc("size"), "duplicate_of").collect())
    finally:
        sizes.unpersist()
    return DuplicateSample(rows, n, groups)


def sample_quarantine(src: Sources, per_kind: int) -> QuarantineSample | Absent:
    quarantine = src.table("quarantine")
    if isinstance(quarantine, Absent):
        return quarantine
    counts = tuple((r["error_kind"] or "(none)", int(r["count"]))
                   for r in quarantine.groupBy("error_kind").count().orderBy(F.desc("count"), "error_kind").collect())
    place = F.row_number().over(Window.partitionBy("error_kind").orderBy("item_id"))
    examples = tuple(r.asDict() for r in (
        quarantine.withColumn("_n", place).filter(F.col("_n") <= per_kind)
        .select("item_id", "image_uri", "error_kind", "error_message", "run_id", "seen_at")
        .orderBy("error_kind", "item_id").collect()))
    return QuarantineSample(counts, examples)


def recent_runs(src: Sources, n: int) -> list[StageRun] | Absent:
    """Every stage row of the `n` most recent runs, newest run first, its stages in the order they ran."""
    runs = src.table("runs")
    if isinstance(runs, Absent):
        return runs
    last = (runs.groupBy("run_id").agg(F.min("started_at").alias("_run_start"))
            .orderBy(F.desc_nulls_last("_run_start"), F.desc("run_id")).limit(n))
    rows = (runs.join(last, "run_id").orderBy(F.desc_nulls_last("_run_start"), F.desc("run_id"),
                                              "started_at", "stage").collect())
    return [StageRun(r["run_id"], r["stage"], r["status"] or "", r["started_at"], r["finished_at"],
                     r["rows_in"], r["rows_out"], dict(sorted((r["metrics"] or {}).items())))
            for r in rows]


def overview(src: Sources, data: ReportData) -> list[Card]:
    """Headline numbers: how much of the catalog made it through each step, and how the last run went.
    Sections that already counted something (quarantine, duplicates, runs) lend their numbers."""
    return [_catalog_card(src), _embeddings_card(src), _quarantine_card(data.quarantine), _index_card(src),
            _rank_one_card(src, "similar_items", "Items with neighbours"), _duplicates_card(data.duplicates),
            _rank_one_card(src, "recommendations", "Users with recommendations"), _last_run_card(data.runs)]


def _catalog_card(src: Sources) -> Card:
    if src.catalog is None:
        return Card("Catalog items", "–", src.catalog_problem or "")
    return Card("Catalog items", _int(src.catalog.count()))


def _rank_one_card(src: Sources, name: str, label: str) -> Card:
    """Keys with a list (`rank` 1 rows) and the rows of all lists."""
    df = src.table(name)
    if isinstance(df, Absent):
        return Card(label, "–", "not built yet")
    return Card(label, _int(df.filter(F.col("rank") == 1).count()), f"{_int(df.count())} rows")


def _quarantine_card(quarantine: QuarantineSample | Absent) -> Card:
    if isinstance(quarantine, Absent):
        return Card("Quarantined images", "–", "not built yet")
    kinds = len(quarantine.counts)
    return Card("Quarantined images", _int(sum(n for _, n in quarantine.counts)),
                f"{kinds} kind{'' if kinds == 1 else 's'}")


def _duplicates_card(duplicates: DuplicateSample | Absent) -> Card:
    if isinstance(duplicates, Absent):
        return Card("Duplicate listings", "–", "not built yet")
    groups = duplicates.n_groups
    return Card("Duplicate listings", _int(duplicates.rows), f"{_int(groups)} group{'' if groups == 1 else 's'}")


def _embeddings_card(src: Sources) -> Card:
    df = src.table("embeddings")
    if isinstance(df, Absent):
        return Card("Embedded items", "–", "not built yet")
    models = [r["model"] for r in df.select("model").distinct().orderBy("model").limit(3).collect()]
    return Card("Embedded items", _int(df.count()), ", ".join(m or "?" for m in models))


def _index_card(src: Sources) -> Card:
    try:
        build = index_mod.latest_build(src.root)
        shards = index_mod.build_summary(src.root, build)["shards"]
    except (LookalikeError, OSError, ValueError, KeyError, TypeError):  # none yet, or an unreadable summary
        return Card("Index shards", "–", "no index build yet")
    recall = min((float(s.get("recall_at_10", 1.0)) for s in shards), default=1.0)
    return Card("Index shards", _int(len(shards)), f"build {build} · recall@10 ≥ {recall:.3f}")


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
    rows = (src.catalog.filter(F.col("item_id").isin(wanted))
            .select("item_id", "category", "title", "image_uri").collect())
    return {r["item_id"]: ItemFacts(r["item_id"], r["category"], r["title"], r["image_uri"]) for r in rows}


# --- thumbnails --------------------------------------------------------------------------------------------

def thumbnail(uri: str | None, size: int, max_bytes: int, max_pixels: int) -> Thumb:
    """A picture no bigger than `size` px on its longest side, as a data URI; never enlarged (the browser
    scales small sources up, which costs no bytes)."""
    if not uri:
        return Thumb(None, "not in catalog")
    try:
        picture = decode_image(read_bytes(uri, max_bytes), max_pixels, target_size=size).image
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
    for fmt, mime, options in (("PNG", "image/png", {"optimize": True}),
                               ("JPEG", "image/jpeg", {"quality": 82})):
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

    def one(item: str) -> Thumb:
        found = facts.get(item)
        return thumbnail(found.image_uri if found else None, size, max_bytes, max_pixels)

    with ThreadPoolExecutor(THUMB_THREADS) as pool:
        return dict(zip(wanted, pool.map(one, wanted)))


# --- gathering ---------------------------------------------------------------------------------------------

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


# --- rendering (pure: ReportData in, HTML out) -------------------------------------------------------------

def esc(value: object) -> str:
    """Every data string goes through here: titles, ids and error messages are typed by people."""
    return html.escape("" if value is None else str(value), quote=True)


def _int(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def fmt_number(value: float | None) -> str:
    """Metric values for people: integers with separators, other numbers to three significant digits."""
    if value is None:
        return "–"
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if number.is_integer() and abs(number) < 1e15:
        return f"{int(number):,}"
    if abs(number) >= 1000:
        return f"{number:,.0f}"
    return f"{number:.3g}"


def fmt_time(value: datetime | None) -> str:
    return "–" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def fmt_duration(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "–"
    seconds = (end - start).total_seconds()
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def note(message: str, kind: str = "missing") -> str:
    """A plain-language message; `backticked` parts (commands, keys) are set as code, after escaping."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(message))
    return f'<div class="note {kind}">{text}</div>'


def tile(data: ReportData, item: str, lines: Sequence[str], *, extra_class: str = "",
         tooltip: Sequence[str] = (), badge: str = "") -> str:
    """One thumbnail with its caption lines (already escaped HTML) and a tooltip of plain facts."""
    facts = _facts(data, item)
    thumb = data.thumbs.get(item, Thumb(None, "not shown"))
    tip = " · ".join([item, *(t for t in (facts.category, facts.title) if t), *tooltip])
    if thumb.data_uri:
        picture = f'<img src="{thumb.data_uri}" alt="{esc(item)}">'
    else:
        picture = f'<span class="noimg">{esc(thumb.problem or "no image")}</span>'
    caption = "".join(f"<div>{line}</div>" for line in lines)
    return (f'<figure class="tile {extra_class}" title="{esc(tip)}">'
            f'<div class="pic">{picture}{badge}</div><figcaption>{caption}</figcaption></figure>')


def _facts(data: ReportData, item: str) -> ItemFacts:
    return data.facts.get(item) or ItemFacts(item)


def _item_caption(data: ReportData, item: str) -> list[str]:
    facts = _facts(data, item)
    return [f'<span class="id">{esc(item)}</span>', f'<span class="muted">{esc(facts.category or "–")}</span>']


def render_overview(data: ReportData) -> str:
    cards = "".join(f'<div class="card"><div class="k">{esc(c.label)}</div><div class="v">{esc(c.value)}</div>'
                    f'<div class="d">{esc(c.detail)}</div></div>' for c in data.cards)
    return _section("overview", "Overview", "What the last runs left in the output tables.",
                    f'<div class="cards">{cards}</div>')


def render_items(data: ReportData) -> str:
    title, lead = "Similar items", "Sample items (spread over categories) with their neighbours, most similar first."
    if isinstance(data.items, Absent):
        return _section("similar", title, lead, note(data.items.message))
    rows, same, total = [], 0, 0
    for item in sorted(data.items, key=lambda i: (_facts(data, i).category or "", i)):
        neighbours = data.items[item]
        matches = [_facts(data, n.item_id).category == _facts(data, item).category for n in neighbours]
        same, total = same + sum(matches), total + len(neighbours)
        tiles = [tile(data, n.item_id, [_score_line(n.score), *_item_caption(data, n.item_id)[1:]],
                      extra_class="" if match else "othercat", tooltip=[f"cosine {n.score:.3f}"],
                      badge=f'<span class="rank">{n.rank}</span>') for n, match in zip(neighbours, matches)]
        head = (tile(data, item, _item_caption(data, item), extra_class="query")
                + f'<div class="title">{esc(_facts(data, item).title or "")}</div>'
                + f'<div class="muted small">{sum(matches)} of {len(neighbours)} neighbours in its category</div>')
        rows.append(f'<div class="row"><div class="head">{head}</div>'
                    f'<div class="strip neighbours">{"".join(tiles) or note("no neighbours", "info")}</div></div>')
    share = f"{same / total:.0%}" if total else "–"
    lead += f" {share} of the neighbours shown share the item's category; others are outlined in orange."
    return _section("similar", title, lead, "".join(rows))


def _score_line(score: float) -> str:
    width = max(0.0, min(1.0, score)) * 100
    return (f'<span class="score">{score:.3f}</span>'
            f'<span class="bar"><span style="width:{width:.0f}%"></span></span>')


def render_users(data: ReportData) -> str:
    title = "Users"
    lead = "Sample users: their most recent items (strongest event per item) and their recommendations."
    if isinstance(data.users, Absent):
        return _section("users", title, lead, note(data.users.message))
    notes = "".join(note(message) for message in data.users.notes)
    rows = "".join(_user_row(data, user, data.users.with_recommendations) for user in data.users.users)
    return _section("users", title, lead, notes + rows)


def _user_row(data: ReportData, user: UserView, with_recommendations: bool) -> str:
    history = "".join(
        tile(data, h.item_id, [_event_line(h), *_item_caption(data, h.item_id)[1:]],
             tooltip=[f"last {fmt_time(h.last_ts)}"]) for h in user.history)
    recs = "".join(
        tile(data, r.item_id, [_score_line(r.score), *_item_caption(data, r.item_id)[1:], _via(r.because)],
             tooltip=[f"score {r.score:.3f}", *(_because(data, r.because))],
             badge=f'<span class="rank">{r.rank}</span>') for r in user.recommendations)
    mix = _category_mix(data, [h.item_id for h in user.history])
    rec_mix = _category_mix(data, [r.item_id for r in user.recommendations])
    head = (f'<div class="uid">{esc(user.user_id)}</div><div class="muted small">{_int(user.n_events)} events</div>'
            f'<div class="small"><b>History</b> {mix}</div>'
            + (f'<div class="small"><b>Recommended</b> {rec_mix}</div>' if user.recommendations else ""))
    body = (f'<div class="label">Recent history, newest first</div>'
            f'<div class="strip history">{history or note("no events", "info")}</div>')
    if with_recommendations:  # without the table, the section's note says it once for every user
        body += (f'<div class="label">Recommendations</div>'
                 f'<div class="strip recs">{recs or note("no recommendations for this user", "info")}</div>')
    return f'<div class="row"><div class="head">{head}</div><div>{body}</div></div>'


def _event_line(entry: HistoryEntry) -> str:
    repeat = f" ×{entry.events}" if entry.events > 1 else ""
    return f'<span class="ev ev-{esc(entry.event_type)}">{esc(entry.event_type)}</span>{repeat}'


def _via(because: Sequence[str]) -> str:
    """The first history item behind a recommendation, on the tile itself (tooltips do not print)."""
    if not because:
        return '<span class="muted">–</span>'
    more = f" +{len(because) - 1}" if len(because) > 1 else ""
    return f'<span class="muted">via {esc(because[0])}{more}</span>'


def _because(data: ReportData, because: Sequence[str]) -> list[str]:
    if not because:
        return []
    named = [f"{b} ({data.facts[b].title})" if b in data.facts and data.facts[b].title else b for b in because]
    return ["because " + ", ".join(named)]


def _category_mix(data: ReportData, items: Sequence[str]) -> str:
    """The top categories of a list of items as 'Sandal 60% · Bag 40%' (escaped)."""
    if not items:
        return '<span class="muted">–</span>'
    counts: dict[str, int] = {}
    for item in items:
        category = _facts(data, item).category or "unknown"
        counts[category] = counts.get(category, 0) + 1
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    return " · ".join(f"{esc(c)} {n / len(items):.0%}" for c, n in top)


def render_duplicates(data: ReportData) -> str:
    title, lead = "Duplicates", "Listings whose image bytes are identical to another item's (the smallest id is kept)."
    dups = data.duplicates
    if isinstance(dups, Absent):
        return _section("duplicates", title, lead, note(dups.message))
    if not dups.rows:
        return _section("duplicates", title, lead, note("No duplicate images found.", "info"))
    summary = (f'<p class="small">{_int(dups.rows)} duplicate listings in {_int(dups.n_groups)} groups; '
               f'the {len(dups.groups)} biggest:</p>')
    groups = []
    for group in dups.groups:
        tiles = [tile(data, group.duplicate_of, _item_caption(data, group.duplicate_of), extra_class="query")]
        tiles += [tile(data, m, _item_caption(data, m)) for m in group.members]
        more = group.size - len(group.members)
        tail = f'<div class="more">+{_int(more)} more</div>' if more > 0 else ""
        groups.append(f'<div class="row dup"><div class="head"><div class="uid">{esc(group.duplicate_of)}</div>'
                      f'<div class="muted small">{_int(group.size)} duplicate listing(s)</div></div>'
                      f'<div class="strip members">{"".join(tiles)}{tail}</div></div>')
    return _section("duplicates", title, lead, summary + "".join(groups))


def render_quarantine(data: ReportData) -> str:
    title, lead = "Quarantine", "Images the embed stage could not use, by reason, with examples."
    quarantine = data.quarantine
    if isinstance(quarantine, Absent):
        return _section("quarantine", title, lead, note(quarantine.message))
    if not quarantine.counts:
        return _section("quarantine", title, lead, note("No image is in quarantine.", "info"))
    total = sum(n for _, n in quarantine.counts)
    counts = "".join(
        f'<tr><td><span class="kind">{esc(kind)}</span></td><td class="num">{_int(n)}</td>'
        f'<td class="barcell"><span class="bar wide"><span style="width:{100 * n / total:.0f}%"></span></span>'
        '</td></tr>'
        for kind, n in quarantine.counts)
    examples = "".join(
        f'<tr><td><span class="kind">{esc(r["error_kind"])}</span></td><td class="id">{esc(r["item_id"])}</td>'
        f'<td class="uri">{esc(r["image_uri"])}</td><td>{esc(r["error_message"])}</td>'
        f'<td class="nowrap">{esc(fmt_time(r["seen_at"]))}</td></tr>' for r in quarantine.examples)
    body = (f'<div class="split"><table class="counts"><thead><tr><th>error_kind</th><th class="num">items</th>'
            f'<th>share of {_int(total)}</th></tr></thead><tbody>{counts}</tbody></table></div>'
            f'<h3>Examples</h3><table><thead><tr><th>kind</th><th>item</th><th>image_uri</th><th>message</th>'
            f'<th>seen at (UTC)</th></tr></thead><tbody>{examples}</tbody></table>')
    return _section("quarantine", title, lead, body)


def render_runs(data: ReportData) -> str:
    title, lead = "Runs", "The most recent runs, newest first: one row per stage, with its metrics."
    if isinstance(data.runs, Absent):
        return _section("runs", title, lead, note(data.runs.message))
    if not data.runs:
        return _section("runs", title, lead, note("The runs table is empty.", "info"))
    body, current = [], None
    for run in data.runs:
        if run.run_id != current:
            current = run.run_id
            body.append(f'<tr class="runhead"><td colspan="7">{esc(run.run_id)}</td></tr>')
        metrics = "".join(f'<span class="metric">{esc(k)} <b>{esc(fmt_number(v))}</b></span>'
                          for k, v in run.metrics.items())
        body.append(f'<tr><td>{esc(run.stage)}</td><td>{_status(run.status)}</td>'
                    f'<td class="nowrap">{esc(fmt_time(run.started_at))}</td>'
                    f'<td class="num nowrap">{esc(fmt_duration(run.started_at, run.finished_at))}</td>'
                    f'<td class="num">{esc(_int(run.rows_in))}</td><td class="num">{esc(_int(run.rows_out))}</td>'
                    f'<td>{metrics}</td></tr>')
    table = ('<table class="runs"><thead><tr><th>stage</th><th>status</th><th>started (UTC)</th>'
             '<th class="num">duration</th><th class="num">rows in</th><th class="num">rows out</th>'
             f'<th>metrics</th></tr></thead><tbody>{"".join(body)}</tbody></table>')
    return _section("runs", title, lead, table)


def _status(status: str) -> str:
    lower = status.lower()
    kind = ("ok" if lower in OK_STATUSES else "bad" if lower in BAD_STATUSES
            else "warn" if lower in WARN_STATUSES else "other")
    return f'<span class="status {kind}">{esc(status or "?")}</span>'


def _section(anchor: str, title: str, lead: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2><p class="lead">{esc(lead)}</p>{body}</section>'


NAV = (("overview", "Overview"), ("similar", "Similar items"), ("users", "Users"), ("duplicates", "Duplicates"),
       ("quarantine", "Quarantine"), ("runs", "Runs"))

# No network, no scripts: the browser may only show what is inside this file.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
:root{--bg:#f4f5f7;--card:#fff;--ink:#1f2937;--muted:#6b7280;--line:#e5e7eb;--accent:#2563eb;
--ok:#15803d;--bad:#b91c1c;--warn:#c2410c;--thumb:96px}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
header.top{background:#111827;color:#f9fafb;padding:18px 32px;display:flex;flex-wrap:wrap;gap:12px 32px;
align-items:flex-end;justify-content:space-between}
header.top h1{margin:0;font-size:22px;font-weight:650;letter-spacing:-.01em}
header.top .sub{margin:4px 0 0;color:#9ca3af;font-size:12px;word-break:break-all}
nav a{color:#d1d5db;text-decoration:none;margin-left:18px;font-size:13px}
nav a:first-child{margin-left:0}
main{max-width:1280px;margin:0 auto;padding:8px 32px 48px}
section{margin-top:30px}
h2{font-size:19px;margin:0 0 2px}
h3{font-size:14px;margin:18px 0 8px}
.lead{color:var(--muted);margin:0 0 14px}
.small{font-size:12px}.muted{color:var(--muted)}.nowrap{white-space:nowrap}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 16px}
.card .k{color:var(--muted);font-size:11px;text-transform:uppercase;letter-spacing:.05em}
.card .v{font-size:24px;font-weight:650;margin-top:2px}
.card .d{color:var(--muted);font-size:12px;overflow-wrap:anywhere}
.row{display:grid;grid-template-columns:190px 1fr;gap:18px;background:var(--card);border:1px solid var(--line);
border-radius:10px;padding:14px 16px;margin-bottom:12px}
.head .title{font-weight:600;margin-top:6px}
.uid{font-weight:650;font-family:ui-monospace,"DejaVu Sans Mono",monospace;overflow-wrap:anywhere}
.label{font-size:11px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted);margin:2px 0 6px}
.label:not(:first-child){margin-top:12px}
.strip{display:grid;grid-template-columns:repeat(auto-fill,minmax(104px,1fr));gap:10px;align-items:start}
.tile{margin:0;min-width:0}
.tile .pic{position:relative;width:var(--thumb);height:var(--thumb);border-radius:8px;overflow:hidden;
background:#e5e7eb;display:flex;align-items:center;justify-content:center;border:2px solid transparent}
.tile img{width:100%;height:100%;object-fit:contain}
.tile.query .pic{border-color:var(--accent)}
.tile.othercat .pic{border-color:#fb923c}
.tile figcaption{font-size:11px;line-height:1.35;margin-top:4px;width:var(--thumb)}
.tile figcaption div{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.tile .id{font-family:ui-monospace,"DejaVu Sans Mono",monospace}
.noimg{font-size:11px;color:var(--bad);padding:4px;text-align:center}
.rank{position:absolute;top:4px;left:4px;background:rgba(17,24,39,.78);color:#fff;font-size:10px;
font-weight:650;border-radius:999px;min-width:18px;height:18px;line-height:18px;text-align:center;padding:0 5px}
.score{font-weight:650;font-variant-numeric:tabular-nums;margin-right:6px}
.bar{display:inline-block;vertical-align:middle;width:44px;height:6px;border-radius:3px;background:var(--line);
overflow:hidden}
.bar>span{display:block;height:100%;background:var(--accent)}
.bar.wide{width:100%;max-width:320px;height:8px}
.ev{display:inline-block;border-radius:999px;padding:0 6px;font-weight:600;background:#e5e7eb}
.ev-purchase{background:#dcfce7;color:var(--ok)}.ev-cart{background:#fef3c7;color:#92400e}
.ev-view{background:#e0e7ff;color:#3730a3}
.more{align-self:center;color:var(--muted);font-size:13px}
.note{border-radius:10px;padding:12px 16px;border:1px solid #fde68a;background:#fffbeb;color:#92400e;
margin-bottom:12px}
.note.info{border-color:var(--line);background:#f9fafb;color:var(--muted);margin:0}
.note code{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;background:rgba(0,0,0,.06);
border-radius:4px;padding:0 4px}
.strip>.note{grid-column:1/-1;justify-self:start}
table{border-collapse:separate;border-spacing:0;width:100%;background:var(--card);border:1px solid var(--line);
border-radius:10px;overflow:hidden;font-size:13px}
th,td{padding:7px 10px;text-align:left;border-bottom:1px solid var(--line);vertical-align:top}
tbody tr:last-child td{border-bottom:0}
th{background:#f9fafb;font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted)}
.num{text-align:right;font-variant-numeric:tabular-nums}
td.id,td.uri{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;overflow-wrap:anywhere}
td.id{white-space:nowrap}
td.uri{max-width:320px}
table.counts{max-width:640px}
td.barcell{width:50%}
.kind{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;background:#fee2e2;color:var(--bad);
border-radius:4px;padding:1px 6px}
tr.runhead td{background:#f3f4f6;font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-weight:650}
.status{display:inline-block;border-radius:999px;padding:0 8px;font-size:12px;font-weight:600;background:#e5e7eb}
.status.ok{background:#dcfce7;color:var(--ok)}.status.bad{background:#fee2e2;color:var(--bad)}
.status.warn{background:#fef3c7;color:#92400e}
.metric{display:inline-block;background:#f3f4f6;border-radius:4px;padding:1px 6px;margin:0 4px 3px 0;
font-size:12px;color:var(--muted)}
.metric b{color:var(--ink);font-weight:600}
footer{max-width:1280px;margin:0 auto;padding:0 32px 32px;color:var(--muted);font-size:12px}
footer code{font-size:11px}
"""


def render(data: ReportData) -> str:
    """The whole page. Pure and deterministic: the same ReportData gives the same bytes."""
    nav = "".join(f'<a href="#{anchor}">{esc(label)}</a>' for anchor, label in NAV)
    versions = ", ".join(f"{esc(name)} v{v}" if v is not None else f"{esc(name)} (none)"
                         for name, v in sorted(data.versions.items()))
    sections = (render_overview(data), render_items(data), render_users(data), render_duplicates(data),
                render_quarantine(data), render_runs(data))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>lookalike report</title><style>{CSS}</style></head><body>"
            f'<header class="top"><div><h1>lookalike report</h1>'
            f'<p class="sub">{esc(data.output_root)}</p></div><nav>{nav}</nav></header>'
            f"<main>{''.join(sections)}</main>"
            f"<footer>Table versions: {versions}. Samples are drawn in a seeded hash order (seed {SEED}), "
            f"so the same tables give the same page.</footer></body></html>\n")


def absent_sections(data: ReportData) -> tuple[str, ...]:
    parts = {"similar": data.items, "users": data.users, "duplicates": data.duplicates,
             "quarantine": data.quarantine, "runs": data.runs}
    return tuple(name for name, part in parts.items() if isinstance(part, Absent))


def write_report(cfg: Config, spark: SparkSession, out: str | os.PathLike[str]) -> ReportSummary:
    """Gather, render and write the report atomically (a half-written report is never left at `out`)."""
    data = gather(cfg, spark)
    page = render(data).encode("utf-8")
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    shown = sum(1 for thumb in data.thumbs.values() if thumb.data_uri)
    return ReportSummary(target, len(page), shown, absent_sections(data))
