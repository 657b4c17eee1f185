"""cer.criu.images: the schema and reader against CRIU's own decoder, and malformed input."""

import os
import re
import struct
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

import criu_support  # noqa: E402
from google.protobuf.descriptor_pb2 import DescriptorProto, FieldDescriptorProto  # noqa: E402

from cer.criu import criu_pb2 as pb  # noqa: E402
from cer.criu.images import (  # noqa: E402
    IDS,
    IMG_COMMON_MAGIC,
    IMG_SERVICE_MAGIC,
    INVENTORY,
    IPC_VAR,
    IPCNS_SHM,
    MAX_ENTRY_SIZE,
    MM,
    MNTS,
    PAGEMAP,
    PSTREE,
    UTSNS,
    ImageReader,
    RawImage,
    pagemap_nr_pages,
    read_entries,
    read_pagemap,
    read_single_entry,
)
from cer.errors import ImageError  # noqa: E402

SAMPLE_CHECKPOINT = criu_support.SAMPLE_DIR / "checkpoint"
# Image files whose entries carry no payload, by name, with the type they must have.
PLAIN_IMAGES = [
    (r"inventory\.img", INVENTORY),
    (r"pstree\.img", PSTREE),
    (r"ids-\d+\.img", IDS),
    (r"utsns-\d+\.img", UTSNS),
    (r"ipcns-var-\d+\.img", IPC_VAR),
    (r"pagemap-(shmem-)?\d+\.img", PAGEMAP),
    (r"mountpoints-\d+\.img", MNTS),
    (r"mm-\d+\.img", MM),
]
# Where cer's schema departs from Debian's CRIU 3.17 on purpose: (message, field number).
RENAMED = {("pagemap_entry", 2): ("nr_pages", "compat_nr_pages")}  # renamed by CRIU 4.2
NEWER_FIELDS = {("pagemap_entry", 5)}  # CRIU 4.2's 64-bit page count


def plain_images(directory: Path):
    for name in sorted(os.listdir(directory)):
        for pattern, image_type in PLAIN_IMAGES:
            if re.fullmatch(pattern, name):
                yield directory / name, image_type


def by_number(message) -> dict:
    """A message as {field number: value}, nested messages likewise, enums by name."""
    out = {}
    for field, value in message.ListFields():
        if field.message_type:
            convert = by_number
        elif field.enum_type:
            convert = field.enum_type.values_by_number.__getitem__
        else:
            convert = None
        values = list(value) if shape(field)[2] == FieldDescriptorProto.LABEL_REPEATED else [value]
        if convert is not None:
            values = [convert(v).name if field.enum_type else convert(v) for v in values]
        out[field.number] = values if shape(field)[2] == FieldDescriptorProto.LABEL_REPEATED else values[0]
    return out


def shape(field) -> tuple[str, int, int, str]:
    """(name, type, label, message or enum type's short name) of a field, on every protobuf runtime
    (FieldDescriptor.label is gone from recent ones)."""
    proto = DescriptorProto()
    field.containing_type.CopyToProto(proto)
    declared = next(f for f in proto.field if f.number == field.number)
    return declared.name, declared.type, declared.label, declared.type_name.rsplit(".", 1)[-1]


def crit_by_number(entry: dict, descriptor) -> dict:
    """A crit JSON entry as {field number: value}, through pycriu's descriptor of its message."""
    out = {}
    for name, value in entry.items():
        if name == "extra":
            continue
        field = descriptor.fields_by_name[name]
        if field.message_type and isinstance(value, list):
            value = [crit_by_number(v, field.message_type) for v in value]
        elif field.message_type:
            value = crit_by_number(value, field.message_type)
        out[field.number] = value
    return out


def reader_entries(path: Path, image_type) -> list:
    if image_type is PAGEMAP:
        head, entries = read_pagemap(path)
        return [head, *entries]
    return read_entries(path, image_type)


# --------------------------------------------------------------------------- schema and decoding


def test_schema_matches_pycriu(pycriu_pb):
    """Every message of criu.proto has CRIU's field numbers, types and labels, field by field."""
    ours = pb.DESCRIPTOR.message_types_by_name
    assert set(ours) == {"inventory_entry", "task_kobj_ids_entry", "pstree_entry", "utsns_entry", "ipc_var_entry",
                         "ipc_desc_entry", "ipc_shm_entry", "ipc_sem_entry", "ipc_msg", "ipc_msg_entry",
                         "pagemap_head", "pagemap_entry", "mnt_entry", "vma_entry", "aio_ring_entry", "mm_entry"}
    problems = []
    for name, descriptor in ours.items():
        theirs = getattr(pycriu_pb, name).DESCRIPTOR
        for field in descriptor.fields:
            other = theirs.fields_by_number.get(field.number)
            if other is None:
                if (name, field.number) not in NEWER_FIELDS:
                    problems.append(f"{name}.{field.name} = {field.number}: not in CRIU's schema")
                continue
            expected = shape(other)
            expected = (RENAMED.get((name, field.number), (None, expected[0]))[1], *expected[1:])
            if shape(field) != expected:
                problems.append(f"{name} field {field.number}: ours {shape(field)}, CRIU's {shape(other)}")
        missing = {f.number for f in theirs.fields} - {f.number for f in descriptor.fields}
        if missing:
            problems.append(f"{name}: CRIU's fields {sorted(missing)} are missing")
    assert problems == []


@pytest.mark.slow
def test_entries_match_crit(checkpoint_dir, crit, pycriu_pb):
    """Every payload-free image of each checkpoint reads field for field as crit decodes it."""
    checked = set()
    for path, image_type in plain_images(checkpoint_dir):
        decoded = crit(path)
        assert decoded["magic"] == image_type.name, path
        entries = reader_entries(path, image_type)
        expected = [crit_by_number(entry, getattr(pycriu_pb, entries[i].DESCRIPTOR.name).DESCRIPTOR)
                    for i, entry in enumerate(decoded["entries"])] if len(entries) == len(decoded["entries"]) else None
        assert [by_number(e) for e in entries] == expected, path
        checked.add(image_type.name)
    # Every type cer reads at all was compared (the empty-IPC checkpoint holds no shm pagemaps).
    assert {"INVENTORY", "PSTREE", "IDS", "UTSNS", "IPC_VAR", "PAGEMAP", "MM"} <= checked


@pytest.mark.slow
def test_shm_entries_match_crit(checkpoint_dir, decode_patched, pycriu_pb):
    """ipcns-shm entries (CRIU 4 writes no inline payload) against crit's decoder."""
    paths = sorted(checkpoint_dir.glob("ipcns-shm-*.img"))
    for path in paths:
        with ImageReader(path, IPCNS_SHM) as image:
            entries = list(image.entries())
        decoded = decode_patched(path)["entries"]
        expected = [crit_by_number(e, pycriu_pb.ipc_shm_entry.DESCRIPTOR) for e in decoded]
        assert [by_number(e) for e in entries] == expected
        assert all(e.in_pagemaps for e in entries)
    assert len(paths) == (0 if checkpoint_dir.name == "checkpoint-empty-ipc" else 1)


@pytest.mark.slow
def test_mount_entries_match_crit(tmp_path, crit, make_image, pycriu_pb):
    """mnt_entry (for mountpoints-*.img, next to be read): what crit decodes from our bytes."""
    entry = pb.mnt_entry(fstype=5, mnt_id=31, root_dev=0x2a, parent_mnt_id=30, flags=0x200006, root="/",
                         mountpoint="./dev/shm", source="shm", options="size=65536k", shared_id=4, master_id=2,
                         with_plugin=False, ext_mount=True, fsname="tmpfs", internal_sharing=True, deleted=False,
                         sb_flags=0x6, ext_key="dev-shm")
    proc = pb.mnt_entry(fstype=1, mnt_id=32, root_dev=5, parent_mnt_id=31, flags=0, root="/", mountpoint="./proc",
                        source="proc", options="")
    path = make_image(tmp_path / "mountpoints-12.img", MNTS, [entry, proc])
    decoded = crit(path)
    assert decoded["magic"] == "MNTS"
    assert [crit_by_number(e, pycriu_pb.mnt_entry.DESCRIPTOR) for e in decoded["entries"]] == \
        [by_number(e) for e in read_entries(path, MNTS)]
    assert read_entries(path, MNTS)[0] == entry


def test_pagemap_page_count_of_both_criu_versions(tmp_path, make_image):
    """CRIU up to 4.1 counts pages in field 2, CRIU 4.2 in field 5 (leaving field 2 zero)."""
    path = make_image(tmp_path / "pagemap-shmem-3.img", PAGEMAP, [
        pb.pagemap_head(pages_id=9),
        pb.pagemap_entry(vaddr=0, compat_nr_pages=3, flags=4),
        # The bytes crit's CRIU 4.2 tests show: vaddr 4096, compat 0, flags PE_PARENT, nr_pages 2.
        struct.pack("<I", 9) + bytes.fromhex("088020100020012802"),
    ])
    head, entries = read_pagemap(path)
    assert head.pages_id == 9
    assert [(e.vaddr, pagemap_nr_pages(e), e.flags) for e in entries] == [(0, 3, 4), (4096, 2, 1)]


# --------------------------------------------------------------------------- malformed input


def small_images():
    for path, image_type in plain_images(SAMPLE_CHECKPOINT):
        yield pytest.param(path, image_type, id=path.name)


def read_any(path: Path, image_type):
    return [by_number(e) for e in reader_entries(path, image_type)]


def assert_names(error: ImageError, path: Path, upto: int) -> None:
    assert error.path == str(path)
    assert 0 <= error.offset <= upto
    assert str(path) in str(error) and f"offset {error.offset}" in str(error)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("source, image_type", list(small_images()))
def test_truncated_at_every_offset(tmp_path, source, image_type):
    """Cut anywhere, an image reads as an ImageError naming the file and an offset inside what is
    left, or (cut between entries) as fewer entries: never anything else, never slowly."""
    data = source.read_bytes()
    full = read_any(source, image_type)
    path = tmp_path / source.name
    started = time.monotonic()
    errors = 0
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        try:
            entries = read_any(path, image_type)
        except ImageError as e:
            assert_names(e, path, cut)
            errors += 1
        else:
            assert len(entries) < len(full) and entries == full[: len(entries)], cut
    assert errors >= len(data) - len(full)  # every cut inside an entry or the magic failed
    assert time.monotonic() - started < 10


@pytest.mark.timeout(30)
@pytest.mark.parametrize("source, image_type", list(small_images()))
def test_garbled_bytes(tmp_path, source, image_type):
    """Any byte flipped: an ImageError naming the file, or entries that still parse."""
    data = source.read_bytes()
    path = tmp_path / source.name
    errors = 0
    for offset in range(len(data)):
        garbled = bytearray(data)
        garbled[offset] ^= 0xFF
        path.write_bytes(garbled)
        try:
            read_any(path, image_type)
        except ImageError as e:
            assert_names(e, path, len(data))
            errors += 1
    assert errors >= 8  # at least every flip in the magics


@pytest.mark.timeout(10)
@pytest.mark.parametrize("declared", [0xFFFFFFFF, MAX_ENTRY_SIZE + 1, 1000])
def test_huge_declared_entry_size(tmp_path, declared):
    """A size field larger than the file (or than any entry may be) fails at that entry's offset
    without reading or allocating it."""
    path = tmp_path / "utsns-1.img"
    body = bytes(MAX_ENTRY_SIZE + 8) if declared == MAX_ENTRY_SIZE + 1 else b"\x0a\x01a"
    path.write_bytes(struct.pack("<III", IMG_COMMON_MAGIC, UTSNS.magic, declared) + body)
    with pytest.raises(ImageError) as caught:
        read_entries(path, UTSNS)
    assert_names(caught.value, path, 8)
    assert caught.value.offset == 8
    assert ("exceeds the limit" if declared > MAX_ENTRY_SIZE else "the file ends") in caught.value.problem


@pytest.mark.parametrize("content, offset, problem", [
    (b"", 0, "empty"),
    (struct.pack("<II", 0xDEADBEEF, UTSNS.magic), 0, "unknown magic 0xdeadbeef"),
    (struct.pack("<II", IMG_COMMON_MAGIC, 0x12345678), 4, "unknown image type magic 0x12345678"),
    (struct.pack("<I", IMG_COMMON_MAGIC), 4, "image type magic"),
    (struct.pack("<II", IMG_SERVICE_MAGIC, UTSNS.magic), 0, "service file"),
    (struct.pack("<II", IMG_COMMON_MAGIC, IDS.magic), 0, "an image of type IDS, not UTSNS"),
    (struct.pack("<I", INVENTORY.magic), 0, "an image of type INVENTORY, not UTSNS"),
    (struct.pack("<III", IMG_COMMON_MAGIC, UTSNS.magic, 3) + b"\x0a\x01a", 8, "lacks required fields: domainname"),
    (struct.pack("<III", IMG_COMMON_MAGIC, UTSNS.magic, 2) + b"\x0a\x05", 8, "garbled utsns_entry"),
])
def test_bad_headers_and_entries(tmp_path, content, offset, problem):
    path = tmp_path / "utsns-1.img"
    path.write_bytes(content)
    with pytest.raises(ImageError) as caught:
        read_single_entry(path, UTSNS)
    assert caught.value.offset == offset
    assert problem in caught.value.problem
    assert_names(caught.value, path, offset)


def test_unknown_image_type_is_rejected_even_without_expectation(tmp_path):
    """ImageReader(path) without a type accepts only the types it knows (core-*.img is not one)."""
    path = tmp_path / "core-1.img"
    path.write_bytes(struct.pack("<II", IMG_COMMON_MAGIC, 0x55053847) + b"\x00" * 8)
    with pytest.raises(ImageError, match="unknown image type magic 0x55053847"):
        ImageReader(path)


@pytest.mark.timeout(10)
def test_not_a_regular_file(tmp_path):
    """A FIFO, a directory or a missing path fails at once (opening a FIFO must not block)."""
    fifo = tmp_path / "ipcns-var-1.img"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path, tmp_path / "missing.img"):
        with pytest.raises(ImageError) as caught:
            read_single_entry(path, IPC_VAR)
        assert caught.value.path == str(path) and caught.value.offset == 0


def test_single_entry_images_hold_exactly_one(tmp_path, make_image):
    uts = pb.utsns_entry(nodename="a", domainname="b")
    path = make_image(tmp_path / "utsns-1.img", UTSNS, [uts, uts])
    with pytest.raises(ImageError, match="unexpected data after the only entry"):
        read_single_entry(path, UTSNS)
    make_image(path, UTSNS, [])
    with pytest.raises(ImageError, match="no utsns_entry entry"):
        read_single_entry(path, UTSNS)


def test_raw_reads_are_bounded(tmp_path):
    path = tmp_path / "pages-1.img"
    path.write_bytes(bytes(range(256)) * 16)
    with RawImage(path) as pages:
        assert pages.read_at(4000, 96, "tail") == (bytes(range(256)) * 16)[4000:]
        with pytest.raises(ImageError) as caught:
            pages.read_at(4000, 97, "pages of shm segment 3")
    assert caught.value.offset == 4000 and "pages of shm segment 3" in caught.value.problem
