"""The HTML report over a tiny real pipeline output: content, escaping, self-containment, missing tables,
the command line, determinism, and a real render in headless Chromium.

The page is parsed with the standard library's HTMLParser into sections, rows, tiles and table cells, so the
assertions are about what an analyst sees, not about string layout; the parser also checks that every
element is closed in order.
"""

from __future__ import annotations

import base64
import html
import io
import re
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from pyspark.sql import SparkSession

from lookalike import cli
from lookalike.report.data import ReportSummary
from lookalike.report.page import write_report
from tests.demo_output import (
    BROKEN,
    DUPLICATES,
    FAILED_RUN_ID,
    RUN_ID,
    TRICKY_ITEM,
    TRICKY_TITLE,
    DemoOutput,
    K,
    demo_output,
    full_output,
)

__all__ = ["demo_output", "full_output"]  # session fixtures shared with test_notebook.py

CHROMIUM = Path("/usr/bin/chromium")
SCREEN = (1280, 2000)


@dataclass
class Tile:
    item: str
    tooltip: str
    classes: set[str]
    strip: str
    src: str | None = None
    caption: str = ""


@dataclass
class Block:
    """One `div.row`: a sample item, user or duplicate group."""

    key: str = ""
    text: str = ""
    tiles: list[Tile] = field(default_factory=list)

    def strip(self, name: str) -> list[Tile]:
        return [t for t in self.tiles if t.strip == name]


@dataclass
class Section:
    text: str = ""
    rows: list[Block] = field(default_factory=list)
    cells: list[list[str]] = field(default_factory=list)  # every table row, as cell texts
    notes: list[str] = field(default_factory=list)


class Page(HTMLParser):
    """The report as sections -> rows -> tiles (+ table cells, cards, every src/href)."""

    VOID = frozenset({"img", "meta", "link", "br", "hr", "input", "source"})

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.sections: dict[str, Section] = {}
        self.refs: list[str] = []
        self.cards: dict[str, str] = {}
        self._stack: list[tuple[str, set[str]]] = []
        self._section: Section | None = None
        self._row: Block | None = None
        self._tile: Tile | None = None
        self._strip = ""
        self._buffers: list[tuple[str, list[str]]] = []  # open elements whose text is wanted, by class
        self._card: dict[str, str] = {}
        self.feed(text)
        self.close()
        assert not self._stack, f"unclosed elements {self._stack}"

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = set(a.get("class", "").split())
        self.refs += [a[k] for k in ("src", "href") if k in a]
        if tag == "section":
            self._section = self.sections[a["id"]] = Section()
        elif tag == "div" and "row" in classes:
            self._row = Block()
            self._section.rows.append(self._row)
        elif tag == "div" and "strip" in classes:
            self._strip = " ".join(sorted(classes - {"strip"}))
        elif tag == "figure":
            self._tile = Tile(a["title"].split(" · ")[0], a["title"], classes, self._strip)
            self._row.tiles.append(self._tile)
        elif tag == "img" and self._tile is not None:
            self._tile.src = a["src"]
        elif tag == "tr":
            self._section.cells.append([])
        elif tag in ("td", "th"):
            self._section.cells[-1].append("")
        wanted = classes & {"uid", "k", "v", "note"}
        if tag not in self.VOID:
            self._stack.append((tag, classes))
            self._buffers.append((next(iter(wanted)) if wanted else "", []))

    def handle_endtag(self, tag: str) -> None:
        open_tag, classes = self._stack.pop()
        assert open_tag == tag, f"</{tag}> closes <{open_tag}>"
        kind, text = self._buffers.pop()
        self._collect(kind, "".join(text))
        if tag == "figure":
            self._tile = None
        elif tag == "div" and "row" in classes:
            self._row = None
        elif tag == "div" and "strip" in classes:
            self._strip = ""
        elif tag == "section":
            self._section = None

    def _collect(self, kind: str, text: str) -> None:
        if kind == "uid" and self._row is not None:
            self._row.key = text
        elif kind == "note":
            self._section.notes.append(text)
        elif kind in ("k", "v"):
            self._card[kind] = text
            if kind == "v":
                self.cards[self._card["k"]] = text

    def handle_data(self, data: str) -> None:
        for _, text in self._buffers:
            text.append(data)
        if self._section is not None:
            self._section.text += data
            if any(tag in ("td", "th") for tag, _ in self._stack):
                self._section.cells[-1][-1] += data
        if self._row is not None:
            self._row.text += data
        if self._tile is not None and any(tag == "figcaption" for tag, _ in self._stack):
            self._tile.caption += data


def picture(src: str) -> Image.Image:
    header, _, payload = src.partition(",")
    assert re.fullmatch(r"data:image/(png|jpeg);base64", header), header
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    image.load()
    return image


@pytest.fixture(scope="module")
def reports(
    spark: SparkSession, demo_output: DemoOutput, full_output: DemoOutput, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, ReportSummary]]:
    folder = tmp_path_factory.mktemp("reports")
    return {
        name: (folder / f"{name}.html", write_report(output.cfg, spark, folder / f"{name}.html"))
        for name, output in (("bare", demo_output), ("full", full_output))
    }


@pytest.fixture(scope="module")
def full(reports: dict[str, tuple[Path, ReportSummary]]) -> Page:
    return Page(reports["full"][0].read_text())


def catalog_of(output: DemoOutput) -> dict[str, dict]:
    return {row["item_id"]: row for row in pq.read_table(output.cfg["catalog.path"]).to_pylist()}


def test_sample_items_with_their_neighbour_lists(full: Page, full_output: DemoOutput) -> None:
    rows = full.sections["similar"].rows
    assert len(rows) == full_output.cfg["report.items"]
    catalog = catalog_of(full_output)
    lists: dict[str, list[tuple[str, float]]] = {}
    for r in sorted(full_output.table("similar_items").to_pylist(), key=lambda r: (r["item_id"], r["rank"])):
        lists.setdefault(r["item_id"], []).append((r["similar_item_id"], r["score"]))
    shown = [row.tiles[0].item for row in rows]
    # spread over categories: 8 samples from 10 categories, none twice
    assert len({catalog[item]["category"] for item in shown}) == len(shown)
    for row in rows:
        query, *neighbours = row.tiles
        assert "query" in query.classes and all(t.strip == "neighbours" for t in neighbours)
        assert [t.item for t in neighbours] == [item for item, _ in lists[query.item]]
        scores = [re.match(r"-?\d\.\d{3}", t.caption).group() for t in neighbours]
        assert scores == [f"{score:.3f}" for _, score in lists[query.item]]
        same = sum(catalog[t.item]["category"] == catalog[query.item]["category"] for t in neighbours)
        assert f"{same} of {K} neighbours in its category" in row.text
        assert sum("othercat" in t.classes for t in neighbours) == K - same
        for t in row.tiles:  # every tile carries its real picture: 28x28 grey, never enlarged
            assert t.src is not None, t
            image = picture(t.src)
            assert image.size == (28, 28) and image.mode == "L"


def test_users_with_history_and_recommendations(full: Page, full_output: DemoOutput) -> None:
    rows = full.sections["users"].rows
    assert len(rows) == full_output.cfg["report.users"]
    assert [row.key for row in rows] == sorted(row.key for row in rows)
    events = pq.read_table(full_output.cfg["events.path"]).to_pandas()
    recs = full_output.table("recommendations").to_pandas().sort_values(["user_id", "rank"])
    for row in rows:
        mine = events[events["user_id"] == row.key]
        assert len(mine) > 0 and f"{len(mine)} events" in row.text
        latest = (
            mine.groupby("item_id")["ts"].max().reset_index().sort_values(["ts", "item_id"], ascending=[False, True])
        )
        assert [t.item for t in row.strip("history")] == latest["item_id"].tolist()[:12]
        assert [t.item for t in row.strip("recs")] == recs[recs["user_id"] == row.key]["item_id"].tolist()
        assert all(t.src for t in row.tiles)
        because = recs[recs["user_id"] == row.key]["because"].iloc[0]
        if len(because):  # empty for a popularity fill
            assert f"because {because[0]}" in row.strip("recs")[0].tooltip


def test_overview_numbers_match_the_tables(full: Page, full_output: DemoOutput) -> None:
    n_catalog = len(catalog_of(full_output))
    similar = full_output.table("similar_items").to_pandas()
    recs = full_output.table("recommendations").to_pandas()
    assert full.cards["Catalog items"] == f"{n_catalog:,}"
    assert full.cards["Embedded items"] == f"{full_output.table('embeddings').num_rows:,}"
    assert full.cards["Quarantined images"] == str(len(BROKEN))
    assert full.cards["Items with neighbours"] == f"{similar['item_id'].nunique():,}"
    duplicates = full_output.table("duplicates").to_pandas()
    assert full.cards["Duplicate listings"] == str((duplicates["kind"] == "exact").sum())  # identical images only
    assert full.cards["Users with recommendations"] == str(recs["user_id"].nunique())
    assert full.cards["Last run"] == "succeeded"
    assert full.cards["Index shards"] == "10"


def test_duplicates_and_quarantine(full: Page, full_output: DemoOutput) -> None:
    table = full_output.table("duplicates").to_pandas()
    table = table[table["kind"] == "exact"]  # the report shows groups of identical images, not near pairs
    assert {(item, source) for item, source, _ in DUPLICATES} <= set(zip(table["item_id"], table["duplicate_of"]))
    section = full.sections["duplicates"]
    groups = table.groupby("duplicate_of").size()
    assert f"{len(table)} duplicate listings in {len(groups)} groups" in section.text
    first = section.rows[0]
    assert first.key == TRICKY_ITEM and [t.item for t in first.tiles] == [TRICKY_ITEM, "fm-dup-a", "fm-dup-b"]
    assert len({t.src for t in first.tiles}) == 1  # the same bytes give the same picture

    quarantine = full_output.table("quarantine").to_pandas()
    assert dict(zip(quarantine["item_id"], quarantine["error_kind"])) == {k: v[2] for k, v in BROKEN.items()}
    cells = full.sections["quarantine"].cells
    counts = {row[0]: row[1] for row in cells if len(row) == 3 and row[1].isdigit()}
    assert counts == {kind: str(n) for kind, n in Counter(v[2] for v in BROKEN.values()).items()}
    examples = {row[1]: row for row in cells if len(row) == 5 and row[1] in BROKEN}
    assert set(examples) == set(BROKEN)
    assert examples["bad-missing"][2].endswith("broken/<b>gone</b>&.png")  # shown as text, not markup


def test_runs_newest_first_with_metrics(full: Page, full_output: DemoOutput) -> None:
    cells = full.sections["runs"].cells
    heads = [row[0] for row in cells if len(row) == 1]
    assert heads == [RUN_ID, FAILED_RUN_ID]
    stages = {row[0]: row for row in cells[cells.index([RUN_ID]) + 1 : cells.index([FAILED_RUN_ID])]}
    assert list(stages) == ["embed", "index", "similar", "recommend"]
    assert {row[1] for row in stages.values()} == {"succeeded"}
    embed_result = full_output.results[0][0]
    assert stages["embed"][4] == f"{embed_result.rows_in:,}" and stages["embed"][5] == f"{embed_result.rows_out:,}"
    assert f"embedded {embed_result.metrics['embedded']}" in stages["embed"][6]
    assert re.fullmatch(r"\d+\.\d s|\d+ min \d\d s", stages["embed"][3])
    failed = cells[cells.index([FAILED_RUN_ID]) + 1]
    assert failed[:2] == ["embed", "failed"] and failed[3] == "75.0 s" and "bad_fraction 0.61" in failed[6]


def test_data_strings_are_escaped_and_nothing_is_fetched(reports: dict, full: Page) -> None:
    raw = reports["full"][0].read_text()
    assert TRICKY_TITLE not in raw and html.escape(TRICKY_TITLE) in raw
    assert "<script" not in raw.lower() and html.escape("broken/<b>gone</b>&.png") in raw
    assert TRICKY_TITLE in full.sections["duplicates"].rows[0].tiles[0].tooltip  # the text survives, as text
    assert 'http-equiv="Content-Security-Policy" content="default-src \'none\'' in raw
    assert all(ref.startswith(("data:image/", "#")) for ref in full.refs) and full.refs
    for forbidden in ("http://", "https://", "url(", "@import", "<link", "<iframe", "<object"):
        assert forbidden not in raw, forbidden


def test_missing_tables_are_explained(
    reports: dict, spark: SparkSession, demo_output: DemoOutput, tmp_path: Path
) -> None:
    path, summary = reports["bare"]
    assert summary.absent == ("runs",)  # the users section still shows history without recommendations
    page = Page(path.read_text())
    users = page.sections["users"]
    assert any("The recommendations table does not exist yet" in note for note in users.notes)
    assert len(users.rows) == demo_output.cfg["report.users"]
    assert all(row.strip("history") and not row.strip("recs") for row in users.rows)
    assert "Recommendations" not in users.rows[0].text  # said once, in the note, not under every user
    assert any("The runs table does not exist yet" in note for note in page.sections["runs"].notes)
    assert page.cards["Users with recommendations"] == "–" and page.cards["Last run"] == "–"
    # a fresh output root: every section explains itself, nothing crashes
    empty = write_report(
        demo_output.cfg.with_overrides({"output.root": str(tmp_path / "nothing")}), spark, tmp_path / "empty.html"
    )
    assert set(empty.absent) == {"similar", "duplicates", "quarantine", "runs"}
    page = Page((tmp_path / "empty.html").read_text())
    assert any("similar_items table does not exist yet" in n for n in page.sections["similar"].notes)
    assert not page.sections["similar"].rows and page.cards["Embedded items"] == "–"


def test_cli_writes_the_same_bytes(reports: dict, full_output: DemoOutput, tmp_path: Path) -> None:
    conf = tmp_path / "report.yaml"
    conf.write_text(yaml.safe_dump(dict(full_output.cfg)))
    out = tmp_path / "sub" / "cli.html"
    assert cli.main(["report", "--conf", str(conf), "--out", str(out)]) == 0
    assert out.read_bytes() == reports["full"][0].read_bytes()  # deterministic for the same tables
    assert reports["full"][1].bytes < 600_000 and reports["full"][1].thumbnails > 60


def test_renders_in_headless_chromium(reports: dict, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("needs Debian chromium (`make chromium`)")
    shot = tmp_path / "report.png"
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--window-size={SCREEN[0]},{SCREEN[1]}",
        f"--screenshot={shot}",
        reports["full"][0].as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == SCREEN
        rgb = image.convert("RGB")
    colours = rgb.getcolors(maxcolors=SCREEN[0] * SCREEN[1])
    assert len(colours) > 50  # text, cards, grey thumbnails: far from a blank page
    assert max(count for count, _ in colours) < 0.8 * SCREEN[0] * SCREEN[1]
    assert sum(rgb.getpixel((20, 20))) < 150  # the dark header bar is drawn: CSS applied
