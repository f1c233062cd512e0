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

import os
import tempfile
from pathlib import Path

from pyspark.sql import SparkSession

from lookalike.config import Config
from lookalike.report.data import Absent, ReportData, ReportSummary
from lookalike.report.gather import gather
from lookalike.report.render import render


def absent_sections(data: ReportData) -> tuple[str, ...]:
    parts = {
        "similar": data.items,
        "users": data.users,
        "duplicates": data.duplicates,
        "quarantine": data.quarantine,
        "runs": data.runs,
    }
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
