"""Catalog reading: every input format, required columns, duplicates, relative URIs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import SparkSession

from lookalike.embed.catalog import CatalogError, read_catalog
from lookalike.storage import tables
from tests.conftest import make_config

ITEMS = pd.DataFrame(
    {
        "item_id": ["a", "b", "c"],
        "image_uri": ["img/a.png", "/abs/b.png", "s3a://bucket/c.jpg"],
        "category": ["shoe", "bag", None],
        "title": ["A", "B", "C"],
        "in_stock": [True, False, None],
    }
)


def write_catalog(spark: SparkSession, folder: Path, fmt: str, pdf: pd.DataFrame = ITEMS) -> Path:
    path = folder / f"catalog.{fmt}"
    df = spark.createDataFrame(pdf)
    if fmt == "delta":
        tables.write(df, str(path))
    elif fmt == "csv":
        pdf.to_csv(path, index=False)
    elif fmt == "json":
        pdf.to_json(path, orient="records", lines=True)
    else:
        pdf.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json", "delta"])
def test_every_format_reads_to_the_contract(spark: SparkSession, tmp_path: Path, fmt: str) -> None:
    path = write_catalog(spark, tmp_path, fmt)
    cfg = make_config(tmp_path, **{"catalog.path": str(path), "catalog.format": fmt})
    df = read_catalog(spark, cfg)
    assert df.columns == ["item_id", "image_uri", "category", "title", "in_stock"]
    got = {r["item_id"]: r for r in df.collect()}
    assert got["a"]["image_uri"] == f"{tmp_path}/img/a.png"  # relative: against the catalog's folder
    assert got["b"]["image_uri"] == "/abs/b.png" and got["c"]["image_uri"] == "s3a://bucket/c.jpg"
    assert got["b"]["in_stock"] is False and got["c"]["in_stock"] is True  # missing stock means in stock


def test_optional_columns_may_be_absent_and_ids_become_strings(spark: SparkSession, tmp_path: Path) -> None:
    path = tmp_path / "catalog.parquet"
    pd.DataFrame({"item_id": [10, 11], "image_uri": ["x.png", "y.png"], "extra": [1, 2]}).to_parquet(path)
    rows = read_catalog(spark, make_config(tmp_path, **{"catalog.path": str(path)})).collect()
    assert [r["item_id"] for r in sorted(rows)] == ["10", "11"]
    assert all(r["category"] is None and r["in_stock"] is True for r in rows)


def test_missing_required_column(spark: SparkSession, tmp_path: Path) -> None:
    path = write_catalog(spark, tmp_path, "parquet", ITEMS.drop(columns=["image_uri"]))
    with pytest.raises(CatalogError, match=r"lacks required column\(s\) \['image_uri'\]"):
        read_catalog(spark, make_config(tmp_path, **{"catalog.path": str(path)}))


def test_duplicates_and_null_ids_name_examples(spark: SparkSession, tmp_path: Path) -> None:
    dupes = pd.concat([ITEMS, ITEMS.iloc[[0, 0, 1]]])
    path = write_catalog(spark, tmp_path, "parquet", dupes)
    with pytest.raises(CatalogError, match=r"2 duplicate item_id\(s\), e.g. 'a' \(x3\), 'b' \(x2\)"):
        read_catalog(spark, make_config(tmp_path, **{"catalog.path": str(path)}))
    nulls = ITEMS.assign(item_id=["a", None, "c"])
    path = write_catalog(spark, tmp_path, "parquet", nulls)
    with pytest.raises(CatalogError, match=r"rows without item_id, e.g. image_uri '/abs/b.png'"):
        read_catalog(spark, make_config(tmp_path, **{"catalog.path": str(path)}))
