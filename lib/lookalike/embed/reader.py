"""Catalog `image_uri` -> bytes, for local paths, `file:` URIs and anything `pyarrow.fs` can open.

Runs on executors once per image, so:

* Paths and URIs are resolved by `lookalike.storage.uri`, the one resolver of every stage (its file systems
  are cached per bucket).
* Every failure becomes `ImageError` ('missing', 'unreadable' or 'too_large') with a one-line message
  naming the URI and the reason, so one bad row lands in the quarantine table instead of failing the task.
* The byte limit is checked from the file size before reading, and enforced again while reading, so a
  stray multi-gigabyte file (or one that grows) is never pulled into memory.
"""

from __future__ import annotations

import os

import pyarrow as pa

from lookalike.embed.decode import ImageError
from lookalike.storage.uri import file_uri_path, remote_filesystem


def read_bytes(uri: str, max_bytes: int) -> bytes:
    """All bytes of the image at `uri` (a local path, `file:` URI or a pyarrow-supported URI).

    Raises ImageError: 'missing' when it does not exist, 'unreadable' when it exists but cannot be read
    (permissions, a directory, an unsupported scheme, a filesystem that cannot be reached), 'too_large'
    when it holds more than `max_bytes`.
    """
    if not uri:
        raise ImageError("missing", "no image URI (empty or null)")
    if uri.startswith("file:"):
        try:
            path = file_uri_path(uri)
        except ValueError as err:
            raise ImageError("unreadable", str(err)) from None
        return _read_local(uri, path, max_bytes)
    if "://" not in uri:
        return _read_local(uri, uri, max_bytes)
    return _read_remote(uri, max_bytes)


def _read_local(uri: str, path: str, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            _check_size(uri, os.fstat(handle.fileno()).st_size, max_bytes)
            data = handle.read(max_bytes + 1)
    except OSError as err:
        raise _os_error(uri, err) from None
    _check_size(uri, len(data), max_bytes)  # it grew since fstat, or is a special file reporting size 0
    return data


def _read_remote(uri: str, max_bytes: int) -> bytes:
    try:
        filesystem, path = remote_filesystem(uri)
    except (OSError, pa.ArrowException) as err:
        raise ImageError("unreadable", f"{uri}: cannot open its filesystem: {err}") from None
    try:
        with filesystem.open_input_file(path) as handle:  # fetches the size with the open (one HEAD on S3)
            _check_size(uri, handle.size(), max_bytes)
            data = handle.read(max_bytes + 1)
    except (OSError, pa.ArrowException) as err:
        raise _os_error(uri, err) from None
    _check_size(uri, len(data), max_bytes)
    return data


def _check_size(uri: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ImageError("too_large", f"{uri}: {size} bytes, over the limit of {max_bytes}")


def _os_error(uri: str, err: Exception) -> ImageError:
    """Map a filesystem error to an ImageError kind.

    NotADirectoryError (a path component is a file) means the path does not exist, so it is 'missing' like
    FileNotFoundError; everything else exists-but-fails and is 'unreadable'.
    """
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    if isinstance(err, (FileNotFoundError, NotADirectoryError)):
        return ImageError("missing", f"{uri}: {reason}")
    return ImageError("unreadable", f"{uri}: {reason}")
