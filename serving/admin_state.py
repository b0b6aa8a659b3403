"""What every ingress replica serves, decided by admin writes: one small Serve deployment, followed by all.

Why: HAProxy (or Serve's proxy) hands ``POST /admin/reload`` and ``POST /admin/items`` to *one*
ingress replica; the others, and every replica started later (after a crash or a scale-up), must
serve the same model version and catalogue. So:

- the replica that gets an admin write applies it itself first (a model that fails to load is a
  409 and changes nothing), then publishes the resulting **desired state** here under a new
  generation: the model version by its pinned key (``ModelState.key``, never a moving alias), its
  index folder, and the batches of cold items added since;
- every replica applies the desired state when it starts, before it takes traffic, and sends a
  heartbeat every ``admin_poll_s`` that answers the current generation; when it moved, the replica
  applies the new state in the background while its requests keep going to the version it has;
- the writer waits (at most ``admin_sync_timeout_s``) until every live replica (one heartbeat in
  the last ``live_s``) reports the generation, and its answer says how many did.

Concurrent writers: a reload replaces the whole state (the last one wins); items are appended
only onto the generation the writer has applied (``publish(expected=...)``), so two admin calls
on two replicas never leave them with different catalogues: the one that lost catches up and
retries. The first replica to start publishes what it loaded, so replicas that resolve a moving
alias at different moments still end on one version.

Why a deployment of the app and not Serve's ``user_config``: a new ``user_config`` is a redeploy
sent to the controller from outside the app, without an answer saying which replicas took it; a
deployment bound into the app lives and dies with the app (no detached actor left behind) and
Serve restarts it when it is lost. A restarted one comes back empty (generation 0, a new epoch);
the replicas then hand it the state they serve (``restore``), so losing it loses nothing.

This module imports only Ray Serve: the state replica never loads torch, FAISS or a model.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Optional

from ray import serve

from towerline.errors import TowerlineError

log = logging.getLogger(__name__)

Desired = dict[str, Any]  # {"model": pinned key, "index_dir": str | None, "items": [[row, ...], ...]}
Mark = tuple[str, int]  # (epoch of the state replica, generation)
RETRY_S = 5.0  # a replica that failed to apply a state tries again after this long


class AdminStateUnavailable(TowerlineError):
    """The state replica cannot be reached (restarting): an admin write changes nothing (503)."""


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                  health_check_period_s=2.0, health_check_timeout_s=10.0)
class AdminState:
    """The desired state, its generation, and what each ingress replica last reported."""

    def __init__(self, live_s: float = 3.0) -> None:
        self.epoch = uuid.uuid4().hex[:12]  # a restarted state replica is told apart from its predecessor
        self.generation = 0
        self.state: Optional[Desired] = None  # None: nothing published yet
        self.live_s = live_s
        self.replicas: dict[str, tuple[float, Mark, Optional[Mark]]] = {}  # id -> (seen, applied, failed)

    def snapshot(self) -> tuple[str, int, Optional[Desired]]:
        return self.epoch, self.generation, self.state

    def heartbeat(self, replica: str, applied: Mark, failed: Optional[Mark] = None) -> Mark:
        self.replicas[replica] = (time.monotonic(), tuple(applied), tuple(failed) if failed else None)
        return self.epoch, self.generation

    def publish(self, replica: str, state: Desired, expected: Optional[Mark] = None) -> Optional[Mark]:
        """A new generation holding ``state``; None when ``expected`` is not the current one."""
        if expected is not None and tuple(expected) != (self.epoch, self.generation):
            return None
        self.generation += 1
        self.state = state
        self.replicas[replica] = (time.monotonic(), (self.epoch, self.generation), None)
        return self.epoch, self.generation

    def restore(self, replica: str, generation: int, state: Desired) -> tuple[str, int, Optional[Desired]]:
        """After a restart (nothing published in this epoch): take back what a replica serves."""
        if self.generation == 0:
            self.generation, self.state = generation, state
            log.info("admin state restored at generation %d from replica %s", generation, replica)
        return self.snapshot()

    def progress(self, mark: Mark) -> dict[str, int]:
        """Live replicas, and how many of them applied (or failed to apply) ``mark``."""
        now = time.monotonic()
        self.replicas = {r: v for r, v in self.replicas.items() if now - v[0] < 60 * self.live_s}  # the long gone
        live = [v for v in self.replicas.values() if now - v[0] <= self.live_s]
        mark = tuple(mark)
        applied = sum(v[1] == mark or (v[1][0] == mark[0] and v[1][1] > mark[1]) for v in live)
        failed = sum(v[2] == mark and v[1] != mark for v in live)
        return {"replicas": len(live), "applied": applied, "failed": failed}


class Follower:
    """One ingress replica's side: what it applied, its heartbeat loop, publishing and waiting.

    ``apply(state)`` is the replica's own function that makes it serve ``state`` (idempotent: a
    state it already serves changes nothing); the follower calls it holding ``lock``, the lock
    the replica's admin writes hold too, so a write and a catch-up never interleave.
    """

    def __init__(self, handle: Any, poll_s: float = 0.5, wait_s: float = 5.0) -> None:
        self.handle = handle
        self.lock = asyncio.Lock()  # the replica's admin lock, given to ``start``
        self.poll_s = poll_s
        self.wait_s = wait_s
        self.id = uuid.uuid4().hex[:12]
        self.mark: Mark = ("", 0)  # the (epoch, generation) this replica serves
        self.state: Optional[Desired] = None
        self.failed: Optional[Mark] = None
        self._retry_at = 0.0
        self._tasks: set[asyncio.Task] = set()

    @classmethod
    async def connect(cls, handle: Any, poll_s: float, wait_s: float) -> "Follower":
        """The follower with the state published so far (``state`` None: nothing yet)."""
        f = cls(handle, poll_s, wait_s)
        epoch, generation, state = await handle.snapshot.remote()
        f.mark, f.state = (epoch, generation), state
        return f

    def start(self, serving: Desired, apply: Callable[[Desired], Awaitable[None]], lock: asyncio.Lock) -> None:
        """Heartbeats from now on (a task on the running loop); ``serving`` is what the replica loaded."""
        first = self.state is None
        self.state, self.lock = serving, lock
        task = asyncio.get_running_loop().create_task(self._follow(apply, first))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def publish(self, state: Desired, *, expected: bool) -> bool:
        """Publish ``state`` (already applied here); False when ``expected`` and someone wrote first.
        The caller holds ``lock``."""
        mark = await self.handle.publish.remote(self.id, state, self.mark if expected else None)
        if mark is None:
            return False
        self.mark, self.state, self.failed = tuple(mark), state, None
        return True

    async def confirm(self) -> dict[str, int]:
        """Wait (at most ``wait_s``) until every live replica applied what this one serves."""
        deadline = time.monotonic() + self.wait_s
        while True:
            p = await self.handle.progress.remote(self.mark)
            if p["applied"] + p["failed"] >= p["replicas"] or time.monotonic() >= deadline:
                return p
            await asyncio.sleep(0.05)

    async def catch_up(self, apply: Callable[[Desired], Awaitable[None]]) -> None:
        """Apply the published state if it moved since this replica's last one. The caller holds ``lock``."""
        epoch, generation, state = await self.handle.snapshot.remote()
        if (epoch, generation) == self.mark:
            return
        if generation == 0 and self.state is not None:  # the state replica restarted empty: give it ours
            epoch, generation, state = await self.handle.restore.remote(self.id, max(self.mark[1], 1), self.state)
        if state is None:
            return
        try:
            await apply(state)
        except Exception:
            self.failed = (epoch, generation)
            raise
        self.mark, self.state, self.failed = (epoch, generation), state, None
        log.info("replica %s serves admin state generation %d", self.id, generation)

    async def _follow(self, apply: Callable[[Desired], Awaitable[None]], first: bool) -> None:
        applying: Optional[asyncio.Task] = None
        if first:  # the first replica up pins what it loaded (an alias read once for all replicas)
            async with self.lock:
                try:
                    await self.publish(self.state, expected=True)
                except Exception as e:
                    log.warning("admin state: could not publish the start state: %s", e)
        last_error = ""
        while True:
            try:
                mark = tuple(await self.handle.heartbeat.remote(self.id, self.mark, self.failed))
                idle = applying is None or applying.done()
                if mark != self.mark and idle and time.monotonic() >= self._retry_at:
                    applying = asyncio.get_running_loop().create_task(self._catch_up_locked(apply))
                last_error = ""
            except Exception as e:  # the state replica restarting: keep serving what we have
                if str(e) != last_error:
                    log.warning("admin state unreachable, serving generation %d meanwhile: %s", self.mark[1], e)
                    last_error = str(e)
            await asyncio.sleep(self.poll_s)

    async def _catch_up_locked(self, apply: Callable[[Desired], Awaitable[None]]) -> None:
        try:
            async with self.lock:
                await self.catch_up(apply)
        except Exception:
            self._retry_at = time.monotonic() + RETRY_S
            log.exception("replica %s could not apply the admin state; it keeps serving generation %d and retries "
                          "in %.0f s", self.id, self.mark[1], RETRY_S)
