"""notebooks/analysts.ipynb runs top to bottom on a kernel of this venv, over the tiny demo output.

The notebook is executed for real (nbclient, ipykernel): it starts its own SparkSession from the config named
by LOOKALIKE_CONF, registers the tables as views and runs every query. The output copy lacks `duplicates`,
so the skip path for a table that does not exist is exercised too.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nbformat
import pyarrow.parquet as pq
import pytest
import yaml
from nbclient import NotebookClient

from tests.conftest import REPO
from tests.demo_output import BROKEN, FAILED_RUN_ID, K, RUN_ID, DemoOutput, demo_output, full_output

__all__ = ["demo_output", "full_output"]  # session fixtures shared with test_report.py

NOTEBOOK = REPO / "notebooks" / "analysts.ipynb"
KERNEL = "lookalike-test-venv"


def venv_kernel(folder: Path) -> Path:
    """A kernel spec that runs this interpreter (the venv's), whatever kernels the machine has installed."""
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lookalike test venv", "language": "python"}))
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


@pytest.fixture(scope="module")
def executed(full_output: DemoOutput, tmp_path_factory: pytest.TempPathFactory) -> nbformat.NotebookNode:
    folder = tmp_path_factory.mktemp("notebook")
    out = folder / "out"
    shutil.copytree(full_output.root, out)
    shutil.rmtree(out / "tables" / "duplicates")
    conf = folder / "analysts.yaml"
    values = {**dict(full_output.cfg), "output.root": str(out), "spark.driver_memory": "1g"}
    conf.write_text(yaml.safe_dump(values))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOOKALIKE_CONF", str(conf))
        env.delenv("LOOKALIKE_ITEM", raising=False)
        env.setenv("JUPYTER_PATH", str(venv_kernel(folder / "jupyter")))
        env.setenv("JUPYTER_RUNTIME_DIR", str(folder / "runtime"))
        notebook = nbformat.read(NOTEBOOK, as_version=4)
        NotebookClient(notebook, kernel_name=KERNEL, timeout=600,
                       resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return notebook


@pytest.fixture(scope="module")
def texts(executed: nbformat.NotebookNode) -> list[str]:
    return [cell_text(cell) for cell in executed.cells if cell.cell_type == "code"]


def test_notebook_runs_on_the_venv_kernel_and_skips_missing_tables(executed: nbformat.NotebookNode,
                                                                   texts: list[str]) -> None:
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
