"""Extraction of a checkpoint's CRIU archive: exactly the archive's files, and nothing outside the target.

The archive is outside input and cer runs as root: every hostile tar here must end in ArchiveError with a
message naming the problem, and leave nothing outside the target directory.
"""

import hashlib
import io
import os
import tarfile
import threading

import pytest

from cer.containerd.archive import READY_MARKER, Progress, extract_once, extract_tar, ready_digest, remove_stale
from cer.errors import ArchiveError, Cancelled


def tar_bytes(*members: tuple[tarfile.TarInfo, bytes | None], fmt=tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def regular(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def special(name: str, kind: bytes, **fields) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info, None


def digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def chunked(data: bytes, size: int = 7000):
    return (data[i:i + size] for i in range(0, len(data), size))


@pytest.fixture
def place(tmp_path):
    """A target directory beside a sibling that must stay empty, and a check that it did."""
    target, outside = tmp_path / "target", tmp_path / "outside"
    target.mkdir()
    outside.mkdir()
    before = set(os.listdir(tmp_path))
    yield target, outside
    assert os.listdir(outside) == []
    assert set(os.listdir(tmp_path)) == before


def test_extracts_exactly_the_archive(place):
    target, _ = place
    big = os.urandom(3 << 20)
    long_name = "d/" + "n" * 150 + ".img"  # needs a PAX header
    directory = tarfile.TarInfo("sub/dir")
    directory.type, directory.mode = tarfile.DIRTYPE, 0o700
    data = tar_bytes(
        regular("inventory.img", b"inv"),
        regular("./pages-1.img", big),
        (directory, None),
        regular("sub/dir/file", b"nested", 0o4755),  # the set-id bit is dropped
        regular(long_name, b"long"),
        regular("empty", b""),
    )
    progress = Progress()
    written = extract_tar(chunked(data), str(target), len(data), digest(data), progress=progress)
    assert written == ["inventory.img", "pages-1.img", "sub/dir/file", long_name, "empty"]
    assert (target / "pages-1.img").read_bytes() == big
    assert (target / "sub/dir/file").read_bytes() == b"nested"
    assert (target / long_name).read_bytes() == b"long"
    assert (target / "sub/dir/file").stat().st_mode & 0o7777 == 0o755
    assert progress.done == progress.total == len(data)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([regular("/etc/cer-evil", b"x")], "has an absolute name"),
        ([regular("../cer-evil", b"x")], "has '..' in its name"),
        ([regular("a/../../cer-evil", b"x")], "has '..' in its name"),
        ([special("link", tarfile.SYMTYPE, linkname="../outside"), regular("link/cer-evil", b"x")], "is a symbolic link"),
        ([special("abs", tarfile.SYMTYPE, linkname="/etc"), regular("abs/cer-evil", b"x")], "is a symbolic link"),
        ([regular("real", b"x"), special("hard", tarfile.LNKTYPE, linkname="real")], "is a hard link"),
        ([special("hard", tarfile.LNKTYPE, linkname="/etc/shadow")], "is a hard link"),
        ([special("null", tarfile.CHRTYPE, devmajor=1, devminor=3)], "is a character device"),
        ([special("disk", tarfile.BLKTYPE, devmajor=8, devminor=0)], "is a block device"),
        ([special("pipe", tarfile.FIFOTYPE)], "is a fifo"),
        ([regular("twice", b"a"), regular("twice", b"b")], "appears twice"),
        ([regular("file", b"x"), regular("file/below", b"y")], "is not a directory"),
    ],
    ids=["absolute", "dotdot", "dotdot-nested", "symlink-escape", "symlink-absolute", "hardlink", "hardlink-outside",
         "chardev", "blockdev", "fifo", "duplicate", "file-as-dir"],
)
def test_hostile_members_are_refused(place, members, message):
    target, _ = place
    data = tar_bytes(*members)
    with pytest.raises(ArchiveError, match=message):
        extract_tar(chunked(data), str(target), len(data), digest(data))
    for path in target.rglob("*"):
        assert path.is_dir() or path.is_file() and not path.is_symlink()


def test_a_huge_declared_size_is_refused_before_writing(place):
    target, _ = place
    header = tarfile.TarInfo("pages-1.img")
    header.size = 64 << 30
    data = header.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 4096
    with pytest.raises(ArchiveError, match=r"declares 68719476736 bytes, more than the \d+ left of the archive"):
        extract_tar(chunked(data), str(target), len(data))
    assert os.listdir(target) == []


def test_a_stream_longer_than_its_descriptor_is_refused(place):
    target, _ = place
    data = tar_bytes(regular("inventory.img", b"inv"))
    with pytest.raises(ArchiveError, match=f"longer than the {len(data)} bytes"):
        extract_tar(chunked(data + b"\0" * 8192), str(target), len(data))


def test_a_truncated_archive_is_refused(place):
    target, _ = place
    data = tar_bytes(regular("pages-1.img", os.urandom(1 << 20)))
    with pytest.raises(ArchiveError):
        extract_tar(chunked(data[: 600 * 1024]), str(target), len(data))


def test_pax_and_gnu_long_names_cannot_smuggle_paths(place):
    target, _ = place
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        data = tar_bytes(regular("../" * 40 + "x" * 120, b"evil"), fmt=fmt)  # the name needs a PAX/GNU header
        with pytest.raises(ArchiveError, match="has '..' in its name"):
            extract_tar(chunked(data), str(target), len(data))
    info, data = regular("sparse", b"abc")
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}
    archive = tar_bytes((info, data))
    with pytest.raises(ArchiveError, match="is a sparse file"):
        extract_tar(chunked(archive), str(target), len(archive))


def test_a_malformed_pax_header_is_refused(place):
    target, _ = place
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    body = b"999 path=x\n"
    header.size = len(body)
    data = header.tobuf(format=tarfile.USTAR_FORMAT) + body.ljust(512, b"\0") + b"\0" * 1024
    with pytest.raises(ArchiveError, match="malformed record"):
        extract_tar(chunked(data), str(target), len(data))


def test_a_wrong_digest_is_refused(place):
    target, _ = place
    data = tar_bytes(regular("inventory.img", b"inv"))
    with pytest.raises(ArchiveError, match="digest"):
        extract_tar(chunked(data), str(target), len(data), digest(b"something else"))


def test_garbage_is_not_a_tar(place):
    target, _ = place
    data = b"\x89PNG not a tar at all" * 100
    with pytest.raises(ArchiveError, match="not a valid tar archive"):
        extract_tar(chunked(data), str(target), len(data))


def test_a_cancelled_extraction_stops(place):
    target, _ = place
    data = tar_bytes(regular("pages-1.img", os.urandom(4 << 20)))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        extract_tar(chunked(data), str(target), len(data), cancel=cancel)


def test_extract_once_is_all_or_nothing(tmp_path):
    base = tmp_path / "checkpoint"
    data = tar_bytes(regular("inventory.img", b"inv"))

    def failing(directory: str) -> None:
        extract_tar(chunked(data), directory, len(data))
        raise ArchiveError("interrupted")

    with pytest.raises(ArchiveError):
        extract_once(str(base), "k" * 64, digest(data), failing)
    assert os.listdir(base) == []  # the partial directory went with the failure

    calls = []

    def extract(directory: str) -> None:
        calls.append(directory)
        extract_tar(chunked(data), directory, len(data), digest(data))

    final = extract_once(str(base), "k" * 64, digest(data), extract)
    assert final == str(base / ("k" * 64))
    assert sorted(os.listdir(final)) == [READY_MARKER, "inventory.img"]
    assert ready_digest(final) == digest(data)
    assert extract_once(str(base), "k" * 64, digest(data), extract) == final
    assert len(calls) == 1  # whole already: not extracted again

    other = tar_bytes(regular("inventory.img", b"v2"))
    extract_once(str(base), "k" * 64, digest(other), lambda d: extract_tar(chunked(other), d, len(other)))
    assert (base / ("k" * 64) / "inventory.img").read_bytes() == b"v2"  # made again under the same name
    assert os.listdir(base) == ["k" * 64]


def test_remove_stale_keeps_only_whole_configured_extractions(tmp_path):
    base = tmp_path / "checkpoint"
    data = tar_bytes(regular("inventory.img", b"inv"))
    for key in ("a" * 64, "b" * 64):
        extract_once(str(base), key, digest(data), lambda d: extract_tar(chunked(data), d, len(data)))
    (base / ("c" * 64)).mkdir()  # configured, but no marker: incomplete
    (base / f".partial-{'a' * 64}-1234").mkdir()
    (base / "stray-file").write_text("x")
    (base / "link").symlink_to(base / ("a" * 64))
    removed = remove_stale(str(base), ["a" * 64, "c" * 64, "link"])
    assert sorted(os.listdir(base)) == ["a" * 64]
    assert len(removed) == 5
    assert (base / ("a" * 64) / "inventory.img").exists()  # the link's target was not followed
