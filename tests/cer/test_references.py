"""Checkpoint references from the wire: hostile names are refused, and never reach a path."""

import pytest

from cer.errors import BadRequest
from cer.references import CheckpointRef


def test_wire_round_trip_and_default_namespace():
    ref = CheckpointRef.from_wire({"name": "docker.io/library/app:v1"})
    assert ref == CheckpointRef("docker.io/library/app:v1", "default")
    assert CheckpointRef.from_wire(ref.to_wire()) == ref


@pytest.mark.parametrize(
    "value",
    [None, "name", [], {}, {"name": ""}, {"name": 3}, {"name": "a\nb"}, {"name": "x" * 1025},
     {"name": "a", "labels": []}, {"name": "a", "labels": {"namespace": ""}},
     {"name": "a", "labels": {"namespace": "../etc"}}, {"name": "a", "labels": {"namespace": "a" * 77}},
     {"name": "a", "other": 1}],
)
def test_bad_refs_are_bad_requests(value):
    with pytest.raises(BadRequest):
        CheckpointRef.from_wire(value)


def test_the_on_disk_key_is_a_digest_whatever_the_name():
    for name in ("../../etc/passwd", "/", "a/b", ".."):
        key = CheckpointRef(name).key
        assert len(key) == 64 and set(key) <= set("0123456789abcdef")
    assert CheckpointRef("a", "b").key != CheckpointRef("b", "a").key
