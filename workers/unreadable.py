"""Records the Kafka client cannot read (a header key that is not UTF-8): read raw, skipped
alone, dead-lettered.

Kafka's header keys are strings and Java clients write UTF-8, but librdkafka and others can
write any bytes. aiokafka decodes each key strictly while a poll iterates a fetch, so such a
record makes ``getmany`` raise (UnicodeDecodeError; CorruptRecordException from its
pure-Python reader) and aiokafka gives neither that record nor any after it in its partition,
nor the records it had already taken from other partitions in the same call (their positions
moved past them all the same). A worker that let the error stop it met the same record again
after its restart, for good.

The poll catches the error (around each getmany, nothing per record) and calls ``skip``:
every partition goes back where the batch leaves it, a raw fetch of its own finds the record,
aiokafka gives the records before it as usual, the rest of its record batch (which aiokafka
reads whole, from any offset in it) is read raw, and the partition moves on after that batch.
The batch ends with the records the client cannot read (``Unreadable``), which go to the
dead-letter topic as MALFORMED_HEADER; the commit then covers them.
"""

from __future__ import annotations

import logging
import struct
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.codec import gzip_decode, lz4_decode, snappy_decode, zstd_decode
from aiokafka.errors import CorruptRecordException, RebalanceInProgressError, for_code
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.legacy_records import LegacyRecordBatch
from aiokafka.record.util import decode_varint
from aiokafka.structs import ConsumerRecord

from workers.decode import DeadLetter, origin_of

log = logging.getLogger(__name__)

# what getmany raises for such a record: its C reader, its pure-Python one (which raises the
# latter for a bad CRC too: no such key is found then, and the worker stops as it did)
ERRORS = (UnicodeDecodeError, CorruptRecordException)
CODE = "MALFORMED_HEADER"  # the dead letter's sluice-error-code
_TAKE_S = 10.0  # to take the records before it from aiokafka (fetched moments ago)
_TAKE_WAIT_S = 0.5  # one wait of those: then whether the partition is still assigned
# the raw fetch's wait for data: a partition with some answers at once (Tansu answers a fetch
# that may not wait with no partitions at all)
_RAW_WAIT_MS = 100


@dataclass
class Unreadable(ConsumerRecord):
    """A record aiokafka could not read, as read raw: a header key that is not UTF-8 is
    written with \\x escapes (``error`` quotes its bytes)."""

    error: str = ""


def letter(record: Unreadable) -> DeadLetter:
    """The record's dead letter: its value as it came, its headers (the key quoted)."""
    return DeadLetter(record, record.value or b"", CODE, record.error, origin=origin_of(record))


class Unskippable(Exception):
    """The record aiokafka could not read was not found, or not skipped alone: the worker
    stops with this, nothing of the batch committed, and its replacement tries again."""


def split(batch: list) -> tuple[list, list[Unreadable]]:
    """The batch's records to decode, and those at its end the client could not read."""
    end = len(batch)
    while end and type(batch[end - 1]) is Unreadable:
        end -= 1
    return (batch, []) if end == len(batch) else (batch[:end], batch[end:])


@dataclass
class _Found:
    """A record batch holding a record the client cannot read, read raw."""

    tp: TopicPartition
    before: int  # records aiokafka gives from the fetch offset before the first such record
    readable: list[ConsumerRecord]  # the batch's other records after it
    unreadable: list[Unreadable]  # that record, and any other such of the batch
    next_offset: int  # the offset after the batch


async def skip(consumer: AIOKafkaConsumer, bootstrap: str, last: dict[TopicPartition, int],
               max_bytes: int, error: Exception) -> list[ConsumerRecord]:
    """After ``getmany`` raised ``error``: the records to append to the batch, whose last
    records per partition are at ``last``. Of the partition of the first record the client
    cannot read: the records aiokafka gives before it, the rest of its record batch read
    raw (aiokafka reads a batch whole, from any offset in it), then the unreadable ones
    (Unreadable, at the end). Every partition is where the batch leaves it, that one just
    past the record batch. Nothing when a rebalance gave that partition to another member
    meanwhile: the member that has it now meets the record."""
    starts = await _rewind(consumer, last)
    # the record is among those aiokafka fetched: not in a partition it found no more in
    ahead = {tp: offset for tp, offset in starts.items()
             if (highwater := consumer.highwater(tp)) is None or offset < highwater}
    found = await _find(bootstrap, ahead, max_bytes)
    if found is None:
        raise Unskippable(f"the Kafka client could not read a record ({error!r}), and no "
                          "header key that is not UTF-8 was found after the batch's "
                          "offsets") from error
    tp = found.tp
    taken = await _take(consumer, tp, starts[tp], found.before, found.unreadable[0].offset)
    if taken is None:  # the rebalance put the partitions kept at their committed offsets
        await _rewind(consumer, last)
        return []
    consumer.seek(tp, found.next_offset)
    for record in found.unreadable:
        log.warning("record %s:%d at offset %d has a header key that is not UTF-8; it goes "
                    "to the dead-letter topic", tp.topic, tp.partition, record.offset)
    return [*taken, *found.readable, *found.unreadable]


async def _rewind(consumer: AIOKafkaConsumer,
                  last: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
    """Every assigned partition back to the record after the batch's last one, else to its
    committed offset (where this poll began: each batch commits all its partitions), else to
    its beginning (auto_offset_reset earliest): the offsets."""
    starts = {}
    for tp in consumer.assignment():
        starts[tp] = last[tp] + 1 if tp in last else await consumer.committed(tp)
    never = [tp for tp, offset in starts.items() if offset is None]
    if never:
        starts.update(await consumer.beginning_offsets(never))
    for tp, offset in starts.items():
        consumer.seek(tp, offset)
    return starts


async def _find(bootstrap: str, starts: dict[TopicPartition, int],
                max_bytes: int) -> _Found | None:
    """The first record batch with a header key that is not UTF-8 in a fetch of each
    partition from its start, as aiokafka's fetch reads it (one fetch's worth of bytes). A
    client of its own: the consumer's connection may be holding a long-polling fetch."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap, client_id="sluice-worker-raw")
    try:
        await client.bootstrap()
        cluster = await client.fetch_all_metadata()
        for tp in sorted(starts):
            request = FetchRequest(_RAW_WAIT_MS, 1, max_bytes, 0,
                                   [(tp.topic, [(tp.partition, starts[tp], max_bytes)])])
            response = await client.send(cluster.leader_for_partition(tp), request)
            for _topic, partitions in response.topics:
                for _partition, code, _highwater, *rest in partitions:
                    if code:
                        raise for_code(code)(f"raw fetch of {tp}")
                    found = first_unreadable(tp, rest[-1] or b"", starts[tp])
                    if found is not None:
                        return found
    finally:
        await client.close()
    return None


async def _take(consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, count: int,
                stop: int) -> list[ConsumerRecord] | None:
    """The ``count`` records aiokafka gives of ``tp`` from ``start`` (where it was put), all
    before offset ``stop`` (max_records keeps it from reaching the record it cannot read).
    A record before ``start`` shows that a rebalance put the partition back at its committed
    offset (as it does every partition): RebalanceInProgressError, so that the skip is
    retried from the rewind. None once a rebalance gave ``tp`` to another member (aiokafka
    would give none of its records: each wait is short, to see that)."""
    taken: list[ConsumerRecord] = []
    deadline = time.monotonic() + _TAKE_S
    while tp in consumer.assignment():
        if len(taken) == count:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Unskippable(f"aiokafka gave {len(taken)} of the {count} records of {tp} "
                              f"before offset {stop} in {_TAKE_S:.0f} s")
        try:
            fetched = await consumer.getmany(
                tp, timeout_ms=int(min(remaining, _TAKE_WAIT_S) * 1000),
                max_records=count - len(taken))
        except ERRORS as exc:
            raise Unskippable(f"aiokafka could not read a record of {tp} before offset "
                              f"{stop}: {exc!r}") from exc
        records = fetched.get(tp, [])
        if records and records[0].offset < start:
            raise RebalanceInProgressError(f"{tp} went back to offset {records[0].offset}, "
                                           f"before {start}, while a record was skipped")
        taken.extend(records)
    else:
        return None
    if taken and taken[-1].offset >= stop:
        raise Unskippable(f"aiokafka gave offset {taken[-1].offset} of {tp}, expected only "
                          f"records before {stop}")
    return taken


# -- the record batch format (v2), read without decoding header keys -------------------------

_BATCH = struct.Struct(">qiibIhiqqqhii")  # base offset .. record count: 61 bytes
_LENGTH = struct.Struct(">qi")  # base offset, batch length (after these 12 bytes)
_MAGIC = 16  # where every format has its magic byte
_CODECS = {1: gzip_decode, 2: snappy_decode, 3: lz4_decode, 4: zstd_decode}
_LOG_APPEND_TIME, _CONTROL = 0x08, 0x20


def first_unreadable(tp: TopicPartition, raw: bytes, start: int) -> _Found | None:
    """In the record batches ``raw`` of a fetch of ``tp`` from offset ``start``, the first
    with a record that has a header key that is not UTF-8. aiokafka skips control batches
    and the records before the fetch offset, as here; it gives the records of older message
    sets (v0, v1: no headers) before a v2 batch, which count among those before."""
    before = 0
    for batch in _batches(raw):
        if isinstance(batch, LegacyRecordBatch):
            before += sum(record.offset >= start for record in batch)
            continue
        base, attributes, last_delta, first_ts, max_ts, count, body = batch
        if attributes & _CONTROL:
            continue
        found = None
        appended = bool(attributes & _LOG_APPEND_TIME)
        for offset, delta, key, value, headers, bad in _records(body, count, base):
            if offset < start:
                continue
            record = (tp.topic, tp.partition, offset, max_ts if appended else first_ts + delta,
                      int(appended), key, value, None, -1 if key is None else len(key),
                      -1 if value is None else len(value), headers)
            if bad is not None:
                found = found or _Found(tp, before, [], [], base + last_delta + 1)
                found.unreadable.append(Unreadable(
                    *record, error=f"a header key is not UTF-8: {bad!r} (in this letter: "
                                   f"{bad.decode('utf-8', 'backslashreplace')})"))
            elif found is not None:
                found.readable.append(ConsumerRecord(*record))
            else:
                before += 1
        if found is not None:
            return found
    return None


def _batches(raw: bytes):
    """(base offset, attributes, last offset delta, first and max timestamps, record count,
    records) of each whole v2 batch in ``raw``, and each older message set (v0, v1: no
    headers) as aiokafka reads it; a fetch may end with part of one."""
    pos = 0
    while pos + _LENGTH.size <= len(raw):
        base, length = _LENGTH.unpack_from(raw, pos)
        end = pos + _LENGTH.size + length
        if end > len(raw):
            return
        magic = raw[pos + _MAGIC]
        if magic < 2:  # shorter than a v2 batch's header may be
            yield LegacyRecordBatch(raw[pos:end], magic)
        else:
            (_, _, _, _, _, attributes, last_delta, first_ts, max_ts, _, _, _,
             count) = _BATCH.unpack_from(raw, pos)
            body = raw[pos + _BATCH.size:end]
            codec = _CODECS.get(attributes & 0x07)
            yield (base, attributes, last_delta, first_ts, max_ts, count,
                   body if codec is None else codec(body))
        pos = end


def _records(body: bytes, count: int, base: int):
    """(offset, timestamp delta, key, value, headers, the first header key that is not
    UTF-8 or None) of each record of a batch; such a key is written with \\x escapes."""
    pos = 0
    for _ in range(count):
        length, pos = decode_varint(body, pos)
        end = pos + length
        _attributes, pos = decode_varint(body, pos)
        delta, pos = decode_varint(body, pos)
        offset_delta, pos = decode_varint(body, pos)
        key, pos = _nullable(body, pos)
        value, pos = _nullable(body, pos)
        headers, bad = [], None
        n, pos = decode_varint(body, pos)
        for _ in range(n):
            size, pos = decode_varint(body, pos)
            name = body[pos:pos + size]
            header_value, pos = _nullable(body, pos + size)
            try:
                headers.append((name.decode("utf-8"), header_value))
            except UnicodeDecodeError:
                bad = bad or name
                headers.append((name.decode("utf-8", "backslashreplace"), header_value))
        yield base + offset_delta, delta, key, value, tuple(headers), bad
        pos = end


def _nullable(body: bytes, pos: int) -> tuple[bytes | None, int]:
    size, pos = decode_varint(body, pos)
    if size < 0:
        return None, pos
    return body[pos:pos + size], pos + size
