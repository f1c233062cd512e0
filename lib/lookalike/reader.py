"""Catalog `image_uri` -> bytes, for local paths, `file:` URIs and anything `pyarrow.fs` can open.

Runs on executors once per image, so:

* Filesystem objects are cached per scheme + host (+ query options): building an S3 filesystem can cost a
  network round trip to find the bucket's region, and an executor reads thousands of objects per bucket.
* Every failure becomes `ImageError` ('missing', 'unreadable' or 'too_large') with a one-line message
  naming the URI and the reason, so one bad row lands in the quarantine table instead of failing the task.
* The byte limit is checked from the file size before reading, and enforced again while reading, so a
  stray multi-gigabyte file (or one that grows) is never pulled into memory.
"""
from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from lookalike.decode import ImageError

# Hadoop spells S3 `s3a://` (and the retired `s3n://`); Spark catalogs carry those, pyarrow knows `s3://`.
_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3"}

# (scheme, netloc, query) -> (filesystem, prefix that turns a URI's path into the filesystem's path).
_FILESYSTEMS: dict[tuple[str, str, str], tuple[pafs.FileSystem, str]] = {}


def read_bytes(uri: str, max_bytes: int) -> bytes:
    """All bytes of the image at `uri` (a local path, `file:` URI or a pyarrow-supported URI).

    Raises ImageError: 'missing' when it does not exist, 'unreadable' when it exists but cannot be read
    (permissions, a directory, an unsupported scheme, a filesystem that cannot be reached), 'too_large'
    when it holds more than `max_bytes`.
    """
    if not uri:
        raise ImageError("missing", "no image URI (empty or null)")
    if uri.startswith("file:"):
        return _read_local(uri, _file_uri_path(uri), max_bytes)
    if "://" not in uri:
        return _read_local(uri, uri, max_bytes)
    return _read_remote(uri, max_bytes)


def remote_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The cached pyarrow filesystem for a remote `uri`, and the path of `uri` inside it.

    Only the first URI per scheme + host goes through `FileSystem.from_uri`; later ones reuse its
    filesystem and derive their path the same way (from_uri's path ends with the URI's own path, after a
    fixed prefix such as the bucket name). Raises what `from_uri` raises (OSError, pyarrow errors).
    """
    uri = _canonical_scheme(uri)
    parts = urlsplit(uri)
    key = (parts.scheme, parts.netloc, parts.query)
    own_path = unquote(parts.path).lstrip("/")
    cached = _FILESYSTEMS.get(key)
    if cached is not None:
        filesystem, prefix = cached
        return filesystem, prefix + own_path
    filesystem, path = pafs.FileSystem.from_uri(uri)
    prefix = path[: len(path) - len(own_path)]
    if own_path and path.endswith(own_path) and (prefix == "" or prefix.endswith("/")):
        # setdefault: two threads racing on a miss keep one filesystem, and either answer is right.
        _FILESYSTEMS.setdefault(key, (filesystem, prefix))
    return filesystem, path


def _canonical_scheme(uri: str) -> str:
    scheme, sep, rest = uri.partition("://")
    return f"{_SCHEME_ALIASES.get(scheme.lower(), scheme)}{sep}{rest}"


def _file_uri_path(uri: str) -> str:
    """The local path of a `file:` URI: `file:///a%20b` (RFC 8089, percent-encoded) or Hadoop's `file:/a`."""
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ImageError("unreadable", f"{uri}: file URI names host {parts.netloc!r}; "
                                       "a local file is file:///absolute/path")
    return unquote(parts.path)


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
