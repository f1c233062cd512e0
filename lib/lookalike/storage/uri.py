"""One resolver for every path and URI lookalike reads or writes: a local path, a `file:` URI, or anything
`pyarrow.fs` reaches (s3a://, gs://, hdfs://, ...), mapped to a pyarrow file system and the path inside it.

Tables, small files, staging folders and catalog images all go through `filesystem`, so a scheme works
everywhere or nowhere. Remote file systems are cached per scheme + host (+ query options): building an S3
file system can cost a round trip to find the bucket's region, and an executor reads thousands of objects
per bucket.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

# Hadoop spells S3 `s3a://` (and the retired `s3n://`); Spark catalogs carry those, pyarrow knows `s3://`.
_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3"}

# (scheme, netloc, query) -> (filesystem, prefix that turns a URI's path into the filesystem's path).
_FILESYSTEMS: dict[tuple[str, str, str], tuple[pafs.FileSystem, str]] = {}


def filesystem(path: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """The file system and its path for a local path or a URI. Raises ValueError for a `file:` URI that
    names another host, and what `pyarrow.fs.FileSystem.from_uri` raises for an unusable remote URI."""
    path = os.fspath(path)
    if path.startswith("file:"):
        return pafs.LocalFileSystem(), file_uri_path(path).rstrip("/") or "/"
    if "://" in path:
        return remote_filesystem(path)
    return pafs.LocalFileSystem(), os.path.abspath(path).rstrip("/") or "/"


def is_local(path: str) -> bool:
    """Whether `path` is a plain local path or a `file:` URI (what `open()` can read once resolved)."""
    return path.startswith("file:") or "://" not in path


def file_uri_path(uri: str) -> str:
    """The local path of a `file:` URI: `file:///a%20b` (RFC 8089, percent-encoded) or Hadoop's `file:/a`."""
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{uri}: file URI names host {parts.netloc!r}; a local file is file:///absolute/path")
    return "/" + unquote(parts.path).lstrip("/")


def remote_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The cached pyarrow file system for a remote `uri`, and the path of `uri` inside it.

    Only the first URI per scheme + host goes through `FileSystem.from_uri`; later ones reuse its
    file system and derive their path the same way (from_uri's path ends with the URI's own path, after a
    fixed prefix such as the bucket name). Raises what `from_uri` raises (OSError, pyarrow errors).
    """
    uri = _canonical_scheme(uri)
    parts = urlsplit(uri)
    key = (parts.scheme, parts.netloc, parts.query)
    own_path = unquote(parts.path).lstrip("/")
    cached = _FILESYSTEMS.get(key)
    if cached is not None:
        fs, prefix = cached
        return fs, prefix + own_path
    fs, path = pafs.FileSystem.from_uri(uri)
    prefix = path[: len(path) - len(own_path)]
    if own_path and path.endswith(own_path) and (prefix == "" or prefix.endswith("/")):
        # setdefault: two threads racing on a miss keep one file system, and either answer is right.
        _FILESYSTEMS.setdefault(key, (fs, prefix))
    return fs, path


def _canonical_scheme(uri: str) -> str:
    scheme, sep, rest = uri.partition("://")
    return f"{_SCHEME_ALIASES.get(scheme.lower(), scheme)}{sep}{rest}"
