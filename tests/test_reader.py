"""read_bytes: local paths, file: URIs and pyarrow filesystems, every failure as an ImageError kind."""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import quote

import pyarrow.fs as pafs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lookalike.embed import reader
from lookalike.embed.decode import ERROR_KINDS, ImageError
from lookalike.embed.reader import ImagePolicy, read_bytes
from lookalike.storage.uri import remote_filesystem

PAYLOAD = b"\xff\xd8\xff" + bytes(range(256)) * 4


@pytest.fixture()
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "an image.jpg"  # a space, so file: URIs must be percent-decoded
    path.write_bytes(PAYLOAD)
    return path


def kind_of(uri: str, max_bytes: int = 10_000) -> ImageError:
    with pytest.raises(ImageError) as caught:
        read_bytes(uri, max_bytes)
    assert "\n" not in caught.value.message
    return caught.value


def test_reads_a_local_path(image_file: Path) -> None:
    assert read_bytes(str(image_file), 10_000) == PAYLOAD


def test_a_local_file_is_validated_by_its_stat(image_file: Path) -> None:
    fresh = reader.read(str(image_file), 10_000)
    assert fresh.data == PAYLOAD and fresh.etag is None  # just written: a second write could keep its stat
    info = os.stat(image_file)
    assert reader.stat_tag(info, info.st_ctime + reader.FRESH_SECONDS / 2) is None
    tag = reader.stat_tag(info, info.st_ctime + reader.FRESH_SECONDS)
    assert tag == f'"{info.st_ino:x}-{info.st_size:x}-{info.st_mtime_ns:x}-{info.st_ctime_ns:x}"'

    time.sleep(reader.FRESH_SECONDS + 0.1)
    read = reader.read(str(image_file), 10_000)
    assert read.data == PAYLOAD and read.etag == tag
    assert reader.read(str(image_file), 10_000, etag=tag).data is None  # unchanged: not read
    assert reader.read(str(image_file), 10_000, etag='"other"').data == PAYLOAD
    # Rewritten with the same size and its modification time put back: the change time still moves.
    image_file.write_bytes(PAYLOAD[::-1])
    os.utime(image_file, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert reader.read(str(image_file), 10_000, etag=tag).data == PAYLOAD[::-1]


def test_reads_file_uris_in_both_spellings(image_file: Path) -> None:
    assert read_bytes(image_file.as_uri(), 10_000) == PAYLOAD  # file:///...an%20image.jpg
    assert read_bytes("file:" + quote(str(image_file)), 10_000) == PAYLOAD  # Hadoop's file:/...


def test_file_uri_with_a_host_is_a_bad_uri_and_says_how_to_fix_it() -> None:
    error = kind_of("file://images/a.jpg")
    assert error.kind == "bad_uri"
    assert "file:///absolute/path" in error.message


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    uri = str(tmp_path / "nope.jpg")
    error = kind_of(uri)
    assert error.kind == "missing"
    assert uri in error.message


def test_path_through_a_file_is_missing(image_file: Path) -> None:
    assert kind_of(str(image_file / "child.jpg")).kind == "missing"


@pytest.mark.parametrize("uri", ["", None])
def test_no_uri_is_missing(uri: str) -> None:
    assert kind_of(uri).kind == "missing"


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    error = kind_of(str(tmp_path))
    assert error.kind == "not_a_file"
    assert str(tmp_path) in error.message and "folder" in error.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_file_without_read_permission_is_unreadable(image_file: Path) -> None:
    image_file.chmod(0)
    assert kind_of(str(image_file)).kind == "unreadable"


def test_permission_errors_map_to_unreadable() -> None:
    # Root-proof check of the mapping the permission test above exercises for real.
    error = reader._os_error("s3://b/k.jpg", PermissionError(13, "Permission denied"))
    assert (error.kind, error.message) == ("unreadable", "s3://b/k.jpg: Permission denied")


def test_byte_limit_is_inclusive(image_file: Path) -> None:
    assert read_bytes(str(image_file), len(PAYLOAD)) == PAYLOAD
    error = kind_of(str(image_file), max_bytes=len(PAYLOAD) - 1)
    assert error.kind == "too_large"
    assert str(len(PAYLOAD)) in error.message


def test_remote_reads_go_through_one_cached_filesystem() -> None:
    # pyarrow's mock:// filesystem is in-memory and new per from_uri: a file written into the first one is
    # only readable later if the reader kept that filesystem.
    filesystem, path = remote_filesystem("mock:///bucket/cached/a.jpg")
    assert path == "bucket/cached/a.jpg"
    filesystem.create_dir("bucket/cached")
    with filesystem.open_output_stream(path) as out:
        out.write(PAYLOAD)
    assert read_bytes("mock:///bucket/cached/a.jpg", 10_000) == PAYLOAD
    assert kind_of("mock:///bucket/cached/a.jpg", max_bytes=10).kind == "too_large"
    assert kind_of("mock:///bucket/cached/other.jpg").kind == "missing"
    assert kind_of("mock:///bucket/cached").kind == "unreadable"


def test_hadoop_s3_schemes_map_to_s3_and_share_a_filesystem() -> None:
    # Region and endpoint given, so building the filesystem needs no network.
    options = "?region=us-east-1&endpoint_override=127.0.0.1:9"
    first, first_path = remote_filesystem(f"s3a://shop-images/a%20b.jpg{options}")
    second, second_path = remote_filesystem(f"s3a://shop-images/c/d.jpg{options}")
    assert isinstance(first, pafs.S3FileSystem)
    assert second is first
    assert (first_path, second_path) == ("shop-images/a b.jpg", "shop-images/c/d.jpg")


def test_unsupported_scheme_is_unreadable() -> None:
    error = kind_of("ftp://example.com/a.jpg")
    assert error.kind == "unreadable"
    assert "ftp://example.com/a.jpg" in error.message


# --------------------------------------------------------------------------- hostile rows: never a task failure


@pytest.mark.parametrize("uri", ["a\x00b.jpg", "file:///a%00b.jpg", "http://[oops/x.jpg", "s3a://[::1/x.jpg"])
def test_malformed_uris_are_bad_uri(uri: str) -> None:
    assert kind_of(uri).kind == "bad_uri"


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever without O_NONBLOCK
    error = kind_of(str(fifo))
    assert error.kind == "not_a_file" and "FIFO" in error.message


def test_relative_uris_cannot_leave_the_catalog_folder(tmp_path: Path, image_file: Path) -> None:
    catalog = tmp_path / "catalog"
    (catalog / "img").mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (catalog / "img" / "link.jpg").symlink_to(secret)
    (catalog / "img" / "ok.jpg").write_bytes(image_file.read_bytes())
    policy = ImagePolicy.of(str(catalog), None)
    for uri in (f"{catalog}/../secret.txt", f"{catalog}/img/../../secret.txt", f"{catalog}/img/link.jpg"):
        with pytest.raises(ImageError) as caught:
            read_bytes(uri, 10_000, policy)
        assert caught.value.kind == "forbidden" and "root:x" not in caught.value.message
    assert read_bytes(f"{catalog}/img/../img/ok.jpg", 10_000, policy) == image_file.read_bytes()
    assert read_bytes(str(image_file), 10_000, policy) == image_file.read_bytes()  # absolute, elsewhere: allowed


def test_image_roots_allow_only_their_prefixes(tmp_path: Path, image_file: Path) -> None:
    inside = tmp_path / "images"
    inside.mkdir()
    (inside / "a.jpg").write_bytes(image_file.read_bytes())
    (inside / "escape.jpg").symlink_to(image_file)  # image_file lives outside `inside`
    policy = ImagePolicy.of(None, [str(inside), "s3a://shop/images/"])
    assert read_bytes(str(inside / "a.jpg"), 10_000, policy) == image_file.read_bytes()
    assert read_bytes(f"file://{inside}/a.jpg", 10_000, policy) == image_file.read_bytes()
    for uri in (
        str(image_file),
        str(inside / "escape.jpg"),
        f"{inside}/../{image_file.name}",
        "s3a://shop/other/x.jpg",
        "s3a://shop/images/../other/x.jpg",
        "gs://shop/images/x.jpg",
    ):
        with pytest.raises(ImageError) as caught:
            read_bytes(uri, 10_000, policy)
        assert caught.value.kind == "forbidden", uri


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    uri=st.one_of(
        st.text(max_size=80),
        st.builds(
            lambda scheme, rest: f"{scheme}://{rest}",
            # No s3/gs/hdfs: resolving those reaches for the network; their parsing is the same code as these.
            st.sampled_from(["file", "http", "https", "ftp", "x-y", "S3A+"]),
            st.text(max_size=60),
        ),
        st.builds(lambda rest: f"file:{rest}", st.text(max_size=60)),
    )
)
def test_any_uri_string_is_bytes_or_an_image_error(uri: str, tmp_path: Path) -> None:
    policy = ImagePolicy.of(str(tmp_path), None)
    try:
        read_bytes(uri, 10_000, policy)
    except ImageError as err:
        assert err.kind in ERROR_KINDS and "\n" not in err.message
