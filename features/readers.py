"""Files -> validated ``Dataset``: CSV and Parquet tables, and the S3Rec sequence format.

``load_dataset(path)`` is the one call most code needs. It accepts

* a folder with ``events.{csv,parquet}`` and optionally ``items.*`` and ``users.*`` (a missing
  catalogue or users table is derived from the events, with a logged note);
* a single events file (``.csv``, ``.parquet``/``.pq``);
* an S3Rec file (``.txt``: one line per user, ``user item item ...`` in time order) with its
  ``<Name>_item2attributes.json`` beside it.

Reading stays columnar: pyarrow parses CSV (multi-threaded, typed) and Parquet, id columns become
dictionary-encoded (pandas Categorical) before they reach pandas, and validation is vectorised, so a
10-million-row events file loads in seconds. Every fatal problem of every table is collected before
anything is raised, so one run tells the user everything to fix.
"""

from __future__ import annotations

import difflib
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Iterable, Literal, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from towerline.errors import DataValidationError
from towerline.features.contracts import (
    DEFAULT_EVENT_TYPE,
    EVENT_COLUMNS,
    ITEM_COLUMNS,
    USER_COLUMNS,
    Dataset,
)
from towerline.features.validate import (
    MAX_LISTED,
    ValidationReport,
    s3rec_id_problems,
    validate_dataset,
    validate_events,
    validate_items,
    validate_users,
)

log = logging.getLogger(__name__)

Format = Literal["csv", "parquet", "s3rec"]
Kind = Literal["events", "items", "users"]

SUFFIX_FORMATS: dict[str, Format] = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".txt": "s3rec"}
TABLE_SUFFIXES: dict[str, tuple[str, ...]] = {"csv": (".csv",), "parquet": (".parquet", ".pq")}

# Columns read as text whatever they look like: "007" is an id, not the number 7.
_TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    "events": ("user_id", "item_id", "event_type", "event_id", "channel"),
    "items": ("item_id", "attributes", "title"),
    "users": ("user_id",),
}
# Of those, the ones with few distinct values per row count: dictionary-encoded (-> Categorical).
_DICTIONARY_COLUMNS: dict[str, tuple[str, ...]] = {
    "events": ("user_id", "item_id", "event_type", "channel"),
    "items": (),
    "users": (),
}


# Towerline's column names per table: what ``--map NAME=COLUMN`` (``data.columns``) may name.
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "events": tuple(EVENT_COLUMNS), "items": tuple(ITEM_COLUMNS), "users": tuple(USER_COLUMNS),
}
COLUMN_NAMES: tuple[str, ...] = tuple(dict.fromkeys(EVENT_COLUMNS + ITEM_COLUMNS + USER_COLUMNS))


# ----------------------------------------------------------------------------- column mapping


def parse_column_map(specs: Iterable[str], flag: str = "--map") -> dict[str, str]:
    """``["user_id=customer,item_id=sku", "timestamp=ts"]`` -> ``{"user_id": "customer", ...}``.

    Each spec is ``NAME=COLUMN`` (Towerline's name on the left, your file's on the right), several
    per spec separated by commas, as users type them. Raises ``DataValidationError`` with one line per
    bad entry, naming the flag and the valid names.
    """
    mapping: dict[str, str] = {}
    problems = []
    for spec in specs:
        for entry in (e.strip() for e in spec.split(",")):
            if not entry:
                continue
            name, sep, column = (part.strip() for part in entry.partition("="))
            if not sep or not name or not column:
                problems.append(f"{flag} {entry}: expected NAME=COLUMN, e.g. {flag} user_id=customer")
                continue
            mapping[name] = column
    problems += column_map_problems(mapping, flag)
    if problems:
        raise DataValidationError(problems)
    return mapping


def column_map_problems(columns: Mapping[str, str], flag: str = "--map") -> list[str]:
    """One line per mapped name that is not a Towerline column, or per file column mapped twice."""
    problems = []
    for name, column in columns.items():
        if name not in COLUMN_NAMES:
            close = difflib.get_close_matches(name, COLUMN_NAMES, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(
                f"{flag} {name}={column}: '{name}' is not a Towerline column; {hint}valid names: {', '.join(COLUMN_NAMES)}"
            )
    by_column: dict[str, list[str]] = {}
    for name, column in columns.items():
        by_column.setdefault(column, []).append(name)
    for column, names in by_column.items():
        if len(names) > 1:
            problems.append(f"{flag}: column '{column}' is mapped to {' and '.join(names)}; map it to one name")
    return problems


def _renames(names: list[str], kind: Kind, columns: Mapping[str, str] | None, source: str) -> dict[str, str]:
    """File column -> Towerline name for the mapped columns this table has.

    A mapping applies to every table that has the mapped column (``user_id=customer`` renames it in
    events and users alike); a table that already uses Towerline's name keeps it. Raises when a
    table has both the mapped column and a column of the Towerline name (which one is meant?).
    """
    renames: dict[str, str] = {}
    problems = []
    for name, column in (columns or {}).items():
        if name not in TABLE_COLUMNS[kind] or column == name:
            continue
        if column in names and name in names:
            problems.append(
                f"{source} header, field '{name}': both '{column}' (mapped by --map {name}={column}) and "
                f"'{name}' exist; drop or rename one of them"
            )
        elif column in names:
            renames[column] = name
        elif kind == "events" and name not in names:
            problems.append(
                f"{source} header, field '{column}': no such column to map to '{name}' (--map {name}={column}; "
                f"found: {', '.join(names) or 'no columns'})"
            )
    if problems:
        raise DataValidationError(problems)
    return renames


# ----------------------------------------------------------------------------- single tables


def detect_format(path: str | Path, format: Format | None = None) -> Format:
    """The explicit ``format`` if given, else the one the file suffix implies."""
    if format is not None:
        if format not in ("csv", "parquet", "s3rec"):
            raise DataValidationError(f"{path}: unknown format {format!r}; use csv, parquet or s3rec")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        raise DataValidationError(
            f"{path}: cannot tell the format from the suffix {suffix or '(none)'!r}; "
            "name it .csv/.parquet/.txt or pass --format csv|parquet|s3rec"
        )
    return SUFFIX_FORMATS[suffix]


def read_table(
    path: str | Path, kind: Kind, format: Format | None = None, columns: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """One raw table as pandas: columns as the file has them (mapped ones renamed), ids as text,
    nothing validated yet.

    ``columns`` maps Towerline names to the file's (``{"user_id": "customer"}``, see
    ``parse_column_map``). Raises ``DataValidationError`` for a missing, empty or unparsable file.
    CSV rows with the wrong number of fields are all reported with their row numbers (pyarrow's
    error names only one).
    """
    p = Path(path)
    fmt = detect_format(p, format)
    if fmt == "s3rec":
        raise DataValidationError(f"{p}: S3Rec files hold whole data sets; read them with read_s3rec")
    if not p.is_file():
        raise DataValidationError(f"{p}: missing file; check the path (the {kind} table is read from it)")
    if p.stat().st_size == 0:
        raise DataValidationError(f"{p.name}: file is empty (0 bytes); write a header and rows, or remove it")
    if fmt == "csv":
        header = _csv_header(p)
        renames = _renames(header, kind, columns, p.name)
        table = _read_csv(p, kind, header, renames)
    else:
        try:
            schema = pq.read_schema(p)
        except (pa.ArrowException, OSError) as e:
            raise DataValidationError(
                f"{p.name}: cannot be read as Parquet ({e}); is it a CSV file? pass --format csv"
            ) from None
        renames = _renames(schema.names, kind, columns, p.name)
        source_of = {name: column for column, name in renames.items()}
        as_dictionary = [
            source_of.get(c, c) for c in _DICTIONARY_COLUMNS[kind]
            if source_of.get(c, c) in schema.names and _is_text(schema.field(source_of.get(c, c)).type)
        ]
        try:
            table = pq.read_table(p, read_dictionary=as_dictionary)
        except (pa.ArrowException, OSError) as e:
            raise DataValidationError(f"{p.name}: cannot be read as Parquet ({e})") from None
    if renames:
        table = table.rename_columns([renames.get(c, c) for c in table.column_names])
    return _to_pandas(table, kind)


def _read_csv(p: Path, kind: Kind, header: list[str], renames: dict[str, str]) -> pa.Table:
    source_of = {name: column for column, name in renames.items()}
    # ids as text; repetitive ones dictionary-encoded while parsing (in parallel, one pass)
    dictionary = pa.dictionary(pa.int32(), pa.string())
    text_types = {
        source_of.get(c, c): dictionary if c in _DICTIONARY_COLUMNS[kind] else pa.string()
        for c in _TEXT_COLUMNS[kind] if source_of.get(c, c) in header
    }
    bad_rows: list[pacsv.InvalidRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad_rows.append(row)
        return "skip"

    def read(threads: bool) -> pa.Table:
        return pacsv.read_csv(
            p,
            read_options=pacsv.ReadOptions(use_threads=threads),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types=text_types),
        )

    try:
        table = read(threads=True)
        if bad_rows:  # a second, single-threaded pass is the one that knows the row numbers
            bad_rows.clear()
            table = read(threads=False)
    except pa.ArrowException as e:
        raise DataValidationError(f"{p.name}: cannot be read as CSV ({e}); check it is comma-separated") from None
    if bad_rows:
        lines = [
            f"{p.name} row {row.number - 1 if row.number else '?'}, field '(all)': has {row.actual_columns} "
            f"fields but the header has {row.expected_columns}; check commas and quoting in {row.text[:60]!r}"
            for row in bad_rows[:MAX_LISTED]
        ]
        if len(bad_rows) > MAX_LISTED:
            lines.append(f"{p.name}: ... and {len(bad_rows) - MAX_LISTED:,} more rows like these")
        raise DataValidationError(lines)
    return table


def _csv_header(p: Path) -> list[str]:
    with p.open("r", encoding="utf-8-sig", errors="replace", newline="") as f:  # -sig: Excel BOM
        first = f.readline()
    return [c.strip().strip('"') for c in first.rstrip("\r\n").split(",")]


def _to_pandas(table: pa.Table, kind: Kind) -> pd.DataFrame:
    """Id columns -> text (dictionary-encoded where repetitive), then one pandas conversion.

    Columns that arrive dictionary-encoded with string values (CSV read with dictionary column
    types, Parquet read with ``read_dictionary``) are kept as they are: re-encoding ten million ids
    would cost a hash pass for nothing.
    """
    columns = []
    for name, column in zip(table.column_names, table.columns):
        if name in _TEXT_COLUMNS[kind] and name != "attributes":
            wanted_dictionary = name in _DICTIONARY_COLUMNS[kind]
            if pa.types.is_dictionary(column.type):
                if wanted_dictionary and _is_text(column.type.value_type):
                    columns.append(column)
                    continue
                column = pc.cast(column, column.type.value_type)
            if not _is_text(column.type):
                column = pc.cast(column, pa.string())
            if wanted_dictionary:
                column = pc.dictionary_encode(column)
        columns.append(column)
    return pa.table(columns, names=table.column_names).to_pandas(date_as_object=False)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _table_or_problems(
    path: Path, kind: Kind, format: Format | None, report: ValidationReport, columns: Mapping[str, str] | None
) -> pd.DataFrame | None:
    try:
        return read_table(path, kind, format, columns)
    except DataValidationError as e:
        report.problems.extend(e.problems)
        return None


def read_events(path: str | Path, format: Format | None = None, columns: Mapping[str, str] | None = None) -> pd.DataFrame:
    """An events file -> canonical events (see ``contracts``); raises ``DataValidationError``."""
    frame, report = validate_events(read_table(path, "events", format, columns), Path(path).name)
    report.raise_if_invalid()
    return frame.reset_index(drop=True)


def read_items(path: str | Path, format: Format | None = None, columns: Mapping[str, str] | None = None) -> pd.DataFrame:
    """An items file -> canonical catalogue; raises ``DataValidationError``."""
    frame, report = validate_items(read_table(path, "items", format, columns), Path(path).name)
    report.raise_if_invalid()
    return frame


def read_users(path: str | Path, format: Format | None = None, columns: Mapping[str, str] | None = None) -> pd.DataFrame:
    """A users file -> canonical users (extra attribute columns kept); raises ``DataValidationError``."""
    frame, report = validate_users(read_table(path, "users", format, columns), Path(path).name)
    report.raise_if_invalid()
    return frame


# ----------------------------------------------------------------------------- S3Rec


def read_s3rec(txt_path: str | Path, attributes_path: str | Path | None = None, name: str | None = None) -> Dataset:
    """An S3Rec data set (Zhou et al., CIKM 2020, RUCAIBox/CIKM2020-S3Rec) -> ``Dataset``.

    The format has no clock: each line is ``user item item ...`` in time order, so an event's
    timestamp is its position in the line (0, 1, 2, ...), which keeps order = time for every later
    step (sequences, leave-one-out). Every event is of type ``interaction``; every user consents.
    The catalogue is every item in the attributes JSON or in the sequences, with attribute ids as
    tokens ``attr:<id>``, no price and in stock. ``attributes_path`` defaults to
    ``<Name>_item2attributes.json`` beside the text file; when it is absent, items get no attributes.
    Raises ``DataValidationError`` for a missing or empty file, a token that is not an integer id
    (naming its line), or a user with two lines.
    """
    dataset, report = _parse_s3rec(Path(txt_path), attributes_path, name)
    report.raise_if_invalid()
    return dataset


def _parse_s3rec(
    txt: Path, attributes_path: str | Path | None, name: str | None
) -> tuple[Dataset | None, ValidationReport]:
    report = ValidationReport(counts={"events": 0, "users": 0, "items": 0, "empty_sequences": 0})
    if not txt.is_file():
        report.problems.append(f"{txt}: missing file; check the path to the S3Rec .txt file")
        return None, report
    text = txt.read_text(encoding="utf-8")
    if not text.strip():
        report.problems.append(f"{txt.name}: file is empty; an S3Rec file has one line per user: 'user item item ...'")
        return None, report

    # Split once per line in C (str.split), then flatten: no Python work per interaction.
    split = [line.split() for line in text.splitlines()]
    line_no = np.flatnonzero(np.fromiter((len(t) > 0 for t in split), dtype=bool, count=len(split))) + 1
    split = [t for t in split if t]
    lengths = np.fromiter((len(t) for t in split), dtype=np.int64, count=len(split))
    tokens = np.array(list(itertools.chain.from_iterable(split)), dtype=object)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    user_ids = tokens[starts]
    is_user = np.zeros(len(tokens), dtype=bool)
    is_user[starts] = True
    report.problems.extend(s3rec_id_problems(tokens, np.repeat(line_no, lengths), is_user, txt.name))

    dup_users = pd.Series(user_ids).duplicated().to_numpy()
    if dup_users.any():
        first_line = dict(zip(user_ids[::-1], line_no[::-1]))  # reversed so the first line wins
        for i in np.flatnonzero(dup_users)[:MAX_LISTED]:
            report.problems.append(
                f"{txt.name} line {line_no[i]}, field 'user_id': user {user_ids[i]!r} already has line "
                f"{first_line[user_ids[i]]}; S3Rec files hold one line per user, merge the two lines"
            )
        if dup_users.sum() > MAX_LISTED:
            report.problems.append(f"{txt.name}: ... and {int(dup_users.sum()) - MAX_LISTED:,} more lines like these")
    empty = np.flatnonzero(lengths < 2)
    if len(empty):
        report.counts["empty_sequences"] = len(empty)
        shown = ", ".join(str(int(n)) for n in line_no[empty[:MAX_LISTED]])
        report.warnings.append(
            f"{txt.name}, field 'item_id': {len(empty):,} users have no items (lines {shown}"
            f"{', ...' if len(empty) > MAX_LISTED else ''}); they are in users but have no events"
        )

    attributes = _read_item_attributes(txt, attributes_path, report)
    if report.problems:
        return None, report

    n_items_per_line = lengths - 1
    is_item = ~is_user
    n_events = int(is_item.sum())
    position = np.flatnonzero(is_item) - np.repeat(starts + 1, n_items_per_line)  # (E,) 0, 1, 2, ... per line
    item_col = pd.Categorical(tokens[is_item].astype(str))
    user_index = pd.Index(user_ids.astype(str), dtype="str")  # unique: duplicates were refused above
    events = pd.DataFrame(
        {
            "user_id": pd.Categorical.from_codes(
                np.repeat(np.arange(len(split)), n_items_per_line), categories=user_index
            ),
            "item_id": item_col,
            "timestamp": position.astype(np.int64),
            "event_type": pd.Categorical.from_codes(np.zeros(n_events, dtype=np.int8), categories=[DEFAULT_EVENT_TYPE]),
            "value": np.full(n_events, np.nan),
            "event_id": pd.Series(np.nan, index=range(n_events), dtype="str"),
            "channel": pd.Categorical.from_codes(
                np.full(n_events, -1, dtype=np.int8), categories=pd.Index([], dtype="str")
            ),
        }
    )[EVENT_COLUMNS]
    all_items = pd.Index(item_col.categories).union(pd.Index(list(attributes), dtype="str"))
    all_items = _sort_ids(all_items)
    items = pd.DataFrame(
        {
            "item_id": pd.Series(all_items, dtype="str"),
            "attributes": [[f"attr:{a}" for a in attributes.get(i, ())] for i in all_items],
            "price": np.full(len(all_items), np.nan),
            "in_stock": np.ones(len(all_items), dtype=bool),
            "title": pd.Series(np.nan, index=range(len(all_items)), dtype="str"),
        }
    )[ITEM_COLUMNS]
    users = pd.DataFrame({"user_id": pd.Series(user_index), "consent": np.ones(len(user_index), dtype=bool)})
    report.counts.update(events=n_events, users=len(users), items=len(items))
    for line in report.warnings:
        log.warning(line)
    return Dataset(name=name or txt.stem, events=events, items=items, users=users), report


def _sort_ids(ids: pd.Index) -> list[str]:
    """Numeric ids in numeric order (S3Rec ids are 1..N), anything else as text after them."""
    as_num = pd.to_numeric(pd.Series(ids), errors="coerce")
    order = np.lexsort((np.asarray(ids, dtype=str), as_num.fillna(np.inf).to_numpy()))
    return [str(x) for x in np.asarray(ids, dtype=object)[order]]


def _read_item_attributes(
    txt: Path, attributes_path: str | Path | None, report: ValidationReport
) -> dict[str, list[object]]:
    explicit = attributes_path is not None
    path = Path(attributes_path) if explicit else txt.with_name(f"{txt.stem}_item2attributes.json")
    if not path.is_file():
        if explicit:
            report.problems.append(f"{path}: missing file; check the path to the item2attributes JSON")
        else:
            log.info("%s not found: S3Rec items get no attribute tokens", path.name)
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        report.problems.append(f"{path.name}: not valid JSON ({e}); expected {{\"item_id\": [attribute_id, ...]}}")
        return {}
    if not isinstance(raw, dict):
        report.problems.append(
            f"{path.name}: expected an object {{\"item_id\": [attribute_id, ...]}}, got {type(raw).__name__}"
        )
        return {}
    bad = [k for k, v in raw.items() if not isinstance(v, list)]
    for k in bad[:MAX_LISTED]:
        report.problems.append(f"{path.name} item {k!r}, field 'attributes': {raw[k]!r} is not a list of attribute ids")
    not_ids = [k for k in raw if not (k.isascii() and k.isdecimal())]  # keys are the .txt file's item ids
    for k in not_ids[:MAX_LISTED]:
        report.problems.append(f"{path.name} item {k!r}, field 'item_id': not an integer id; S3Rec items are numbered 1..N")
    if len(not_ids) > MAX_LISTED:
        report.problems.append(f"{path.name}: ... and {len(not_ids) - MAX_LISTED:,} more items like these")
    return {str(k): v for k, v in raw.items()}


# ----------------------------------------------------------------------------- whole data sets


def _find_table(folder: Path, stem: str, format: Format | None, report: ValidationReport) -> Path | None:
    suffixes = TABLE_SUFFIXES[format] if format in TABLE_SUFFIXES else sum(TABLE_SUFFIXES.values(), ())
    found = [folder / f"{stem}{s}" for s in suffixes if (folder / f"{stem}{s}").is_file()]
    if len(found) > 1:
        names = " and ".join(p.name for p in found)
        report.problems.append(f"{folder}: both {names} exist; pass --format csv or --format parquet to pick one")
        return None
    return found[0] if found else None


def infer_format(path: str | Path) -> Format:
    """The format of a data path: a file's from its suffix, a folder's from its ``events.*`` file.

    ``towerline train --data PATH`` needs it before anything is read (the config records it).
    Raises ``DataValidationError`` naming the path when it cannot tell.
    """
    p = Path(path)
    if not p.exists():
        raise DataValidationError(f"{p}: missing file or folder; check the path")
    if p.is_file():
        return detect_format(p)
    report = ValidationReport()
    found = _find_table(p, "events", None, report)
    report.raise_if_invalid()
    if found is None:
        hint = "; for S3Rec data pass the .txt file itself" if any(p.glob("*.txt")) else ""
        raise DataValidationError(f"{p}: missing file events.csv or events.parquet; the events table is required{hint}")
    return SUFFIX_FORMATS[found.suffix.lower()]


def default_name(path: str | Path) -> str:
    """The data set's name when none is given: the folder's name, or the file's stem
    (the folder's for ``events.*``), as MLflow's ``dataset`` tag and the run name show it."""
    p = Path(path)
    if p.is_dir():
        return p.resolve().name
    return p.parent.resolve().name if p.stem == "events" else p.stem


def check_dataset(
    path: str | Path,
    format: Format | None = None,
    name: str | None = None,
    progress: bool = False,
    columns: Mapping[str, str] | None = None,
) -> tuple[Dataset | None, ValidationReport]:
    """Read and validate like ``load_dataset`` but return the report instead of raising.

    The dataset is None when the report has problems. ``towerline data validate`` uses this so it
    can print counts next to the problems. In a folder, ``format`` and ``columns`` apply to every
    table.
    """
    p = Path(path)
    report = ValidationReport()
    report.problems += column_map_problems(columns or {}, "data.columns")
    if report.problems:
        return None, report
    if not p.exists():
        report.problems.append(f"{p}: missing file or folder; check the path")
        return None, report
    if p.is_dir():
        if format == "s3rec":
            report.problems.append(
                f"{p}: --format s3rec reads one .txt file, not a folder; pass e.g. {p / 'Beauty.txt'}"
            )
            return None, report
        events_path = _find_table(p, "events", format, report)
        if events_path is None and not report.problems:
            wanted = " or ".join(f"events{s}" for s in (TABLE_SUFFIXES.get(format or "", ()) or (".csv", ".parquet")))
            s3rec_hint = "; for S3Rec data pass the .txt file itself" if any(p.glob("*.txt")) else ""
            report.problems.append(
                f"{p}: missing file {wanted}; the events table is required (items.* and users.* are "
                f"optional){s3rec_hint}"
            )
        items_path = _find_table(p, "items", format, report)
        users_path = _find_table(p, "users", format, report)
    else:
        try:
            fmt = detect_format(p, format)
        except DataValidationError as e:
            report.problems.extend(e.problems)
            return None, report
        if fmt == "s3rec":
            with _steps(progress, 1, f"reading {p.name}") as bar:
                dataset, report = _parse_s3rec(p, None, name)
                bar.update()
            if dataset is not None:
                _add_cross_checks(report, validate_dataset(dataset, p.name, p.name, p.name))
            return dataset, report
        format = fmt
        events_path, items_path, users_path = p, None, None

    tables: dict[str, pd.DataFrame | None] = {}
    sources = {}
    with _steps(progress, 3, f"reading {p.name}") as bar:
        for kind, table_path, validate in (
            ("events", events_path, validate_events),
            ("items", items_path, validate_items),
            ("users", users_path, validate_users),
        ):
            bar.set_postfix_str(kind)
            if table_path is None:
                tables[kind] = None
                bar.update()
                continue
            sources[kind] = table_path.name
            raw = _table_or_problems(table_path, kind, format, report, columns)  # type: ignore[arg-type]
            if raw is not None:
                frame, table_report = validate(raw, table_path.name)
                report.extend(table_report)
                tables[kind] = frame
            bar.update()
    if not report.ok or tables["events"] is None:
        return None, report

    events = tables["events"]
    items = tables["items"] if items_path is not None else _derive_items(events, p)
    users = tables["users"] if users_path is not None else _derive_users(events, p, report)
    dataset = Dataset(name=name or default_name(p), events=events, items=items, users=users)
    cross = validate_dataset(
        dataset, sources["events"], sources.get("items", "items (derived)"), sources.get("users", "users (derived)")
    )
    _add_cross_checks(report, cross)
    dataset.events = events.reset_index(drop=True)
    return dataset, report


def _add_cross_checks(report: ValidationReport, cross: ValidationReport) -> None:
    """Table counts from the final dataset replace per-file ones; cross-table warnings are added."""
    report.warnings.extend(cross.warnings)
    report.counts.update(cross.counts)


def load_dataset(
    path: str | Path,
    format: Format | None = None,
    name: str | None = None,
    progress: bool = False,
    columns: Mapping[str, str] | None = None,
) -> tuple[Dataset, ValidationReport]:
    """Read a folder, an events file or an S3Rec file into a validated ``Dataset``.

    ``columns`` maps Towerline's column names to the files' (``{"user_id": "customer"}``); columns
    neither named nor mapped are ignored with one warning per file. Returns the dataset and the
    report of non-fatal findings (duplicates dropped, unknown ids, out-of-order rows, no consent
    data: each also logged as a warning). Raises ``DataValidationError`` with every fatal problem,
    one line each naming file, row and field.
    """
    dataset, report = check_dataset(path, format, name, progress, columns)
    report.raise_if_invalid()
    assert dataset is not None  # internal invariant: no problems -> a dataset
    log.info(
        "loaded %s: %s events, %s users, %s items", dataset.name,
        f"{len(dataset.events):,}", f"{len(dataset.users):,}", f"{len(dataset.items):,}",
    )
    return dataset, report


def _derive_items(events: pd.DataFrame, where: Path) -> pd.DataFrame:
    ids = _distinct_ids(events["item_id"])
    log.info("%s has no items file: catalogue derived from the %s item ids in events (no attributes, "
             "price or stock data)", where, f"{len(ids):,}")
    return pd.DataFrame(
        {
            "item_id": pd.Series(ids, dtype="str"),
            "attributes": [[] for _ in range(len(ids))],
            "price": np.full(len(ids), np.nan),
            "in_stock": np.ones(len(ids), dtype=bool),
            "title": pd.Series(np.nan, index=range(len(ids)), dtype="str"),
        }
    )[ITEM_COLUMNS]


def _derive_users(events: pd.DataFrame, where: Path, report: ValidationReport) -> pd.DataFrame:
    """Users from the events, all consenting: a WARNING, since personalising for users who never said
    yes is a decision the data owner should make knowingly, not learn from an INFO line."""
    ids = _distinct_ids(events["user_id"])
    fix = (
        f"add users.csv with a consent column (user_id,consent) to {where}" if where.is_dir()
        else f"put {where.name} in a folder with users.csv (user_id,consent) and pass the folder"
    )
    line = f"{where}: no users file: every user is treated as consenting ({len(ids):,} users); {fix}"
    report.warnings.append(line)
    log.warning(line)
    return pd.DataFrame({"user_id": pd.Series(ids, dtype="str"), "consent": np.ones(len(ids), dtype=bool)})


def _distinct_ids(column: pd.Series) -> np.ndarray:
    """Distinct ids in first-appearance order; through the categories when the column is Categorical."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        codes = column.cat.codes.to_numpy()
        used = pd.unique(codes[codes >= 0])
        return np.asarray(column.cat.categories, dtype=object)[used]
    return pd.unique(column.dropna().to_numpy())


def _steps(progress: bool, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="table", file=sys.stderr, disable=not progress, leave=False)
