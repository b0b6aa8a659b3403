"""Immediate campaign triggers: signups posted to ``POST /events`` become messages within a second.

The nightly ``towerline campaign run`` evaluates every trigger over the event log; a welcome message
is worth most in the minutes after the signup, so the service also evaluates the *immediate*
triggers (``signup`` with ``days: 0``) on each batch of events it accepts. The decision is the
batch run's, written once in ``marketing.campaigns.plan_for_events`` (eligibility, consent per
channel, segments, holdout, frequency caps, quiet hours, deterministic message ids), and the
content comes from the replica's own ``Recommender`` (``recommend_async``: the ``/recommend`` path
with its business rules, consent and popular fallback). The same message ids as the batch run's
mean a nightly run later that day, another replica, or a re-posted batch publish nothing twice
(``Outbox.publish`` drops ids it holds, under a lock shared by every process on the machine).

Why a background queue: ``/events`` is the hot write path, and a campaign decision reads the
outbox's history and writes a Parquet file or talks to a broker. The handler only puts the batch's
signup events on a bounded ``asyncio.Queue`` (microseconds) and answers; one worker task per
replica drains it. A full queue drops the batch with a warning (the nightly run's ``window_days``
still catches those users), and a failing outbox or campaign is logged, never a 500.

Where the second goes (profiled on the shared 2-core box, load 8-10, tiny bundle): a decision costs
~150 ms of small pandas steps (trigger ~30 ms, eligibility and caps ~60 ms, the content's user-tower
pass on the replica's loop ~50 ms), the publish ~25 ms (history re-read under the lock, Parquet
write ~15 ms). A signup arriving during a decision waits for it, so its latency is up to two
decisions. The outbox's history used to be re-concatenated from every file on each read (twice per
decision, growing with every file the service wrote); ``ParquetOutbox`` now keeps it joined.
Prefetching each signup's content at submit was tried and dropped: it put the tower pass in front of
the next ``/events`` request on the loop and, measured, made both that request and the messages slower.

Consent: marketing is opt-in. A user's consent rows come from ``campaign_users`` (a users table,
re-read when the file changes, for users who signed up after the model was trained) over the
served bundle's ``users.parquet``; a user found in neither gets no message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from towerline.errors import ConfigError
from towerline.features.contracts import Event
from towerline.features.readers import read_users
from towerline.marketing.campaign_config import CampaignConfig, find_campaign
from towerline.marketing.campaigns import HOLDOUT, SEND, SIGNUP, plan_for_events
from towerline.marketing.outbox import Outbox, as_messages, empty_messages, open_outbox, redact
from towerline.serving.settings import ServeSettings

log = logging.getLogger(__name__)

CLOCK_SKEW_S = 300  # a signup stamped up to this far ahead of the server's clock still fires now


def immediate(campaign: CampaignConfig) -> bool:
    """Does the campaign fire the moment its trigger happens (what ``/events`` can evaluate)?"""
    return campaign.trigger.kind == SIGNUP and campaign.trigger.days == 0


def load_immediate_campaigns(settings: ServeSettings) -> list[CampaignConfig]:
    """The campaigns ``settings.campaigns`` names, each checked to have an immediate trigger."""
    out = []
    for name in settings.campaigns:
        try:
            c = find_campaign(name, settings.campaign_dir)
        except ConfigError as e:  # the folder's own hint names the CLI flag; here it is a setting
            raise ConfigError(f"serve setting 'campaigns': {str(e).replace('pass --campaigns DIR', 'set campaign_dir')}") from None
        if not immediate(c):
            raise ConfigError(
                f"serve setting 'campaigns': campaign '{c.name}' has a {c.trigger.kind} trigger (days {c.trigger.days}); "
                "only signup with days: 0 fires from POST /events; run the others with `towerline campaign run`"
            )
        out.append(c)
    return out


class CampaignTriggers:
    """One replica's immediate campaigns: ``submit`` from the handler, a worker task does the rest."""

    def __init__(self, settings: ServeSettings, recommender: Any, profiles: pd.DataFrame | None = None) -> None:
        self.campaigns = load_immediate_campaigns(settings)
        self.outbox: Outbox = open_outbox(str(settings.campaign_outbox), settings.campaign_ledger)
        self.target = redact(str(settings.campaign_outbox))
        self.recommender = recommender  # .state (swapped by reload) and .recommend_async
        self.profiles = profiles  # segments for campaigns that filter on them
        self.users_path = Path(settings.campaign_users) if settings.campaign_users else None
        self.queue_size = settings.campaign_queue
        self.loop: asyncio.AbstractEventLoop | None = None  # created on the replica's loop, at the first signup
        self.queue: asyncio.Queue[list[Event]] | None = None
        self.worker: asyncio.Task[None] | None = None
        self._users: tuple[Any, pd.DataFrame] | None = None  # ((file mtime, bundle path), table)
        self.published = 0  # messages this replica published (tests, logs)
        self.dropped = 0  # batches lost to a full queue
        log.info("campaigns %s fire from POST /events into %s", [c.name for c in self.campaigns], self.target)

    @classmethod
    def from_settings(cls, settings: ServeSettings, recommender: Any, profiles: pd.DataFrame | None = None
                      ) -> "CampaignTriggers | None":
        """The replica's triggers, or None when the settings name no campaign."""
        return cls(settings, recommender, profiles) if settings.campaigns else None

    def submit(self, events: Sequence[Event]) -> None:
        """Queue the batch's signup events for the worker; never raises, never waits."""
        try:
            signups = [e for e in events if e.event_type == SIGNUP]
            if not signups:
                return
            loop = asyncio.get_running_loop()
            if self.loop is not loop:  # the queue and worker live on the loop that serves (Serve keeps one)
                self.loop, self.queue, self.worker = loop, asyncio.Queue(self.queue_size), None
            if self.worker is None or self.worker.done():
                self.worker = loop.create_task(self._work())
            self.queue.put_nowait(signups)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("campaign triggers: queue full (%d batches), %d signups left to the nightly campaign run",
                        self.queue_size, len(signups))
        except Exception:
            log.exception("campaign triggers: could not queue %d events", len(events))

    async def _work(self) -> None:
        """Drain the queue for ever: each pass takes every batch waiting, so a burst costs one decision."""
        assert self.queue is not None
        while True:
            batch = await self.queue.get()
            while not self.queue.empty():
                batch = batch + self.queue.get_nowait()
            try:
                await self.process(batch)
            except Exception:  # the campaign or the outbox failed: the events are stored, the nightly run retries
                log.exception("campaign triggers: %d signups not messaged (outbox %s)", len(batch), self.target)

    async def process(self, events: Sequence[Event]) -> pd.DataFrame:
        """Decide and publish the messages ``events`` fire; returns the ones newly published."""
        loop = asyncio.get_running_loop()

        def recommend(user_ids: Sequence[str], k: int) -> list[list[str]]:
            """The sync callable the campaign engine takes, answered on the replica's loop."""
            futures = [asyncio.run_coroutine_threadsafe(self.recommender.recommend_async(str(u), k), loop)
                       for u in user_ids]
            return [[item for item, _ in f.result(timeout=30).items] for f in futures]

        published = await asyncio.to_thread(self._decide_and_publish, events, recommend)
        self.published += len(published)
        if len(published):
            log.info("campaign triggers: %d messages -> %s", len(published), self.target)
        return published

    def _decide_and_publish(self, events: Sequence[Event], recommend: Any) -> pd.DataFrame:
        clock = int(time.time())
        newest = max((int(e.timestamp) for e in events if e.timestamp is not None), default=clock)
        now = max(clock, min(newest, clock + CLOCK_SKEW_S))  # a client clock slightly ahead is not "future"
        users = self.users()
        ids = {e.user_id for e in events}
        users = users.loc[users["user_id"].astype(str).isin(ids)]
        plan = plan_for_events(self.campaigns, list(events), users, self.outbox.history(), now=now,
                               recommend=recommend, profiles=self.profiles)
        if not len(plan):
            return empty_messages()
        published = self.outbox.publish(as_messages(plan.loc[plan["status"] == SEND]))
        self.outbox.record_holdout(as_messages(plan.loc[plan["status"] == HOLDOUT]))  # the report's control group
        return published

    def users(self) -> pd.DataFrame:
        """Consent rows: ``campaign_users`` (re-read when it changes) over the served bundle's users."""
        bundle_dir = Path(self.recommender.state.bundle.path)
        mtime = self.users_path.stat().st_mtime_ns if self.users_path and self.users_path.is_file() else None
        key = (mtime, str(bundle_dir))
        if self._users is None or self._users[0] != key:
            frames = []
            known = bundle_dir / "users.parquet"
            if known.is_file():
                frames.append(pd.read_parquet(known))
            if self.users_path is not None:
                if mtime is None:
                    log.warning("campaign_users %s not found: consent from the model's users only", self.users_path)
                else:
                    frames.append(read_users(self.users_path))
            table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"user_id": [], "consent": []})
            table = table.assign(user_id=table["user_id"].astype(str)).drop_duplicates("user_id", keep="last")
            self._users = (key, table.reset_index(drop=True))
        return self._users[1]
