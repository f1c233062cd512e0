"""Demo data: real PNGs, the catalog/users/events contract, and a simulation whose tastes show in the events."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lookalike.demo_data import (
    CLASS_NAMES,
    FASHION_MNIST_DIR,
    PARALLEL_MIN_IMAGES,
    DatasetMissingError,
    DemoDataError,
    build_demo_data,
    category_slug,
)
from lookalike.errors import LookalikeError

LIMIT = 300


@pytest.fixture(scope="module")
def fashion_mnist() -> None:
    """Skip tests that build from the real dataset where the Debian package is not installed."""
    if not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("needs `apt-get install dataset-fashion-mnist`")


@pytest.fixture(scope="module")
def demo(fashion_mnist, tmp_path_factory: pytest.TempPathFactory):
    """One small build shared by the read-only tests: (summary, catalog, users, events) as pandas frames."""
    summary = build_demo_data(tmp_path_factory.mktemp("demo"), limit=LIMIT)
    paths = (summary.catalog_path, summary.users_path, summary.events_path)
    tables = [pq.read_table(p).to_pandas() for p in paths]
    return summary, *tables


def _read_tables(out: Path) -> dict[str, pa.Table]:
    return {name: pq.read_table(out / f"{name}.parquet") for name in ("catalog", "users", "events")}


def test_summary_counts_and_paths(demo):
    summary, catalog, users, events = demo
    assert (summary.n_items, summary.n_users, summary.n_events) == (len(catalog), len(users), len(events))
    assert summary.n_items == LIMIT
    assert summary.n_users == 20  # max(20, 300 // 25)
    assert summary.catalog_path == summary.out / "catalog.parquet"
    assert summary.images_dir == summary.out / "images"
    assert str(summary) == f"300 items, 20 users, {len(events)} events in {summary.out}"


def test_schemas_exactly_as_the_contract_says(demo):
    summary = demo[0]
    assert pq.read_schema(summary.catalog_path).remove_metadata() == pa.schema(
        [
            ("item_id", pa.string()),
            ("image_uri", pa.string()),
            ("category", pa.string()),
            ("title", pa.string()),
            ("in_stock", pa.bool_()),
        ]
    )
    assert pq.read_schema(summary.events_path).remove_metadata() == pa.schema(
        [
            ("user_id", pa.string()),
            ("item_id", pa.string()),
            ("event_type", pa.string()),
            ("ts", pa.timestamp("us", tz="UTC")),
        ]
    )
    users = pq.read_schema(summary.users_path)
    assert users.field("user_id").type == pa.string()
    assert users.field("favourite_categories").type == pa.list_(pa.string())
    assert users.field("taste_strength").type == pa.float64()


def test_catalog_ids_uris_and_images(demo):
    summary, catalog, _, _ = demo
    assert catalog["item_id"].is_unique
    assert list(catalog["item_id"][:3]) == ["fm-00000", "fm-00001", "fm-00002"]
    assert set(catalog["category"]) <= set(CLASS_NAMES)
    for row in catalog.itertuples():
        assert not Path(row.image_uri).is_absolute()
        assert row.image_uri == f"images/{category_slug(row.category)}/{row.item_id}.png"
        with Image.open(summary.out / row.image_uri) as image:
            assert image.format == "PNG" and image.size == (28, 28)
            image.load()
    assert not list(summary.images_dir.rglob("*.tmp"))
    assert sum(1 for _ in summary.images_dir.rglob("*.png")) == LIMIT


def test_category_slugs_are_safe_folder_names():
    assert category_slug("T-shirt/top") == "t-shirt-top"
    assert category_slug("Ankle boot") == "ankle-boot"


def test_titles_carry_the_class_noun_and_most_items_are_in_stock(demo):
    catalog = demo[1]
    nouns = {"T-shirt/top": ("t-shirt", "top"), "Trouser": ("trousers",)}
    for category, title in zip(catalog["category"], catalog["title"]):
        words = nouns.get(category, (category.lower(),))
        assert any(title.lower().endswith(w) for w in words), (category, title)
    assert catalog["title"].nunique() > LIMIT // 3
    assert 0.8 < catalog["in_stock"].mean() < 0.97


def test_users_have_one_to_three_favourites(demo):
    users = demo[2]
    assert users["user_id"].is_unique
    for favourites in users["favourite_categories"]:
        assert 1 <= len(favourites) <= 3 and len(set(favourites)) == len(favourites)
        assert set(favourites) <= set(CLASS_NAMES)
    assert users["taste_strength"].between(0.5, 1.0).all()


def test_events_reference_known_users_and_items(demo):
    _, catalog, users, events = demo
    assert set(events["item_id"]) <= set(catalog["item_id"])
    assert set(events["user_id"]) == set(users["user_id"])
    assert set(events["event_type"]) == {"view", "cart", "purchase"}
    per_user = events.groupby("user_id").size()
    assert per_user.min() >= 3 and per_user.max() <= 80
    assert (events["ts"].max() - events["ts"].min()).total_seconds() <= 60 * 86400


def test_purchases_follow_a_cart_and_a_view_of_the_same_item(demo):
    events = demo[3]
    first = events.groupby(["user_id", "item_id", "event_type"])["ts"].min().unstack()
    bought = first.dropna(subset=["purchase"])
    assert len(bought) > 0
    assert (bought["cart"] < bought["purchase"]).all()
    assert (bought["view"] < bought["cart"]).all()


def test_events_follow_the_simulated_tastes(demo):
    _, catalog, users, events = demo
    category = dict(zip(catalog["item_id"], catalog["category"]))
    favourites = dict(zip(users["user_id"], users["favourite_categories"]))
    in_favourites = [category[i] in favourites[u] for u, i in zip(events["user_id"], events["item_id"])]
    share = sum(in_favourites) / len(in_favourites)
    # Chance would be about 0.2 (two favourites of ten categories); the simulation aims at about 0.87.
    assert share > 0.6


def test_popular_items_are_viewed_by_several_users(demo):
    events = demo[3]
    viewers = events[events["event_type"] == "view"].groupby("item_id")["user_id"].nunique()
    assert viewers.max() >= 4  # Zipf-like popularity: co-visitation has something to count


def test_same_seed_same_tables_other_seed_other_events(fashion_mnist, tmp_path):
    first = build_demo_data(tmp_path / "a", limit=LIMIT, seed=3)
    again = build_demo_data(tmp_path / "b", limit=LIMIT, seed=3)
    other = build_demo_data(tmp_path / "c", limit=LIMIT, seed=4)
    a, b, c = _read_tables(first.out), _read_tables(again.out), _read_tables(other.out)
    for name in a:
        assert a[name].equals(b[name]), name
    assert not a["events"].equals(c["events"])
    uri = a["catalog"]["image_uri"][0].as_py()
    assert (first.out / uri).read_bytes() == (again.out / uri).read_bytes()


def test_rebuild_in_place_is_identical_and_prunes_stale_images(fashion_mnist, tmp_path):
    out = tmp_path / "demo"
    build_demo_data(out, limit=LIMIT)
    before = _read_tables(out)
    build_demo_data(out, limit=LIMIT)
    after = _read_tables(out)
    for name in before:
        assert before[name].equals(after[name]), name
    (out / "images" / "bag").mkdir(exist_ok=True)
    (out / "images" / "bag" / "fm-99999.png.tmp").write_bytes(b"left by an interrupted run")
    build_demo_data(out, limit=50)
    assert sum(1 for _ in (out / "images").rglob("*.png")) == 50
    assert not list((out / "images").rglob("*.tmp"))
    assert not list(out.glob(".*.tmp"))
    assert len(pq.read_table(out / "catalog.parquet")) == 50


def test_worker_processes_write_the_same_files(fashion_mnist, tmp_path):
    serial = build_demo_data(tmp_path / "serial", limit=PARALLEL_MIN_IMAGES, workers=1)
    parallel = build_demo_data(tmp_path / "parallel", limit=PARALLEL_MIN_IMAGES, workers=2)
    files = sorted(p.relative_to(serial.out) for p in serial.images_dir.rglob("*.png"))
    assert files == sorted(p.relative_to(parallel.out) for p in parallel.images_dir.rglob("*.png"))
    assert len(files) == PARALLEL_MIN_IMAGES
    assert all((serial.out / f).read_bytes() == (parallel.out / f).read_bytes() for f in files)


def test_limit_must_be_positive(tmp_path):
    with pytest.raises(DemoDataError, match="limit") as info:
        build_demo_data(tmp_path, limit=0)
    assert isinstance(info.value, LookalikeError)  # the CLI prints these as one line


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist") as info:
        build_demo_data(tmp_path / "out", limit=10, dataset_dir=tmp_path / "nowhere")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, LookalikeError)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
