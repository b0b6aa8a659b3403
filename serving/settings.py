"""Every knob of the serving layer in one frozen pydantic model.

Why pydantic and not a dataclass like ``towerline.config``: the same object arrives from three
edges — ``towerline serve`` flags, the ``args:`` block of ``configs/serve.yaml`` (Ray Serve builds
``AppArgs`` from it and passes it to ``build_app``) and tests — and pydantic validates nested YAML,
rejects unknown keys and names the offending field, which is exactly ``ConfigError``'s job.
``core/config.py`` stays about training; serving settings live here because only serving reads them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from towerline.errors import ConfigError
from towerline.serving.auth import check_exposure, is_loopback

log = logging.getLogger(__name__)

MIB = 1 << 20


class ServeSettings(BaseModel):
    """What the endpoint does with a request, with every default visible."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"  # bind address; 0.0.0.0 only behind a proxy you trust
    port: int = Field(8000, ge=1, le=65535)
    n_candidates: int = Field(100, ge=1, le=10_000)  # retrieval depth handed to the rules when no ranker runs;
    # a ranker always gets the list length it was trained with (ranker/config.json), never this number
    max_k: int = Field(200, ge=1, le=1000)  # largest k a request may ask for
    exclude_seen: bool = True  # drop every item already in the user's history (the model's candidate lists
    # never hold history items, as in training; False lets seen items back in only through the popular fill)
    exclude_purchased: bool = True  # drop purchased items (matters when exclude_seen is False)
    max_per_category: Optional[int] = Field(None, ge=1)  # diversity cap per "category:" token; None = no cap
    drop_out_of_stock: bool = True  # never recommend items whose catalogue row says in_stock=False
    blocked_items: tuple[str, ...] = ()  # item ids never recommended (legal, brand safety)
    history_db: str = "towerline_history.sqlite"  # SQLite file of the online history store
    history_redis_url: Optional[str] = None  # redis://host:6379/0: the history store shared by several
    # machines (needs `pip install 'towerline[redis]'`); None = the SQLite file history_db
    history_keep_per_user: int = Field(1000, ge=1)  # Redis keeps each user's newest events only
    feedback_db: str = "towerline_feedback.sqlite"  # SQLite file of A/B feedback (POST /feedback)
    history_recent: int = Field(200, ge=1)  # newest online events read per request (>= the model's max_len)
    threads: int = Field(1, ge=1, le=64)  # torch/FAISS threads per replica: replicas share the cores
    stage_placement: Literal["ingress", "deployments"] = "ingress"  # ingress: user tower, FAISS and ranker run
    # batched inside the ingress replica (no actor hop: fastest on one machine); deployments: through the
    # Retriever and Ranker deployments, which scale out on their own across a cluster
    rank_stage: Literal["auto", "always", "never"] = "auto"  # auto: rank when the bundle has a trained ranker
    # (ranker/), else the retrieval score ranks without a rank hop; always: call the rank stage anyway; never: the
    # retrieval score ranks even with a ranker. Decided once per loaded version (recommender.ModelState)
    retriever_batch_size: int = Field(32, ge=1, le=1024)  # serve.batch max_batch_size of the retriever
    ranker_batch_size: int = Field(32, ge=1, le=1024)  # serve.batch max_batch_size of the ranker
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=1.0)  # how long a batch waits to fill; 0 = take what
    # queued while the previous batch ran (under load batches fill by themselves, idle requests don't wait)
    max_body_bytes: int = Field(MIB, ge=1024)  # larger request bodies get 413
    max_batch: int = Field(10_000, ge=1, le=100_000)  # records per POST /events or /feedback; more: 413
    api_token_file: Optional[str] = None  # file holding the bearer token of writes and admin; $TOWERLINE_API_TOKEN
    # wins when set. Without either the server starts on a loopback host only, with writes open (serving/auth.py)
    require_token_for_reads: bool = False  # True: /recommend, /similar, profiles, segments, /version need it too
    models_root: Optional[str] = None  # folder POST /admin/reload may load bundles from (besides the registry);
    # None = the folder holding the bundle the app started with (none when it came from the registry)
    retriever_replicas: int = Field(1, ge=1)
    ranker_replicas: int = Field(1, ge=1)
    # --- operations: ingress replicas, bounded queues, deadlines, health checks, stopping
    # (towerline.serving.shedding turns these into the Ingress deployment's Serve options)
    ingress_replicas: int = Field(2, ge=1)  # HTTP replicas: with two, a lost replica is not an outage
    max_ongoing_requests: int = Field(8, ge=1)  # requests one ingress replica works on at once
    max_queued_requests: int = Field(8, ge=-1)  # more may wait per replica; beyond that 503 + Retry-After
    # at once (-1 = unbounded: every client waits, however long)
    retry_after_s: int = Field(1, ge=0)  # Retry-After of a 503, in seconds
    haproxy_queue_ms: int = Field(20, ge=0, le=10_000)  # through HAProxy: a request no replica has room for
    # (HAProxy sends each max_ongoing_requests at once) waits this long in HAProxy's queue, then gets its 503
    request_timeout_s: float = Field(10.0, gt=0)  # a request not answered by then gets 504
    health_check_period_s: float = Field(1.0, gt=0)  # Serve checks each replica this often ...
    health_check_timeout_s: float = Field(2.0, gt=0)  # ... and replaces one that does not answer in time
    graceful_shutdown_timeout_s: float = Field(5.0, ge=0, le=15)  # a stopping replica finishes its
    # requests in flight for at most this long (SIGTERM to exit stays under 20 s)
    drain_s: float = Field(1.0, ge=0, le=5)  # after SIGTERM/SIGINT the app keeps answering this long before
    # Serve stops: requests already on their way (accepted, or queued at the proxy) are answered, not cut
    admin_poll_s: float = Field(0.5, gt=0, le=10)  # each ingress replica asks this often whether an admin write
    # (reload, items) reached another replica, and then applies it (serving/admin_state.py)
    admin_sync_timeout_s: float = Field(5.0, ge=0, le=60)  # an admin write waits at most this long for every
    # live replica to apply it; its answer says how many did
    # --- immediate campaigns (towerline.serving.campaign_triggers): signups posted to /events are messaged at once
    campaigns: tuple[str, ...] = ()  # campaign names (in campaign_dir) or YAML files with a signup trigger
    # (days: 0) that POST /events fires; () = none
    campaign_dir: str = Field("configs/campaigns", validate_default=True)  # where campaign names are looked up
    campaign_outbox: Optional[str] = None  # the outbox `towerline campaign run` writes: a folder, amqp://... or nats://...
    campaign_ledger: Optional[str] = None  # broker outboxes: folder of published ids (default: outbox-ledger)
    campaign_users: Optional[str] = None  # users table (user_id, consent, consent_<channel>) for users who signed
    # up after the model was trained; re-read when it changes; None = the bundle's users.parquet only
    campaign_queue: int = Field(1000, ge=1)  # event batches waiting for the campaign worker; more are dropped
    # (logged; the nightly campaign run still reaches those users within its window_days)

    @field_validator("max_queued_requests")
    @classmethod
    def _queue(cls, v: int) -> int:
        if v == 0:  # Ray Serve's own rule, checked here so that it is one line naming the setting
            raise ValueError("must be -1 (no limit) or at least 1")
        return v

    @field_validator("history_redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected redis://host:port/db, rediss://... or unix:///path.sock, got {v!r}")
        return v

    @field_validator("campaign_dir", "campaign_ledger", "campaign_users", "campaign_outbox")
    @classmethod
    def _local_path(cls, v: str | None) -> str | None:
        """Replicas may run in another working directory: local paths become absolute where the
        settings are built (the driver); broker URLs stay as they are."""
        if v is None or "://" in v:
            return v
        return str(Path(v).expanduser().resolve())

    @field_validator("campaigns")
    @classmethod
    def _campaign_files(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(Path(c).expanduser().resolve()) if c.endswith((".yaml", ".yml")) else c for c in v)

    @model_validator(mode="after")
    def _consistent(self) -> "ServeSettings":
        if self.campaigns and not self.campaign_outbox:
            raise ValueError("campaigns fire from POST /events only into an outbox: set campaign_outbox "
                             "(a folder, amqp://... or nats://...)")
        if not is_loopback(self.host):  # ConfigError now, before Ray: a host beyond loopback without a token
            check_exposure(self)  # (the replica checks again, loopback too, when it starts)
        if self.history_redis_url and self.history_keep_per_user < self.history_recent:
            log.warning("history_keep_per_user=%d < history_recent=%d: requests read at most %d online events",
                        self.history_keep_per_user, self.history_recent, self.history_keep_per_user)
        if self.max_per_category is not None and self.max_per_category > self.max_k:
            log.warning("max_per_category=%d exceeds max_k=%d: the cap never binds", self.max_per_category, self.max_k)
        return self


def settings_from(values: dict | None = None, **overrides: object) -> ServeSettings:
    """``ServeSettings`` from a dict plus keyword overrides, or ``ConfigError`` naming each bad field."""
    data = {**(values or {}), **overrides}
    try:
        return ServeSettings(**data)
    except ValidationError as e:
        problems = [f"serve setting '{'.'.join(str(p) for p in err['loc'])}': {err['msg']}" if err["loc"]
                    else f"serve settings: {err['msg'].removeprefix('Value error, ')}" for err in e.errors()]
        raise ConfigError("; ".join(problems)) from None
