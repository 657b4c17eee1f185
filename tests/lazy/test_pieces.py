"""The pieces of cer's lazy-pages server that need no restore: page ranges, userfaultfd messages, working-set
files. A restore through the whole server is tests/contrib/test_lazy_server.py's."""

from __future__ import annotations

import json
import struct

import pytest

from cer.errors import WorkingSetError
from cer.lazy import working_set as ws
from cer.lazy.pages import PAGE_SIZE, Ranges
from cer.linux.userfaultfd import EVENT_FORK, EVENT_PAGEFAULT, EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP, parse_message

P = PAGE_SIZE


def items(ranges: Ranges) -> list[tuple[int, int, int]]:
    found, start = [], 0
    while (piece := ranges.next_within(start, 1 << 62)) is not None:
        low, high = piece
        image = ranges.find(low)
        found.append((low, high, image[2] + low - image[0]))
        start = high
    return found


def test_take_splits_ranges_and_keeps_where_each_page_came_from():
    ranges = Ranges([[10 * P, 20 * P, 10 * P], [30 * P, 40 * P, 30 * P]])
    assert ranges.take(12 * P, 13 * P) == [(12 * P, 13 * P, 12 * P)]
    assert ranges.pages == 19
    assert ranges.take(15 * P, 35 * P) == [(15 * P, 20 * P, 15 * P), (30 * P, 35 * P, 30 * P)]
    assert items(ranges) == [(10 * P, 12 * P, 10 * P), (13 * P, 15 * P, 13 * P), (35 * P, 40 * P, 35 * P)]
    assert ranges.take(0, 5 * P) == [] and ranges.take(50 * P, 60 * P) == []
    assert ranges.find(12 * P) is None and ranges.find(13 * P) == (13 * P, 15 * P, 13 * P)


def test_next_within_finds_pieces_and_nothing_in_an_empty_span():
    ranges = Ranges([[10 * P, 20 * P, 10 * P], [30 * P, 40 * P, 30 * P]])
    assert ranges.next_within(0, 15 * P) == (10 * P, 15 * P)
    assert ranges.next_within(15 * P, 35 * P) == (15 * P, 20 * P)
    assert ranges.next_within(20 * P, 35 * P) == (30 * P, 35 * P)
    assert ranges.next_within(12 * P, 12 * P) is None  # an empty span inside a range: nothing, not (12, 12)
    assert ranges.next_within(40 * P, 50 * P) is None


def test_move_follows_mremap_and_drops_what_was_at_the_target():
    ranges = Ranges([[10 * P, 20 * P, 10 * P], [100 * P, 110 * P, 100 * P]])
    ranges.move(15 * P, 200 * P, 10 * P)  # pages 15..20 move, 20..25 were none of ours
    assert items(ranges) == [(10 * P, 15 * P, 10 * P), (100 * P, 110 * P, 100 * P), (200 * P, 205 * P, 15 * P)]
    ranges.move(10 * P, 100 * P, 2 * P)  # onto pages the process had not got yet: those are gone
    assert items(ranges) == [(12 * P, 15 * P, 12 * P), (100 * P, 102 * P, 10 * P), (102 * P, 110 * P, 102 * P),
                             (200 * P, 205 * P, 15 * P)]


def test_a_copy_is_independent():
    ranges = Ranges([[0, 4 * P, 0]])
    child = ranges.copy()
    ranges.take(0, 2 * P)
    assert child.pages == 4 and ranges.pages == 2


def _message(event: int, *words: int) -> bytes:
    return struct.pack("<B7x", event) + struct.pack("<QQQ", *(list(words) + [0] * (3 - len(words))))


def test_userfaultfd_messages():
    fault = parse_message(_message(EVENT_PAGEFAULT, 1, 0x7F0000001234))
    assert (fault.name, fault.address, fault.flags) == ("pagefault", 0x7F0000001234, 1)
    assert parse_message(_message(EVENT_FORK, 7)).fd == 7
    remap = parse_message(_message(EVENT_REMAP, 0x1000, 0x9000, 0x2000))
    assert (remap.source, remap.start, remap.end) == (0x1000, 0x9000, 0xB000)
    for event in (EVENT_REMOVE, EVENT_UNMAP):
        removed = parse_message(_message(event, 0x1000, 0x3000))
        assert (removed.start, removed.end) == (0x1000, 0x3000)
    with pytest.raises(ValueError, match="unknown userfaultfd event 0x42"):
        parse_message(_message(0x42))
    with pytest.raises(ValueError, match="32 bytes, not 31"):
        parse_message(_message(EVENT_PAGEFAULT)[:31])


def test_a_working_set_file_round_trips(tmp_path):
    path = str(tmp_path / "set.ws")
    recorded = ws.WorkingSet("default/x", "f" * 64, 1.5, 0.25, ((1, 0x1000), (1, 0x5000), (7, 0x2000)))
    ws.write(path, recorded)
    assert ws.read(path) == recorded
    assert ws.read_header(path)["pages"] == 3
    assert ws.read(path).by_task() == {1: [0x1000, 0x5000], 7: [0x2000]}
    assert ws.path_for("/root", "default/x") != ws.path_for("/root", "default/y")
    assert "/" not in ws.path_for("/root", "../../etc/passwd")[len("/root/"):].removeprefix(ws.DIRECTORY + "/")


@pytest.mark.parametrize("damage, message", [
    (lambda data: b"not a set" + data, "not a working-set file"),
    (lambda data: data[:16] + struct.pack("<I", 1 << 30) + data[20:], "garbled header length"),
    (lambda data: data[:-1], "the header announces 3 pages"),
    (lambda data: data + b"x" * 16, "the header announces 3 pages"),
])
def test_a_damaged_working_set_file_is_refused(tmp_path, damage, message):
    path = tmp_path / "set.ws"
    ws.write(str(path), ws.WorkingSet("default/x", "f" * 64, 1.5, 0.25, ((1, 0x1000), (1, 0x5000), (7, 0x2000))))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(WorkingSetError, match=message):
        ws.read(str(path))


@pytest.mark.parametrize("header", [
    {"ref": "x", "fingerprint": "f", "recorded": 1, "seconds": 1},
    {"ref": "x", "fingerprint": "f", "recorded": 1, "seconds": 1, "pages": -1},
    {"ref": "x", "fingerprint": "f", "recorded": 1, "seconds": 1, "pages": ws.MAX_PAGES + 1},
    {"ref": 3, "fingerprint": "f", "recorded": 1, "seconds": 1, "pages": 0},
    {"ref": "x", "fingerprint": "f", "recorded": 1, "seconds": 1, "pages": True},
    [1, 2],
])
def test_a_working_set_header_that_cer_did_not_write_is_refused(tmp_path, header):
    raw = json.dumps(header).encode()
    path = tmp_path / "set.ws"
    path.write_bytes(b"CER-WORKING-SET\n" + struct.pack("<I", len(raw)) + raw)
    with pytest.raises(WorkingSetError):
        ws.read(str(path))


def test_a_working_set_is_planned_in_runs_first_needed_first():
    from types import SimpleNamespace

    from cer.lazy.pages import TaskImage
    from cer.lazy.server import GAP_PAGES, _plan

    # Two VMAs' worth of lazy pages: [10, 20) and [20, 30) (one pagemap entry split at a VMA end), [40, 50).
    image = TaskImage(1, Ranges([[10 * P, 20 * P, 10 * P], [20 * P, 30 * P, 20 * P], [40 * P, 50 * P, 40 * P]]),
                      SimpleNamespace(address=1 << 40), [10 * P, 40 * P], [(10 * P, 30 * P, 0), (40 * P, 50 * P, 20 * P)])
    recorded = [45 * P, 11 * P, 12 * P + 5, 12 * P, (13 + GAP_PAGES) * P, 19 * P, 20 * P, 60 * P, 0]
    plan = _plan(image, recorded)
    source = 1 << 40
    # 45 was needed first; then the run 11..13 and 13 + the gap (the pages between come along, 12 + 5 is no
    # page); 19..21 crosses a VMA end and becomes two copies; 60 and 0 are no lazy pages: nothing.
    assert plan[0] == (45 * P, source + 25 * P, P)
    assert plan[1] == (11 * P, source + 1 * P, (3 + GAP_PAGES) * P)
    assert plan[2:] == [(19 * P, source + 9 * P, P), (20 * P, source + 10 * P, P)]
