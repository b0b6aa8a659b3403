"""Validation: each problem on a small broken file names file, row and field; non-fatal findings are counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from towerline.errors import DataValidationError
from towerline.features.contracts import Dataset
from towerline.features.readers import check_dataset, load_dataset
from towerline.features.validate import MAX_LISTED, validate_dataset, validate_events, validate_items

HEADER = "user_id,item_id,timestamp,event_type,value,event_id\n"
GOOD_ROWS = [
    "u1,i1,1735689600,view,,e1",
    "u1,i2,1735689700,purchase,12.50,e2",
    "u2,i1,1735689800,view,,e3",
]


def _folder(tmp_path: Path, events: str | None = None, items: str | None = None, users: str | None = None) -> Path:
    folder = tmp_path / "shop"
    folder.mkdir(exist_ok=True)
    for name, text in (("events", events), ("items", items), ("users", users)):
        if text is not None:
            (folder / f"{name}.csv").write_text(text)
    return folder


def _events(*rows: str, header: str = HEADER) -> str:
    return header + "\n".join(rows) + "\n"


def _problems(path: Path) -> list[str]:
    with pytest.raises(DataValidationError) as e:
        load_dataset(path)
    return e.value.problems


def test_valid_folder_loads_without_findings(tmp_path):
    folder = _folder(tmp_path, _events(*GOOD_ROWS), "item_id,price\ni1,3\ni2,12.5\n", "user_id,consent\nu1,true\nu2,no\n")
    dataset, report = load_dataset(folder)
    assert report.ok and report.warnings == []
    assert report.counts["events"] == 3 and report.counts["items"] == 2 and report.counts["users"] == 2


def test_missing_events_file_is_named(tmp_path):
    folder = _folder(tmp_path, items="item_id\ni1\n")
    (problem,) = _problems(folder)
    assert "missing file events.csv or events.parquet" in problem and str(folder) in problem


def test_missing_path_is_named(tmp_path):
    (problem,) = _problems(tmp_path / "nope.csv")
    assert "nope.csv" in problem and "missing" in problem


def test_empty_file_is_refused(tmp_path):
    folder = _folder(tmp_path, "")
    (problem,) = _problems(folder)
    assert problem.startswith("events.csv: file is empty")


def test_header_only_file_is_refused(tmp_path):
    folder = _folder(tmp_path, HEADER)
    (problem,) = _problems(folder)
    assert problem.startswith("events.csv: file is empty (a header but no data rows)")


def test_missing_required_column_names_the_field(tmp_path):
    folder = _folder(tmp_path, "user_id,item_id\nu1,i1\n")
    (problem,) = _problems(folder)
    assert problem.startswith("events.csv header, field 'timestamp': required column is missing")


def test_unknown_event_column_is_ignored_with_a_warning_suggesting_the_nearest_name(tmp_path):
    folder = _folder(tmp_path, "user_id,item_id,timestamp,evnt_type\nu1,i1,1,view\n")
    dataset, report = load_dataset(folder)
    assert any("events.csv: 1 column not used by Towerline, ignored: 'evnt_type' (did you mean 'event_type'?)" in w
               for w in report.warnings)
    assert dataset.events["event_type"].astype(str).tolist() == ["interaction"]


def test_misspelt_required_column_is_missing_with_a_map_hint_and_an_ignored_column(tmp_path):
    folder = _folder(tmp_path, "user_id,item_id,timestmp\nu1,i1,1\n")
    (problem,) = _problems(folder)
    assert "field 'timestamp': required column is missing" in problem and "'timestmp'" in problem
    assert "--map timestamp=timestmp" in problem


def test_unknown_item_column_is_ignored_with_a_hint_and_extra_user_columns_are_kept(tmp_path):
    folder = _folder(tmp_path, _events(*GOOD_ROWS), "item_id,category\ni1,c1\ni2,c2\n", "user_id,age_band\nu1,25-34\nu2,\n")
    dataset, report = load_dataset(folder)
    (line,) = [w for w in report.warnings if w.startswith("items.csv")]
    assert "ignored: 'category'" in line and "attributes" in line
    dataset, _ = load_dataset(folder)
    assert dataset.users["age_band"].tolist()[0] == "25-34"


def test_unparsable_timestamp_names_file_row_field_and_value(tmp_path):
    folder = _folder(tmp_path, _events(GOOD_ROWS[0], "u1,i2,yesterday,view,,e2"))
    (problem,) = _problems(folder)
    assert problem.startswith(
        "events.csv row 2, field 'timestamp': 'yesterday' is neither epoch seconds nor ISO-8601"
    )


def test_negative_value_and_non_numeric_value_are_refused(tmp_path):
    folder = _folder(tmp_path, _events(GOOD_ROWS[0], "u1,i2,1735689700,purchase,-5,e2", "u2,i1,5,purchase,€3,e3"))
    problems = _problems(folder)
    assert any(p.startswith("events.csv row 2, field 'value': '-5' is negative") for p in problems)
    assert any(p.startswith("events.csv row 3, field 'value': '€3' is not a number") for p in problems)


def test_negative_timestamp_is_refused(tmp_path):
    folder = _folder(tmp_path, _events("u1,i1,-1,view,,e1"))
    (problem,) = _problems(folder)
    assert problem.startswith("events.csv row 1, field 'timestamp': -1 is negative")


def test_empty_ids_are_refused(tmp_path):
    folder = _folder(tmp_path, _events(GOOD_ROWS[0], ",i1,1735689700,view,,e2", "u2,  ,1735689800,view,,e3"))
    problems = _problems(folder)
    assert any(p.startswith("events.csv row 2, field 'user_id': '' is an empty user_id") for p in problems)
    assert any(p.startswith("events.csv row 3, field 'item_id': '  ' is an empty item_id") for p in problems)


def test_item_price_and_stock_types_are_checked(tmp_path):
    items = "item_id,price,in_stock\ni1,cheap,true\ni2,-1,true\ni3,2.0,maybe\n"
    folder = _folder(tmp_path, _events(*GOOD_ROWS), items)
    problems = _problems(folder)
    assert any(p.startswith("items.csv row 1, field 'price': 'cheap' is not a number") for p in problems)
    assert any(p.startswith("items.csv row 2, field 'price': '-1' is negative") for p in problems)
    assert any(p.startswith("items.csv row 3, field 'in_stock': 'maybe' is not a boolean") for p in problems)


def test_user_consent_must_be_boolean(tmp_path):
    folder = _folder(tmp_path, _events(*GOOD_ROWS), users="user_id,consent\nu1,true\nu2,sure\n")
    (problem,) = _problems(folder)
    assert problem.startswith("users.csv row 2, field 'consent': 'sure' is not a boolean")


def test_csv_row_with_extra_fields_is_named(tmp_path):
    folder = _folder(tmp_path, _events(GOOD_ROWS[0], "u1,i2,1735689700,view,,e2,surplus"))
    (problem,) = _problems(folder)
    assert problem.startswith("events.csv row 2, field '(all)': has 7 fields but the header has 6")


def test_problems_of_every_file_are_reported_together(tmp_path):
    folder = _folder(tmp_path, _events("u1,i1,later,view,,e1"), "item_id,price\ni1,free\n")
    problems = _problems(folder)
    assert any(p.startswith("events.csv row 1, field 'timestamp'") for p in problems)
    assert any(p.startswith("items.csv row 1, field 'price'") for p in problems)


def test_many_bad_rows_are_capped_with_a_count(tmp_path):
    rows = [f"u1,i1,bad{i},view,,e{i}" for i in range(MAX_LISTED + 7)]
    problems = _problems(_folder(tmp_path, _events(*rows)))
    assert len(problems) == MAX_LISTED + 1
    assert problems[-1] == "events.csv, field 'timestamp': ... and 7 more rows like these"


def test_duplicate_event_ids_are_dropped_counted_and_listed(tmp_path):
    folder = _folder(tmp_path, _events(*GOOD_ROWS, "u2,i2,1735689900,view,,e2", "u2,i2,1735689901,view,,e2"))
    dataset, report = load_dataset(folder)
    assert report.ok
    assert report.counts["duplicate_event_ids"] == 2
    assert len(dataset.events) == 3  # first of each kept
    (warning,) = [w for w in report.warnings if "field 'event_id'" in w]
    assert "events.csv, field 'event_id': 2 rows dropped as repeats of an earlier event_id" in warning
    assert "row 4 ('e2', first at row 2)" in warning and "row 5 ('e2', first at row 2)" in warning


def test_unknown_items_are_kept_counted_and_listed(tmp_path):
    folder = _folder(tmp_path, _events(*GOOD_ROWS, "u2,i9,1735689900,view,,e4"), "item_id\ni1\ni2\n")
    dataset, report = load_dataset(folder)
    assert report.counts["unknown_items"] == 1
    assert "i9" in dataset.events["item_id"].astype(str).tolist()  # kept
    assert "i9" not in dataset.items["item_id"].tolist()  # no catalogue row invented
    (warning,) = [w for w in report.warnings if "item_id" in w]
    assert warning.startswith("events.csv, field 'item_id': 1 event (row 4) with 1 item_id not in items.csv ('i9')")


def test_unknown_item_rows_stay_file_rows_after_duplicates_are_dropped(tmp_path):
    folder = _folder(tmp_path, _events(*GOOD_ROWS, "u1,i1,1735689600,view,,e1", "u2,i9,1735689900,view,,e5"), "item_id\ni1\ni2\n")
    _, report = load_dataset(folder)
    assert report.counts["duplicate_event_ids"] == 1 and report.counts["unknown_items"] == 1
    assert any("(row 5) with 1 item_id" in w for w in report.warnings)


def test_unknown_users_are_counted(tmp_path):
    folder = _folder(tmp_path, _events(*GOOD_ROWS), users="user_id\nu1\n")
    _, report = load_dataset(folder)
    assert report.counts["unknown_users"] == 1 and report.counts["unknown_users_distinct"] == 1


def test_out_of_order_timestamps_are_counted_not_dropped(tmp_path):
    rows = ["u1,i1,300,view,,e1", "u2,i1,100,view,,e2", "u1,i2,200,view,,e3", "u2,i2,150,view,,e4"]
    dataset, report = load_dataset(_folder(tmp_path, _events(*rows)))
    assert report.counts["out_of_order"] == 1
    assert len(dataset.events) == 4
    assert any("1 event out of order, earlier than the same user's previous row (row 3)" in w for w in report.warnings)


def test_check_dataset_returns_counts_with_problems(tmp_path):
    folder = _folder(tmp_path, _events(GOOD_ROWS[0], "u1,i2,soon,view,,e2"))
    dataset, report = check_dataset(folder)
    assert dataset is None and not report.ok
    assert report.counts["events"] == 2


def test_validate_frames_built_by_hand_with_integer_ids():
    raw = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 11, 10], "timestamp": [3.0, 4.0, np.nan]})
    events, report = validate_events(raw, "memory")
    assert events is None
    assert report.problems == [
        "memory row 3, field 'timestamp': (empty) is missing; every event needs a time "
        "(write epoch seconds (1735689600) or ISO-8601 (2025-01-01T00:00:00Z))"
    ]
    events, report = validate_events(raw.iloc[:2], "memory")
    assert report.ok and events["user_id"].astype(str).tolist() == ["1", "1"]
    items, report = validate_items(pd.DataFrame({"item_id": [10]}), "memory")
    dataset = Dataset("hand", events, items, pd.DataFrame({"user_id": ["1"], "consent": [True]}))
    assert validate_dataset(dataset).counts["unknown_items"] == 1


def test_millisecond_timestamps_are_refused_with_a_hint(tmp_path):
    folder = _folder(tmp_path, _events("u1,i1,1735689600000,view,,e1"))
    (problem,) = _problems(folder)
    assert problem.startswith("events.csv row 1, field 'timestamp': 1735689600000 is after the year 5000")
    assert "divide by 1000" in problem


def test_blank_event_type_takes_the_default_and_blank_channel_is_missing(tmp_path):
    text = "user_id,item_id,timestamp,event_type,channel\nu1,i1,1,view,web\nu1,i2,2,,\n"
    dataset, report = load_dataset(_folder(tmp_path, text))
    assert report.ok
    assert dataset.events["event_type"].astype(str).tolist() == ["view", "interaction"]
    assert dataset.events["channel"].isna().tolist() == [False, True]


def test_duplicates_among_otherwise_sorted_ids_are_found(tmp_path):
    # sorted ids take a fast path (no repeats possible when each is greater than the last); an
    # equal neighbour must send them down the full check
    rows = ["u1,i1,1,view,,e1", "u1,i2,2,view,,e2", "u1,i3,3,view,,e2", "u1,i4,4,view,,e3"]
    dataset, report = load_dataset(_folder(tmp_path, _events(*rows)))
    assert report.counts["duplicate_event_ids"] == 1
    assert dataset.events["item_id"].astype(str).tolist() == ["i1", "i2", "i4"]
