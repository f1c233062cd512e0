"""Rendering the report: pure functions from `ReportData` to one self-contained HTML page. Every string that
comes from the data is escaped; the stylesheet is `report.css`, shipped beside this module and inlined."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from lookalike.report.data import (
    BAD_STATUSES,
    OK_STATUSES,
    SEED,
    WARN_STATUSES,
    Absent,
    HistoryEntry,
    ItemFacts,
    ReportData,
    Thumb,
    UserView,
)


def esc(value: object) -> str:
    """Every data string goes through here: titles, ids and error messages are typed by people."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt_int(value: int | None) -> str:
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


def tile(
    data: ReportData,
    item: str,
    lines: Sequence[str],
    *,
    extra_class: str = "",
    tooltip: Sequence[str] = (),
    badge: str = "",
) -> str:
    """One thumbnail with its caption lines (already escaped HTML) and a tooltip of plain facts."""
    facts = _facts(data, item)
    thumb = data.thumbs.get(item, Thumb(None, "not shown"))
    tip = " · ".join([item, *(t for t in (facts.category, facts.title) if t), *tooltip])
    if thumb.data_uri:
        picture = f'<img src="{thumb.data_uri}" alt="{esc(item)}">'
    else:
        picture = f'<span class="noimg">{esc(thumb.problem or "no image")}</span>'
    caption = "".join(f"<div>{line}</div>" for line in lines)
    return (
        f'<figure class="tile {extra_class}" title="{esc(tip)}">'
        f'<div class="pic">{picture}{badge}</div><figcaption>{caption}</figcaption></figure>'
    )


def _facts(data: ReportData, item: str) -> ItemFacts:
    return data.facts.get(item) or ItemFacts(item)


def _item_caption(data: ReportData, item: str) -> list[str]:
    facts = _facts(data, item)
    return [f'<span class="id">{esc(item)}</span>', f'<span class="muted">{esc(facts.category or "–")}</span>']


def render_overview(data: ReportData) -> str:
    cards = "".join(
        f'<div class="card"><div class="k">{esc(c.label)}</div><div class="v">{esc(c.value)}</div>'
        f'<div class="d">{esc(c.detail)}</div></div>'
        for c in data.cards
    )
    return _section(
        "overview", "Overview", "What the last runs left in the output tables.", f'<div class="cards">{cards}</div>'
    )


def render_items(data: ReportData) -> str:
    title, lead = "Similar items", "Sample items (spread over categories) with their neighbours, most similar first."
    if isinstance(data.items, Absent):
        return _section("similar", title, lead, note(data.items.message))
    rows, same, total = [], 0, 0
    for item in sorted(data.items, key=lambda i: (_facts(data, i).category or "", i)):
        neighbours = data.items[item]
        matches = [_facts(data, n.item_id).category == _facts(data, item).category for n in neighbours]
        same, total = same + sum(matches), total + len(neighbours)
        tiles = [
            tile(
                data,
                n.item_id,
                [_score_line(n.score), *_item_caption(data, n.item_id)[1:]],
                extra_class="" if match else "othercat",
                tooltip=[f"cosine {n.score:.3f}"],
                badge=f'<span class="rank">{n.rank}</span>',
            )
            for n, match in zip(neighbours, matches)
        ]
        head = (
            tile(data, item, _item_caption(data, item), extra_class="query")
            + f'<div class="title">{esc(_facts(data, item).title or "")}</div>'
            + f'<div class="muted small">{sum(matches)} of {len(neighbours)} neighbours in its category</div>'
        )
        rows.append(
            f'<div class="row"><div class="head">{head}</div>'
            f'<div class="strip neighbours">{"".join(tiles) or note("no neighbours", "info")}</div></div>'
        )
    share = f"{same / total:.0%}" if total else "–"
    lead += f" {share} of the neighbours shown share the item's category; others are outlined in orange."
    return _section("similar", title, lead, "".join(rows))


def _score_line(score: float) -> str:
    width = max(0.0, min(1.0, score)) * 100
    return f'<span class="score">{score:.3f}</span><span class="bar"><span style="width:{width:.0f}%"></span></span>'


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
        tile(
            data,
            h.item_id,
            [_event_line(h), *_item_caption(data, h.item_id)[1:]],
            tooltip=[f"last {fmt_time(h.last_ts)}"],
        )
        for h in user.history
    )
    recs = "".join(
        tile(
            data,
            r.item_id,
            [_score_line(r.score), *_item_caption(data, r.item_id)[1:], _via(r.because)],
            tooltip=[f"score {r.score:.3f}", *(_because(data, r.because))],
            badge=f'<span class="rank">{r.rank}</span>',
        )
        for r in user.recommendations
    )
    mix = _category_mix(data, [h.item_id for h in user.history])
    rec_mix = _category_mix(data, [r.item_id for r in user.recommendations])
    head = (
        f'<div class="uid">{esc(user.user_id)}</div><div class="muted small">{fmt_int(user.n_events)} events</div>'
        f'<div class="small"><b>History</b> {mix}</div>'
        + (f'<div class="small"><b>Recommended</b> {rec_mix}</div>' if user.recommendations else "")
    )
    body = (
        f'<div class="label">Recent history, newest first</div>'
        f'<div class="strip history">{history or note("no events", "info")}</div>'
    )
    if with_recommendations:  # without the table, the section's note says it once for every user
        body += (
            f'<div class="label">Recommendations</div>'
            f'<div class="strip recs">{recs or note("no recommendations for this user", "info")}</div>'
        )
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
    summary = (
        f'<p class="small">{fmt_int(dups.rows)} duplicate listings in {fmt_int(dups.n_groups)} groups; '
        f"the {len(dups.groups)} biggest:</p>"
    )
    groups = []
    for group in dups.groups:
        tiles = [tile(data, group.duplicate_of, _item_caption(data, group.duplicate_of), extra_class="query")]
        tiles += [tile(data, m, _item_caption(data, m)) for m in group.members]
        more = group.size - len(group.members)
        tail = f'<div class="more">+{fmt_int(more)} more</div>' if more > 0 else ""
        groups.append(
            f'<div class="row dup"><div class="head"><div class="uid">{esc(group.duplicate_of)}</div>'
            f'<div class="muted small">{fmt_int(group.size)} duplicate listing(s)</div></div>'
            f'<div class="strip members">{"".join(tiles)}{tail}</div></div>'
        )
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
        f'<tr><td><span class="kind">{esc(kind)}</span></td><td class="num">{fmt_int(n)}</td>'
        f'<td class="barcell"><span class="bar wide"><span style="width:{100 * n / total:.0f}%"></span></span>'
        "</td></tr>"
        for kind, n in quarantine.counts
    )
    examples = "".join(
        f'<tr><td><span class="kind">{esc(r["error_kind"])}</span></td><td class="id">{esc(r["item_id"])}</td>'
        f'<td class="uri">{esc(r["image_uri"])}</td><td>{esc(r["error_message"])}</td>'
        f'<td class="nowrap">{esc(fmt_time(r["seen_at"]))}</td></tr>'
        for r in quarantine.examples
    )
    body = (
        f'<div class="split"><table class="counts"><thead><tr><th>error_kind</th><th class="num">items</th>'
        f"<th>share of {fmt_int(total)}</th></tr></thead><tbody>{counts}</tbody></table></div>"
        f"<h3>Examples</h3><table><thead><tr><th>kind</th><th>item</th><th>image_uri</th><th>message</th>"
        f"<th>seen at (UTC)</th></tr></thead><tbody>{examples}</tbody></table>"
    )
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
        metrics = "".join(
            f'<span class="metric">{esc(k)} <b>{esc(fmt_number(v))}</b></span>' for k, v in run.metrics.items()
        )
        body.append(
            f"<tr><td>{esc(run.stage)}</td><td>{_status(run.status)}</td>"
            f'<td class="nowrap">{esc(fmt_time(run.started_at))}</td>'
            f'<td class="num nowrap">{esc(fmt_duration(run.started_at, run.finished_at))}</td>'
            f'<td class="num">{esc(fmt_int(run.rows_in))}</td><td class="num">{esc(fmt_int(run.rows_out))}</td>'
            f"<td>{metrics}</td></tr>"
        )
    table = (
        '<table class="runs"><thead><tr><th>stage</th><th>status</th><th>started (UTC)</th>'
        '<th class="num">duration</th><th class="num">rows in</th><th class="num">rows out</th>'
        f"<th>metrics</th></tr></thead><tbody>{''.join(body)}</tbody></table>"
    )
    return _section("runs", title, lead, table)


def _status(status: str) -> str:
    lower = status.lower()
    kind = (
        "ok"
        if lower in OK_STATUSES
        else "bad"
        if lower in BAD_STATUSES
        else "warn"
        if lower in WARN_STATUSES
        else "other"
    )
    return f'<span class="status {kind}">{esc(status or "?")}</span>'


def _section(anchor: str, title: str, lead: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2><p class="lead">{esc(lead)}</p>{body}</section>'


NAV = (
    ("overview", "Overview"),
    ("similar", "Similar items"),
    ("users", "Users"),
    ("duplicates", "Duplicates"),
    ("quarantine", "Quarantine"),
    ("runs", "Runs"),
)

# No network, no scripts: the browser may only show what is inside this file.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = (Path(__file__).with_name("report.css")).read_text(encoding="utf-8")


def render(data: ReportData) -> str:
    """The whole page. Pure and deterministic: the same ReportData gives the same bytes."""
    nav = "".join(f'<a href="#{anchor}">{esc(label)}</a>' for anchor, label in NAV)
    versions = ", ".join(
        f"{esc(name)} v{v}" if v is not None else f"{esc(name)} (none)" for name, v in sorted(data.versions.items())
    )
    sections = (
        render_overview(data),
        render_items(data),
        render_users(data),
        render_duplicates(data),
        render_quarantine(data),
        render_runs(data),
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>lookalike report</title><style>{CSS}</style></head><body>"
        f'<header class="top"><div><h1>lookalike report</h1>'
        f'<p class="sub">{esc(data.output_root)}</p></div><nav>{nav}</nav></header>'
        f"<main>{''.join(sections)}</main>"
        f"<footer>Table versions: {versions}. Samples are drawn in a seeded hash order (seed {SEED}), "
        f"so the same tables give the same page.</footer></body></html>\n"
    )
