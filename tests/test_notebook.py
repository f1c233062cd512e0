"""notebooks/analysts.ipynb runs top to bottom on a kernel of this venv, over the tiny demo output.

The notebook is executed for real (nbclient, ipykernel): it starts its own SparkSession from the config named
by LOOKALIKE_CONF, registers the tables as views and runs every query. The output copy lacks `duplicates`,
so the skip path for a table that does not exist is exercised too.

The plot cells (tagged `plots` in their metadata; the queries' cells are untagged and found by position) must
show their figures as `image/png` outputs that decode and are not blank. The notebook reads a copy of the
catalog in which two neighbours of the item it shows have a missing image and an HTML page for an image, so
the thumbnails' placeholder tiles are exercised, and another neighbour's image is a `file://` URI.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import sys
from pathlib import Path

import nbformat
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from nbclient import NotebookClient
from PIL import Image

from tests.conftest import REPO
from tests.demo_output import BROKEN, FAILED_RUN_ID, RUN_ID, DemoOutput, K, demo_output, full_output

__all__ = ["demo_output", "full_output"]  # session fixtures shared with test_report.py

NOTEBOOK = REPO / "notebooks" / "analysts.ipynb"
KERNEL = "lookalike-test-venv"
PLOTS = ("neighbour-thumbnails", "score-histogram", "category-mix", "runs-over-time")


def venv_kernel(folder: Path) -> Path:
    """A kernel spec that runs this interpreter (the venv's), whatever kernels the machine has installed."""
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "lookalike test venv",
                "language": "python",
            }
        )
    )
    return folder


def cell_text(cell: nbformat.NotebookNode) -> str:
    """Everything a code cell showed: printed streams and the plain-text form of its result."""
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            parts.append(output["text"])
        elif output["output_type"] in ("execute_result", "display_data"):
            parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


def tags(cell: nbformat.NotebookNode) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def pngs(cell: nbformat.NotebookNode) -> list[Image.Image]:
    """The figures a code cell displayed, decoded."""
    images = []
    for output in cell.get("outputs", []):
        if output["output_type"] in ("execute_result", "display_data") and "image/png" in output["data"]:
            image = Image.open(io.BytesIO(base64.b64decode(output["data"]["image/png"])))
            image.load()
            images.append(image)
    return images


def first_neighbours(full_output: DemoOutput) -> tuple[str, list[str]]:
    """The item the notebook shows by default (the smallest item id) and its neighbours by rank."""
    similar = full_output.table("similar_items").to_pandas()
    first = similar["item_id"].min()
    return first, similar[similar["item_id"] == first].sort_values("rank")["similar_item_id"].tolist()


def catalog_with_unreadable_neighbours(full_output: DemoOutput, folder: Path) -> Path:
    """A copy of the catalog with absolute image paths; of the first item's neighbours, rank 1's image is a
    file:// URI, rank K-1's an HTML page (file://) and rank K's a file that does not exist."""
    source = Path(full_output.cfg["catalog.path"])
    catalog = pq.read_table(source)
    _, neighbours = first_neighbours(full_output)
    html_page = full_output.demo / "broken" / BROKEN["bad-html"][0]
    uris = []
    for item, uri in zip(catalog["item_id"].to_pylist(), catalog["image_uri"].to_pylist()):
        path = source.parent / uri  # an absolute uri stays as it is
        uris.append(
            {
                neighbours[0]: path.as_uri(),
                neighbours[-2]: html_page.as_uri(),
                neighbours[-1]: str(folder / "no-such-image.png"),
            }.get(item, str(path))
        )
    column = catalog.schema.get_field_index("image_uri")
    path = folder / "catalog.parquet"
    pq.write_table(catalog.set_column(column, catalog.schema.field(column), pa.array(uris, pa.string())), path)
    return path


@pytest.fixture(scope="module")
def executed(full_output: DemoOutput, tmp_path_factory: pytest.TempPathFactory) -> nbformat.NotebookNode:
    folder = tmp_path_factory.mktemp("notebook")
    out = folder / "out"
    shutil.copytree(full_output.root, out)
    shutil.rmtree(out / "tables" / "duplicates")
    conf = folder / "analysts.yaml"
    values = {
        **dict(full_output.cfg),
        "output.root": str(out),
        "spark.driver_memory": "1g",
        "catalog.path": str(catalog_with_unreadable_neighbours(full_output, folder)),
    }
    conf.write_text(yaml.safe_dump(values))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOOKALIKE_CONF", str(conf))
        env.delenv("LOOKALIKE_ITEM", raising=False)
        env.setenv("JUPYTER_PATH", str(venv_kernel(folder / "jupyter")))
        env.setenv("JUPYTER_RUNTIME_DIR", str(folder / "runtime"))
        notebook = nbformat.read(NOTEBOOK, as_version=4)
        NotebookClient(
            notebook, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
        ).execute()
    return notebook


@pytest.fixture(scope="module")
def texts(executed: nbformat.NotebookNode) -> list[str]:
    """What the query cells showed, in order (the plot cells are tested by their tags)."""
    return [cell_text(cell) for cell in executed.cells if cell.cell_type == "code" and "plots" not in tags(cell)]


@pytest.fixture(scope="module")
def plots(executed: nbformat.NotebookNode) -> dict[str, nbformat.NotebookNode]:
    return {tag: cell for cell in executed.cells if cell.cell_type == "code" for tag in tags(cell) if tag in PLOTS}


def test_notebook_runs_on_the_venv_kernel_and_skips_missing_tables(
    executed: nbformat.NotebookNode, texts: list[str]
) -> None:
    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code)  # every cell ran, top to bottom
    assert not [out for cell in code for out in cell.outputs if out["output_type"] == "error"]
    setup, views, *_ = texts
    assert "output.root = " in setup and f"on {sys.executable}" in setup
    for name in ("embeddings", "similar_items", "recommendations", "runs", "quarantine", "catalog"):
        assert f"view {name}: " in views
    assert "skipped duplicates: no table at" in views
    assert "skipped: needs duplicates, not built yet" in texts[-1]


def test_notebook_queries_print_results(texts: list[str], full_output: DemoOutput) -> None:
    _, _, neighbours, mix, runs, quarantine, _ = texts
    similar = full_output.table("similar_items").to_pandas()
    first = similar["item_id"].min()
    assert f"neighbours of {first}" in neighbours and "same_category" in neighbours
    expected = similar[similar["item_id"] == first]["similar_item_id"]
    assert len(expected) == K and all(item in neighbours for item in expected)
    assert "pct_of_recommendations" in mix and "pct_of_catalog" in mix and "lift" in mix
    catalog = pq.read_table(full_output.cfg["catalog.path"]).to_pandas()["category"].value_counts()
    assert f"{catalog.index[0]} " in mix and f"{100 * catalog.iloc[0] / catalog.sum():.1f}" in mix
    assert RUN_ID in runs and FAILED_RUN_ID in runs and "images_per_s" in runs and "failed" in runs
    for kind in {kind for _, _, kind in BROKEN.values()}:
        assert kind in quarantine


def test_notebook_plots_render_as_pictures(plots: dict[str, nbformat.NotebookNode], full_output: DemoOutput) -> None:
    assert sorted(plots) == sorted(PLOTS)
    for name, cell in plots.items():
        images = pngs(cell)
        assert images, f"{name} showed no image/png, only {cell_text(cell)!r}"
        for image in images:
            assert image.width >= 300 and image.height >= 150, (name, image.size)
            colours = image.convert("RGB").getcolors(maxcolors=image.width * image.height)
            background = max(count for count, _ in colours)
            assert len(colours) > 1 and background < 0.99 * image.width * image.height, f"{name} is blank"
    _, neighbours = first_neighbours(full_output)
    thumbnails = cell_text(plots["neighbour-thumbnails"])
    assert (
        f"{K + 1} pictures, 2 could not be shown: {neighbours[-2]} (not_an_image), {neighbours[-1]} (missing)"
        in thumbnails
    )
    assert "skipped" not in "".join(cell_text(cell) for cell in plots.values())
