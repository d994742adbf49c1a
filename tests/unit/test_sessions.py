"""Session pure parts: the create request, the status derived from Redis's reply, completeness."""

from __future__ import annotations

import pytest

from gateway.config import Settings
from gateway.errors import EmptyPayload, InvalidParameter, MalformedJson
from gateway.sessions import CLOSED, EXPIRED, PENDING, CreateSpec, Session, parse_create, visible
from schemas.catalogue import Principal

SETTINGS = Settings.from_env({"SLUICE_SESSION_MAX_TIMEOUT_S": "3600"})


def test_create_names_the_dataset_one_way_or_the_other():
    assert parse_create(b'{"dataset": "sales"}', SETTINGS) == CreateSpec("sales", None, 900)
    assert parse_create(b'{"namespace": "retail", "entity": "sales", "timeout_s": 60}',
                        SETTINGS) == CreateSpec("sales", "retail", 60)
    assert parse_create(b'{"dataset": "sales", "entity": "sales"}', SETTINGS).dataset == "sales"
    # JSON Schema's integer: a whole number written with a fraction is one
    assert parse_create(b'{"dataset": "sales", "timeout_s": 60.0}', SETTINGS).timeout_s == 60


@pytest.mark.parametrize("body", [
    b"{}", b'{"namespace": "retail"}', b'{"dataset": "sales", "entity": "journal"}',
    b'{"dataset": ""}', b'{"dataset": 3}', b'{"dataset": "sales", "extra": 1}',
    b'{"dataset": "sales", "timeout_s": 0}', b'{"dataset": "sales", "timeout_s": 3601}',
    b'{"dataset": "sales", "timeout_s": 1.5}', b'{"dataset": "sales", "timeout_s": true}',
    b'[{"dataset": "sales"}, {"dataset": "sales"}]', b'["sales"]',
])
def test_create_refuses_what_it_cannot_use(body):
    with pytest.raises(InvalidParameter):
        parse_create(body, SETTINGS)


def test_create_body_must_be_json():
    with pytest.raises(MalformedJson):
        parse_create(b'{"dataset": ', SETTINGS)
    with pytest.raises(EmptyPayload):
        parse_create(b"[]", SETTINGS)


def _reply(status=b"pending", alive=1, in_flight=0, accepted=b"5", stored=(b"3", b"1", None),
           closed_at=None, lapsed=0):
    fields = [b"dataset", b"sales", b"created_by", b"pos", b"timeout_ms", b"60000",
              b"status", status, b"created_at", b"1000", b"last_activity_at", b"2000",
              b"chunks", b"2", b"received", b"6", b"accepted", accepted, b"rejected", b"1"]
    if closed_at:
        fields += [b"closed_at", closed_at]
    return [fields, alive, in_flight, list(stored), lapsed]


def test_status_comes_from_the_reply():
    session = Session.from_reply("ing_x", _reply())
    assert (session.status, session.accepted, session.written, session.duplicates,
            session.failed) == (PENDING, 5, 3, 1, 0)
    doc = session.document()
    assert doc["expires_at"] == 62_000 and doc["items_pending"] == 1
    assert doc["chunks"] == 2 and doc["timeout_s"] == 60 and doc["namespace"] is None


def test_pending_without_its_alive_key_is_expired():
    assert Session.from_reply("ing_x", _reply(alive=0)).status == EXPIRED


def test_complete_needs_no_more_chunks_none_in_flight_and_every_fate():
    every_fate = (b"4", b"1", None)
    assert not Session.from_reply("ing_x", _reply(stored=every_fate)).complete  # pending
    closed = _reply(status=b"closed", closed_at=b"3000", stored=every_fate)
    assert Session.from_reply("ing_x", closed).complete
    assert Session.from_reply("ing_x", closed).document()["expires_at"] is None
    busy = _reply(status=b"closed", closed_at=b"3000", stored=every_fate, in_flight=1)
    assert not Session.from_reply("ing_x", busy).complete
    short = _reply(status=b"closed", closed_at=b"3000", stored=(b"3", b"1", None))
    assert not Session.from_reply("ing_x", short).complete
    # a claim that lapsed before its chunk ended: records may be published and not counted
    lapsed = _reply(status=b"closed", closed_at=b"3000", stored=every_fate, lapsed=1)
    assert not Session.from_reply("ing_x", lapsed).complete
    assert Session.from_reply("ing_x", lapsed).document()["chunks_lapsed"] == 1
    dead_lettered = _reply(alive=0, stored=(b"2", None, b"3"))
    assert Session.from_reply("ing_x", dead_lettered).status == EXPIRED
    assert Session.from_reply("ing_x", dead_lettered).complete
    assert Session.from_reply("ing_x", closed).status == CLOSED


def test_only_the_opening_key_and_admins_see_a_session():
    pos = Principal("pos", frozenset({"sales"}))
    assert visible(pos, "sales", "pos")
    assert not visible(Principal("pos2", frozenset({"sales"})), "sales", "pos")
    assert not visible(Principal("pos", frozenset({"other"})), "sales", "pos")  # lost access
    assert visible(Principal("ops", frozenset(), admin=True), "sales", "pos")
