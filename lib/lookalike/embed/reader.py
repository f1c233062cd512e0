"""Catalog `image_uri` -> bytes, for local paths, `file:` URIs, http(s) URLs (through `fetcher`) and anything
`pyarrow.fs` can open, under the catalog's image access policy.

Runs on executors once per image, so:

* Paths and URIs are resolved by `lookalike.storage.uri`, the one resolver of every stage (its file systems
  are cached per bucket).
* Every failure becomes an `ImageError` with a one-line message naming the URI and the reason, never the
  file's content, so one bad row lands in the quarantine table instead of failing the task: `bad_uri` (not a
  usable URI at all: NUL bytes, a malformed URL), `forbidden` (outside the policy), `missing`, `not_a_file`
  (a folder, FIFO, device or socket: a FIFO would block the task forever), `unreadable`, `too_large`.
* The byte limit is checked from the file size before reading, and enforced again while reading, so a
  stray multi-gigabyte file (or one that grows) is never pulled into memory.
* A local file gets a validator, as a web server gives a static file its ETag: its inode, size,
  modification and change times (`stat_tag`). Handed the validator of the bytes seen last time, `read`
  answers like a 304 when the file's stat still matches, without reading it: an unchanged night then costs
  one `stat` per image, not its bytes. The change time is set by the kernel on every write and cannot be
  set back by `touch` or `cp -p`; a file changed less than `FRESH_SECONDS` ago gets no validator, since on
  a file system with coarse timestamps a second write of the same size within one tick would keep its stat.

The policy (`ImagePolicy`): a local path that names a file under the catalog's folder (every relative
`image_uri` is resolved there) must really be inside it once `..` and symlinks are resolved, so a catalog row
cannot climb out of its own folder; with `catalog.image_roots` set, every image must lie under one of those
prefixes (local ones compared after resolving symlinks), and anything else is `forbidden`. An http(s) image
passes the policy at every redirect hop, so a redirect cannot lead outside `catalog.image_roots` either.
"""

from __future__ import annotations

import os
import posixpath
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import pyarrow as pa

from lookalike.embed.decode import ImageError
from lookalike.embed.fetcher import Fetched, Fetcher, is_http
from lookalike.storage.uri import file_uri_path, is_local, remote_filesystem

FRESH_SECONDS = 2.0
"""A local file modified or changed less than this long ago gets no validator (see the module docstring):
2 s covers the coarsest timestamps in use (FAT's)."""


@dataclass(frozen=True)
class ImagePolicy:
    """Where catalog images may come from: plain values, pickled into every task."""

    catalog_folder: str | None = None  # relative URIs resolve here, and may not leave it
    roots: tuple[str, ...] | None = None  # `catalog.image_roots`: allowed prefixes, or None for any

    @classmethod
    def of(cls, catalog_folder: str | None, roots: Sequence[str] | None) -> ImagePolicy:
        """A policy with local folders resolved once on the driver (symlinks too), URI prefixes canonical."""
        folder = _real(catalog_folder) if catalog_folder and is_local(catalog_folder) else None
        return cls(folder, None if roots is None else tuple(_real(r) if is_local(r) else _canonical(r) for r in roots))


def read(
    uri: str,
    max_bytes: int,
    policy: ImagePolicy = ImagePolicy(),
    fetcher: Fetcher | None = None,
    etag: str | None = None,
    last_modified: str | None = None,
) -> Fetched:
    """The image at `uri` (a local path, `file:` URI, http(s) URL or a pyarrow-supported URI).

    http(s) goes through `fetcher`, conditionally when `etag` or `last_modified` (the validators of the bytes
    seen last time) are given: then `Fetched.data` is None if they are still current. A local file is
    validated the same way against `etag` (its `stat_tag`, which every read of it returns). Raises ImageError
    with one of the kinds in the module docstring, or those of `lookalike.embed.fetcher`.
    """
    if not uri or not uri.strip():
        raise ImageError("missing", "no image URI (empty or null)")
    if "\x00" in uri:
        raise ImageError("bad_uri", f"{uri!r}: a NUL character cannot be in a path or URI")
    if is_local(uri):
        return _read_local(uri, _local_path(uri, policy), max_bytes, etag)
    if is_http(uri):
        if fetcher is None:
            raise ImageError("bad_uri", f"{uri}: http(s) images are read by the embed stage's fetcher only")
        return fetcher.fetch(uri, max_bytes, lambda url: _check_remote(url, policy), etag, last_modified)
    _check_remote(uri, policy)
    return Fetched(_read_remote(uri, max_bytes))


def read_bytes(uri: str, max_bytes: int, policy: ImagePolicy = ImagePolicy(), fetcher: Fetcher | None = None) -> bytes:
    """All bytes of the image at `uri`: `read` without validators, which always brings bytes."""
    data = read(uri, max_bytes, policy, fetcher).data
    assert data is not None  # only a conditional request answers without bytes
    return data


def _local_path(uri: str, policy: ImagePolicy) -> str:
    """The real path of a local image, checked against the policy."""
    try:
        path = file_uri_path(uri) if uri.startswith("file:") else uri
    except ValueError as err:
        raise ImageError("bad_uri", str(err)) from None
    if "\x00" in path:  # a percent-encoded NUL (file:///a%00b)
        raise ImageError("bad_uri", f"{uri!r}: a NUL character cannot be in a path")
    real = _real(path)
    folder = policy.catalog_folder
    # A path that names a file under the catalog's folder (as every resolved relative image_uri does) must
    # really be in it: compared before `..` and symlinks are applied, and after.
    lexical = path if path.startswith("/") else os.path.join(os.getcwd(), path)
    if folder is not None and _under(lexical, folder) and not _under(real, folder):
        raise ImageError("forbidden", f"{uri}: leaves the catalog's folder {folder} (through '..' or a symlink)")
    if policy.roots is not None and not any(_under(real, root) for root in policy.roots if root.startswith("/")):
        raise ImageError("forbidden", f"{uri}: not under catalog.image_roots")
    return real


def _check_remote(uri: str, policy: ImagePolicy) -> None:
    try:
        canonical = _canonical(uri)
    except ValueError as err:
        raise ImageError("bad_uri", f"{uri}: {err}") from None
    if policy.roots is not None and not any(_under(canonical, root) for root in policy.roots):
        raise ImageError("forbidden", f"{uri}: not under catalog.image_roots")


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _canonical(uri: str) -> str:
    """A URI with its scheme and host lower-cased and its path normalised (`..` applied), for prefix checks.
    Raises ValueError for a malformed URI (urlsplit's own check, e.g. an unclosed `[` in the host)."""
    parts = urlsplit(uri)
    path = "/" + posixpath.normpath(unquote(parts.path)).lstrip("/") if parts.path else ""
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{path}"


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def stat_tag(info: os.stat_result, now: float) -> str | None:
    """A local file's validator: inode, size, modification and change times (in ns), as a quoted ETag;
    None while the file changed less than `FRESH_SECONDS` before `now`."""
    if now - max(info.st_mtime, info.st_ctime) < FRESH_SECONDS:
        return None
    return f'"{info.st_ino:x}-{info.st_size:x}-{info.st_mtime_ns:x}-{info.st_ctime_ns:x}"'


def _read_local(uri: str, path: str, max_bytes: int, etag: str | None) -> Fetched:
    """The file's bytes and validator, or (`data` None) just the validator when it equals `etag`."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; the type check below then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise _os_error(uri, err) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError("not_a_file", f"{uri}: is a {_file_type(info.st_mode)}, not a regular file")
        tag = stat_tag(info, time.time())
        if etag is not None and tag == etag:
            return Fetched(None, etag=tag)
        _check_size(uri, info.st_size, max_bytes)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(max_bytes + 1)
    except OSError as err:
        raise _os_error(uri, err) from None
    finally:
        os.close(fd)
    _check_size(uri, len(data), max_bytes)  # it grew since fstat
    return Fetched(data, etag=tag)


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "folder"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "special file"


def _read_remote(uri: str, max_bytes: int) -> bytes:
    try:
        filesystem, path = remote_filesystem(uri)  # malformed URIs were refused by `_check_remote`
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
    FileNotFoundError; a folder is 'not_a_file'; everything else exists-but-fails and is 'unreadable'.
    """
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    if isinstance(err, (FileNotFoundError, NotADirectoryError)):
        return ImageError("missing", f"{uri}: {reason}")
    if isinstance(err, IsADirectoryError):
        return ImageError("not_a_file", f"{uri}: is a folder, not a regular file")
    return ImageError("unreadable", f"{uri}: {reason}")
