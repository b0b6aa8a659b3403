"""Outboxes: a Parquet folder, RabbitMQ and NATS JetStream, each publishing a message once.

The broker tests publish to and consume from the real servers on 127.0.0.1 (RabbitMQ on 5672 as
guest/guest, NATS on 4222), each in a queue or stream of its own that is deleted afterwards, with
bounded waits; they skip, saying why, where no server answers (or NATS runs without JetStream).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid

import numpy as np
import pandas as pd
import pytest

from towerline.errors import ConfigError
from towerline.marketing.campaigns import message_id
from towerline.marketing.outbox import (
    MESSAGE_COLUMNS,
    NatsOutbox,
    ParquetOutbox,
    RabbitMQOutbox,
    open_outbox,
    redact,
    split_url,
)

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
NATS_URL = "nats://127.0.0.1:4222"
WAIT_S = 10.0


def messages(n: int, campaign: str = "welcome", created_at: int = 1_740_000_000) -> pd.DataFrame:
    users = [f"u{i:03d}" for i in range(n)]
    return pd.DataFrame({
        "message_id": [message_id(campaign, u, "2025-03-03") for u in users],
        "campaign": campaign, "user_id": users, "channel": "email",
        "items": [[f"i{i}", f"i{i + 1}"] for i in range(n)],
        "offer": ["10%"] * (n - 1) + [None] if n else [], "offer_value": [10.0] * (n - 1) + [np.nan] if n else [],
        "reason": "signed up on 2025-03-03", "trigger": "signup", "trigger_moment": "2025-03-03",
        "segment": "new", "send_at": created_at, "created_at": created_at,
    }, columns=MESSAGE_COLUMNS)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_parquet_outbox_writes_each_message_once(tmp_path):
    box = ParquetOutbox(tmp_path / "outbox")
    assert box.history().columns.tolist() == MESSAGE_COLUMNS and box.history().empty
    assert len(box.publish(messages(3))) == 3
    assert len(box.publish(messages(5))) == 2  # the first three are already out
    assert box.publish(messages(5)).empty
    hist = box.history()
    assert len(hist) == 5 and hist["message_id"].is_unique
    assert len(list((tmp_path / "outbox").glob("part-*.parquet"))) == 2
    assert not list((tmp_path / "outbox").glob("*.tmp"))
    back = pd.read_parquet(tmp_path / "outbox").sort_values("user_id")
    assert list(back["items"].iloc[0]) == ["i0", "i1"] and pd.isna(back["offer"].iloc[-1])


def test_history_kept_between_reads_matches_a_fresh_read_of_the_folder(tmp_path):
    """The service reads the history before every signup batch; it is kept joined between reads,
    and a file from another process (another replica, the nightly run) is picked up wherever it sorts."""
    box = ParquetOutbox(tmp_path / "outbox")
    box.publish(messages(3, campaign="welcome"))
    first = box.history()
    first.loc[0, "user_id"] = "changed by a caller"  # a caller's edit never reaches the next read
    box.publish(messages(4, created_at=1_740_000_100))  # a later file: appended to the joined frame
    ParquetOutbox(tmp_path / "outbox").publish(messages(2, campaign="a-nightly-run"))  # sorts before: a full re-read
    kept, fresh = box.history(), ParquetOutbox(tmp_path / "outbox").history()
    assert len(kept) == 6 and "changed by a caller" not in set(kept["user_id"])
    pd.testing.assert_frame_equal(kept, fresh)


def test_outbox_targets_are_folders_or_broker_urls(tmp_path):
    assert isinstance(open_outbox(tmp_path / "o"), ParquetOutbox)
    assert isinstance(open_outbox(RABBIT_URL, tmp_path / "l"), RabbitMQOutbox)
    assert isinstance(open_outbox(NATS_URL, tmp_path / "l"), NatsOutbox)
    with pytest.raises(ConfigError, match="unknown scheme 'kafka'"):
        open_outbox("kafka://127.0.0.1:9092")
    assert split_url("amqp://h/%2F?queue=q&heartbeat=30", ("queue",)) == ("amqp://h/%2F?heartbeat=30", {"queue": "q"})
    assert redact("amqp://guest:secret@h:5672/x") == "amqp://guest:***@h:5672/x"


def test_an_unreachable_broker_is_one_clear_error(tmp_path):
    pytest.importorskip("pika")
    pytest.importorskip("nats")
    with pytest.raises(ConfigError, match="cannot connect to RabbitMQ"):
        open_outbox("amqp://guest:guest@127.0.0.1:1/%2F", tmp_path / "l").publish(messages(1))
    with pytest.raises(ConfigError, match="cannot connect to NATS"):
        open_outbox("nats://127.0.0.1:1", tmp_path / "l").publish(messages(1))
    assert ParquetOutbox(tmp_path / "l").history().empty  # nothing recorded as published


# ----------------------------------------------------------------------------------------------
# RabbitMQ


@pytest.fixture
def rabbit_queue():
    """A queue name of this test's own on the local RabbitMQ, deleted afterwards."""
    pika = pytest.importorskip("pika", reason="pika is not installed: pip install -e '.[test]'")
    if not listening(5672):
        pytest.skip("no RabbitMQ on 127.0.0.1:5672")

    name = f"towerline-test-{uuid.uuid4().hex[:10]}"
    yield name
    conn = pika.BlockingConnection(pika.URLParameters(RABBIT_URL))
    try:
        conn.channel().queue_delete(name)
    finally:
        conn.close()


def consume_rabbit(queue: str, expect: int) -> list[tuple[object, dict]]:
    """Messages from ``queue`` (properties, body) until ``expect`` arrived or WAIT_S passed, then
    a short grace period to catch any extra (duplicate) message."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(RABBIT_URL))
    got: list[tuple[object, dict]] = []
    try:
        ch = conn.channel()
        deadline = time.monotonic() + WAIT_S
        grace = None
        while time.monotonic() < (grace or deadline):
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                if len(got) >= expect and grace is None:
                    grace = time.monotonic() + 0.5
                time.sleep(0.05)
                continue
            got.append((props, json.loads(body)))
    finally:
        conn.close()
    return got


def test_rabbitmq_outbox_publishes_each_message_once_with_its_id(rabbit_queue, tmp_path):
    box = open_outbox(f"{RABBIT_URL}?queue={rabbit_queue}", tmp_path / "ledger")
    msgs = messages(4)
    assert len(box.publish(msgs)) == 4
    assert box.publish(msgs).empty  # re-run: the ledger knows they are out
    assert len(open_outbox(f"{RABBIT_URL}?queue={rabbit_queue}", tmp_path / "ledger").publish(messages(5))) == 1

    got = consume_rabbit(rabbit_queue, expect=5)
    assert len(got) == 5
    ids = [props.message_id for props, _ in got]
    assert sorted(ids) == sorted(messages(5)["message_id"]) and len(set(ids)) == 5
    props, body = got[0]
    assert props.content_type == "application/json" and props.delivery_mode == 2
    assert body["message_id"] == props.message_id and body["items"] == ["i0", "i1"] and body["offer"] == "10%"
    last = next(b for _, b in got if b["user_id"] == "u003")
    assert last["offer"] is None and last["offer_value"] is None  # NaN travels as null
    assert len(ParquetOutbox(tmp_path / "ledger").history()) == 5


# ----------------------------------------------------------------------------------------------
# NATS JetStream


async def _js(coro_fn):
    from towerline.marketing.outbox import connect_nats

    nc = await connect_nats(NATS_URL)
    try:
        return await coro_fn(nc.jetstream(timeout=WAIT_S))
    finally:
        await nc.close()


@pytest.fixture
def nats_stream():
    """(stream, subject prefix) of this test's own on the local NATS, deleted afterwards."""
    pytest.importorskip("nats", reason="nats-py is not installed: pip install -e '.[test]'")
    if not listening(4222):
        pytest.skip("no NATS server on 127.0.0.1:4222")
    from nats.js.errors import ServiceUnavailableError
    from nats.errors import NoRespondersError, TimeoutError as NatsTimeout

    async def check(js):
        await js.account_info()

    try:
        asyncio.run(_js(check))
    except (NoRespondersError, ServiceUnavailableError, NatsTimeout):
        pytest.skip("the NATS server on 127.0.0.1:4222 runs without JetStream (-js)")
    tag = uuid.uuid4().hex[:10]
    stream, subject = f"TOWERLINE_TEST_{tag.upper()}", f"towerline.test.{tag}"
    yield stream, subject

    async def delete(js):
        from nats.js.errors import NotFoundError

        try:
            await js.delete_stream(stream)
        except NotFoundError:
            pass

    asyncio.run(_js(delete))


def consume_nats(stream: str, subject: str) -> list:
    """Every message in the stream (an ephemeral pull consumer, bounded wait)."""
    async def pull(js):
        info = await js.stream_info(stream)
        n = info.state.messages
        if not n:
            return []
        sub = await js.pull_subscribe(f"{subject}.>", stream=stream)
        out = []
        deadline = time.monotonic() + WAIT_S
        while len(out) < n and time.monotonic() < deadline:
            try:
                batch = await sub.fetch(n - len(out), timeout=1)
            except Exception:  # nats.errors.TimeoutError: nothing yet
                continue
            for m in batch:
                await m.ack()
                out.append(m)
        await sub.unsubscribe()
        return [(m.subject, dict(m.headers or {}), json.loads(m.data)) for m in out]

    return asyncio.run(_js(pull))


def test_nats_outbox_publishes_each_message_once_with_nats_msg_id(nats_stream, tmp_path):
    stream, subject = nats_stream
    url = f"{NATS_URL}?stream={stream}&subject={subject}"
    box = open_outbox(url, tmp_path / "ledger")
    msgs = messages(4)
    assert len(box.publish(msgs)) == 4  # the stream is created on first use
    assert box.publish(msgs).empty

    # a lost ledger (crash between publish and record): JetStream drops the repeats by Nats-Msg-Id
    assert len(open_outbox(url, tmp_path / "other-ledger").publish(messages(5))) == 5

    got = consume_nats(stream, subject)
    assert len(got) == 5
    assert sorted(h["Nats-Msg-Id"] for _, h, _ in got) == sorted(messages(5)["message_id"])
    subj, headers, body = got[0]
    assert subj == f"{subject}.welcome" and body["message_id"] == headers["Nats-Msg-Id"]
    assert body["items"] == ["i0", "i1"]


# ----------------------------------------------------------------------------------------------
# through the CLI


VIEWED = """name: viewed-cli
trigger: {kind: view_without_purchase, days: 1}
content: {kind: viewed_item, k: 1}
offer: {kind: fixed, unit: percent, value: 10}
channels: [push, email]
holdout: 0.0
eligibility:
  quiet_hours: {start: null}
"""


@pytest.fixture
def viewed_shop(tmp_path):
    """A data folder where 30 users viewed an item on 2025-03-03 and did not buy it; 5 refused
    consent and 5 refused push (they get email); plus the campaign file."""
    users = [f"u{i:02d}" for i in range(30)]
    t = int(pd.Timestamp("2025-03-03T10:00Z").timestamp())
    folder = tmp_path / "shop"
    folder.mkdir()
    pd.DataFrame({"user_id": users, "item_id": [f"i{i % 7}" for i in range(30)], "timestamp": t,
                  "event_type": "view"}).to_parquet(folder / "events.parquet")
    pd.DataFrame({"user_id": users, "consent": [i >= 5 for i in range(30)],
                  "consent_push": [not 5 <= i < 10 for i in range(30)]}).to_parquet(folder / "users.parquet")
    campaign = tmp_path / "viewed-cli.yaml"
    campaign.write_text(VIEWED)
    return folder, campaign


def cli_run(shop, campaign, outbox: str, ledger) -> list[str]:
    return ["campaign", "run", str(campaign), "--data", str(shop), "--as-of", "2025-03-04T09:00",
            "--outbox", outbox, "--ledger", str(ledger)]


def test_cli_run_publishes_to_rabbitmq_once(viewed_shop, rabbit_queue, tmp_path, capsys):
    from towerline.cli import main

    shop, campaign = viewed_shop
    url = f"{RABBIT_URL}?queue={rabbit_queue}"
    assert main(cli_run(shop, campaign, url, tmp_path / "ledger")) == 0
    first = capsys.readouterr()
    assert "published 25 new messages" in first.out
    assert "guest:guest" not in first.out + first.err  # the password is never printed or logged
    assert main(cli_run(shop, campaign, url, tmp_path / "ledger")) == 0
    assert "published 0 new messages" in capsys.readouterr().out
    got = consume_rabbit(rabbit_queue, expect=25)
    assert len(got) == 25 and len({p.message_id for p, _ in got}) == 25
    channels = {b["user_id"]: b["channel"] for _, b in got}
    assert all(channels[f"u{i:02d}"] == "email" for i in range(5, 10)) and channels["u10"] == "push"


def test_cli_run_publishes_to_nats_jetstream_once(viewed_shop, nats_stream, tmp_path, capsys):
    from towerline.cli import main

    shop, campaign = viewed_shop
    stream, subject = nats_stream
    url = f"{NATS_URL}?stream={stream}&subject={subject}"
    assert main(cli_run(shop, campaign, url, tmp_path / "ledger")) == 0
    assert main(cli_run(shop, campaign, url, tmp_path / "ledger")) == 0
    assert "published 0 new messages" in capsys.readouterr().out
    got = consume_nats(stream, subject)
    assert len(got) == 25 and {b["items"][0] for _, _, b in got} <= {f"i{i}" for i in range(7)}
    assert all(b["offer"] == "10%" for _, _, b in got)
