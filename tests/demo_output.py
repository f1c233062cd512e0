"""A tiny but real pipeline output, shared by the report and notebook tests.

Why its own module and not conftest.py: only two test modules need it, and building it costs a real embed,
index and similar run. Both modules import the fixtures from here; the builds are memoised in this module so
the output is made once per test session even though each importing module registers its own fixture.

What it holds: the Fashion-MNIST demo data (200 real images, simulated shoppers) plus a few catalog rows that
exercise the report: two listings that reuse another item's image file (duplicates, one across categories),
four broken images (quarantine kinds missing, not_an_image, decode_error) and a title full of HTML.

`demo_output` stops after embed, index and similar: no `recommendations`, no `runs` (the report's "not there
yet" paths). `full_output` is a copy completed by the real recommend stage, with the `runs` rows of the
stages that built it and an older failed run.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import SparkSession

from lookalike.config import Config
from lookalike.demo_data import FASHION_MNIST_DIR, build_demo_data
from lookalike.embed import stage as embed
from lookalike.index import stage as index
from lookalike.results import StageResult
from lookalike.run import runs, stages
from lookalike.similar import stage as similar
from lookalike.storage import tables
from tests.conftest import make_config

N_ITEMS = 200
K = 6
RUN_ID = "20250102T030000Z-demo01"
FAILED_RUN_ID = "20250101T030000Z-demo00"
TRICKY_ITEM = "fm-00000"
TRICKY_TITLE = '<script>alert("x")</script> Tom\'s <b>bold</b> & co'
# (item_id, demo item whose image file it reuses, category: None = the same, "other" = another one)
# The tricky item is the canonical one of the first group, so the report always shows its title.
DUPLICATES = (("fm-dup-a", TRICKY_ITEM, None), ("fm-dup-b", TRICKY_ITEM, None), ("fm-dup-c", "fm-00002", "other"))
BROKEN = {  # item_id -> (file name under broken/, bytes written or None for no file, expected error_kind)
    "bad-missing": ("<b>gone</b>&.png", None, "missing"),
    "bad-empty": ("empty.png", b"", "not_an_image"),
    "bad-html": ("error-page.jpg", b"<html><body>404 Not Found</body></html>", "not_an_image"),
    "bad-truncated": ("truncated.png", None, "decode_error"),  # the first 80 bytes of a real PNG
}
RECS_PER_USER = 5


@dataclass(frozen=True)
class DemoOutput:
    """A config whose `output.root` holds the tables, the demo folder it read, and what the stages said."""

    cfg: Config
    demo: Path
    results: tuple[tuple[StageResult, datetime, datetime], ...]

    @property
    def root(self) -> str:
        return self.cfg["output.root"]

    def table(self, name: str) -> pa.Table:
        return tables.read_arrow(tables.table_path(self.root, name))


_BUILT: dict[str, DemoOutput] = {}


def _once(name: str, build: Callable[[], DemoOutput]) -> DemoOutput:
    if name not in _BUILT:
        _BUILT[name] = build()
    return _BUILT[name]


def add_oddities(demo: Path) -> Path:
    """The demo catalog plus duplicate listings, broken images and an HTML-laden title, as a new file."""
    catalog = pq.read_table(demo / "catalog.parquet").to_pylist()
    by_id = {row["item_id"]: row for row in catalog}
    by_id[TRICKY_ITEM]["title"] = TRICKY_TITLE
    for item, source, category in DUPLICATES:
        row = by_id[source]
        if category == "other":
            category = "Bag" if row["category"] != "Bag" else "Sandal"
        catalog.append(
            {
                **row,
                "item_id": item,
                "category": category or row["category"],
                "title": f"Relisted {row['title'].lower()}",
            }
        )
    broken = demo / "broken"
    broken.mkdir(exist_ok=True)
    real_png = (demo / by_id["fm-00003"]["image_uri"]).read_bytes()
    for item, (name, content, _) in BROKEN.items():
        if item == "bad-truncated":
            content = real_png[:80]
        if content is not None:
            (broken / name).write_bytes(content)
        catalog.append(
            {
                "item_id": item,
                "image_uri": f"broken/{name}",
                "category": "Bag",
                "title": f"Broken listing {item}",
                "in_stock": True,
            }
        )
    path = demo / "catalog_report.parquet"
    pq.write_table(pa.Table.from_pylist(catalog, schema=pq.read_schema(demo / "catalog.parquet")), path)
    return path


def _timed(fn: Callable[[], StageResult]) -> tuple[StageResult, datetime, datetime]:
    started = datetime.now(UTC)
    result = fn()
    return result, started, datetime.now(UTC)


def build_pipeline_output(spark: SparkSession, folder: Path) -> DemoOutput:
    """Demo data -> embed -> index -> similar, for real, small settings (64 px, k = 6)."""
    if not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("needs `apt-get install dataset-fashion-mnist` (make datasets)")
    demo = folder / "demo"
    build_demo_data(demo, limit=N_ITEMS, workers=1)
    cfg = make_config(
        folder,
        **{
            "catalog.path": str(add_oddities(demo)),
            "events.path": str(demo / "events.parquet"),
            "embed.image_size": 64,
            "embed.batch_size": 32,
            "embed.partition_size": 80,
            "similar.k": K,
        },
    )
    results = []
    for stage in (embed, index, similar):
        results.append(_timed(lambda stage=stage: stage.run(cfg, spark, RUN_ID)))
    return DemoOutput(cfg, demo, tuple(results))


def build_full_output(spark: SparkSession, base: DemoOutput, folder: Path) -> DemoOutput:
    """A copy of `base` completed by the real recommend stage, with the `runs` log of the stages that made
    it, plus an older run whose embed stage failed (so the report and notebook show a failure too)."""
    root = folder / "out"
    shutil.copytree(base.root, root)
    full = replace(base, cfg=base.cfg.with_overrides({"output.root": str(root), "recommend.n": RECS_PER_USER}))
    for result, started, finished in base.results:
        runs.record(
            full.root,
            RUN_ID,
            result.stage,
            runs.SUCCEEDED,
            started,
            finished,
            result.rows_in,
            result.rows_out,
            result.metrics,
        )
    stages.run_logged("recommend", full.cfg, spark, RUN_ID)
    yesterday = base.results[0][1] - timedelta(days=1)
    runs.record(
        full.root,
        FAILED_RUN_ID,
        "embed",
        runs.FAILED,
        yesterday,
        yesterday + timedelta(seconds=75),
        N_ITEMS,
        0,
        {"bad_fraction": 0.61},
    )
    return full


@pytest.fixture(scope="session")
def demo_output(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> DemoOutput:
    """The output of embed, index and similar over the tiny demo; read it, never write to it."""
    return _once("base", lambda: build_pipeline_output(spark, tmp_path_factory.mktemp("demo-output")))


@pytest.fixture(scope="session")
def full_output(spark: SparkSession, demo_output: DemoOutput, tmp_path_factory: pytest.TempPathFactory) -> DemoOutput:
    """`demo_output` plus the real `recommendations` and a `runs` log (see the module docstring)."""
    return _once("full", lambda: build_full_output(spark, demo_output, tmp_path_factory.mktemp("full-output")))
