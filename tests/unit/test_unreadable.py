"""Records the Kafka client cannot read: the raw reader finds them as aiokafka counts."""

from __future__ import annotations

import struct

import pytest
from aiokafka import TopicPartition
from aiokafka.record.default_records import DefaultRecordBatch, _DefaultRecordBatchBuilderPy
from aiokafka.record.legacy_records import LegacyRecordBatchBuilder
from aiokafka.record.memory_records import _MemoryRecordsPy
from aiokafka.structs import ConsumerRecord

from tests.services import RawKey
from workers.unreadable import ERRORS, Unreadable, first_unreadable, letter, split

TP = TopicPartition("ingest.t", 3)
BAD = b"\xff\xfek"


def _batch(base: int, records: list[tuple[bytes, list]], compression: int = 0) -> bytes:
    """A v2 record batch at offset ``base`` (not covered by the CRC), as a producer writes it;
    header keys given as bytes are written as they are."""
    builder = _DefaultRecordBatchBuilderPy(2, compression, 0, -1, -1, 0, 1 << 20)
    for delta, (value, headers) in enumerate(records):
        builder.append(delta, timestamp=1_790_000_000_000 + delta, key=None, value=value,
                       headers=[(RawKey(k) if isinstance(k, bytes) else k, v)
                                for k, v in headers])
    return struct.pack(">q", base) + bytes(builder.build())[8:]


@pytest.mark.parametrize("compression", [0, 1])  # none, gzip
def test_the_first_batch_with_an_unreadable_key_is_found_as_aiokafka_counts(compression):
    raw = (_batch(0, [(b"0", []), (b"1", [])])
           + _batch(2, [(b"2", [("a", b"x")]), (b"3", [(BAD, b"v"), ("b", None)]),
                        (b"4", [("c", b"y")]), (b"5", [(b"id-\xc3\x28", b"w")])], compression)
           + _batch(6, [(b"6", [(BAD, b"v")])]))
    with pytest.raises(ERRORS):  # what aiokafka's readers do with it
        list(DefaultRecordBatch(raw[len(_batch(0, [(b"0", []), (b"1", [])])):]))
    found = first_unreadable(TP, raw + raw[:20], 1)  # a fetch may end inside a batch
    assert found is not None
    assert (found.tp, found.before, found.next_offset) == (TP, 2, 6)  # offsets 1 and 2
    assert [(r.offset, r.value, r.headers) for r in found.readable] == [(4, b"4", (("c", b"y"),))]
    assert type(found.readable[0]) is ConsumerRecord
    assert [(r.offset, r.value, r.headers, r.error) for r in found.unreadable] == [
        (3, b"3", (("\\xff\\xfek", b"v"), ("b", None)),
         "a header key is not UTF-8: b'\\xff\\xfek' (in this letter: \\xff\\xfek)"),
        (5, b"5", (("id-\\xc3(", b"w"),),
         "a header key is not UTF-8: b'id-\\xc3(' (in this letter: id-\\xc3()")]
    assert found.unreadable[0].timestamp == 1_790_000_000_001
    assert first_unreadable(TP, raw, 6).before == 0  # from the last batch's offset
    assert first_unreadable(TP, raw[:len(raw) - 5], 6) is None  # that batch cut short


def test_batches_without_such_keys_are_none():
    assert first_unreadable(TP, _batch(0, [(b"0", [("a", b"x")])]), 0) is None
    assert first_unreadable(TP, b"", 0) is None


def test_a_batch_ends_with_its_unreadable_records_which_are_dead_lettered_whole():
    record = Unreadable("ingest.t", 3, 7, 0, 0, None, b"[1]", None, -1, 3,
                        (("\\xff", b"v"), ("sluice-connector", b"pos")), error="why")
    plain = ConsumerRecord("ingest.t", 3, 6, 0, 0, None, b"{}", None, -1, 2, ())
    assert split([plain]) == ([plain], [])
    assert split([plain, record]) == ([plain], [record])
    assert split([record]) == ([], [record])
    dead = letter(record)
    assert (dead.value, dead.code, dead.error, dead.index) == (b"[1]", "MALFORMED_HEADER",
                                                               "why", None)
    assert dead.origin.connector == "pos" and dead.origin.offset == 7


def _legacy(base: int, values: list[bytes], compression: int = 0) -> bytes:
    """A v1 message set (Kafka before 0.11: no headers) from offset ``base``."""
    builder = LegacyRecordBatchBuilder(1, compression, 1 << 20)
    for delta, value in enumerate(values):
        builder.append(delta if compression else base + delta, timestamp=1_790_000_000_000,
                       key=None, value=value)
    built = bytes(builder.build())
    return struct.pack(">q", base + len(values) - 1) + built[8:] if compression else built


def _aiokafka_before(raw: bytes, start: int) -> int:
    """How many records aiokafka's reader gives from ``start`` before one it cannot read
    (its pure-Python reader: its C one cannot read a v2 batch after a v1 message set)."""
    records, before = _MemoryRecordsPy(raw), 0
    while records.has_next():
        try:
            for record in records.next_batch():
                before += record.offset >= start
        except ERRORS:
            return before
    raise AssertionError("aiokafka read every record")


@pytest.mark.parametrize("compression", [0, 1])  # none, gzip
def test_records_of_an_older_message_set_before_the_batch_are_counted(compression):
    """A log written before Kafka 0.11 holds v0/v1 message sets, and a fetch gives them as
    they are, before the v2 batches after them: aiokafka gives their records too, so they
    are among those taken before the record it cannot read (uncounted, the records between
    them and that record were skipped unstored). A short one ends a fetch as it is."""
    raw = (_legacy(0, [b"0", b"1", b"2"], compression)
           + _batch(3, [(b"3", []), (b"4", [(BAD, b"v")]), (b"5", [])]))
    for start in (0, 1, 3):
        found = first_unreadable(TP, raw, start)
        assert found is not None and found.before == _aiokafka_before(raw, start)
        assert [r.offset for r in found.unreadable] == [4] and found.next_offset == 6
    assert first_unreadable(TP, _batch(0, [(b"0", [])]) + _legacy(1, [b""]), 0) is None
