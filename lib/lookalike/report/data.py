"""The report's data: the fixed sampling settings, and the shapes that gathering fills and rendering reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

SEED = 7  # the sampling seed: fixed, so the same tables always show the same sample
HISTORY_ITEMS = 12  # most recent distinct items shown per sampled user
GROUP_MEMBERS = 8  # members shown per duplicate group
THUMB_THREADS = 8  # image reads are I/O bound (object stores): overlap them
EVENT_STRENGTH = {"purchase": 3, "cart": 2, "view": 1}  # the strongest event names a history tile
OK_STATUSES = frozenset({"ok", "success", "succeeded", "done", "completed", "complete", "finished"})
BAD_STATUSES = frozenset({"failed", "failure", "error", "errored", "aborted", "killed"})
WARN_STATUSES = frozenset({"interrupted", "running", "skipped"})  # `interrupted`: killed, found by the next run
WRITERS = {  # table -> the command that writes it, for "does not exist yet" notes
    "embeddings": "embed",
    "quarantine": "embed",
    "similar_items": "similar",
    "duplicates": "similar",
    "recommendations": "recommend",
    "runs": "nightly",
}


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
