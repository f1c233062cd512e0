"""One resolver for every path and URI lookalike reads or writes: a local path, a `file:` URI, or anything
`pyarrow.fs` reaches (s3a://, gs://, hdfs://, ...), mapped to a pyarrow file system and the path inside it.

Tables, small files, staging folders and catalog images all go through `filesystem`, so a scheme works
everywhere or nowhere. Remote file systems are cached per scheme + host (+ query options): building an S3
file system can cost a round trip to find the bucket's region, and an executor reads thousands of objects
per bucket.

Spark and delta-rs each need paths spelled their own way (`native_path`, `spark_read_path`). Spark (Hadoop)
takes a path literally, does not decode a `file:` URI's escapes (`file:///a%20b` names a folder `a%20b`), and
expands `*?[]{}` as patterns in every path it reads (a backslash makes one literal). delta-rs decodes `%` and
two hex digits even in a plain path, cannot open a table under a folder whose name holds `[`, `]` or a
backslash, and lists a table's files as percent-encoded paths.
"""

from __future__ import annotations

import os
import re
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


# Characters Hadoop's glob expands in a path Spark reads; a backslash before one makes it literal.
_SPARK_PATTERN = re.compile(r"([\\*?\[\]{}])")
# What delta-rs 1.6 cannot keep in a local table path: it panics on brackets, splits at a backslash, and
# decodes an escape it finds even in a plain path ("a%20b" opens "a b").
_DELTA_UNSAFE = re.compile(r"[\[\]\\]|%[0-9A-Fa-f]{2}")


def native_path(path: str) -> str:
    """`path` as Spark writes to it and delta-rs opens it: a local path or `file:` URI as the plain absolute
    path, a remote URI as it is. Hadoop would keep a `file:` URI's escapes as literal characters, and delta-rs
    resolves every local spelling to this one anyway."""
    return filesystem(path)[1] if is_local(path) else path


def spark_read_path(path: str) -> str:
    """`path` as Spark must be given it to read exactly that file or folder: `native_path` with the
    characters Hadoop's glob would expand (`*?[]{}` and the backslash) escaped."""
    return _SPARK_PATTERN.sub(r"\\\1", native_path(path))


def delta_problem(path: str) -> str | None:
    """Why delta-rs cannot hold a table at local `path`, in a few words naming the character; None if it can.
    Remote URIs are not judged: their escapes belong to the URI."""
    if not is_local(path):
        return None
    found = _DELTA_UNSAFE.search(native_path(path))
    if found is None:
        return None
    text = found.group()
    if text.startswith("%"):
        return f"{text!r} in a path is not supported: delta-rs reads it as the escape of {unquote(text)!r}"
    return f"{text!r} in a path is not supported: delta-rs cannot open a table under it"


def spark_pattern_problem(path: str) -> str | None:
    """Why a local `path` cannot be read by every Spark reader of the pipeline, naming the character; None
    if it can. Storage escapes Hadoop's pattern characters (`spark_read_path`), stage code reading staged
    Parquet, the catalog or the events by path does not, so such a path would be read as a pattern."""
    if not is_local(path):
        return None
    found = _SPARK_PATTERN.search(native_path(path))
    if found is None:
        return None
    return f"{found.group()!r} in a path is not supported: Spark reads it as a pattern character"
