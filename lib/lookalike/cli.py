"""The `lookalike` command line: one sub-command per stage, plus demo-data, nightly and report.

Every stage command takes `--conf FILE` and repeatable `--set dotted.key=value`, validates the config before
Spark starts, and turns a LookalikeError into one line on stderr and a non-zero exit. `jobs/<stage>.py` calls
`run_job` with the stage's name, so spark-submit and the CLI run the same code.

`main` returns the exit status (tests call it in-process); the console script, `python -m lookalike.cli` and
`run_job` go through `entry`, which ends the process with that status and nothing else (`leave`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from lookalike import config as config_mod
from lookalike.errors import LookalikeError
from lookalike.run import stages

log = logging.getLogger("lookalike")

EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130  # what a shell reports for a command ended by Ctrl-C (128 + SIGINT)

STAGE_HELP = {
    "embed": "catalog -> embeddings, quarantine",
    "index": "embeddings -> FAISS shards + manifests",
    "similar": "-> similar_items",
    "recommend": "events + embeddings -> recommendations",
    "nightly": "(train when due ->) embed -> index -> similar -> recommend, incremental, one run id",
    "search": "query images -> search_results, search_errors (against the latest index build)",
    "train": "labels + behaviour + stored backbone vectors -> a head under models/, models/LATEST",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lookalike", description="Visual-similarity pipeline on Spark.")
    parser.add_argument("--log-level", default="INFO", help="Python log level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo-data", help="build the Fashion-MNIST demo catalog and events")
    demo.add_argument("--out", required=True, type=Path, help="folder to write (created if missing)")
    demo.add_argument("--limit", type=int, default=None, help="first N images only (default: all 70,000)")
    demo.add_argument("--seed", type=int, default=7, help="simulation seed (default 7)")
    for name, text in STAGE_HELP.items():
        stage = commands.add_parser(name, help=text)
        _add_conf_args(stage)
        if name == "search":
            stage.add_argument("--queries", help="query table: query_id, image_uri, optional category and k")
            stage.add_argument(
                "--text",
                action="append",
                help='words to search the images by, e.g. "white leather trainers" (repeatable; needs a head '
                "with a text map or image+title vectors: docs/training.md)",
            )
            stage.add_argument(
                "--where",
                help='SQL predicate over catalog columns every result must satisfy, e.g. "in_stock AND '
                "category = 'shoes'\" (the same as --set search.where=...)",
            )
        if name == "embed":
            stage.add_argument(
                "--retry-failed",
                action="store_true",
                help="embed only the items in quarantine, now, whatever their next retry time "
                "(the same as --set embed.retry_failed=true)",
            )
    report = commands.add_parser("report", help="visual HTML report of the last run")
    _add_conf_args(report)
    report.add_argument("--out", required=True, type=Path, help="HTML file to write")
    return parser


def _add_conf_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conf", required=True, help="YAML config file (see conf/local.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set embed.batch_size=32 (repeatable)",
    )


def overrides(args: argparse.Namespace) -> list[str]:
    """The command's `--set` overrides, with those its flags stand for (`embed --retry-failed`)."""
    flags = ["embed.retry_failed=true"] if getattr(args, "retry_failed", False) else []
    for key, value in (
        ("search.queries", getattr(args, "queries", None)),
        ("search.where", getattr(args, "where", None)),
    ):
        if value is not None:
            flags.append(f"{key}={json.dumps(value)}")  # a JSON string is a YAML string: `true` stays text
    if getattr(args, "text", None):
        flags.append(f"search.text={json.dumps(args.text)}")  # a JSON list is a YAML list
    return [*args.overrides, *flags]


def _run_stage(name: str, args: argparse.Namespace) -> int:
    """A stage or nightly under the output root's run lock: stale staging of dead runs is cleared, a dead
    run whose lock is taken over is logged as interrupted in `runs`."""
    cfg = config_mod.load(args.conf, overrides(args))
    from lookalike.run import (
        lock,  # pyspark only once the config is known to be good
        runs,
    )
    from lookalike.session import get_spark
    from lookalike.storage import files, tables

    run_id = stages.new_run_id()
    root = cfg["output.root"]
    # Every commit of this process keeps the newest tables.keep_versions versions' files (tables.vacuum).
    tables.set_retention(tables.Retention(cfg["tables.keep_versions"], cfg["tables.vacuum_min_age_hours"]))
    with lock.RunLock(root, run_id, name, cfg["lock.stale_seconds"]) as held:
        # The dead runs this run took over, and those that a run killed before logging them handed on in its
        # lock (`RunLock.interrupted`); a run already logged by a run killed just after logging it is skipped.
        logged = runs.interrupted_run_ids(root)
        for dead in held.interrupted:
            if dead.run_id not in logged:
                runs.record(
                    root,
                    dead.run_id,
                    dead.command,
                    runs.INTERRUPTED,
                    dt.datetime.fromisoformat(dead.started_at),
                    dt.datetime.fromisoformat(dead.heartbeat),
                )
        held.logged()
        spark = get_spark(cfg)
        cleared = files.clear_stale_staging(root, run_id)
        if cleared:
            log.info("removed the staging folders of unfinished runs %s", cleared)
        if name == "nightly":
            from lookalike.run import nightly

            nightly.run(cfg, spark, run_id)
        else:
            stages.run_logged(name, cfg, spark, run_id)
    return 0


def _report(args: argparse.Namespace) -> int:
    # Inputs may be gone by the time someone asks for a report: the page says so instead of refusing.
    cfg = config_mod.load(args.conf, args.overrides, need_paths=())
    from lookalike.report.page import write_report  # pyspark only once the config is known to be good
    from lookalike.session import get_spark

    summary = write_report(cfg, get_spark(cfg), args.out)
    log.info(
        "report written to %s (%d KB, %d thumbnails%s)",
        summary.path,
        summary.bytes // 1024,
        summary.thumbnails,
        f"; not available yet: {', '.join(summary.absent)}" if summary.absent else "",
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines are CPU-feature probing
    try:
        if args.command == "demo-data":
            from lookalike.demo_data import build_demo_data

            summary = build_demo_data(args.out, limit=args.limit, seed=args.seed)
            log.info("demo data: %s", summary)
            return 0
        if args.command == "report":
            return _report(args)
        return _run_stage(args.command, args)
    except config_mod.ConfigError as err:
        print(f"lookalike: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except LookalikeError as err:
        print(f"lookalike: error: {err}", file=sys.stderr)
        return EXIT_ERROR


def entry(argv: Sequence[str] | None = None) -> NoReturn:
    """The `lookalike` console script and `python -m lookalike.cli`: `main`, then `leave` with its status.

    What escapes `main` gets the status Python itself would give it: argparse's own (0 after --help, 2 for a
    usage error), EXIT_INTERRUPTED for Ctrl-C, EXIT_ERROR and the traceback for a bug."""
    try:
        code = main(argv)
    except SystemExit as done:
        code = _exit_status(done.code)
    except KeyboardInterrupt:
        print("lookalike: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        code = EXIT_ERROR
    leave(code)


def _exit_status(code: object) -> int:
    """The status `sys.exit(code)` gives: None is 0, an int itself, anything else printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_ERROR


def leave(code: int) -> NoReturn:
    """End the process with `code`, whatever interpreter shutdown would do.

    At shutdown Python runs atexit hooks and the finalizers of native libraries, and one of them can abort a
    run that succeeded: delta-rs with pyarrow sometimes dies there with "terminate called without an active
    exception", exit 134 (delta-io/delta-rs#2184), and a scheduler would mark a good night failed. So the
    process leaves with `os._exit`, which runs none of them, after doing here what matters of what shutdown
    would have done: the SparkSession this process uses is stopped (its event log complete; under
    spark-submit, whose JVM waits for this process and exits with its status, the application ends cleanly
    before it), log handlers and the standard streams are flushed. Every stage's work is committed before
    `main` returns, so nothing else is lost; lookalike's own threads (lock heartbeat, progress) are daemons.
    """
    _stop_spark()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        # A closed stream or a reader that went away: nothing can be written there any more.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _stop_spark() -> None:
    """Stop the session if this process has one: a failure is logged and leaves the exit status alone, since
    the command's outcome was already decided (the JVM's shutdown hook stops what is left)."""
    if "pyspark.sql" not in sys.modules:
        return  # pyspark was never imported: no session can exist
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession()
    if session is None:
        return
    try:
        session.stop()
    except Exception as err:  # the JVM may already be gone; the status must still be the command's
        log.warning("stopping Spark failed: %s", str(err).splitlines()[0] if str(err) else type(err).__name__)


def run_job(command: str) -> NoReturn:
    """Entry for `jobs/<stage>.py` under spark-submit: the same code path as `lookalike <stage>`."""
    entry([command, *sys.argv[1:]])


if __name__ == "__main__":
    entry()
