"""``Dataset`` -> ``events``/``items``/``users`` files that ``load_dataset`` reads back unchanged.

Parquet files carry the pyarrow schemas of ``contracts`` (ids as strings, timestamps as int64
epoch seconds, attributes as a list of strings), so any Parquet reader sees the contract. CSV is
for people and spreadsheets: attributes become ``category:c12|brand:b3`` text, booleans
``true``/``false``, missing values empty cells. Both are written by pyarrow, column by column, so
ten million events take seconds rather than the minutes of ``DataFrame.to_csv``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from towerline.errors import DataValidationError
from towerline.features.contracts import EVENTS_SCHEMA, ITEMS_SCHEMA, USERS_SCHEMA, Dataset
from towerline.features.validate import ATTRIBUTE_SEPARATOR

log = logging.getLogger(__name__)

SUFFIX = {"parquet": ".parquet", "csv": ".csv"}
EVENT_SHARDS_DIR = "events"  # a sharded data set keeps its event log as events/part-00000.parquet, ...


def write_dataset(
    dataset: Dataset, out_dir: str | Path, format: Literal["parquet", "csv"] = "parquet"
) -> dict[str, Path]:
    """Write ``events``, ``items`` and ``users`` files into ``out_dir`` (created if needed).

    Returns ``{"events": path, "items": path, "users": path}``. Users' extra attribute columns are
    written after the contract's columns with the types pandas gives them.
    """
    if format not in SUFFIX:
        raise DataValidationError(f"unknown output format {format!r}; use parquet or csv")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, frame, schema in (
        ("events", dataset.events, EVENTS_SCHEMA),
        ("items", dataset.items, ITEMS_SCHEMA),
        ("users", dataset.users, USERS_SCHEMA),
    ):
        table = to_arrow(frame, schema)
        path = out / f"{name}{SUFFIX[format]}"
        if format == "parquet":
            pq.write_table(table, path)
        else:
            pacsv.write_csv(_csv_ready(table), path)
        paths[name] = path
        log.info("wrote %s (%s rows)", path, f"{table.num_rows:,}")
    return paths


def to_arrow(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """A canonical frame -> a table with exactly ``schema``'s columns first, then any extras.

    Categorical id columns are cast to plain strings (Parquet dictionary-encodes them on disk
    anyway); a contract column the frame lacks is written as nulls rather than refused, since every
    contract column but the ids is optional.
    """
    columns, names = [], []
    n = len(frame)
    for field in schema:
        if field.name in frame.columns:
            arr = pa.array(frame[field.name], from_pandas=True)
            if not arr.type.equals(field.type):
                arr = pc.cast(arr, field.type)
        else:
            arr = pa.nulls(n, field.type)
        columns.append(arr)
        names.append(field.name)
    for extra in (c for c in frame.columns if c not in schema.names):
        columns.append(pa.array(frame[extra], from_pandas=True))
        names.append(str(extra))
    return pa.table(columns, names=names)


def _csv_ready(table: pa.Table) -> pa.Table:
    """List columns (item attributes) -> ``a|b|c`` text, which CSV can hold and the reader splits."""
    for i, field in enumerate(table.schema):
        if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
            joined = pc.binary_join(pc.cast(table.column(i), pa.list_(pa.string())), ATTRIBUTE_SEPARATOR)
            table = table.set_column(i, field.name, pc.fill_null(joined, ""))
    return table


def write_table(table: pa.Table, path: str | Path, format: Literal["parquet", "csv"] = "parquet") -> Path:
    """One contract table to one file (Parquet as is, CSV with list columns joined)."""
    path = Path(path)
    if format == "parquet":
        pq.write_table(table, path)
    else:
        pacsv.write_csv(_csv_ready(table), path)
    return path


def shard_path(out_dir: str | Path, shard: int, format: Literal["parquet", "csv"] = "parquet") -> Path:
    """``<out_dir>/events/part-00042.parquet``: zero-padded, so sorting by name is shard order, which is
    the order the readers concatenate shards in (ties in time keep it, as they keep file order)."""
    return Path(out_dir) / EVENT_SHARDS_DIR / f"part-{shard:05d}{SUFFIX[format]}"


def write_sharded_dataset(
    dataset: Dataset,
    out_dir: str | Path,
    rows_per_shard: int = 1_000_000,
    format: Literal["parquet", "csv"] = "parquet",
) -> dict[str, Path]:
    """Like ``write_dataset``, but the events go to ``events/part-*.{parquet,csv}`` of at most
    ``rows_per_shard`` rows each: the layout Ray Data reads one shard per task
    (``towerline.features.ray_data``), so no reader ever holds the whole log.

    Returns ``{"events": events folder, "items": path, "users": path}``.
    """
    if format not in SUFFIX:
        raise DataValidationError(f"unknown output format {format!r}; use parquet or csv")
    if rows_per_shard < 1:
        raise DataValidationError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    out = Path(out_dir)
    (out / EVENT_SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    events = to_arrow(dataset.events, EVENTS_SCHEMA)
    n_shards = max(1, -(-events.num_rows // rows_per_shard))
    for i in range(n_shards):
        write_table(events.slice(i * rows_per_shard, rows_per_shard), shard_path(out, i, format), format)
    paths = {"events": out / EVENT_SHARDS_DIR}
    for name, frame, schema in (("items", dataset.items, ITEMS_SCHEMA), ("users", dataset.users, USERS_SCHEMA)):
        paths[name] = write_table(to_arrow(frame, schema), out / f"{name}{SUFFIX[format]}", format)
    log.info("wrote %s events in %d shard(s) under %s", f"{events.num_rows:,}", n_shards, paths["events"])
    return paths
