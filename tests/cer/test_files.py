"""cer.files: every file read from outside opened non-blocking and checked to be a regular file; ROOT only
where no other user can change it; clean-up by fd, never following a link."""

import errno
import os
import socket
import stat
import threading

import pytest
from conftest import short_tempdir

from cer.config import load_config, validate_image_directory
from cer.errors import BadRequest, ConfigError, UnsafePathError
from cer.files import open_private_directory, open_regular_file, read_regular_file, remove_entry

UNPRIVILEGED_UID = 54321


def in_thread(call, timeout: float = 5.0):
    """Run ``call`` in a thread and fail (instead of hanging the suite) when it blocks."""
    outcome = {}

    def body():
        try:
            outcome["result"] = call()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{call} blocked"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")


def not_files(directory):
    """A FIFO, a socket, a directory, a character device and a link, each where a file is expected."""
    os.mkfifo(directory / "fifo")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(directory / "socket"))
    (directory / "dir").mkdir()
    (directory / "regular").write_bytes(b"x")
    os.symlink(directory / "regular", directory / "link")
    return listener, {"fifo": "a FIFO", "socket": "No such device or address", "dir": "a directory",
                      "link": "a symbolic link", "/dev/null": "a character device"}


def test_what_is_not_a_regular_file_is_refused_without_blocking(tmp_path):
    listener, cases = not_files(tmp_path)
    with listener:
        for name, problem in cases.items():
            path = name if name.startswith("/") else tmp_path / name
            with pytest.raises(OSError, match=problem):
                in_thread(lambda: open_regular_file(path))
    os.close(open_regular_file(tmp_path / "link", follow_links=True))
    assert read_regular_file(tmp_path / "regular", 10) == b"x"


def test_a_fifo_as_inventory_or_configuration_is_an_error_not_a_hang(tmp_path):
    """Issue 15, finding 5: validate_image_directory blocked in open() on a FIFO named inventory.img."""
    os.mkfifo(tmp_path / "inventory.img")
    with pytest.raises(BadRequest, match="inventory.img: a FIFO, not a regular file"):
        in_thread(lambda: validate_image_directory(str(tmp_path)))
    os.mkfifo(tmp_path / "namespace_service.json")
    with pytest.raises(ConfigError, match="a FIFO, not a regular file"):
        in_thread(lambda: load_config(str(tmp_path / "namespace_service.json")))


def test_a_link_planted_as_inventory_is_refused(tmp_path):
    (tmp_path / "elsewhere").write_bytes(b"\x16\x31\x31\x58rest")
    os.symlink(tmp_path / "elsewhere", tmp_path / "inventory.img")
    with pytest.raises(BadRequest, match="a symbolic link"):
        validate_image_directory(str(tmp_path))


def test_a_private_directory_is_made_private_and_its_chain_checked():
    base = short_tempdir()
    fd = open_private_directory(base / "a" / "root")  # created, as os.makedirs would
    try:
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o700
        assert os.path.samestat(os.fstat(fd), os.stat(base / "a" / "root"))
    finally:
        os.close(fd)
    os.chmod(base / "a" / "root", 0o777)  # an earlier owner left it open: root's, so it is closed again
    os.symlink("a/root", base / "link")  # a link root owns, in a directory only root changes
    fd = open_private_directory(base / "link")
    try:
        assert stat.S_IMODE(os.stat(base / "a" / "root").st_mode) == 0o700
    finally:
        os.close(fd)


@pytest.mark.parametrize("arrange, problem", [
    (lambda base: os.chown(base / "root", UNPRIVILEGED_UID, 0), f"owned by uid {UNPRIVILEGED_UID}: cer keeps"),
    (lambda base: os.chmod(base, 0o773), "mode 773: other users can write it"),
    (lambda base: os.chmod(base, 0o775), "mode 775: other users can write it"),
    (lambda base: os.chown(base, UNPRIVILEGED_UID, 0), "another user could move"),
])
def test_a_directory_someone_else_can_change_is_refused(arrange, problem):
    base = short_tempdir()
    (base / "root").mkdir(mode=0o700)
    arrange(base)
    with pytest.raises(UnsafePathError, match=problem) as caught:
        open_private_directory(base / "root")
    assert caught.value.errno == errno.EPERM


def test_a_sticky_directory_above_is_fine():
    base = short_tempdir()
    os.chmod(base, 0o1777)
    os.close(open_private_directory(base / "root"))


def test_remove_entry_removes_links_not_what_they_point_to(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep")
    base = tmp_path / "base"
    (base / "tree" / "deep").mkdir(parents=True)
    os.symlink(victim, base / "tree" / "deep" / "out")
    os.symlink(victim, base / "link")
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert remove_entry(fd, "link") and remove_entry(fd, "tree")
        assert not remove_entry(fd, "absent")
    finally:
        os.close(fd)
    assert os.listdir(base) == [] and (victim / "precious").read_text() == "keep"
