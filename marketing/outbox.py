"""The outbox: where campaign messages wait for the external sender, written exactly once.

Towerline decides *who gets what*; a sender (an ESP, a push service, the site) delivers it. The two
meet here, in one of three places:

- ``ParquetOutbox(dir)``: one Parquet file per run that produced new messages; the sender reads the
  folder. The folder is also the ledger: ``history()`` is every message ever written there.
- ``RabbitMQOutbox("amqp://...")``: each message published once to a durable queue (persistent
  delivery, committed in transactions of ``RABBIT_BATCH`` messages) with ``message_id`` set to the message's id, so a consumer can
  de-duplicate too. RabbitMQ has no de-duplication of its own, so a Parquet ledger beside
  (``ledger`` folder) records what was published and a re-run publishes only what it lacks.
- ``NatsOutbox("nats://...")``: each message published once to a JetStream stream with the
  ``Nats-Msg-Id`` header, JetStream's de-duplication key (within the stream's duplicate window,
  two minutes by default). The same ledger covers re-runs after that window.

Message ids are a hash of (campaign, user, trigger moment), so re-running a campaign for the same
time produces the same ids, and every outbox drops ids it already holds: re-runs write nothing new.
The ledger is written after each publish batch, including a failed one (what reached the broker is
recorded), so a crash costs at most a republish that the broker key or the consumer absorbs.

URL options (query string, stripped before connecting): ``queue=`` for RabbitMQ (default
``towerline.campaigns``); ``stream=`` and ``subject=`` for NATS (default stream
``TOWERLINE_CAMPAIGNS`` over subjects ``towerline.campaigns.>``, messages on
``towerline.campaigns.<campaign>``). A missing queue or stream is created.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from towerline.errors import ConfigError, DataValidationError, TowerlineError

log = logging.getLogger(__name__)

# What the sender consumes: one row per message.
MESSAGE_SCHEMA = pa.schema(
    [
        ("message_id", pa.string()),  # hash of (campaign, user, trigger moment): the de-duplication key
        ("campaign", pa.string()),
        ("user_id", pa.string()),
        ("channel", pa.string()),  # push | email | sms | on-site
        ("items", pa.list_(pa.string())),  # item ids to show, best first
        ("offer", pa.string()),  # "10%", "5.00", or null for no offer
        ("offer_value", pa.float64()),  # the offer's number (NaN: none)
        ("reason", pa.string()),  # why the user got it, in words
        ("trigger", pa.string()),  # the trigger kind
        ("trigger_moment", pa.string()),  # the moment the id hashes (a day, or the launch time)
        ("segment", pa.string()),  # the user's lifecycle segment when the message was made
        ("send_at", pa.int64()),  # epoch seconds; later than created_at when quiet hours deferred it
        ("created_at", pa.int64()),  # epoch seconds: the run's --as-of time
    ]
)
MESSAGE_COLUMNS: list[str] = MESSAGE_SCHEMA.names

MESSAGES_GLOB = "part-*.parquet"  # the messages of a Parquet outbox (or a broker's ledger)
HOLDOUT_PREFIX = "_holdout-"  # the users runs held out, beside them
DEFAULT_QUEUE = "towerline.campaigns"
DEFAULT_STREAM = "TOWERLINE_CAMPAIGNS"
DEFAULT_SUBJECT = "towerline.campaigns"
CONNECT_TIMEOUT_S = 5.0
RABBIT_BATCH = 256  # RabbitMQ messages per transaction (one commit round trip per batch: ~8x per-message confirms)
NATS_IN_FLIGHT = 256  # JetStream publishes awaiting their acks at once (one round trip per window, not per message)


class Outbox(Protocol):
    """Somewhere messages are published exactly once; two real kinds (a folder, a broker)."""

    def history(self) -> pd.DataFrame:
        """Every message published so far (``MESSAGE_COLUMNS``): for de-duplication and frequency caps."""
        ...

    def publish(self, messages: pd.DataFrame) -> pd.DataFrame:
        """Publish the messages whose ids are new; returns those (the others were already out)."""
        ...

    def record_holdout(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Keep the rows a campaign held out (never sent) for its report; returns the new ones."""
        ...

    def holdout_history(self) -> pd.DataFrame:
        """Every holdout row recorded so far (``MESSAGE_COLUMNS``)."""
        ...


def empty_messages() -> pd.DataFrame:
    """A new empty frame with the message columns and types (a copy: callers may add to it)."""
    global _EMPTY
    if _EMPTY is None:  # Arrow -> pandas costs milliseconds; the service asks several times per signup batch
        _EMPTY = MESSAGE_SCHEMA.empty_table().to_pandas()
    return _EMPTY.copy()


_EMPTY: pd.DataFrame | None = None


def message_record(row: dict[str, Any]) -> dict[str, Any]:
    """One message as the JSON body a broker carries: NaN becomes null (strict JSON, which most
    consumers need), numbers plain Python."""
    out = {k: (None if _missing(row[k]) else row[k]) for k in MESSAGE_COLUMNS if k != "items"}
    out["items"] = [str(i) for i in row["items"]]
    out["offer_value"] = None if out["offer_value"] is None else float(out["offer_value"])
    out["send_at"], out["created_at"] = int(out["send_at"]), int(out["created_at"])
    return {k: out[k] for k in MESSAGE_COLUMNS}


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))



# ----------------------------------------------------------------------------------------------
# a folder of Parquet files


class ParquetOutbox:
    """A folder of Parquet files, one per run with new messages (``part-<campaign>-<as_of>-<hash>``).

    Beside them, ``_holdout-...`` files record the users each run held out (same columns, never to
    be sent): ``campaign report`` compares recipients with them. The leading ``_`` keeps them out of
    a sender reading the folder as one Parquet data set (Arrow and Spark skip ``_`` and ``.`` files)
    and out of ``history()``, so holdout users count towards no frequency cap.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        # files are written once, atomically, and never changed: each is read once per process
        # (the service publishes a small file per signup batch and reads the history before each)
        self._files: dict[tuple[Path, int], pd.DataFrame] = {}
        # per pattern: the files (in order) of the last answer and their rows in one frame, so a new
        # file costs one concat with it instead of re-concatenating every file (thousands a day)
        self._joined: dict[str, tuple[list[tuple[Path, int]], pd.DataFrame]] = {}

    def history(self) -> pd.DataFrame:
        return self._read(MESSAGES_GLOB)

    def holdout_history(self) -> pd.DataFrame:
        """Every holdout row recorded in the folder (``MESSAGE_COLUMNS``)."""
        return self._read(HOLDOUT_PREFIX + "*.parquet")

    def record_holdout(self, rows: pd.DataFrame) -> pd.DataFrame:
        if not len(rows):
            return drop_published(rows, empty_messages())
        with folder_lock(self.directory):
            new = drop_published(rows, self.holdout_history())
            if len(new):
                self.write(new, HOLDOUT_PREFIX)
        return new

    def _read(self, pattern: str) -> pd.DataFrame:
        files = sorted(self.directory.glob(pattern)) if self.directory.is_dir() else []
        if not files:
            return empty_messages()
        keys = []
        for f in files:
            try:
                key = (f, f.stat().st_size)
                if key not in self._files:
                    self._files[key] = pq.read_table(f, schema=MESSAGE_SCHEMA).to_pandas()
            except (pa.ArrowInvalid, OSError) as e:
                raise DataValidationError(f"{self.directory}: an outbox file is not a Towerline outbox: {e}") from None
            keys.append(key)
        done, joined = self._joined.get(pattern, ([], None))
        if joined is not None and keys[: len(done)] == done:  # only files after the last answer's: append them
            if len(keys) > len(done):
                joined = pd.concat([joined] + [self._files[k] for k in keys[len(done):]], ignore_index=True)
        else:
            joined = pd.concat([self._files[k] for k in keys], ignore_index=True)
        self._joined[pattern] = (keys, joined)
        return joined.copy()

    def publish(self, messages: pd.DataFrame) -> pd.DataFrame:
        if not len(messages):
            return drop_published(messages, empty_messages())
        with folder_lock(self.directory):  # another process's publish between history() and write() would duplicate
            new = drop_published(messages, self.history())
            if len(new):
                self.write(new)
        return new

    def write(self, messages: pd.DataFrame, prefix: str = "part-") -> Path:
        """Write ``messages`` as one new file, atomically (a reader never sees half a file)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        ids = "\n".join(sorted(messages["message_id"].astype(str)))
        digest = hashlib.sha256(ids.encode()).hexdigest()[:12]
        campaign = str(messages["campaign"].iloc[0]) if messages["campaign"].nunique() == 1 else "mixed"
        path = self.directory / f"{prefix}{campaign}-{int(messages['created_at'].max())}-{digest}.parquet"
        table = pa.Table.from_pandas(messages[MESSAGE_COLUMNS], schema=MESSAGE_SCHEMA, preserve_index=False)
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        log.info("outbox: %d messages -> %s", len(messages), path)
        return path


@contextmanager
def folder_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on ``directory`` (``.lock`` in it) across processes on this machine.

    A publish reads the history and then writes: the service's ingress replicas, and a nightly run
    beside them, must not interleave those two steps, or both would publish the same new id.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def drop_published(messages: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """``messages`` without ids already in ``history`` (and without repeats among themselves)."""
    seen = set(history["message_id"].astype(str)) if len(history) else set()
    keep = ~messages["message_id"].astype(str).isin(seen)
    return messages.loc[keep].drop_duplicates("message_id").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# brokers


def split_url(url: str, options: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """``amqp://h/?queue=q&heartbeat=30`` -> (``amqp://h/?heartbeat=30``, ``{"queue": "q"}``)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    ours = {k: v[-1] for k, v in query.items() if k in options}
    rest = urlencode([(k, x) for k, v in query.items() if k not in options for x in v])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, rest, parts.fragment)), ours


def redact(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class _LedgeredOutbox:
    """A broker outbox whose published ids are kept in a Parquet ledger folder."""

    def __init__(self, url: str, ledger: str | Path) -> None:
        self.url = url
        self.ledger = ParquetOutbox(ledger)

    def history(self) -> pd.DataFrame:
        return self.ledger.history()

    def record_holdout(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Holdout rows go to the ledger folder only: nothing held out reaches the broker."""
        return self.ledger.record_holdout(rows)

    def holdout_history(self) -> pd.DataFrame:
        return self.ledger.holdout_history()

    def publish(self, messages: pd.DataFrame) -> pd.DataFrame:
        if not len(messages):
            return drop_published(messages, empty_messages())
        with folder_lock(self.ledger.directory):
            return self._publish_new(messages)

    def _publish_new(self, messages: pd.DataFrame) -> pd.DataFrame:
        new = drop_published(messages, self.history())
        if not len(new):
            return new
        records = [message_record(r) for r in new.to_dict("records")]  # (fails before publishing, not midway)
        done: list[str] = []  # ids the broker confirmed, in order: recorded even when a later one fails
        try:
            self._send(records, done)
        except TowerlineError:
            raise
        except Exception as e:  # the broker went away mid-run: say how far it got, keep what it has
            raise TowerlineError(
                f"--outbox {redact(self.url)}: publishing stopped after {len(done)} of {len(records)} messages "
                f"({type(e).__name__}: {e}); those are in the ledger, re-run to publish the rest"
            ) from e
        finally:
            out = new.loc[new["message_id"].isin(set(done))].reset_index(drop=True)
            if len(out):
                self.ledger.write(out)
        log.info("outbox %s: %d messages published", redact(self.url), len(out))
        return out

    def _send(self, records: list[dict[str, Any]], done: list[str]) -> None:
        """Publish ``records``, appending each message's id to ``done`` once the broker confirmed it."""
        raise NotImplementedError


class RabbitMQOutbox(_LedgeredOutbox):
    """Publishes to a durable RabbitMQ queue in committed batches; ``message_id`` = the message's id.

    Transactions, not per-message publisher confirms: on a blocking connection a confirm costs a
    round trip per message (550 messages/s here), a commit one per batch (about 4,000/s).
    """

    def __init__(self, url: str, ledger: str | Path) -> None:
        super().__init__(url, ledger)
        self.amqp_url, opts = split_url(url, ("queue",))
        self.queue = opts.get("queue") or DEFAULT_QUEUE

    def _send(self, records: list[dict[str, Any]], done: list[str]) -> None:
        import pika
        from pika.exceptions import AMQPError

        params = pika.URLParameters(self.amqp_url)
        params.socket_timeout = params.blocked_connection_timeout = CONNECT_TIMEOUT_S
        try:
            conn = pika.BlockingConnection(params)
        except AMQPError as e:
            raise ConfigError(f"--outbox {redact(self.url)}: cannot connect to RabbitMQ ({type(e).__name__}: {e})") from None
        try:
            channel = conn.channel()
            channel.queue_declare(self.queue, durable=True)
            channel.tx_select()  # a batch counts as published once tx_commit returns: the broker has it
            for lo in range(0, len(records), RABBIT_BATCH):
                chunk = records[lo : lo + RABBIT_BATCH]
                for rec in chunk:
                    props = pika.BasicProperties(
                        message_id=rec["message_id"], content_type="application/json", delivery_mode=2,
                        timestamp=rec["created_at"], type="campaign_message", headers={"campaign": rec["campaign"]},
                    )
                    channel.basic_publish("", self.queue, json.dumps(rec, allow_nan=False).encode(), props)
                channel.tx_commit()
                done.extend(rec["message_id"] for rec in chunk)
        finally:
            conn.close()


class NatsOutbox(_LedgeredOutbox):
    """Publishes to a NATS JetStream stream; ``Nats-Msg-Id`` = the message's id (server-side de-dup)."""

    def __init__(self, url: str, ledger: str | Path) -> None:
        super().__init__(url, ledger)
        self.nats_url, opts = split_url(url, ("stream", "subject"))
        self.stream = opts.get("stream") or DEFAULT_STREAM
        self.subject = opts.get("subject") or DEFAULT_SUBJECT

    def _send(self, records: list[dict[str, Any]], done: list[str]) -> None:
        asyncio.run(self._send_async(records, done))

    async def _send_async(self, records: list[dict[str, Any]], done: list[str]) -> None:
        from nats.js.errors import NotFoundError

        try:
            nc = await connect_nats(self.nats_url)
        except Exception as e:  # nats-py raises several unrelated types for "no server"
            raise ConfigError(f"--outbox {redact(self.url)}: cannot connect to NATS ({type(e).__name__}: {e})") from None
        try:
            js = nc.jetstream(timeout=CONNECT_TIMEOUT_S)
            await check_jetstream(js, self.url)
            try:
                await js.stream_info(self.stream)
            except NotFoundError:
                await js.add_stream(name=self.stream, subjects=[f"{self.subject}.>"])
                log.info("NATS: created stream %s over %s.>", self.stream, self.subject)
            for lo in range(0, len(records), NATS_IN_FLIGHT):  # a window of publishes awaiting their acks
                chunk = records[lo : lo + NATS_IN_FLIGHT]
                acks = await asyncio.gather(*(
                    js.publish(f"{self.subject}.{rec['campaign']}", json.dumps(rec, allow_nan=False).encode(),
                               stream=self.stream, headers={"Nats-Msg-Id": rec["message_id"]})
                    for rec in chunk
                ), return_exceptions=True)
                failed = [a for a in acks if isinstance(a, BaseException)]
                done.extend(rec["message_id"] for rec, a in zip(chunk, acks) if not isinstance(a, BaseException))
                dup = sum(1 for a in acks if not isinstance(a, BaseException) and a.duplicate)
                if dup:
                    log.info("NATS: %d messages were already in stream %s (de-duplicated by Nats-Msg-Id)", dup, self.stream)
                if failed:
                    raise failed[0]
        finally:
            await nc.close()


async def connect_nats(url: str) -> Any:
    """A NATS connection that fails within ``CONNECT_TIMEOUT_S`` instead of retrying for ever.

    (nats-py reads ``max_reconnect_attempts=0`` as "no limit", and logs a traceback per attempt.)
    """
    import nats

    async def on_error(e: Exception) -> None:
        log.debug("NATS %s: %s", redact(url), e)

    return await asyncio.wait_for(
        nats.connect(url, connect_timeout=CONNECT_TIMEOUT_S, allow_reconnect=False, max_reconnect_attempts=1,
                     error_cb=on_error),
        2 * CONNECT_TIMEOUT_S,
    )


async def check_jetstream(js: Any, url: str) -> None:
    """Raise ``ConfigError`` when the server answers without JetStream (no stream could keep messages)."""
    from nats.errors import NoRespondersError, TimeoutError as NatsTimeout
    from nats.js.errors import ServiceUnavailableError

    try:
        await js.account_info()
    except (NoRespondersError, ServiceUnavailableError, NatsTimeout):
        raise ConfigError(f"--outbox {redact(url)}: the NATS server has JetStream disabled (start nats-server with -js)") from None


def open_outbox(target: str | Path, ledger: str | Path | None = None) -> Outbox:
    """``--outbox`` -> an outbox: a folder path, ``amqp://...`` (RabbitMQ) or ``nats://...`` (JetStream).

    Brokers need ``ledger`` (a folder) for the ids they have published; default ``outbox-ledger``.
    """
    text = str(target)
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    if scheme in ("amqp", "amqps"):
        _need("pika", text)
        return RabbitMQOutbox(text, ledger or "outbox-ledger")
    if scheme in ("nats", "tls"):
        _need("nats", text)
        return NatsOutbox(text, ledger or "outbox-ledger")
    if scheme:
        raise ConfigError(f"--outbox {redact(text)}: unknown scheme '{scheme}'; give a folder, amqp://... or nats://...")
    return ParquetOutbox(text)


def _need(module: str, url: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pkg = {"pika": "pika", "nats": "nats-py"}[module]
        raise ConfigError(f"--outbox {redact(url)} needs {pkg}: pip install 'towerline[campaigns]'")


def as_messages(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame``'s message columns in schema order and types (an empty frame keeps the columns)."""
    if not len(frame):
        return empty_messages()
    out = frame[MESSAGE_COLUMNS].copy()
    out["offer_value"] = out["offer_value"].astype(np.float64)
    for c in ("send_at", "created_at"):
        out[c] = out[c].astype(np.int64)
    return out.reset_index(drop=True)
