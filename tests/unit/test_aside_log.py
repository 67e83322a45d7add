"""The index of a queue set aside, from its log: which copies are still in the queue."""

from __future__ import annotations

import json

from rmqdelay.core.journal import STREAM_OFFSET
from rmqdelay.core.wire import ASIDE_PURGED, ASIDE_TAKEN, MARKER, TASK_ID
from rmqdelay.tools.aside_log import AsideIndex


def _copy(index: AsideIndex, offset: int, task_id: str) -> None:
    index.read({STREAM_OFFSET: offset, TASK_ID: task_id}, b"{}", None)


def test_copies_are_found_at_their_offset_the_oldest_first() -> None:
    index = AsideIndex()
    _copy(index, 0, "a")
    _copy(index, 1, "b")
    _copy(index, 2, "a")  # parked again before the first was taken out
    assert (index.offset_of("a"), index.offset_of("b"), index.offset_of("c")) == (0, 1, None)
    assert index.copies == 3
    assert index.next_offset == 3


def test_a_message_without_a_task_id_is_known_by_its_message_id() -> None:
    index = AsideIndex()
    index.read({STREAM_OFFSET: 7}, b"not a task", "m-1")
    index.read({STREAM_OFFSET: 8}, b"no id at all", None)
    assert (index.offset_of("m-1"), index.offset_of("-")) == (7, 8)


def test_taken_ids_leave_with_every_copy_and_others_stay() -> None:
    index = AsideIndex()
    for offset, task_id in enumerate(["a", "b", "a", "c"]):
        _copy(index, offset, task_id)
    index.read({STREAM_OFFSET: 4, ASIDE_TAKEN: 1}, json.dumps(["a", "zzz"]).encode(), None)
    assert index.offset_of("a") is None
    assert (index.offset_of("b"), index.offset_of("c"), index.copies) == (1, 3, 2)
    assert index.next_offset == 5


def test_a_purge_forgets_what_came_before_it_only() -> None:
    index = AsideIndex()
    _copy(index, 0, "a")
    index.read({STREAM_OFFSET: 1, ASIDE_PURGED: 1}, b"[]", None)
    _copy(index, 2, "b")
    assert (index.offset_of("a"), index.offset_of("b"), index.copies) == (None, 2, 1)


def test_markers_move_the_read_on_and_change_nothing() -> None:
    index = AsideIndex()
    _copy(index, 0, "a")
    index.read({STREAM_OFFSET: 1, MARKER: "m"}, b"", None)
    assert (index.copies, index.next_offset, index.offset_of("a")) == (1, 2, 0)


def test_a_taken_record_that_is_not_a_list_of_ids_takes_nothing() -> None:
    index = AsideIndex()
    _copy(index, 0, "a")
    for offset, body in enumerate([b"not json", b'{"a": 1}', b""], start=1):
        index.read({STREAM_OFFSET: offset, ASIDE_TAKEN: 1}, body, None)
    assert (index.offset_of("a"), index.copies, index.next_offset) == (0, 1, 4)
