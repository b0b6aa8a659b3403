"""Signup campaigns fired from ``POST /events`` (``serving/campaign_triggers.py``), in-process.

The ingress's own FastAPI app over the tiny bundle (no Ray): a signup posted to ``/events`` puts a
message in the Parquet outbox within a second, with content from the replica's recommender, consent
from the ``campaign_users`` table, and nothing twice for a re-post. The same path on a real Serve
app (two ingress replicas, the Retriever deployment) is in ``test_app_marketing.py``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from http_support import in_process_app

from towerline.errors import ConfigError
from towerline.marketing.campaigns import message_id
from towerline.marketing.outbox import ParquetOutbox
from towerline.serving.settings import settings_from

WELCOME = """name: welcome-now
trigger: {kind: signup, days: 0}
content: {kind: recommendations, k: 3}
eligibility:
  frequency_cap: {per_user: 0, per_campaign: 1, per_campaign_days: 365}
  quiet_hours: {start: null}
offer: {kind: fixed, unit: percent, value: 10}
channels: [email, push]
holdout: 0.0
"""


def campaign_settings(tmp: Path) -> dict:
    """A signup campaign, an outbox folder and a users table (one consenting user, one not)."""
    (tmp / "campaigns").mkdir(exist_ok=True)
    (tmp / "campaigns" / "welcome-now.yaml").write_text(WELCOME)
    (tmp / "users.csv").write_text("user_id,consent,consent_email\nnew-1,true,true\nnew-2,true,false\nshy,false,true\n")
    return {"campaigns": ["welcome-now"], "campaign_dir": str(tmp / "campaigns"),
            "campaign_outbox": str(tmp / "outbox"), "campaign_users": str(tmp / "users.csv")}


def wait_for(outbox: ParquetOutbox, n: int, timeout: float = 1.0):
    """The outbox's messages once it holds ``n`` (or whatever it holds after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = outbox.history()
        if len(h) >= n:
            return h
        time.sleep(0.02)
    return outbox.history()


@pytest.fixture(scope="module")
def app(tiny_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triggers")
    replica, app = in_process_app(tiny_run, tmp, **campaign_settings(tmp))
    yield replica, app, tmp
    replica.close()


def test_a_posted_signup_is_messaged_within_a_second_and_a_repost_adds_nothing(app):
    replica, http, tmp = app
    outbox = ParquetOutbox(tmp / "outbox")
    signup = [{"user_id": u, "item_id": "-", "event_type": "signup", "event_id": f"signup-{u}"}
              for u in ("new-1", "new-2", "shy", "stranger")]
    with TestClient(http) as client:
        t0 = time.monotonic()
        resp = client.post("/events", json=signup)
        assert resp.status_code == 200 and resp.json()["accepted"] == 4
        got = wait_for(outbox, 2)
        assert time.monotonic() - t0 < 1.0, "the messages took longer than a second"
        # consent: "shy" said no, "stranger" is in no users table; new-2 has no email consent: push
        assert sorted(zip(got["user_id"], got["channel"])) == [("new-1", "email"), ("new-2", "push")]
        day = time.strftime("%Y-%m-%d", time.gmtime())
        assert set(got["message_id"]) == {message_id("welcome-now", u, day) for u in ("new-1", "new-2")}
        assert all(len(items) == 3 for items in got["items"]) and set(got["offer"]) == {"10%"}
        popular = [i for i, _ in replica.recommender.recommend("new-1", 3).items]
        assert list(got.set_index("user_id").loc["new-1", "items"]) == popular  # the /recommend path's answer

        again = client.post("/events", json=signup[:1] + [{**signup[1], "event_id": "signup-new-2-again"}])
        assert again.status_code == 200
        time.sleep(0.5)
        assert len(outbox.history()) == 2 and len(list((tmp / "outbox").glob("part-*.parquet"))) == 1


def test_a_failing_outbox_is_logged_and_events_still_succeed(tiny_run, tmp_path, caplog):
    settings = campaign_settings(tmp_path)
    (tmp_path / "outbox").write_text("a file where the outbox folder should be")
    replica, http = in_process_app(tiny_run, tmp_path, **settings)
    try:
        with caplog.at_level(logging.ERROR, logger="towerline.serving.campaign_triggers"), TestClient(http) as client:
            resp = client.post("/events", json=[{"user_id": "new-1", "item_id": "-", "event_type": "signup"}])
            assert resp.status_code == 200 and resp.json()["accepted"] == 1
            deadline = time.monotonic() + 2
            while not caplog.records and time.monotonic() < deadline:
                time.sleep(0.02)
        assert any("not messaged" in r.getMessage() for r in caplog.records)
    finally:
        replica.close()


def test_campaign_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="campaign_outbox"):
        settings_from(campaigns=["welcome"])
    s = campaign_settings(tmp_path)
    (tmp_path / "campaigns" / "later.yaml").write_text("name: later\ntrigger: {kind: purchase, days: 3}\n")
    from towerline.serving.campaign_triggers import load_immediate_campaigns

    assert [c.name for c in load_immediate_campaigns(settings_from(s))] == ["welcome-now"]
    with pytest.raises(ConfigError, match="'later' has a purchase trigger"):
        load_immediate_campaigns(settings_from({**s, "campaigns": ["later"]}))


def test_held_out_signups_are_recorded_beside_the_outbox_never_sent(app, tmp_path):
    import asyncio

    from towerline.features.contracts import Event
    from towerline.marketing.campaigns import in_holdout
    from towerline.serving.campaign_triggers import CampaignTriggers

    replica, _, _ = app
    settings = campaign_settings(tmp_path)
    (tmp_path / "campaigns" / "welcome-now.yaml").write_text(WELCOME.replace("holdout: 0.0", "holdout: 0.5"))
    users = [f"h{i:02d}" for i in range(40)]
    (tmp_path / "users.csv").write_text("user_id,consent\n" + "".join(f"{u},true\n" for u in users))
    triggers = CampaignTriggers(settings_from(settings), replica.recommender)
    published = asyncio.run(triggers.process([Event(user_id=u, item_id="-", event_type="signup") for u in users]))
    held = set(triggers.outbox.holdout_history()["user_id"])
    assert held == {u for u, h in zip(users, in_holdout("welcome-now", users, 0.5)) if h} and 5 < len(held) < 35
    assert set(published["user_id"]) == set(users) - held
