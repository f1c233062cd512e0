"""Versioned folders behind a `LATEST` pointer: index builds (`indexes/<run_id>/`) and export snapshots
(`export/<table>/run_id=<run_id>/`).

A version is written in full into its own folder, a marker file inside it says it is complete, and only then
`LATEST` is replaced with its name, so a reader that follows `LATEST` never sees a partial version. Pruning
keeps the newest complete versions and removes incomplete ones (a crashed write's), never the current one.
"""

from __future__ import annotations

import pyarrow.fs as pafs

from lookalike.storage import files
from lookalike.storage.uri import filesystem

LATEST = "LATEST"


def latest(folder: str) -> str | None:
    """The name of the newest complete version under `folder`, or None before the first is published."""
    text = files.read_text(f"{folder}/{LATEST}")
    return None if text is None else text.strip()


def publish(folder: str, version: str) -> None:
    """Point `LATEST` at `version`, whose folder must already be complete."""
    files.write_text(f"{folder}/{LATEST}", version)


def versions(folder: str, marker: str, prefix: str = "") -> list[tuple[str, bool]]:
    """(version, complete) of every version folder (`prefix` + version) under `folder`, oldest first: run
    ids sort by time. A version is complete when its folder holds the file `marker`."""
    fs, root = filesystem(folder)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return []
    found = []
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith(prefix):
            done = fs.get_file_info(f"{info.path}/{marker}").type == pafs.FileType.File
            found.append((info.base_name[len(prefix) :], done))
    return sorted(found)


def prune(folder: str, keep: int, current: str, marker: str, prefix: str = "") -> list[str]:
    """Remove incomplete versions and complete ones beyond the newest `keep`, never `current`; returns the
    versions removed."""
    found = versions(folder, marker, prefix)
    complete = [version for version, done in found if done]
    kept = set(complete[-keep:]) | {current}
    removed = [version for version, _ in found if version not in kept]
    for version in removed:
        files.remove_dir(f"{folder}/{prefix}{version}")
    return removed
