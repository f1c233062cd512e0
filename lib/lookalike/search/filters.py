"""`where` filters: a SQL predicate over the catalog's columns -> the item ids it keeps.

One engine for both callers, so a predicate means the same in the batch command (`--where`) and in a service
(`Searcher.search(..., where=)`): DuckDB, in-process, over an Arrow table of the catalog's columns. The text is
parsed as one expression (DuckDB's relation `filter`), never as a statement, so `; DROP ...` is a syntax
error; file and network access are switched off and the setting locked, so a hostile predicate can read only
the catalog table it is given.
"""

from __future__ import annotations

import re
import threading

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from lookalike.errors import LookalikeError

ID_COLUMN, IN_STOCK = "item_id", "in_stock"
_ENGINE_CONFIG: dict[str, str | bool | int | float | list[str]] = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "threads": 1,
    "lock_configuration": True,
}


class FilterError(LookalikeError):
    """The predicate cannot be used: a syntax error, an unknown column, or a result that is not a boolean."""


def check_syntax(where: str) -> None:
    """Refuse a predicate that does not parse, before anything is read: needs no catalog."""
    CatalogFilter(pa.table({ID_COLUMN: pa.array([], pa.string())}))._run(where, syntax_only=True)


def referenced_columns(where: str, columns: list[str]) -> list[str]:
    """`item_id` and the `columns` whose name appears as a word in `where`: the ones worth reading for it
    (a name inside a string literal only costs reading one more column)."""
    words = {word.lower() for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", where)}
    return [ID_COLUMN] + [c for c in columns if c != ID_COLUMN and c.lower() in words]


class CatalogFilter:
    """Evaluates predicates over one Arrow table of catalog columns (with `item_id`). Thread-safe."""

    def __init__(self, catalog: pa.Table):
        if ID_COLUMN not in catalog.column_names:
            raise FilterError(f"the catalog for filters has no {ID_COLUMN} column; it has {catalog.column_names}")
        catalog = catalog.set_column(
            catalog.column_names.index(ID_COLUMN), ID_COLUMN, pc.cast(catalog[ID_COLUMN], pa.string())
        )
        self._catalog = _with_in_stock(catalog)
        self._engine = duckdb.connect(config=_ENGINE_CONFIG)
        self._lock = threading.Lock()  # a DuckDB connection serves one query at a time

    @property
    def columns(self) -> list[str]:
        return self._catalog.column_names

    def check(self, where: str) -> None:
        """Refuse a predicate that does not parse or bind to these columns, reading no rows."""
        CatalogFilter(self._catalog.schema.empty_table())._run(where, syntax_only=False)

    def matching(self, where: str) -> pa.Array:
        """The `item_id`s of the rows for which `where` is true (null counts as false, as in SQL)."""
        return self._run(where, syntax_only=False)

    def _run(self, where: str, syntax_only: bool) -> pa.Array:
        if not where.strip():
            raise FilterError("the where predicate is empty")
        with self._lock:
            try:
                relation = self._engine.from_arrow(self._catalog).filter(where)
                kept = relation.project(ID_COLUMN).fetch_arrow_table()[ID_COLUMN]
            except duckdb.ParserException as err:
                raise FilterError(f"where {where!r} is not a SQL predicate: {_first_line(err)}") from None
            except duckdb.Error as err:
                if syntax_only:
                    return pa.array([], pa.string())  # parsed; binding waits for the catalog's columns
                raise FilterError(f"where {where!r}: {_first_line(err)} (catalog columns: {self.columns})") from None
        return kept.combine_chunks()


def _with_in_stock(catalog: pa.Table) -> pa.Table:
    """`in_stock` as the pipeline reads it (docs/tables.md): a missing column or a null value means in stock."""
    if IN_STOCK not in catalog.column_names:
        return catalog.append_column(IN_STOCK, pa.array([True] * len(catalog), pa.bool_()))
    column = pc.fill_null(pc.cast(catalog[IN_STOCK], pa.bool_()), True)
    return catalog.set_column(catalog.column_names.index(IN_STOCK), IN_STOCK, column)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]


__all__ = ["CatalogFilter", "FilterError", "check_syntax", "referenced_columns"]
