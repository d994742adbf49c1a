"""Batched Lua script calls against a real Redis: one pipeline per tick, NOSCRIPT, failures;
coalesced calls (one script call per group and tick), and the admission built on them."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from gateway.admission import _SETTLE_WAITS_S, Admitter, Verdict
from gateway.scripts import Coalescer, ScriptBatcher
from schemas import redis_client, redis_keys
from schemas.dataset import RateLimit

pytestmark = pytest.mark.integration

COUNT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
FAIL = "return redis.error_reply('NOPE ' .. ARGV[1])"


class CountingBatcher(ScriptBatcher):
    """Counts the pipelines actually sent."""

    pipelines = 0

    async def _execute(self, batch):
        self.pipelines += 1
        return await super()._execute(batch)


@pytest.fixture
async def redis(redis_url):
    client = Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
    yield client
    await client.aclose()


async def test_concurrent_calls_share_one_pipeline_and_get_their_own_results(redis):
    batcher = CountingBatcher(redis)
    count = batcher.register(COUNT)
    results = await asyncio.gather(*(count(["n"], [1]) for _ in range(50)))
    assert sorted(results) == list(range(1, 51))
    assert batcher.pipelines <= 2  # the first sends NOSCRIPT-free after loading: 1 or 2
    before = batcher.pipelines
    assert await count(["n"], [10]) == 60  # alone: one pipeline of one
    assert batcher.pipelines == before + 1


async def test_calls_made_while_a_pipeline_is_in_flight_go_out_together_next(redis):
    batcher = CountingBatcher(redis)
    count = batcher.register(COUNT)
    assert await count(["g"], [0]) == 0  # loads the script
    before = batcher.pipelines
    first = count(["g"], [1])
    for _ in range(3):  # the send is scheduled, then its task starts: now in flight
        await asyncio.sleep(0)
    assert batcher.pipelines == before + 1 and not first.done()
    rest = [count(["g"], [1]) for _ in range(20)]
    assert sorted(await asyncio.gather(first, *rest)) == list(range(1, 22))
    assert batcher.pipelines == before + 2


async def test_scripts_are_loaded_again_after_a_flush(redis):
    batcher = CountingBatcher(redis)
    count = batcher.register(COUNT)
    assert await count(["k"], [1]) == 1
    await redis.script_flush()
    assert await asyncio.gather(count(["k"], [1]), count(["k"], [1])) in ([2, 3], [3, 2])
    assert int(await redis.get("k")) == 3  # the refused calls ran exactly once


async def test_an_error_reaches_only_its_caller(redis):
    batcher = ScriptBatcher(redis)
    count, fail = batcher.register(COUNT), batcher.register(FAIL)
    ok, bad = await asyncio.gather(count(["e"], [5]), fail([], ["x"]), return_exceptions=True)
    assert ok == 5
    assert isinstance(bad, ResponseError) and "NOPE x" in str(bad)


async def test_an_unplanned_failure_reaches_every_caller_of_its_batch(redis):
    """Not only Redis errors: whatever breaks a batch fails its callers (a bug: a 500)
    instead of leaving them waiting for ever; the next batch goes out as usual."""

    class Broken(ScriptBatcher):
        broken = True

        async def _execute(self, batch):
            if self.broken:
                self.broken = False
                raise IndexError("a reply that does not parse")
            return await super()._execute(batch)

    count = Broken(redis).register(COUNT)
    results = await asyncio.wait_for(asyncio.gather(
        *(count(["u"], [1]) for _ in range(3)), return_exceptions=True), 5)
    assert all(isinstance(r, IndexError) for r in results), results
    assert await count(["u"], [1]) == 1  # nothing of the broken batch ran


async def test_redis_down_fails_every_caller(own_redis):
    server = own_redis()
    client = redis_client.connect(server.url, 0.5)
    try:
        batcher = ScriptBatcher(client)
        count = batcher.register(COUNT)
        assert await count(["d"], [1]) == 1
        server.stop()
        results = await asyncio.gather(*(count(["d"], [1]) for _ in range(5)),
                                       return_exceptions=True)
        assert all(isinstance(r, RedisError) for r in results), results
        server.start()
        assert await count(["d"], [1]) == 1  # a fresh (empty) Redis: works again
    finally:
        await client.aclose()


async def test_connections_left_from_before_a_redis_restart_are_replaced(own_redis):
    """Pooled connections to the old server fail once; the client retries on a fresh one."""
    server = own_redis()
    client = redis_client.connect(server.url, 0.5)
    plain = Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5,
                           retry_on_error=[])  # what the retry is measured against
    try:
        for c in (client, plain):  # three pooled connections each, idle through the restart
            assert await asyncio.gather(*(c.ping() for _ in range(3))) == [True] * 3
        server.stop()
        server.start()
        stale = await asyncio.gather(*(plain.ping() for _ in range(3)), return_exceptions=True)
        assert any(isinstance(r, RedisError) for r in stale), stale  # without the retry
        batcher = ScriptBatcher(client)
        count = batcher.register(COUNT)
        results = await asyncio.gather(client.incr("n"), client.incr("n"),
                                       count(["d"], [1]), return_exceptions=True)
        assert sorted(results[:2]) == [1, 2] and results[2] == 1, results
    finally:
        await client.aclose()
        await plain.aclose()


async def test_the_batchers_own_connection_is_replaced_after_a_redis_restart(own_redis):
    """The batcher keeps one connection; broken by a restart, it fails once and the batch
    goes out again on a new one (the refused attempt never reached the new server)."""
    server = own_redis()
    client = redis_client.connect(server.url, 0.5)
    try:
        batcher = CountingBatcher(client)
        count = batcher.register(COUNT)
        assert await count(["r"], [1]) == 1
        held = batcher._conn
        server.stop()
        server.start()
        before = batcher.pipelines
        assert await asyncio.gather(count(["r"], [1]), count(["r"], [1])) in ([1, 2], [2, 1])
        # the batch (its reconnect and retry within it), then again once the new server has
        # been given the script (NOSCRIPT)
        assert batcher.pipelines == before + 2
        assert batcher._conn is held and held.is_connected  # the same connection, reconnected
        assert int(await client.get("r")) == 2  # each call ran once on the new server
        await batcher.close()
        assert batcher._conn is None
    finally:
        await client.aclose()


# Adds ARGV[i] to KEYS[1] for every i, answering each running total: a script serving many calls.
ADD_ALL = """
local out = {}
for i, n in ipairs(ARGV) do out[i] = redis.call('INCRBY', KEYS[1], n) end
return out
"""


async def test_coalesced_calls_of_one_group_are_one_script_call(redis):
    batcher = CountingBatcher(redis)
    add_all = batcher.register(ADD_ALL)
    sent: list[tuple[str, list[int]]] = []

    def send(group, items):
        sent.append((group, items))
        return add_all([group], items)

    add = Coalescer(send)
    assert await add("c:{a}", 0) == 0  # loads the script
    sent.clear()
    before = batcher.pipelines
    results = await asyncio.gather(*(add("c:{a}", 1) for _ in range(10)),
                                   *(add("c:{b}", 10) for _ in range(3)))
    assert results == [*range(1, 11), 10, 20, 30]  # each caller its own answer, in order
    assert sorted(sent) == [("c:{a}", [1] * 10), ("c:{b}", [10] * 3)]
    assert batcher.pipelines == before + 1  # and both groups in one pipeline


async def test_a_failed_coalesced_call_fails_every_caller_of_its_group_only(redis):
    batcher = ScriptBatcher(redis)
    add_all, fail = batcher.register(ADD_ALL), batcher.register(FAIL)
    add = Coalescer(lambda group, items: (fail([], ["g"]) if group == "bad"
                                          else add_all([group], items)))
    results = await asyncio.gather(add("bad", 1), add("bad", 2), add("f", 3),
                                   return_exceptions=True)
    assert [type(r) for r in results[:2]] == [ResponseError, ResponseError]
    assert results[2] == 3

    def broken(group, items):
        raise ValueError("cannot build the call")

    with pytest.raises(ValueError):
        await Coalescer(broken)("x", 1)


class CountingAdmitter(Admitter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.groups: list[int] = []  # the number of requests in each script call

    def _send_admits(self, group, calls):
        self.groups.append(len(calls))
        return super()._send_admits(group, calls)


async def test_a_burst_of_one_key_is_admitted_by_one_call_in_arrival_order(redis):
    await redis.flushdb()
    admitter = CountingAdmitter(ScriptBatcher(redis), lock_ttl_s=30, retention_s=60)
    bucket = redis_keys.rate_bucket_key("ds", "k1")
    idem = redis_keys.idempotency_key("ds", "k1", "same")
    rate = RateLimit(requests_per_second=1, burst=10)
    # 12 distinct requests, then 3 with one Idempotency-Key, all in one turn of the loop
    admissions = await asyncio.gather(
        *(admitter.admit(bucket, rate, None, "", f"r{i}") for i in range(7)),
        *(admitter.admit(bucket, rate, idem, "fp", f"d{i}") for i in range(3)),
        *(admitter.admit(bucket, rate, None, "", f"late{i}") for i in range(2)))
    # one call; then the two duplicates look again for the pending claim together, 5 times
    assert admitter.groups == [12] + [2] * len(_SETTLE_WAITS_S)
    verdicts = [a.verdict for a in admissions]
    assert verdicts == [Verdict.PROCEED] * 8 + [Verdict.IN_FLIGHT] * 2 + [
        Verdict.RATE_LIMITED] * 2  # the burst of 10 taken in arrival order, then limited
    assert [a.remaining for a in admissions[:10]] == list(range(9, -1, -1))
    assert admissions[-1].reset_ms > 0
    assert await redis.hget(idem, "owner") == b"d0"
    # completes of one tag together; an answer stored only by its owner
    stored = await asyncio.gather(admitter.complete(idem, "d0", 202, b'{"ok":1}'),
                                  admitter.complete(idem, "d1", 202, b'{"ok":2}'))
    assert stored == [1, 0]
    replay = await admitter.admit(bucket, RateLimit(0, 0), idem, "fp", "again")
    assert replay.verdict is Verdict.REPLAY and replay.replay == b'202{"ok":1}'
    other = await admitter.admit(bucket, RateLimit(0, 0), idem, "other", "again")
    assert other.verdict is Verdict.BODY_MISMATCH


async def test_an_admission_run_twice_for_one_request_admits_it_again(redis):
    """A call retried after it ran (the connection broke before the answer) is not a 409."""
    await redis.flushdb()
    admitter = Admitter(ScriptBatcher(redis), lock_ttl_s=30, retention_s=60)
    bucket = redis_keys.rate_bucket_key("ds", "k1")
    idem = redis_keys.idempotency_key("ds", "k1", "retried")
    first = await admitter.admit(bucket, RateLimit(0, 0), idem, "fp", "req-1")
    again = await admitter.admit(bucket, RateLimit(0, 0), idem, "fp", "req-1")
    other = await admitter.admit(bucket, RateLimit(0, 0), idem, "fp", "req-2")
    assert (first.verdict, again.verdict, other.verdict) == (
        Verdict.PROCEED, Verdict.PROCEED, Verdict.IN_FLIGHT)


async def test_an_admission_run_twice_is_not_rate_limited_by_its_own_first_run(redis):
    """The first run took the bucket's last token; the rerun of that call must still admit its
    own claim, or the client gets 429 and then 409 for the lock's TTL."""
    await redis.flushdb()
    admitter = Admitter(ScriptBatcher(redis), lock_ttl_s=30, retention_s=60)
    bucket = redis_keys.rate_bucket_key("ds", "k1")
    idem = redis_keys.idempotency_key("ds", "k1", "last-token")
    rate = RateLimit(0.01, 1)  # one token, none back for 100 s
    first = await admitter.admit(bucket, rate, idem, "fp", "req-1")
    again = await admitter.admit(bucket, rate, idem, "fp", "req-1")
    other = await admitter.admit(bucket, rate, None, "", "req-2")
    assert (first.verdict, again.verdict, other.verdict) == (
        Verdict.PROCEED, Verdict.PROCEED, Verdict.RATE_LIMITED)


def test_hash_tags():
    assert redis_keys.hash_tag(redis_keys.idempotency_key("ds", "k", "t")) == "{ds/k}"
    assert redis_keys.hash_tag(redis_keys.rate_bucket_key("ds", "k")) == "{ds/k}"
    assert redis_keys.hash_tag("plain") == "plain"
    assert redis_keys.hash_tag("a{}b") == "a{}b"  # an empty tag does not count


async def test_a_duplicate_meeting_a_pending_claim_waits_for_the_answer(redis_url, redis):
    """Two processes: the first stores its answer just after its 202; a retry that reaches the
    other process first looks again and gets the replay, or takes a released claim; a claim
    still pending after the waits is IN_FLIGHT (409)."""
    await redis.flushdb()
    other_client = redis_client.connect(redis_url, 1)
    try:
        first = Admitter(ScriptBatcher(redis), lock_ttl_s=30, retention_s=60)
        other = Admitter(ScriptBatcher(other_client), lock_ttl_s=30, retention_s=60)
        bucket = redis_keys.rate_bucket_key("ds", "k1")
        rate = RateLimit(requests_per_second=100, burst=100)

        async def later(step):
            await asyncio.sleep(0.01)
            await step

        for token, step in (("done", lambda idem: first.complete(idem, "a", 202, b"{}")),
                            ("failed", lambda idem: first.release(idem, "a")),
                            ("slow", None)):
            idem = redis_keys.idempotency_key("ds", "k1", token)
            assert (await first.admit(bucket, rate, idem, "fp", "a")).verdict is Verdict.PROCEED
            settle = asyncio.create_task(later(step(idem))) if step else None
            retry = await other.admit(bucket, rate, idem, "fp", "b")
            if settle:
                await settle
            expected = {"done": Verdict.REPLAY, "failed": Verdict.PROCEED,
                        "slow": Verdict.IN_FLIGHT}[token]
            assert retry.verdict is expected, token
            assert 0 <= retry.remaining < 100  # the first look's token, not an unlimited -1
        assert retry.replay is None
        owner = await redis.hget(redis_keys.idempotency_key("ds", "k1", "failed"), "owner")
        assert owner == b"b"
    finally:
        await other_client.aclose()
