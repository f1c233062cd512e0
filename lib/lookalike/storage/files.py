"""Files beside the tables: one way to reach a local path or a URI, publish small files whole, and keep
per-run scratch folders.

Small files (index `LATEST`, build summaries, state, export markers) are published so that a reader sees
the old or the new content, never a mix. Every stage stages intermediate Parquet under
`<output.root>/staging/<run_id>/<stage>`; a crashed run leaves its folder behind and the next run of the
same stage removes it (`clear_stale_staging`).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pyarrow.fs as pafs

from lookalike.storage.uri import filesystem

STAGING = "staging"


def exists(path: str) -> bool:
    fs, local = filesystem(path)
    return fs.get_file_info(local).type != pafs.FileType.NotFound


def read_bytes(path: str) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    fs, local = filesystem(path)
    if fs.get_file_info(local).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(local) as stream:
        return stream.read()


def read_text(path: str) -> str | None:
    """The file's text, or None when it does not exist."""
    data = read_bytes(path)
    return None if data is None else data.decode()


def read_json(path: str) -> Any:
    text = read_text(path)
    return None if text is None else json.loads(text)


def write_bytes(path: str, data: bytes) -> None:
    """Replace a small file so that a reader sees the old or the new content, never a mix."""
    fs, local = filesystem(path)
    fs.create_dir(local.rsplit("/", 1)[0], recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{local}.tmp-{time.time_ns()}"
        with fs.open_output_stream(tmp) as stream:
            stream.write(data)
        fs.move(tmp, local)  # rename(2): atomic on a local or POSIX file system
    else:
        with fs.open_output_stream(local) as stream:  # one PUT: object stores replace whole objects
            stream.write(data)


def write_text(path: str, text: str) -> None:
    """`write_bytes` of the text's UTF-8."""
    write_bytes(path, text.encode())


def remove_dir(path: str) -> None:
    """Delete a folder and everything in it; a folder that is not there is fine."""
    fs, local = filesystem(path)
    if fs.get_file_info(local).type != pafs.FileType.NotFound:
        fs.delete_dir(local)


def list_dirs(path: str) -> list[str]:
    """The names of the folders directly inside `path` (none when it is not there)."""
    fs, local = filesystem(path)
    if fs.get_file_info(local).type != pafs.FileType.Directory:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(local)) if i.type == pafs.FileType.Directory)


def listing_digest(path: str) -> str:
    """A digest of the files at `path` (a file or a folder, recursively): names, sizes and modification
    times. Changes when any file is added, removed or rewritten; reads no contents, so it is cheap for the
    inputs (events, catalog) whose change decides whether a stage must run again."""
    fs, local = filesystem(path)
    info = fs.get_file_info(local)
    infos = (
        [info]
        if info.type == pafs.FileType.File
        else fs.get_file_info(pafs.FileSelector(local, recursive=True))
        if info.type == pafs.FileType.Directory
        else []
    )
    lines = sorted(f"{i.path}\t{i.size}\t{i.mtime_ns}" for i in infos if i.type == pafs.FileType.File)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def staging_dir(output_root: str, run_id: str, stage: str) -> str:
    return f"{output_root.rstrip('/')}/{STAGING}/{run_id}/{stage}"


def clear_stale_staging(output_root: str, run_id: str) -> list[str]:
    """Remove the staging folders of other runs (a crashed run's leftovers), keeping this run's; returns
    the run ids removed. Called once at the start of a run, while the run lock is held."""
    fs, root = filesystem(f"{output_root.rstrip('/')}/{STAGING}")
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return []
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.base_name == run_id:
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        else:
            fs.delete_file(info.path)
        removed.append(info.base_name)
    return sorted(removed)


def state_path(output_root: str, name: str) -> str:
    """`<output.root>/state/<name>.json`: what a stage's last run left, to decide what the next must redo."""
    return f"{output_root.rstrip('/')}/state/{name}.json"
