"""Feature preparation on Ray Data: the one-process artefacts, from event shards, in bounded memory.

``prepare_features`` writes exactly what ``SequenceDataModule.prepare_data`` writes with
``data.engine: local`` (``vocab/*.json``, ``sequences.npz``, ``item_attributes.npy``,
``items.parquet``, ``users.parquet``), array for array, but no process ever holds the raw event log:

1. **Read** one shard per task (``events/part-*.parquet`` or ``.csv``, or a single ``events.*``
   file) through the same ``read_table`` + ``validate_events`` as the local reader, so errors name
   the shard, row and field exactly as they name a single file. Shards are read twice (once for the
   ids, once to encode them) rather than held in the object store between the passes: re-reading
   Parquet is cheaper than spilling tens of millions of rows.
2. **Vocabularies**: each task returns its shard's distinct user, item and event-type ids; the
   driver unions them with the catalogue and users tables and calls the same ``build_vocab``.
3. **Sequences**: each shard is encoded to indices by an actor holding the vocabularies, tagged
   with a *range partition* of users (``user_idx * P // n_users``) and grouped with
   ``groupby("part").map_groups``: every user's events land in one group, which is sorted by
   (user, time, shard, row) -- the local path's order, where ties in time keep file order -- and
   folded by the same ``fold_repeats``. Partitions hold about ``rows_per_partition`` events, so a
   worker's memory is bounded by that, not by the log; the driver only concatenates folded steps
   in (partition, position) order.

Ray started here binds 127.0.0.1 with few CPUs and no dashboard, and stops when the preparation
ends; with ``RAY_ADDRESS`` set (a cluster) or Ray already initialised, it is joined instead and left
running. Known difference from the local reader: duplicate ``event_id`` rows are dropped within a
shard, not across shards (shards written by ``write_sharded_dataset`` or the streaming generator
never repeat ids).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from towerline.config import DataConfig
from towerline.errors import DataValidationError, TowerlineError
from towerline.features.contracts import EVENT_TYPES, ITEM_COLUMNS
from towerline.features.sequences import SEQUENCE_ARRAYS, fold_repeats
from towerline.features.vocab import Vocab, Vocabs, build_vocab, item_attribute_matrix
from towerline.features.writers import EVENT_SHARDS_DIR, SUFFIX, write_sharded_dataset
from towerline.features.readers import read_table
from towerline.features.validate import validate_items, validate_users
from towerline.features.validate import validate_events
from towerline.features.synthetic import generate_dataset

log = logging.getLogger(__name__)

Format = Literal["parquet", "csv"]
SOURCE_DIR = "source"  # synthetic data with engine=ray: the generated shop is written here as shards first


# ----------------------------------------------------------------------------------------------
# Ray itself


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None, object_store_mb: int | None = None) -> Iterator[bool]:
    """Ray for the duration of a ``with`` block; yields True when this block started it.

    Joins a running Ray (``ray.init`` done by the caller, or ``RAY_ADDRESS`` naming a cluster) and
    leaves it running; otherwise starts a local one bound to 127.0.0.1, without a dashboard, with
    ``num_cpus`` (default: up to 4 of this machine's cores) and stops it on exit, error or not.
    """
    import ray

    if ray.is_initialized():
        yield False
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        try:
            yield False
        finally:
            ray.shutdown()  # disconnects this driver; the cluster keeps running
        return
    ray.init(
        num_cpus=num_cpus or min(4, os.cpu_count() or 1),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        object_store_memory=(object_store_mb or 1024) * 2**20,
    )
    try:
        yield True
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------------------------
# where the events are


def event_shards(folder: str | Path, format: Format | None = None) -> tuple[list[Path], Format]:
    """The event files of a data set folder, in shard order, and their format.

    ``events/part-*.{parquet,csv}`` (the sharded layout) or one ``events.{parquet,csv}`` file.
    """
    root = Path(folder)
    shard_dir = root / EVENT_SHARDS_DIR
    formats: tuple[Format, ...] = (format,) if format else ("parquet", "csv")
    if shard_dir.is_dir():
        for fmt in formats:
            found = sorted(p for p in shard_dir.iterdir() if p.is_file() and p.suffix == SUFFIX[fmt])
            if found:
                return found, fmt
        raise DataValidationError(f"{shard_dir}: no {' or '.join('*' + SUFFIX[f] for f in formats)} shards")
    for fmt in formats:
        single = root / f"events{SUFFIX[fmt]}"
        if single.is_file():
            return [single], fmt
    raise DataValidationError(
        f"{root}: missing events; write shards as {EVENT_SHARDS_DIR}/part-00000.parquet, ... "
        "(towerline data generate --shard-events N) or one events.parquet / events.csv"
    )


def _side_table(root: Path, stem: str, fmt: Format) -> Path | None:
    for f in (fmt, "parquet", "csv"):
        if (root / f"{stem}{SUFFIX[f]}").is_file():
            return root / f"{stem}{SUFFIX[f]}"
    return None


def _read_side_tables(root: Path, fmt: Format) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The catalogue and users tables (small next to the log: read in the driver, validated as locally)."""
    out: list[pd.DataFrame | None] = []
    for stem, validate in (("items", validate_items), ("users", validate_users)):
        path = _side_table(root, stem, fmt)
        if path is None:
            out.append(None)
            continue
        frame, report = validate(read_table(path, stem, None), path.name)  # type: ignore[arg-type]
        report.raise_if_invalid()
        out.append(frame.reset_index(drop=True))
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------
# the tasks (module-level, so Ray pickles them by reference)


def _read_valid_shard(path: str, fmt: Format) -> pd.DataFrame:
    """One shard, read and validated as the local reader reads a file; index = the file's row."""
    p = Path(path)
    frame, report = validate_events(read_table(p, "events", fmt), p.name)
    report.raise_if_invalid()
    assert frame is not None  # no problems -> a frame
    return frame


def _as_text(col: pd.Series) -> np.ndarray:
    return np.asarray(col.astype(str) if isinstance(col.dtype, pd.CategoricalDtype) else col, dtype=object)


def _distinct_ids(col: pd.Series) -> np.ndarray:
    if isinstance(col.dtype, pd.CategoricalDtype):
        codes = np.unique(col.cat.codes.to_numpy())
        return np.asarray(col.cat.categories.astype(str), dtype=object)[codes[codes >= 0]]
    return pd.unique(col.dropna().to_numpy())


def _shard_ids(batch: dict[str, np.ndarray], fmt: Format) -> pa.Table:
    """Pass 1: the distinct ids of each shard in the batch, and its row count."""
    rows: dict[str, list[Any]] = {"users": [], "items": [], "event_types": [], "n_events": []}
    for path in batch["path"]:
        frame = _read_valid_shard(str(path), fmt)
        rows["users"].append([str(x) for x in _distinct_ids(frame["user_id"])])
        rows["items"].append([str(x) for x in _distinct_ids(frame["item_id"])])
        rows["event_types"].append([str(x) for x in _distinct_ids(frame["event_type"])])
        rows["n_events"].append(len(frame))
    ids = pa.list_(pa.string())
    return pa.table({
        "users": pa.array(rows["users"], type=ids),
        "items": pa.array(rows["items"], type=ids),
        "event_types": pa.array(rows["event_types"], type=ids),
        "n_events": pa.array(rows["n_events"], type=pa.int64()),
    })


class _EncodeShards:
    """Pass 2 (an actor, so the vocabularies are unpickled once per worker, not once per shard):
    a shard -> index columns, its shard number and file row (the tie-break), and its user partition."""

    def __init__(self, fmt: Format, users: np.ndarray, items: np.ndarray, event_types: np.ndarray, n_parts: int):
        self.fmt, self.n_parts = fmt, n_parts
        self.users, self.items, self.event_types = Vocab(users), Vocab(items), Vocab(event_types)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        tables = []
        for shard, path in zip(batch["shard"], batch["path"]):
            frame = _read_valid_shard(str(path), self.fmt)
            user = self.users.encode(frame["user_id"])
            tables.append(pa.table({  # int32 indices: half the bytes through the shuffle
                "user_idx": user.astype(np.int32),
                "item_idx": self.items.encode(frame["item_id"]).astype(np.int32),
                "etype": self.event_types.encode(frame["event_type"]).astype(np.int32),
                "ts": frame["timestamp"].to_numpy(dtype=np.int64),
                "value": frame["value"].to_numpy(dtype=np.float64),
                "shard": np.full(len(frame), int(shard), dtype=np.int32),
                "row": frame.index.to_numpy(dtype=np.int64),
                "part": (user * self.n_parts // len(self.users)).astype(np.int32),
            }))
        return pa.concat_tables(tables)


def _fold_partition(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One user partition: sort as the local path does, fold repeats, number the steps."""
    order = np.lexsort((batch["row"], batch["shard"], batch["ts"], batch["user_idx"]))
    user, item, etype, ts, value = fold_repeats(*(batch[k][order] for k in ("user_idx", "item_idx", "etype", "ts", "value")))
    part = batch["part"][:1]
    return {
        "user_idx": user, "item_idx": item, "etype": etype, "ts": ts, "value": value,
        "part": np.repeat(part, len(user)), "pos": np.arange(len(user), dtype=np.int32),
    }


# ----------------------------------------------------------------------------------------------
# the pipeline


def prepare_features(
    cfg: DataConfig,
    out_dir: str | Path,
    max_attributes: int,
    *,
    rows_per_partition: int = 2_000_000,
    num_cpus: int | None = None,
) -> dict[str, Any]:
    """Write the prepared-data files of ``cfg``'s data set into ``out_dir`` with Ray Data.

    Args:
        cfg: the data settings; ``format`` csv or parquet (a folder of shards or of single files),
            or synthetic (generated here, then written as shards under ``out_dir/source``).
        out_dir: the data cache folder (what ``SequenceDataModule`` calls ``work_dir``).
        max_attributes: width of the item-attribute matrix (``model.max_attributes``).
        rows_per_partition: events per user partition: bounds one worker's sort-and-fold memory.
        num_cpus: CPUs of a Ray started here (ignored when joining a running Ray).

    Returns:
        ``{"dataset", "events", "users", "items", "seconds"}`` (counts as the local path reports them).
    """
    import ray

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = cfg.name
    if cfg.format == "synthetic":
        dataset = generate_dataset(cfg.synthetic_users, cfg.synthetic_items, seed=cfg.seed)
        root = out / SOURCE_DIR
        write_sharded_dataset(dataset, root, rows_per_shard=max(1, len(dataset.events) // 4 + 1))
        items, users, fmt_hint = dataset.items, dataset.users, "parquet"
        del dataset
    elif cfg.format in ("parquet", "csv"):
        root, fmt_hint = Path(cfg.path or "."), cfg.format
        items = users = None
    else:
        raise TowerlineError(
            f"data.engine 'ray' reads csv/parquet event shards or synthetic data, not format '{cfg.format}'; "
            "use data.engine: local for S3Rec files"
        )
    shards, fmt = event_shards(root, fmt_hint)  # type: ignore[arg-type]
    if cfg.format != "synthetic":
        items, users = _read_side_tables(root, fmt)

    with ray_session(num_cpus):
        ray.data.DataContext.get_current().enable_progress_bars = False
        tasks = ray.data.from_items(
            [{"shard": i, "path": str(p)} for i, p in enumerate(shards)], override_num_blocks=len(shards)
        )
        seen = {"users": [], "items": [], "event_types": []}
        n_events = 0
        for batch in tasks.map_batches(_shard_ids, fn_kwargs={"fmt": fmt}, batch_size=1, batch_format="numpy").iter_batches(batch_format="pyarrow", batch_size=None):
            for key in seen:
                seen[key].extend(np.asarray(v, dtype=object) for v in batch.column(key).to_pylist())
            n_events += sum(batch.column("n_events").to_pylist())
        event_users = np.unique(np.concatenate(seen["users"])) if seen["users"] else np.array([], dtype=object)
        event_items = np.unique(np.concatenate(seen["items"])) if seen["items"] else np.array([], dtype=object)
        event_types = np.unique(np.concatenate(seen["event_types"])) if seen["event_types"] else np.array([], dtype=object)
        if items is None:
            items = _derived_items(event_items)
        if users is None:
            users = pd.DataFrame({"user_id": pd.Series(event_users, dtype="str"), "consent": np.ones(len(event_users), dtype=bool)})
        vocabs = _vocabs(event_users, event_items, event_types, items, users)
        log.info("ray data: %s events in %d shard(s); vocabularies in %.1f s", f"{n_events:,}", len(shards), time.perf_counter() - t0)

        n_parts = max(1, -(-n_events // rows_per_partition))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        encoded = tasks.map_batches(
            _EncodeShards, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs={
                "fmt": fmt, "users": vocabs.users.ids, "items": vocabs.items.ids,
                "event_types": vocabs.event_types.ids, "n_parts": n_parts,
            },
            compute=ray.data.ActorPoolStrategy(size=max(1, min(len(shards), cpus))),
            # half a CPU each: the shuffle's map and reduce tasks need whole CPUs, and encoders holding every
            # CPU while their output waits for the shuffle deadlock the pipeline (50M events on 2 CPUs did)
            num_cpus=0.5 if cpus >= 2 else 0,
        )
        folded = encoded.groupby("part", num_partitions=n_parts).map_groups(_fold_partition, batch_format="numpy")
        pieces = _ordered_pieces(folded.iter_batches(batch_format="numpy", batch_size=None))
    vocabs.save(out / "vocab")
    save_pieces(pieces, out / "sequences.npz")
    del pieces
    np.save(out / "item_attributes.npy", item_attribute_matrix(items, vocabs, max_attributes))
    items.to_parquet(out / "items.parquet")
    users[["user_id", "consent"]].astype({"user_id": str, "consent": bool}).to_parquet(out / "users.parquet")
    summary = {"dataset": name, "events": n_events, "users": len(users), "items": len(items),
               "seconds": round(time.perf_counter() - t0, 2)}
    log.info("ray data: prepared %s", json.dumps(summary))
    return summary


def _derived_items(ids: np.ndarray) -> pd.DataFrame:
    """A catalogue from the event log alone (no items file), as the local reader derives one."""
    return pd.DataFrame({
        "item_id": pd.Series(ids, dtype="str"),
        "attributes": [[] for _ in range(len(ids))],
        "price": np.full(len(ids), np.nan),
        "in_stock": np.ones(len(ids), dtype=bool),
        "title": pd.Series(np.nan, index=range(len(ids)), dtype="str"),
    })[ITEM_COLUMNS]


def _vocabs(event_users: np.ndarray, event_items: np.ndarray, event_types: np.ndarray,
            items: pd.DataFrame, users: pd.DataFrame) -> Vocabs:
    """The vocabularies ``build_vocabs`` makes, from distinct ids instead of the whole log."""
    if "attributes" in items and len(items):
        tokens = pd.Series(items["attributes"]).explode().dropna()
        attributes = build_vocab(tokens.astype(str).to_numpy())
    else:
        attributes = Vocab(np.array([], dtype=object))
    return Vocabs(
        users=build_vocab(np.concatenate([event_users, _as_text(users["user_id"])])),
        items=build_vocab(np.concatenate([_as_text(items["item_id"]), event_items])),
        event_types=build_vocab(event_types, first=EVENT_TYPES),
        attributes=attributes,
    )


def _ordered_pieces(batches: Iterator[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Folded output batches -> pieces of one partition each, in (partition, position) order: the
    order of the local path (partitions are user ranges, positions follow user and time within one).
    A batch may hold several partitions and a partition may span batches; neither changes the order."""
    pieces = []
    for batch in batches:
        if not len(batch["part"]):
            continue
        order = np.lexsort((batch["pos"], batch["part"]))
        part = batch["part"][order]
        cuts = np.flatnonzero(np.r_[True, part[1:] != part[:-1]])
        for lo, hi in zip(cuts, np.r_[cuts[1:], len(part)]):
            pieces.append({k: v[order[lo:hi]] for k, v in batch.items()})
    pieces.sort(key=lambda p: (int(p["part"][0]), int(p["pos"][0])))
    return pieces


def save_pieces(pieces: list[dict[str, np.ndarray]], path: str | Path) -> None:
    """Write ``Sequences.save``'s ``.npz`` from ordered pieces, one array at a time.

    The driver never holds more than the folded pieces (int32 indices) plus one output array, not
    a concatenated copy of every column; ``Sequences.load`` reads the result (same keys, dtypes).
    """
    import zipfile

    def column(key: str, dtype: type) -> np.ndarray:
        return np.concatenate([p[key] for p in pieces]).astype(dtype, copy=False) if pieces else np.array([], dtype=dtype)

    user = column("user_idx", np.int64)
    row_start = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if len(user) else np.array([], dtype=np.int64)
    arrays: dict[str, Any] = {
        "offsets": lambda: np.append(row_start, len(user)).astype(np.int64),
        "user_idx": lambda: user[row_start],
        "item_idx": lambda: column("item_idx", np.int64),
        "event_type_idx": lambda: column("etype", np.int64),
        "timestamp": lambda: column("ts", np.int64),
        "value": lambda: column("value", np.float64),
    }
    assert tuple(arrays) == SEQUENCE_ARRAYS  # internal: the keys Sequences.load expects
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for key, make in arrays.items():
            with z.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, make(), allow_pickle=False)
