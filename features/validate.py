"""Raw tables -> canonical tables, or a report that says what is wrong and where.

Validation happens once, at the edge: ``validate_events``/``validate_items``/``validate_users`` take a
frame as a reader produced it (any dtypes: strings from a CSV, typed columns from Parquet, a frame
built by hand) and return the canonical frame of ``towerline.features.contracts`` plus a
``ValidationReport``. Downstream code trusts what comes out.

Two kinds of finding:

* problems (fatal): the data cannot be used as it is, e.g. a missing column, an unparsable
  timestamp, a negative price. Every line names the file, the row (1-based data row; ``line`` for
  S3Rec files) and the field, and says how to fix it. ``load_dataset`` raises them together as one
  ``DataValidationError`` so a user fixes a file in one pass, not one error per run.
* warnings (not fatal): duplicate event ids, events whose item or user the catalogue does not know,
  out-of-order timestamps, columns Towerline does not read (ignored), no consent data. They are counted in ``counts`` and logged, never silently dropped:
  duplicates are the one thing removed (keeping the first), and the report lists which rows went.

Everything is vectorised over columns (numpy/pandas), so ten million events validate in seconds;
Python loops only touch the first ``MAX_LISTED`` offending rows that end up in messages.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from towerline.errors import DataValidationError
from towerline.features.contracts import (
    DEFAULT_EVENT_TYPE,
    EVENT_COLUMNS,
    ITEM_COLUMNS,
    REQUIRED_EVENT_COLUMNS,
    REQUIRED_ITEM_COLUMNS,
    REQUIRED_USER_COLUMNS,
    USER_COLUMNS,
    Dataset,
)

log = logging.getLogger(__name__)

MAX_LISTED = 20  # offending rows spelled out per kind of problem; the rest are counted

MAX_EPOCH_SECONDS = 10**11  # year 5138: larger "seconds" are almost surely milliseconds
TIMESTAMP_HINT = "write epoch seconds (1735689600) or ISO-8601 (2025-01-01T00:00:00Z)"
ATTRIBUTE_SEPARATOR = "|"  # CSV cells hold item attributes as "category:c12|brand:b3"

_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})


@dataclass
class ValidationReport:
    """What validation found: fatal ``problems``, non-fatal ``warnings`` and ``counts``.

    After ``load_dataset``/``check_dataset`` of a readable data set, ``counts`` holds ``events``,
    ``users``, ``items`` and the non-fatal findings (``duplicate_event_ids``, ``unknown_items``,
    ``unknown_users``, ``out_of_order``, ... with 0 when nothing was found), so a caller (the CLI, a
    notebook) can print them without checking which keys exist.
    """

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when nothing fatal was found (warnings allowed)."""
        return not self.problems

    def extend(self, other: ValidationReport) -> ValidationReport:
        """Add ``other``'s findings to this report (counts of the same key are summed)."""
        self.problems.extend(other.problems)
        self.warnings.extend(other.warnings)
        for key, value in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + value
        return self

    def raise_if_invalid(self) -> None:
        """Raise every problem at once as a ``DataValidationError``."""
        if self.problems:
            raise DataValidationError(self.problems)


# ----------------------------------------------------------------------------- message helpers


def _bad_rows(source: str, column: str, raw: pd.Series, mask: np.ndarray, reason: str) -> list[str]:
    """One line per offending row of ``raw`` (the first ``MAX_LISTED``), then '... and N more'.

    Row numbers are 1-based positions in ``raw``: the data row of the file it was read from.
    Only the listed cells are converted to Python objects, so a column of ten million rows with
    a few bad cells costs one ``flatnonzero``.
    """
    where = np.flatnonzero(mask)
    if len(where) == 0:
        return []
    shown = raw.iloc[where[:MAX_LISTED]].tolist()
    lines = [
        f"{source} row {int(r) + 1}, field '{column}': {_show(v)} {reason}" for r, v in zip(where, shown)
    ]
    if len(where) > MAX_LISTED:
        lines.append(f"{source}, field '{column}': ... and {len(where) - MAX_LISTED:,} more rows like these")
    return lines


def _money(
    raw: pd.DataFrame, column: str, source: str, report: ValidationReport, not_numeric: str, negative: str
) -> np.ndarray:
    """An optional money column as float (NaN where empty or absent); non-numbers and negatives are reported.

    Event values and item prices follow one rule (a plain decimal, no currency sign, >= 0); only the
    advice in the message differs, so each caller passes its two reasons.
    """
    if column not in raw.columns:
        return np.full(len(raw), np.nan)
    value, bad_number, below_zero = as_number(raw[column])
    for mask, reason in ((bad_number, not_numeric), (below_zero, negative)):
        report.problems += _bad_rows(source, column, raw[column], mask, reason)
    return value


def _show(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return "(empty)"
    text = repr(value.item() if isinstance(value, np.generic) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def _n(count: int, noun: str) -> str:
    """'1 row', '3 rows': counts in messages read as sentences."""
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _list_rows(rows: np.ndarray, unit: str = "row") -> str:
    shown = ", ".join(str(int(r)) for r in rows[:MAX_LISTED])
    more = f" and {len(rows) - MAX_LISTED:,} more" if len(rows) > MAX_LISTED else ""
    return f"{unit}s {shown}{more}" if len(rows) != 1 else f"{unit} {shown}"


def _row_numbers(df: pd.DataFrame) -> np.ndarray:
    """1-based data row of each frame row: from an integer index (file row, 0-based), else position."""
    if pd.api.types.is_integer_dtype(df.index.dtype):
        return np.asarray(df.index, dtype=np.int64) + 1
    return np.arange(1, len(df) + 1, dtype=np.int64)


def check_columns(
    columns: Sequence[object],
    source: str,
    required: Sequence[str],
    known: Sequence[str] | None,
    unknown_fix: str = "remove or rename it",
) -> list[str]:
    """Missing required columns, and (when ``known`` is given) unknown ones with the nearest name."""
    present = [str(c) for c in columns]
    problems = []
    for name in required:
        if name not in present:
            close = difflib.get_close_matches(name, present, n=1, cutoff=0.6)
            column = close[0] if close else "COLUMN"
            hint = f"is '{close[0]}' meant to be '{name}'? " if close else ""
            problems.append(
                f"{source} header, field '{name}': required column is missing "
                f"(found: {', '.join(present) or 'no columns'}); {hint}name the column that holds it with "
                f"--map {name}={column} (data.columns in a config) or rename it"
            )
    if known is not None:
        for name in present:
            if name in known:
                continue
            close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
            fix = f"did you mean '{close[0]}'?" if close else unknown_fix
            problems.append(
                f"{source} header, field '{name}': unknown column; {fix} "
                f"(valid columns: {', '.join(known)})"
            )
    return problems


# ----------------------------------------------------------------------------- column coercion


def _is_missing(s: pd.Series) -> np.ndarray:
    """Null, or an empty/blank string (a CSV cell with nothing in it)."""
    missing = np.array(s.isna(), dtype=bool)  # a copy: pandas may hand out read-only arrays
    if isinstance(s.dtype, pd.CategoricalDtype):
        cats = s.cat.categories
        if pd.api.types.is_string_dtype(cats.dtype) and len(cats):
            blank = np.append(np.asarray(cats.str.strip() == "", dtype=bool), True)
            missing |= blank[s.cat.codes.to_numpy()]
    elif s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
        blank = s.astype("str").str.strip() == ""
        missing |= np.asarray(blank.fillna(False), dtype=bool)
    return missing


def as_id_column(s: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Any column of ids -> Categorical of str, plus a mask of rows whose id is null or blank.

    Categorical keeps 10-million-row id columns small and lets later steps (vocabularies, the
    unknown-item check) work per distinct id rather than per row.
    """
    if not isinstance(s.dtype, pd.CategoricalDtype):
        s = s.astype("category")
    cats = s.cat.categories
    codes = s.cat.codes.to_numpy()
    text = pd.Index(cats.map(str), dtype="str") if len(cats) else pd.Index([], dtype="str")
    if not pd.api.types.is_string_dtype(cats.dtype) or not text.is_unique:
        # non-string ids (ints from Parquet, a frame built by hand): merge categories equal as text
        uniq, inverse = np.unique(np.asarray(text, dtype=object), return_inverse=True)
        codes = np.where(codes >= 0, inverse[np.maximum(codes, 0)], -1)
        text = pd.Index(uniq, dtype="str")
    out = pd.Series(pd.Categorical.from_codes(codes, categories=text), index=s.index, name=s.name)
    blank_cat = np.asarray(text.str.strip() == "", dtype=bool)
    bad = (codes < 0) | np.append(blank_cat, False)[codes]  # code -1 indexes the appended False
    return out, bad


def as_optional_text(s: pd.Series) -> pd.Series:
    """Free text or optional ids (event_id, channel, title): str, with blank cells as missing."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        s = s.astype("str")
    elif not pd.api.types.is_string_dtype(s.dtype) or s.dtype == object:
        s = s.astype("str").where(s.notna())
    missing = _is_missing(s)
    return s.where(~missing).astype("str") if missing.any() else s.astype("str")


def as_optional_category(s: pd.Series) -> pd.Series:
    """Optional repetitive text (channel, event_type): Categorical of str, blank cells missing.

    Works per category when the column is Categorical already, so ten million rows cost nothing.
    """
    col, _ = as_id_column(s)
    cats = col.cat.categories
    blank = list(cats[np.asarray(cats.str.strip() == "", dtype=bool)])
    return col.cat.remove_categories(blank) if blank else col


def as_number(s: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (float64 values, NaN where missing; mask of non-numeric cells; mask of negative values)."""
    if pd.api.types.is_numeric_dtype(s.dtype):  # typed column (Parquet, clean CSV): nothing to parse
        values = s.to_numpy(dtype=np.float64, na_value=np.nan)
        return values, np.zeros(len(s), dtype=bool), values < 0
    missing = _is_missing(s)
    values = pd.to_numeric(s.where(~missing), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    not_numeric = np.isnan(values) & ~missing
    negative = values < 0  # NaN compares False
    return values, not_numeric, negative


def as_bool(s: pd.Series, default: bool) -> tuple[np.ndarray, np.ndarray]:
    """-> (bool values, missing cells take ``default``; mask of cells that are not a boolean).

    Accepts true/false, yes/no, t/f, y/n, 1/0 in any case, as CSV files spell booleans many ways.
    """
    if pd.api.types.is_bool_dtype(s.dtype) and not s.isna().any():
        return s.to_numpy(dtype=bool), np.zeros(len(s), dtype=bool)
    missing = _is_missing(s)
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        num = s.to_numpy(dtype=np.float64, na_value=np.nan)
        is_true, is_false = num == 1, num == 0
    else:
        text = s.astype("str").str.strip().str.lower()
        is_true = np.asarray(text.isin(_TRUE), dtype=bool)
        is_false = np.asarray(text.isin(_FALSE), dtype=bool)
    values = np.where(missing, default, is_true)
    return values, ~missing & ~is_true & ~is_false


def as_epoch_seconds(s: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Timestamps -> (int64 epoch seconds; mask of missing cells; mask of unparsable cells).

    Integers are epoch seconds already; floats are floored; datetimes (Parquet timestamp columns,
    Python datetimes) and ISO-8601 strings are converted, naive ones read as UTC. Strings are tried
    as numbers first, so a CSV column mixing ``1735689600`` and ``2025-01-01T00:00:00Z`` works.
    """
    n = len(s)
    missing = _is_missing(s)
    out = np.zeros(n, dtype=np.int64)
    bad = np.zeros(n, dtype=bool)
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        out[~missing] = _datetimes_to_seconds(s[~missing])
        return out, missing, bad
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        if s.dtype.kind in "iu" and not missing.any():
            return s.to_numpy(dtype=np.int64), missing, bad
        values = s.to_numpy(dtype=np.float64, na_value=np.nan)
        finite = np.isfinite(values)
        out[finite] = np.floor(values[finite]).astype(np.int64)
        return out, missing, ~finite & ~missing
    present = s.where(~missing)
    num = pd.to_numeric(present, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    is_num = np.isfinite(num)
    out[is_num] = np.floor(num[is_num]).astype(np.int64)
    rest = ~missing & ~is_num
    if rest.any():
        parsed = pd.to_datetime(present[rest], format="ISO8601", utc=True, errors="coerce")
        ok = parsed.notna().to_numpy()
        idx = np.flatnonzero(rest)
        out[idx[ok]] = _datetimes_to_seconds(parsed[ok])
        bad[idx[~ok]] = True
    return out, missing, bad


def _datetimes_to_seconds(s: pd.Series) -> np.ndarray:
    if getattr(s.dtype, "tz", None) is not None:
        s = s.dt.tz_convert("UTC").dt.tz_localize(None)
    elif not pd.api.types.is_datetime64_any_dtype(s.dtype):
        s = pd.to_datetime(s, utc=True).dt.tz_localize(None)
    return s.to_numpy().astype("datetime64[s]").astype(np.int64)


# ----------------------------------------------------------------------------- tables


def extra_columns_warning(columns: Sequence[object], source: str, known: Sequence[str], use_hint: str) -> str | None:
    """One warning line listing the columns Towerline does not read, or None when there are none.

    Extra columns are ignored, not fatal: exports from shops carry dozens of columns nobody asked
    for, and refusing the file made bringing data a renaming chore. A name close to a known one
    gets a "did you mean", since a misspelt optional column would otherwise vanish quietly.
    """
    extra = [str(c) for c in columns if str(c) not in known]
    if not extra:
        return None
    shown = []
    for name in extra[:MAX_LISTED]:
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
        shown.append(f"'{name}' (did you mean '{close[0]}'?)" if close else f"'{name}'")
    more = f" and {len(extra) - MAX_LISTED:,} more" if len(extra) > MAX_LISTED else ""
    return (
        f"{source}: {_n(len(extra), 'column')} not used by Towerline, ignored: {', '.join(shown)}{more}; "
        f"{use_hint} (Towerline's columns: {', '.join(known)})"
    )


_MAP_HINT = "to use one, map it with --map NAME=COLUMN"


def _check_table_start(
    raw: pd.DataFrame,
    source: str,
    required: Sequence[str],
    known: Sequence[str] | None,
    report: ValidationReport,
    use_hint: str = _MAP_HINT,
) -> list[str]:
    """Missing required columns and an empty table (problems); extra columns (one warning)."""
    problems = check_columns(list(raw.columns), source, required, None)
    if known is not None and (line := extra_columns_warning(list(raw.columns), source, known, use_hint)):
        report.warnings.append(line)
    if len(raw) == 0 and not problems:
        problems.append(
            f"{source}: file is empty (a header but no data rows); add rows or remove the file"
        )
    return problems


def _duplicates(ids: pd.Series, rows: np.ndarray) -> tuple[np.ndarray, str]:
    """Rows repeating an earlier (non-null) id -> mask, and a phrase listing them with their first row.

    One hash pass: ``pd.factorize`` numbers distinct ids in order of first appearance, so a row is
    the first of its id exactly when its code exceeds every earlier code.
    """
    if _strictly_increasing(ids):  # sequential ids, as generators and many logs write them
        return np.zeros(len(ids), dtype=bool), ""
    codes, _ = pd.factorize(ids)  # (N,) -1 for null
    prev_max = np.maximum.accumulate(np.concatenate([[-1], codes[:-1]]))
    dup = (codes >= 0) & (codes <= prev_max)
    if not dup.any():
        return dup, ""
    first_row = rows[codes > prev_max]  # first_row[c]: file row where id code c first appears
    where = np.flatnonzero(dup)[:MAX_LISTED]
    shown = ids.iloc[where].tolist()
    examples = ", ".join(
        f"row {rows[i]} ({_show(v)}, first at row {first_row[codes[i]]})" for i, v in zip(where, shown)
    )
    n_dup = int(dup.sum())
    more = f" and {n_dup - len(where):,} more" if n_dup > len(where) else ""
    return dup, examples + more


def _strictly_increasing(ids: pd.Series) -> bool:
    """True when every id is greater than the one before (so none repeats): one linear compare.

    A hash pass over ten million distinct strings costs seconds; this check costs a fraction of
    that and settles the common case of ids written in order. Arrow-backed text only.
    """
    if len(ids) < 2 or not (isinstance(ids.dtype, pd.StringDtype) and ids.dtype.storage == "pyarrow"):
        return False
    arr = pa.array(ids.array)  # zero-copy view of the Arrow data (Array or ChunkedArray)
    if arr.null_count:
        return False
    n = len(arr)
    return bool(pc.all(pc.greater(arr.slice(1), arr.slice(0, n - 1))).as_py())


def s3rec_id_problems(tokens: np.ndarray, line_no: np.ndarray, is_user: np.ndarray, source: str) -> list[str]:
    """One problem per S3Rec token that is not an integer id (the first ``MAX_LISTED``), then a count.

    S3Rec files (and the preprocessing that makes them) number users and items 1..N, so a token such
    as ``abc`` is a damaged line, not a new item: read as text it would quietly join the catalogue.
    ``tokens`` (T,) are the file's whitespace-separated strings, ``line_no`` (T,) the 1-based line of
    each and ``is_user`` (T,) True for the first token of a line (the user id).
    """
    bad = ~pc.ascii_is_decimal(pa.array(tokens, type=pa.string())).to_numpy(zero_copy_only=False)
    where = np.flatnonzero(bad)
    lines = [
        f"{source} line {int(line_no[t])}, field '{'user_id' if is_user[t] else 'item_id'}': {_show(tokens[t])} is "
        "not an integer id; S3Rec lines are whole numbers, 'user item item ...'"
        for t in where[:MAX_LISTED]
    ]
    if len(where) > MAX_LISTED:
        lines.append(f"{source}: ... and {len(where) - MAX_LISTED:,} more tokens like these")
    return lines


def validate_events(raw: pd.DataFrame, source: str = "events") -> tuple[pd.DataFrame | None, ValidationReport]:
    """Check an events table and return it in canonical columns (or None when a problem is fatal).

    ``source`` is the file name used in messages (``events.csv``). The returned frame keeps the
    file's 0-based row number as its index (rows dropped as duplicates leave gaps), so later
    checks (``validate_dataset``) can still name file rows; ``load_dataset`` resets it.
    Duplicate ``event_id`` rows are dropped keeping the first; every drop is in the report.
    """
    report = ValidationReport(counts={"events": len(raw), "duplicate_event_ids": 0, "out_of_order": 0})
    report.problems += _check_table_start(raw, source, REQUIRED_EVENT_COLUMNS, EVENT_COLUMNS, report)
    if report.problems:
        return None, report
    raw = raw[[c for c in raw.columns if c in EVENT_COLUMNS]].reset_index(drop=True)
    rows = np.arange(1, len(raw) + 1, dtype=np.int64)
    out: dict[str, object] = {}

    for column in ("user_id", "item_id"):
        out[column], bad = as_id_column(raw[column])
        report.problems += _bad_rows(source, column, raw[column], bad, f"is an empty {column}; every row needs one")

    ts, missing, unparsable = as_epoch_seconds(raw["timestamp"])
    parsed = ~missing & ~unparsable
    for mask, reason in (
        (missing, f"is missing; every event needs a time ({TIMESTAMP_HINT})"),
        (unparsable, f"is neither epoch seconds nor ISO-8601 ({TIMESTAMP_HINT})"),
        (parsed & (ts < 0), "is negative; epoch seconds count from 1970-01-01 and must be >= 0"),
        (parsed & (ts > MAX_EPOCH_SECONDS), "is after the year 5000: milliseconds? divide by 1000 to get seconds"),
    ):
        report.problems += _bad_rows(source, "timestamp", raw["timestamp"], mask, reason)
    out["timestamp"] = ts

    if "event_type" in raw.columns:
        event_type = as_optional_category(raw["event_type"])
        if event_type.isna().any():  # data that records no type: the contract's default
            if DEFAULT_EVENT_TYPE not in event_type.cat.categories:
                event_type = event_type.cat.add_categories([DEFAULT_EVENT_TYPE])
            event_type = event_type.fillna(DEFAULT_EVENT_TYPE)
        out["event_type"] = event_type
    else:
        out["event_type"] = pd.Categorical.from_codes(
            np.zeros(len(raw), dtype=np.int8), categories=[DEFAULT_EVENT_TYPE]
        )

    out["value"] = _money(
        raw, "value", source, report,
        "is not a number; write money as 12.50 (no currency sign) or leave it empty",
        "is negative; a value is money paid and must be >= 0 (record refunds elsewhere)",
    )

    for column in ("event_id", "channel"):
        if column in raw.columns:
            out[column] = as_optional_text(raw[column]) if column == "event_id" else as_optional_category(raw[column])
        else:
            out[column] = pd.Series(np.nan, index=raw.index, dtype="str")

    events = pd.DataFrame(out, index=raw.index)[EVENT_COLUMNS]
    if report.problems:
        return None, report

    if events["event_id"].notna().any():
        dup, listing = _duplicates(events["event_id"], rows)
        if dup.any():
            n_dup = int(dup.sum())
            report.counts["duplicate_event_ids"] = n_dup
            report.warnings.append(
                f"{source}, field 'event_id': {_n(n_dup, 'row')} dropped as repeats of an earlier event_id, "
                f"keeping the first: {listing}"
            )
            events = events[~dup]
    n_late, late_rows = _out_of_order(events, _row_numbers(events))
    if n_late:
        report.counts["out_of_order"] = n_late
        report.warnings.append(
            f"{source}, field 'timestamp': {_n(n_late, 'event')} out of order, earlier than the same "
            f"user's previous row ({_list_rows(late_rows)}); kept, as sequences are sorted by time anyway"
        )
    for line in report.warnings:
        log.warning(line)
    return events, report


def _out_of_order(events: pd.DataFrame, rows: np.ndarray) -> tuple[int, np.ndarray]:
    """Rows whose timestamp is earlier than the previous row of the same user, in file order."""
    codes = events["user_id"].cat.codes.to_numpy()
    order = np.argsort(codes, kind="stable")  # groups users, keeps file order within a user
    ts = events["timestamp"].to_numpy()[order]
    same_user = codes[order][1:] == codes[order][:-1]
    late = same_user & (ts[1:] < ts[:-1])
    late_rows = np.sort(rows[order[1:][late]])
    return int(late.sum()), late_rows


def validate_items(raw: pd.DataFrame, source: str = "items") -> tuple[pd.DataFrame | None, ValidationReport]:
    """Check a catalogue and return it in canonical columns (or None when a problem is fatal).

    ``attributes`` may be a list column (Parquet) or text ``"category:c12|brand:b3"`` (CSV).
    Extra columns are ignored with one warning that says to move them into ``attributes`` tokens:
    a ``category`` column dropped without a word would train a model without the signal its author
    thought it had, and refusing the file made every shop export a renaming chore.
    """
    report = ValidationReport(counts={"items": len(raw), "duplicate_items": 0})
    report.problems += _check_table_start(
        raw, source, REQUIRED_ITEM_COLUMNS, ITEM_COLUMNS, report,
        use_hint="to use one as a feature, move its values into 'attributes' as tokens like "
        "'category:c12|brand:b3', or map it with --map NAME=COLUMN",
    )
    if report.problems:
        return None, report
    raw = raw[[c for c in raw.columns if c in ITEM_COLUMNS]].reset_index(drop=True)
    rows = np.arange(1, len(raw) + 1, dtype=np.int64)
    out: dict[str, object] = {}

    ids, bad = as_id_column(raw["item_id"])
    report.problems += _bad_rows(source, "item_id", raw["item_id"], bad, "is an empty item_id; every row needs one")
    out["item_id"] = ids.astype("str")

    out["attributes"] = (
        _attribute_lists(raw["attributes"]) if "attributes" in raw.columns else [[] for _ in range(len(raw))]
    )
    out["price"] = _money(
        raw, "price", source, report,
        "is not a number; write prices as 12.50 (no currency sign) or leave it empty",
        "is negative; prices must be >= 0",
    )
    if "in_stock" in raw.columns:
        in_stock, not_bool = as_bool(raw["in_stock"], default=True)
        report.problems += _bad_rows(
            source, "in_stock", raw["in_stock"], not_bool,
            "is not a boolean; write true/false (or 1/0, yes/no), empty means true",
        )
        out["in_stock"] = in_stock
    else:
        out["in_stock"] = np.ones(len(raw), dtype=bool)
    out["title"] = (
        as_optional_text(raw["title"]) if "title" in raw.columns else pd.Series(np.nan, index=raw.index, dtype="str")
    )
    if report.problems:
        return None, report

    items = pd.DataFrame(out, index=raw.index)[ITEM_COLUMNS]
    return _keep_first_of_each_id(items, "item_id", "items", rows, source, report), report


def _keep_first_of_each_id(
    table: pd.DataFrame, id_column: str, kind: str, rows: np.ndarray, source: str, report: ValidationReport
) -> pd.DataFrame:
    """Drop rows repeating an earlier id of a catalogue or users table, counted and reported, never silently."""
    dup, listing = _duplicates(table[id_column], rows)
    if dup.any():
        report.counts[f"duplicate_{kind}"] = int(dup.sum())
        report.warnings.append(
            f"{source}, field '{id_column}': {_n(int(dup.sum()), 'row')} dropped as repeats of an earlier "
            f"{id_column}, keeping the first: {listing}"
        )
        table = table[~dup]
    report.counts[kind] = len(table)
    for line in report.warnings:
        log.warning(line)
    return table.reset_index(drop=True)


def _attribute_lists(s: pd.Series) -> list[list[str]]:
    """Per item, a list of str tokens; a text cell is split on ``|``, blanks dropped.

    One Python step per item (not per event): catalogues are small next to event logs.
    """
    result = []
    for v in s.to_numpy():
        if v is None or (isinstance(v, float) and np.isnan(v)):
            result.append([])
        elif isinstance(v, str):
            result.append([t.strip() for t in v.split(ATTRIBUTE_SEPARATOR) if t.strip()])
        else:
            tokens = v.tolist() if hasattr(v, "tolist") else list(v)
            result.append([str(t) for t in tokens if t is not None and str(t).strip()])
    return result


def validate_users(raw: pd.DataFrame, source: str = "users") -> tuple[pd.DataFrame | None, ValidationReport]:
    """Check a users table: ``user_id`` required, ``consent`` boolean (empty/absent means true).

    Further columns (country, age band, ...) are kept as user attributes, unlike extra columns of
    events and items, because user attributes have no fixed list.
    """
    report = ValidationReport(counts={"users": len(raw), "duplicate_users": 0})
    report.problems += _check_table_start(raw, source, REQUIRED_USER_COLUMNS, None, report)
    if report.problems:
        return None, report
    raw = raw.reset_index(drop=True)
    rows = np.arange(1, len(raw) + 1, dtype=np.int64)
    ids, bad = as_id_column(raw["user_id"])
    report.problems += _bad_rows(source, "user_id", raw["user_id"], bad, "is an empty user_id; every row needs one")
    if "consent" in raw.columns:
        consent, not_bool = as_bool(raw["consent"], default=True)
        report.problems += _bad_rows(
            source, "consent", raw["consent"], not_bool,
            "is not a boolean; write true/false (or 1/0, yes/no), empty means true",
        )
    else:
        consent = np.ones(len(raw), dtype=bool)
        report.warnings.append(
            f"{source}: no consent column: every user is treated as consenting; add a consent column "
            "(true/false) or map yours with --map consent=COLUMN"
        )
    if report.problems:
        return None, report
    extra = {c: _blank_as_missing(raw[c]) for c in raw.columns if c not in USER_COLUMNS}
    users = pd.DataFrame({"user_id": ids.astype("str"), "consent": consent, **extra}, index=raw.index)
    return _keep_first_of_each_id(users, "user_id", "users", rows, source, report), report


def _blank_as_missing(s: pd.Series) -> pd.Series:
    """Text columns: an empty CSV cell means 'no value', as it does for typed columns."""
    if s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
        missing = _is_missing(s)
        return s.where(~missing) if missing.any() else s
    return s


def _not_in(ids: pd.Series, known: pd.Series) -> np.ndarray:
    """Mask of rows whose id is not among ``known``; per distinct id when ``ids`` is Categorical."""
    known_index = pd.Index(known.astype("str"))
    if isinstance(ids.dtype, pd.CategoricalDtype):
        cat_known = known_index.get_indexer(ids.cat.categories.astype("str")) >= 0
        codes = ids.cat.codes.to_numpy()
        return ~np.append(cat_known, True)[codes]  # code -1: treated as known (reported elsewhere)
    return known_index.get_indexer(ids.astype("str")) < 0


def validate_dataset(
    dataset: Dataset,
    events_source: str = "events",
    items_source: str = "items",
    users_source: str = "users",
) -> ValidationReport:
    """Checks across tables: events naming items or users the other tables do not have.

    Those events are kept (the catalogue gets no row for them, so they train id embeddings but no
    attribute embeddings) and reported with their count and first rows. Row numbers come from the
    events frame's index, i.e. the 0-based file rows ``validate_events`` keeps.
    """
    events = dataset.events
    report = ValidationReport(
        counts={
            "events": len(events),
            "users": len(dataset.users),
            "items": len(dataset.items),
            "unknown_items": 0,
            "unknown_users": 0,
        }
    )
    rows = _row_numbers(events)
    for column, table, table_source, key, gives in (
        ("item_id", dataset.items, items_source, "unknown_items", "attributes, price and stock"),
        ("user_id", dataset.users, users_source, "unknown_users", "a consent flag and attributes"),
    ):
        unknown = _not_in(events[column], table[column])
        if not unknown.any():
            continue
        where = np.flatnonzero(unknown)
        distinct = pd.unique(np.asarray(events[column].iloc[where].astype("str"), dtype=object))
        report.counts[key] = len(where)
        report.counts[f"{key}_distinct"] = len(distinct)
        examples = ", ".join(repr(str(x)) for x in distinct[:5]) + (", ..." if len(distinct) > 5 else "")
        report.warnings.append(
            f"{events_source}, field '{column}': {_n(len(where), 'event')} ({_list_rows(rows[where])}) with "
            f"{_n(len(distinct), column)} not in {table_source} ({examples}); kept, with no "
            f"{table_source} row; add them to {table_source} to give them {gives}"
        )
    for line in report.warnings:
        log.warning(line)
    return report
