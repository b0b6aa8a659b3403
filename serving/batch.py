"""Batch recommendations: ``/recommend``'s request path for many users at once.

``recommend_all`` answers every user with ``Recommender.recommend_async`` — the coroutine the HTTP
endpoint awaits: history (bundle + online store), consent, rules, popular fallback — so an export
never disagrees with the service. What changes is only where the model stages run: ``GatherStages``
holds each request at its ``retrieve``/``rank`` await until every request of the chunk is waiting,
then runs ``recommender.retrieve``/``recommender.rank`` once over all of them, as ``serve.batch``
does in the ingress (``serving/stages.py``). Those functions compute each request independently of
its batch (``training/inference.py``), so the batch size changes the speed, never an answer.

Why a stage object of its own rather than ``stages.BatchedStages``: ``serve.batch`` runs its
batches on a Serve replica's event loop; here one plain ``asyncio`` loop per worker thread drives a
chunk, and the batch is "everyone in the chunk", known exactly, with no wait timeout.

Speed (Beauty, 22,363 users, retriever + ranker, ``bench/batch_export.py``): torch runs on one
thread (intra-op threads spun at every op's barrier on the shared machine: about 3x the CPU
seconds), the ranker takes 64 users per call (its per-candidate tensors then fit the CPU caches),
and ``workers`` chunks may run side by side, torch releasing the GIL inside its ops.

Output rows: ``user_id, rank (1 = best), item_id, score, model_version, fallback`` — k rows per user
(fewer only when the catalogue has fewer allowed items) — plus ``experiment, arm`` when an A/B
experiment is active: each user then gets the answer of the arm ``/recommend`` gives them (the same
``marketing.assignment`` hash, the arm's own model version or popular rules, ``rec.arm_request``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from towerline.config import ArmConfig, ExperimentConfig
from towerline.errors import TowerlineError
from towerline.marketing.assignment import assign_arms, find_experiment
from towerline.serving import recommender as rec
from towerline.serving.history import HistoryEvent
from towerline.serving.settings import ServeSettings

log = logging.getLogger(__name__)

COLUMNS = ["user_id", "rank", "item_id", "score", "model_version", "fallback"]
ARM_COLUMNS = ["experiment", "arm"]  # appended when an experiment is active
DEFAULT_BATCH_SIZE = 512  # users per model call: large enough for BLAS, small enough for memory


class NoOnlineHistory:
    """A history store without events: each user's history is the bundle's training history."""

    def recent(self, user_id: str, limit: int) -> list[HistoryEvent]:
        return []


class GatherStages:
    """``recommender.Stages`` that batch every request of a chunk into one call per stage.

    Each ``retrieve``/``rank`` call parks its request and a future; ``flush`` (called by
    ``_answer_chunk`` once every request of the chunk is parked or done) computes the whole batch
    with the functions the service's stages end in and resolves the futures.
    """

    def __init__(self, settings: ServeSettings, retrieve_rows: int = 256, rank_rows: int = 64) -> None:
        self.settings = settings
        self.retrieve_rows, self.rank_rows = retrieve_rows, rank_rows
        self._retrieve: list[tuple[rec.ModelState, rec.UserHistory, asyncio.Future]] = []
        self._rank: list[tuple[rec.ModelState, rec.UserHistory, rec.Candidates, asyncio.Future]] = []

    @property
    def parked(self) -> int:
        return len(self._retrieve) + len(self._rank)

    async def retrieve(self, state: rec.ModelState, history: rec.UserHistory) -> rec.Candidates:
        fut = asyncio.get_running_loop().create_future()
        self._retrieve.append((state, history, fut))
        return await fut

    async def rank(self, state: rec.ModelState, history: rec.UserHistory, candidates: rec.Candidates) -> rec.Candidates:
        fut = asyncio.get_running_loop().create_future()
        self._rank.append((state, history, candidates, fut))
        return await fut

    def flush(self) -> None:
        """Run the parked requests, one call per stage, model version and slice of rows.

        Why slices (``retrieve_rows``, ``rank_rows``) rather than the whole chunk at once: the
        ranker's (rows, candidates, features) tensors of 512 users are ~45 MB, far beyond the CPU
        caches, and every op on them waits for memory; 64 users' fit, and the ranker spent ~40% less
        CPU per user on the Beauty bundle (``bench/batch_export.py``). Rows are computed
        independently of their batch (``training/inference.py``), so slicing changes no bit.
        """
        retrieve, self._retrieve = self._retrieve, []
        for group in _by_version(retrieve, self.retrieve_rows):
            state = group[0][0]
            for (_, _, fut), cands in zip(group, rec.retrieve(state, self.settings, [r[1] for r in group])):
                fut.set_result(cands)
        rank, self._rank = self._rank, []
        for group in _by_version(rank, self.rank_rows):
            state = group[0][0]
            for (*_, fut), ranked in zip(group, rec.rank(state, [r[1] for r in group], [r[2] for r in group])):
                fut.set_result(ranked)


def _by_version(parked: list[Any], rows: int) -> list[list[Any]]:
    """Parked requests grouped by model version, each group cut into slices of at most ``rows``."""
    groups: dict[str, list[Any]] = {}
    for item in parked:
        groups.setdefault(item[0].key, []).append(item)
    return [g[lo : lo + rows] for g in groups.values() for lo in range(0, len(g), max(rows, 1))]


@dataclass(frozen=True)
class Arms:
    """The active experiment of an export: which arm each user is in and what each arm serves,
    loaded the way the service's ingress loads them (an arm's own model beside the served one)."""

    experiment: ExperimentConfig
    models: dict[str, rec.ModelState]  # arm name -> its own model version (arms with ``model``)

    def of(self, user_ids: Sequence[str]) -> list[ArmConfig]:
        """Each user's arm: ``assign_arms``, the function behind the service's ``assign_arm``."""
        by_name = {a.name: a for a in self.experiment.arms}
        return [by_name[name] for name in assign_arms(self.experiment, user_ids)]


def load_arms(experiments: Sequence[ExperimentConfig], experiment: str | None, settings: ServeSettings) -> Arms | None:
    """``Arms`` of the experiment named ``experiment`` (None: no A/B split, as in the service);
    ``ConfigError`` naming the known experiments for an unknown name."""
    if experiment is None:
        return None
    active = find_experiment(experiments, experiment)
    return Arms(active, {a.name: rec.load_model(a.model, settings, None) for a in active.arms if a.model})


async def _answer_chunk(recommender: rec.Recommender, stages: GatherStages, user_ids: Sequence[str], k: int,
                        arms: Sequence[ArmConfig] | None = None, arm_models: dict[str, rec.ModelState] | None = None,
                        ) -> list[rec.RecommendResult]:
    """``recommend_async`` for every user of the chunk, concurrently, the model stages gathered;
    with ``arms`` each user as their arm is served (``rec.arm_request``)."""
    if arms is None:
        tasks = [asyncio.ensure_future(recommender.recommend_async(u, k)) for u in user_ids]
    else:
        tasks = [asyncio.ensure_future(recommender.recommend_async(u, k, **rec.arm_request(a, arm_models or {})))
                 for u, a in zip(user_ids, arms)]
    idle = 0
    while True:
        await asyncio.sleep(0)  # every runnable request advances to its next stage await (or finishes)
        done = sum(t.done() for t in tasks)
        if done == len(tasks):
            break
        if stages.parked + done == len(tasks):
            stages.flush()
            idle = 0
        elif (idle := idle + 1) > 10_000:  # a request awaits something other than a stage: not ours to drive
            for t in tasks:
                t.cancel()
            raise RuntimeError("batch recommendations: a request waits on something other than its model stages")
    return [t.result() for t in tasks]


def read_user_ids(source: str | Path) -> list[str]:
    """User ids from a CSV/Parquet file with a ``user_id`` column, or a text file with one id a line.

    Raises ``TowerlineError`` naming the file (and the row of an empty id)."""
    path = Path(source)
    if not path.is_file():
        raise TowerlineError(f"--users {path}: file not found (give a CSV/Parquet/txt of user ids, or 'all')")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(path)
        elif suffix == ".csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            lines = path.read_text().splitlines()
            ids = [line.strip() for line in lines]
            if ids and ids[0] == "user_id":  # a header line is allowed
                ids = ids[1:]
            df = pd.DataFrame({"user_id": [i for i in ids if i]})
    except (OSError, ValueError) as e:
        raise TowerlineError(f"--users {path}: unreadable ({e})") from None
    if "user_id" not in df.columns:
        raise TowerlineError(f"--users {path}: no user_id column (columns: {', '.join(map(str, df.columns))})")
    ids = df["user_id"].astype(str).str.strip()
    empty = np.flatnonzero((ids == "") | df["user_id"].isna().to_numpy())
    if len(empty):
        raise TowerlineError(f"--users {path}: row {int(empty[0]) + 1} has an empty user_id")
    return list(dict.fromkeys(ids))  # first occurrence order, no duplicates


def known_users(state: rec.ModelState) -> list[str]:
    """Every user the model knows (its user vocabulary), in vocabulary order."""
    return [str(u) for u in state.bundle.vocabs.users.ids]


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for lo in range(0, len(items), size):
        yield items[lo : lo + size]


def result_frame(user_ids: Sequence[str], results: Sequence[rec.RecommendResult],
                 arms: Sequence[str] | None = None, experiment: str | None = None) -> pd.DataFrame:
    """One row per (user, recommended item) in ``COLUMNS`` order, then ``ARM_COLUMNS`` when
    ``arms`` (each user's arm name in ``experiment``) is given."""
    users, ranks, items, scores, versions, fallbacks, arm_rows = [], [], [], [], [], [], []
    for pos, (u, r) in enumerate(zip(user_ids, results)):
        n = len(r.items)
        users.extend([u] * n)
        ranks.extend(range(1, n + 1))
        items.extend(i for i, _ in r.items)
        scores.extend(s for _, s in r.items)
        versions.extend([r.model_version] * n)
        fallbacks.extend([r.fallback] * n)
        if arms is not None:
            arm_rows.extend([arms[pos]] * n)
    columns: dict[str, pd.Series] = {
        "user_id": pd.Series(users, dtype=str), "rank": pd.Series(ranks, dtype="int32"),
        "item_id": pd.Series(items, dtype=str), "score": pd.Series(scores, dtype="float32"),
        "model_version": pd.Series(versions, dtype=object).astype("string"),
        "fallback": pd.Series(fallbacks, dtype=bool),
    }
    if arms is None:
        return pd.DataFrame(columns, columns=COLUMNS)
    columns["experiment"] = pd.Series([experiment] * len(users), dtype=object).astype("string")
    columns["arm"] = pd.Series(arm_rows, dtype=object).astype("string")
    return pd.DataFrame(columns, columns=COLUMNS + ARM_COLUMNS)


def recommend_frames(
    recommender: rec.Recommender,
    user_ids: Sequence[str],
    k: int = 20,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_chunk: Callable[[int], None] | None = None,
    arms: Arms | None = None,
    workers: int = 1,
) -> Iterator[pd.DataFrame]:
    """``result_frame`` of each chunk of ``batch_size`` users, in order, answered through
    ``recommender``'s request path with gathered stages; with ``arms``, each user as their arm of the
    experiment is served.

    ``workers`` threads answer chunks side by side, each with its own event loop and stages (the
    recommender's ``stages`` are not used). Why threads with torch on one thread each rather than
    one chunk with torch's intra-op threads: torch releases the GIL inside its ops, so two chunks
    keep two cores busy (one in the model, one in the request path around it), while intra-op threads
    spin at every op's barrier; on the shared 2-core machine two intra-op threads cost about 3x the
    CPU seconds of one (``bench/batch_export.py``). Set ``torch.set_num_threads(1)`` with ``workers > 1``
    (``towerline recommend`` does). The chunks always run in worker threads, so a caller inside a
    running event loop (a notebook's kernel, an async server) is fine too.
    """
    if batch_size < 1:
        raise TowerlineError(f"--batch-size must be >= 1, got {batch_size}")
    if workers < 1:
        raise TowerlineError(f"--threads must be >= 1, got {workers}")
    rec.check_k(k, recommender.settings)
    local = threading.local()
    loops: list[asyncio.AbstractEventLoop] = []
    models = arms.models if arms is not None else None

    def answer(chunk: Sequence[str]) -> pd.DataFrame:
        if not hasattr(local, "loop"):  # first chunk of this worker thread: its loop and stages
            local.loop = asyncio.new_event_loop()
            loops.append(local.loop)
            local.stages = GatherStages(recommender.settings)
            local.recommender = rec.Recommender(recommender.state, recommender.settings, recommender.store, local.stages)
        chunk_arms = arms.of(chunk) if arms is not None else None
        results = local.loop.run_until_complete(_answer_chunk(local.recommender, local.stages, chunk, k, chunk_arms, models))
        if chunk_arms is None:
            return result_frame(chunk, results)
        return result_frame(chunk, results, [a.name for a in chunk_arms], arms.experiment.name)  # type: ignore[union-attr]

    pool = ThreadPoolExecutor(workers, thread_name_prefix="towerline-batch")
    pending: deque[tuple[int, Future[pd.DataFrame]]] = deque()
    try:
        for chunk in _chunks(user_ids, batch_size):
            pending.append((len(chunk), pool.submit(answer, chunk)))
            while len(pending) > workers:  # at most one chunk waiting per worker: bounded memory
                yield _take_done(pending, on_chunk)
        while pending:
            yield _take_done(pending, on_chunk)
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)
        for loop in loops:
            loop.close()


def _take_done(pending: deque[tuple[int, Future[pd.DataFrame]]], on_chunk: Callable[[int], None] | None) -> pd.DataFrame:
    """The oldest chunk's frame (waiting for it), reported to ``on_chunk``."""
    n, fut = pending.popleft()
    frame = fut.result()
    if on_chunk is not None:
        on_chunk(n)
    return frame


class _Progress:
    """A bar on a terminal, else one log line every ``every`` users (and at the end)."""

    def __init__(self, total: int, every: int, bar: bool | None) -> None:
        self.total, self.every, self.done, self.next_line = total, max(every, 1), 0, max(every, 1)
        self.t0 = time.perf_counter()
        use_bar = sys.stderr.isatty() if bar is None else bar
        self.bar = None
        if use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="recommend", unit="user")

    def __call__(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.done >= self.next_line or self.done == self.total:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            log.info("recommended %d/%d users (%.0f users/s)", self.done, self.total, rate)
            while self.next_line <= self.done:
                self.next_line += self.every

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_frames(frames: Iterable[pd.DataFrame], out: str | Path, columns: Sequence[str] = COLUMNS) -> int:
    """Stream frames into ``out`` (Parquet for ``.parquet``, CSV for ``.csv``), atomically; returns rows.
    ``columns`` are the header of a file without rows (``COLUMNS``, plus ``ARM_COLUMNS`` in an experiment)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(out)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise TowerlineError(f"--out {path}: use a .parquet or .csv file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    rows = 0
    writer = None
    try:
        for i, frame in enumerate(frames):
            if suffix == ".csv":
                frame.to_csv(tmp, mode="w" if i == 0 else "a", header=i == 0, index=False)
            else:
                table = pa.Table.from_pandas(frame, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
            rows += len(frame)
        if writer is not None:
            writer.close()
            writer = None
        elif rows == 0 and suffix == ".parquet":
            result_frame([], [], [] if len(columns) > len(COLUMNS) else None).to_parquet(tmp, index=False)
        elif rows == 0:
            result_frame([], [], [] if len(columns) > len(COLUMNS) else None).to_csv(tmp, index=False)
        tmp.replace(path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return rows


def recommend_all(
    model: str | Path | rec.ModelState,
    users: str | Path | Sequence[str] = "all",
    k: int = 20,
    out: str | Path | None = None,
    settings: ServeSettings | None = None,
    store: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool | None = None,
    log_every: int = 5000,
    workers: int = 1,
    experiments: Sequence[ExperimentConfig] = (),
    experiment: str | None = None,
) -> pd.DataFrame | dict[str, Any]:
    """Top-``k`` recommendations for ``users`` (a list of ids, a file of ids, or ``"all"`` = every
    user the model knows) through the service's request path. Example::

        recommend_all("runs/latest/bundle", "all", k=20, out="recs.parquet")

    ``store`` is the online history store the service reads (default: none, so histories are the
    bundle's); ``settings`` the service's rules (default ``ServeSettings()``, as ``towerline serve``);
    ``experiments``/``experiment`` the service's A/B split (``AppArgs.experiments``/``.experiment``):
    each user is answered as their arm and the rows carry ``experiment, arm``; ``workers`` chunks
    are answered side by side (``recommend_frames``; rows and their order do not depend on it).
    Without ``out`` the rows come back as one DataFrame; with ``out`` they are streamed to the file
    and a summary comes back (users, rows, fallback users, seconds, path; users per arm).
    """
    settings = settings or ServeSettings()
    state = model if isinstance(model, rec.ModelState) else rec.load_model(model, settings)
    arms = load_arms(experiments, experiment, settings)
    if isinstance(users, str) and users == "all":
        user_ids = known_users(state)
    elif isinstance(users, (str, Path)):
        user_ids = read_user_ids(users)
    else:
        user_ids = [str(u) for u in users]
    recommender = rec.Recommender(state, settings, store if store is not None else NoOnlineHistory())  # type: ignore[arg-type]
    t0 = time.perf_counter()
    bar = _Progress(len(user_ids), log_every, progress if out is not None else False)
    fallback_users = 0

    def counted(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        nonlocal fallback_users
        for f in frames:
            fallback_users += int(f.loc[f["fallback"], "user_id"].nunique())
            yield f

    try:
        frames = counted(recommend_frames(recommender, user_ids, k, batch_size, bar, arms, workers))
        if out is None:
            parts = list(frames)
            return pd.concat(parts, ignore_index=True) if parts else result_frame([], [])
        rows = write_frames(frames, out, COLUMNS + ARM_COLUMNS if arms is not None else COLUMNS)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    log.info("%d users, %d rows (%d users on the popular fallback) in %.1f s -> %s",
             len(user_ids), rows, fallback_users, seconds, out)
    summary: dict[str, Any] = {"users": len(user_ids), "rows": rows, "fallback_users": fallback_users,
                               "seconds": seconds, "out": str(out), "model_version": state.model_version, "model": state.key}
    if arms is not None:
        summary["experiment"] = arms.experiment.name
        summary["arms"] = {a.name: 0 for a in arms.experiment.arms} | dict(Counter(a.name for a in arms.of(user_ids)))
    return summary
