"""One contract for every Oona backend: each test runs on in-memory and on Redis Streams (a real
redis-server started on a free loopback port)."""

from __future__ import annotations

import asyncio
import time

import pytest

from esper.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from esper.oona import Message, OonaBus, StartPosition

# Redis trims whole stream nodes with MAXLEN ~ (100 entries per node by default).
REDIS_TRIM_SLACK = 100


async def _collect(iterator, count: int, timeout: float = 10.0) -> list[Message]:
    out: list[Message] = []

    async def pull():
        async for message in iterator:
            out.append(message)
            if len(out) >= count:
                return

    await asyncio.wait_for(pull(), timeout)
    return out


async def _nothing_within(iterator, seconds: float) -> bool:
    try:
        await asyncio.wait_for(iterator.__anext__(), seconds)
    except TimeoutError:
        return True
    return False


def test_publish_assigns_dense_offsets_and_round_trips_fields(run_bus):
    async def scenario(bus: OonaBus):
        results = [await bus.publish("t.a", bytes([i, 0, 255]), key=f"k{i}", content_type="application/x-test",
                                     headers={"h": str(i)}, source="tester") for i in range(5)]
        assert [r.offset for r in results] == [0, 1, 2, 3, 4]
        assert [r.message_id for r in results] == ["0", "1", "2", "3", "4"]
        assert await bus.backend.bounds("t.a") == (0, 5)
        batch = await bus.backend.read("t.a", 2, 10, 0)
        assert [m.offset for m in batch] == [2, 3, 4]
        m = batch[0]
        assert (m.topic, m.payload, m.key, m.content_type, m.headers, m.source, m.delivery_attempt) == (
            "t.a", bytes([2, 0, 255]), "k2", "application/x-test", {"h": "2"}, "tester", 1)
        assert m.message_id == "2" and abs(m.publish_time - time.time()) < 30
        assert await bus.backend.bounds("never.written") == (0, 0)

    run_bus(scenario)


def test_read_waits_for_a_later_publish_and_returns_empty_on_timeout(run_bus):
    async def scenario(bus: OonaBus):
        started = time.monotonic()
        assert await bus.backend.read("t.wait", 0, 10, 0.2) == []
        assert time.monotonic() - started >= 0.15
        reader = asyncio.ensure_future(bus.backend.read("t.wait", 0, 10, 5.0))
        await asyncio.sleep(0.05)
        await bus.publish("t.wait", b"late")
        batch = await asyncio.wait_for(reader, 3)
        assert [m.payload for m in batch] == [b"late"]

    run_bus(scenario)


def test_retention_is_bounded_and_the_window_is_readable(run_bus):
    async def scenario(bus: OonaBus):
        for i in range(1000):
            await bus.publish("t.ret", str(i).encode())
        first, next_offset = await bus.backend.bounds("t.ret")
        assert next_offset == 1000
        retained = next_offset - first
        assert 200 <= retained <= 200 + REDIS_TRIM_SLACK, retained
        batch = await bus.backend.read("t.ret", 0, 1000, 0)
        assert batch[0].offset == first and [m.offset for m in batch] == list(range(first, 1000))
        info = {t.name: t for t in await bus.list_topics()}["t.ret"]
        assert (info.first_offset, info.next_offset, info.retained_messages) == (first, 1000, retained)

    run_bus(scenario, retention=200)


def test_offset_subscriptions_latest_earliest_and_offset(run_bus):
    async def scenario(bus: OonaBus):
        for i in range(3):
            await bus.publish("t.sub", f"old{i}".encode())
        latest = (await bus.subscribe("t.sub", StartPosition.LATEST)).messages()
        earliest = (await bus.subscribe("t.sub", StartPosition.EARLIEST)).messages()
        from_one = (await bus.subscribe("t.sub", StartPosition.OFFSET, 1)).messages()
        await bus.publish("t.sub", b"new")
        assert [m.payload for m in await _collect(latest, 1)] == [b"new"]
        assert [m.offset for m in await _collect(earliest, 4)] == [0, 1, 2, 3]
        assert [m.payload for m in await _collect(from_one, 3)] == [b"old1", b"old2", b"new"]
        at_end = (await bus.subscribe("t.sub", StartPosition.OFFSET, 4)).messages()
        assert await _nothing_within(at_end, 0.3)

    run_bus(scenario)


@pytest.mark.parametrize(("start", "offset", "words"), [
    (StartPosition.OFFSET, -1, ">= 0"),
    (StartPosition.OFFSET, 999, "past the end"),
    (StartPosition.OFFSET, 0, "no longer retained"),
    (StartPosition.LATEST, 5, "only used with start OFFSET"),
])
def test_bad_offsets_are_invalid_arguments_naming_from_offset(run_bus, start, offset, words):
    async def scenario(bus: OonaBus):
        for i in range(500):
            await bus.publish("t.bad", str(i).encode())
        with pytest.raises(InvalidArgumentError, match=words) as info:
            await bus.subscribe("t.bad", start, offset)
        assert info.value.field == "from_offset"

    run_bus(scenario, retention=150)


@pytest.mark.parametrize("topic", ["", "has space", "-leading-dash", "x" * 250, "slash/inside"])
def test_bad_topic_names_are_rejected(run_bus, topic):
    async def scenario(bus: OonaBus):
        with pytest.raises(InvalidArgumentError) as info:
            await bus.publish(topic, b"x")
        assert info.value.field == "topic"
        with pytest.raises(InvalidArgumentError):
            await bus.subscribe(topic)

    run_bus(scenario)


def test_slow_offset_subscriber_past_retention_gets_subscriber_lagged(run_bus):
    async def scenario(bus: OonaBus):
        sub = await bus.subscribe("t.lag", StartPosition.LATEST)
        for i in range(1000):
            await bus.publish("t.lag", str(i).encode())
        with pytest.raises(ResourceExhaustedError, match="fell behind retention") as info:
            await _collect(sub.messages(), 1)
        assert info.value.reason == "SUBSCRIBER_LAGGED" and info.value.metadata["next_offset"] == "0"

    run_bus(scenario, retention=100, queue_limit=10)


def test_consumer_group_members_share_messages_once_when_acked(run_bus):
    async def scenario(bus: OonaBus):
        a = await bus.join_group("t.grp", bus.group_options("workers", "a"), StartPosition.EARLIEST)
        b = await bus.join_group("t.grp", bus.group_options("workers", "b"), StartPosition.EARLIEST)
        for i in range(40):
            await bus.publish("t.grp", str(i).encode())
        seen: dict[int, str] = {}

        async def consume(sub, name):
            async for batch in sub.batches():
                for m in batch:
                    assert m.offset not in seen, f"offset {m.offset} delivered twice"
                    assert m.delivery_attempt == 1
                    seen[m.offset] = name
                assert await bus.ack("t.grp", "workers", [m.message_id for m in batch]) == len(batch)
                await asyncio.sleep(0.01)  # let the other member take a turn
                if len(seen) == 40:
                    return

        tasks = [asyncio.ensure_future(consume(a, "a")), asyncio.ensure_future(consume(b, "b"))]
        done, pending = await asyncio.wait(tasks, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()
        assert sorted(seen) == list(range(40))
        assert await bus.ack("t.grp", "workers", ["0", "1"]) == 0  # acking again is harmless
        assert await bus.backend.pending_count("t.grp", "workers", "a") == 0

    run_bus(scenario, queue_limit=5)


def test_unacked_message_is_redelivered_to_another_member_after_visibility_timeout(run_bus):
    async def scenario(bus: OonaBus):
        lazy = await bus.join_group("t.redo", bus.group_options("g", "lazy", visibility_timeout=0.3),
                                    StartPosition.EARLIEST)
        await bus.publish("t.redo", b"job")
        first = await _collect(lazy.messages(), 1)
        assert first[0].delivery_attempt == 1
        diligent = await bus.join_group("t.redo", bus.group_options("g", "diligent", visibility_timeout=0.3))
        started = time.monotonic()
        again = await _collect(diligent.messages(), 1, timeout=5)
        assert again[0].offset == first[0].offset and again[0].payload == b"job"
        assert again[0].delivery_attempt == 2
        assert time.monotonic() - started >= 0.15
        assert await bus.backend.pending_count("t.redo", "g", "diligent") == 1
        assert await bus.ack("t.redo", "g", [again[0].message_id]) == 1

    run_bus(scenario)


def test_max_in_flight_bounds_unacked_deliveries_until_acked(run_bus):
    async def scenario(bus: OonaBus):
        for i in range(20):
            await bus.publish("t.mif", str(i).encode())
        sub = await bus.join_group("t.mif", bus.group_options("g", "c", visibility_timeout=60, max_in_flight=5),
                                   StartPosition.EARLIEST)
        got: list[Message] = []

        async def consume():
            async for m in sub.messages():
                got.append(m)

        task = asyncio.ensure_future(consume())
        try:
            await asyncio.sleep(0.5)
            assert [m.offset for m in got] == [0, 1, 2, 3, 4]  # and nothing more while unacked
            await bus.ack("t.mif", "g", [m.message_id for m in got[:3]])
            for _ in range(100):
                if len(got) >= 8:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            assert [m.offset for m in got] == list(range(8))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run_bus(scenario)


def test_member_at_its_limit_gets_its_own_expired_messages_again(run_bus):
    async def scenario(bus: OonaBus):
        for i in range(10):
            await bus.publish("t.own", str(i).encode())
        sub = await bus.join_group("t.own", bus.group_options("g", "solo", visibility_timeout=0.2, max_in_flight=3),
                                   StartPosition.EARLIEST)
        it = sub.messages()
        first = await _collect(it, 3)
        again = await _collect(it, 3, timeout=5)
        assert [m.offset for m in again] == [m.offset for m in first] == [0, 1, 2]
        assert [m.delivery_attempt for m in again] == [2, 2, 2]

    run_bus(scenario)


def test_group_start_applies_on_creation_and_existing_group_keeps_position(run_bus):
    async def scenario(bus: OonaBus):
        await bus.publish("t.pos", b"before")
        late = await bus.join_group("t.pos", bus.group_options("late", "x"), StartPosition.LATEST)
        early = await bus.join_group("t.pos", bus.group_options("early", "x"), StartPosition.EARLIEST)
        await bus.publish("t.pos", b"after")
        assert [m.payload for m in await _collect(late.messages(), 1)] == [b"after"]
        got = await _collect(early.messages(), 2)
        assert [m.payload for m in got] == [b"before", b"after"]
        await bus.ack("t.pos", "early", [m.message_id for m in got])
        rejoined = await bus.join_group("t.pos", bus.group_options("early", "y"), StartPosition.EARLIEST)
        await bus.publish("t.pos", b"third")
        assert [m.payload for m in await _collect(rejoined.messages(), 1)] == [b"third"]

    run_bus(scenario)


def test_ack_errors_name_what_is_wrong(run_bus):
    async def scenario(bus: OonaBus):
        await bus.publish("t.ack", b"x")
        await bus.join_group("t.ack", bus.group_options("g"), StartPosition.EARLIEST)
        with pytest.raises(NotFoundError, match="'nope' does not exist"):
            await bus.ack("t.ack", "nope", ["0"])
        with pytest.raises(NotFoundError):
            await bus.ack("no.such.topic", "g", ["0"])
        with pytest.raises(InvalidArgumentError) as info:
            await bus.ack("t.ack", "g", ["0", "abc"])
        assert info.value.field == "message_ids[1]"
        with pytest.raises(InvalidArgumentError, match="message_ids is empty"):
            await bus.ack("t.ack", "g", [])
        assert await bus.ack("t.ack", "g", ["0"]) == 0  # never delivered, so not pending

    run_bus(scenario)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"visibility_timeout": -1.0}, "visibility_timeout_seconds"),
    ({"visibility_timeout": float("nan")}, "visibility_timeout_seconds"),
    ({"max_in_flight": -3}, "max_in_flight"),
    ({"consumer": "bad name"}, "consumer_name"),
])
def test_bad_group_options_are_rejected(run_bus, kwargs, field):
    async def scenario(bus: OonaBus):
        with pytest.raises(InvalidArgumentError) as info:
            bus.group_options("g", **kwargs)
        assert info.value.field == field

    run_bus(scenario)


def test_list_topics_reports_windows_and_groups(run_bus):
    async def scenario(bus: OonaBus):
        assert await bus.list_topics() == []
        await bus.publish("b.topic", b"1")
        await bus.publish("b.topic", b"2")
        await bus.join_group("a.topic", bus.group_options("g1"))
        await bus.join_group("b.topic", bus.group_options("g2"))
        topics = await bus.list_topics()
        assert [t.name for t in topics] == ["a.topic", "b.topic"]
        assert (topics[0].next_offset, topics[0].retained_messages, topics[0].consumer_groups) == (0, 0, ("g1",))
        assert (topics[1].first_offset, topics[1].next_offset, topics[1].retained_messages,
                topics[1].consumer_groups) == (0, 2, 2, ("g2",))

    run_bus(scenario)


def test_concurrent_publishers_keep_per_topic_order(run_bus):
    async def scenario(bus: OonaBus):
        sub = (await bus.subscribe("t.conc", StartPosition.EARLIEST)).messages()

        async def publisher(p: int):
            for i in range(300):
                await bus.publish("t.conc", f"{p}:{i}".encode())

        await asyncio.gather(*(publisher(p) for p in range(4)))
        got = await _collect(sub, 1200)
        assert [m.offset for m in got] == list(range(1200))
        last = {p: -1 for p in range(4)}
        for m in got:
            p, i = map(int, m.payload.decode().split(":"))
            assert i == last[p] + 1
            last[p] = i
        assert all(v == 299 for v in last.values())

    run_bus(scenario)


def test_cancelled_subscriptions_end_promptly(run_bus):
    """A subscriber that goes away must not leave a reading loop behind (redis-py can swallow a
    cancel landing as a blocking read times out; the bus re-raises it)."""

    async def scenario(bus: OonaBus):
        async def consume(sub):
            async for _ in sub.messages():
                pass

        tasks = []
        for i in range(12):
            if i % 2:
                sub = await bus.subscribe("t.cancel", StartPosition.LATEST)
            else:
                sub = await bus.join_group("t.cancel", bus.group_options("g", f"c{i}", visibility_timeout=0.2))
            tasks.append(asyncio.ensure_future(consume(sub)))
        for i, task in enumerate(tasks):
            await bus.publish("t.cancel", b"x")
            # Spread the cancels over the poll interval so some land as a blocking read returns.
            await asyncio.sleep(0.2 * i / len(tasks) + 0.01)
            task.cancel()
        done, pending = await asyncio.wait(tasks, timeout=5)
        assert not pending, f"{len(pending)} subscription loop(s) kept running after cancel"
        assert all(t.cancelled() for t in done)

    run_bus(scenario)


def test_publish_batch_keeps_order_across_topics_and_rejects_a_bad_batch_whole(run_bus):
    from esper.oona import OutgoingMessage

    async def scenario(bus: OonaBus):
        items = [("t.b1", OutgoingMessage(b"a")), ("t.b2", OutgoingMessage(b"b")), ("t.b1", OutgoingMessage(b"c"))]
        results = await bus.publish_batch(items)
        assert [(r.offset, r.message_id) for r in results] == [(0, "0"), (0, "0"), (1, "1")]
        assert [m.payload for m in await bus.backend.read("t.b1", 0, 10, 0)] == [b"a", b"c"]
        bad = [("t.b1", OutgoingMessage(b"d")), ("bad topic", OutgoingMessage(b"e"))]
        with pytest.raises(InvalidArgumentError, match=r"messages\[1\]") as info:
            await bus.publish_batch(bad)
        assert info.value.field == "messages[1].topic"
        assert await bus.backend.bounds("t.b1") == (0, 2), "nothing of a rejected batch is published"
        with pytest.raises(InvalidArgumentError, match="messages is empty"):
            await bus.publish_batch([])

    run_bus(scenario)
