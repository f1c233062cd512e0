"""Config errors are caught before Spark starts, with one line naming the key or path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lookalike import config as config_mod
from lookalike.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write_conf(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.parquet"
    path.write_bytes(b"")
    return path


def test_defaults_and_nested_yaml(tmp_path: Path, catalog: Path) -> None:
    conf = write_conf(
        tmp_path,
        f"catalog:\n  path: {catalog}\noutput:\n  root: {tmp_path}/out\n"
        "embed:\n  batch_size: 8\nspark:\n  conf:\n    spark.executor.memory: 2g\n",
    )
    cfg = config_mod.load(conf)
    assert cfg["embed.batch_size"] == 8
    assert cfg["model.name"] == "efficientnet-lite0"
    assert cfg["spark.conf"] == {"spark.executor.memory": "2g"}
    assert cfg["output.root"] == str(tmp_path / "out")


def test_set_overrides_are_typed(tmp_path: Path, catalog: Path) -> None:
    conf = write_conf(tmp_path, f"catalog: {{path: {catalog}}}\noutput: {{root: out}}\n")
    cfg = config_mod.load(conf, ["embed.batch_size=32", "spark.tune_malloc=false", "embed.image_size=112"])
    assert cfg["embed.batch_size"] == 32 and cfg["spark.tune_malloc"] is False and cfg["embed.image_size"] == 112


def test_relative_paths_resolve_against_working_folder(
    tmp_path: Path, catalog: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    conf = write_conf(tmp_path, "catalog: {path: catalog.parquet}\noutput: {root: out}\n")
    cfg = config_mod.load(conf)
    assert cfg["catalog.path"] == str(catalog) and cfg["output.root"] == str(tmp_path / "out")


@pytest.mark.parametrize(
    "body, overrides, message",
    [
        ("embed: {batchsize: 8}", [], "unknown config key 'embed.batchsize'"),
        ("", ["nope.key=1"], "unknown config key 'nope.key'"),
        ("embed: {batch_size: eight}", [], "embed.batch_size: expected an integer, got 'eight'"),
        ("embed: {batch_size: true}", [], "embed.batch_size: expected an integer, got True"),
        ("embed: {batch_size: 0}", [], "embed.batch_size: must be >= 1"),
        ("", ["catalog.format=xml"], "catalog.format: must be one of parquet, csv, json, delta"),
        ("spark: {conf: 3}", [], "spark.conf: expected a mapping"),
        ("", ["embed.batch_size"], "--set expects dotted.key=value"),
        ("", ["fetch.max_requests_per_host_per_s=0"], "fetch.max_requests_per_host_per_s: must be >= 0.001"),
        ("", ["fetch.max_connections_per_host=0"], "fetch.max_connections_per_host: must be >= 1"),
        ("", ["fetch.concurrency=1000"], "fetch.concurrency: must be <= 256"),
        ("", ["fetch.retries=-1"], "fetch.retries: must be >= 0"),
        ("", ["fetch.timeout_s=soon"], "fetch.timeout_s: expected a number"),
        ("", ["fetch.ca_bundle=/nonexistent/ca.pem"], "fetch.ca_bundle: path does not exist: /nonexistent/ca.pem"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, catalog: Path, body: str, overrides: list[str], message: str) -> None:
    conf = write_conf(tmp_path, f"catalog: {{path: {catalog}}}\noutput: {{root: out}}\n{body}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_mod.load(conf, overrides)


def test_missing_input_path_names_the_path(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, f"catalog: {{path: {tmp_path}/nowhere.parquet}}\noutput: {{root: out}}\n")
    with pytest.raises(ConfigError, match=r"catalog.path: path does not exist: .*nowhere.parquet"):
        config_mod.load(conf)


def test_required_key_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="catalog.path: required but not set"):
        config_mod.load(write_conf(tmp_path, "output: {root: out}\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        config_mod.load(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        config_mod.load(write_conf(tmp_path, "catalog: [unclosed\n"))


def test_remote_paths_are_not_checked_locally(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, "catalog: {path: 's3a://bucket/catalog'}\noutput: {root: 's3a://bucket/out'}\n")
    cfg = config_mod.load(conf)
    assert cfg["catalog.path"] == "s3a://bucket/catalog"


def test_local_yaml_is_valid() -> None:
    cfg = config_mod.load(REPO / "conf" / "local.yaml", need_paths=())
    assert cfg["catalog.path"].endswith("demo/catalog.parquet")


def test_configuration_reference_is_generated_from_the_schema() -> None:
    written = (REPO / "docs" / "configuration.md").read_text()
    assert written == config_mod.reference_markdown(), "docs/configuration.md is stale: run `make docs`"
    for key, spec in config_mod.SCHEMA.items():
        [row] = [line for line in written.splitlines() if line.startswith(f"| `{key}` |")]
        assert " ".join(spec.help.split()).replace("|", "\\|") in row
