"""Readers: the shared S3Rec files read to their published counts, CSV/Parquet round trips, timestamps."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from towerline.errors import DataValidationError
from towerline.features.contracts import EVENT_COLUMNS, ITEM_COLUMNS, Dataset
from towerline.features.readers import check_dataset, load_dataset, read_events, read_items, read_s3rec, read_users
from towerline.features.writers import write_dataset

from support import SHARED_DATA  # noqa: E402  (../shared beside the checkout)


def _shared(name: str) -> Path:
    path = SHARED_DATA / f"{name}.txt"
    if not path.is_file():
        pytest.skip(f"shared data set {path} is absent (it lives in ../shared/data/s3rec beside the checkout)")
    return path


@pytest.mark.parametrize(
    ("name", "users", "items", "interactions"),
    [("Beauty", 22_363, 12_101, 198_502), ("LastFM", 1_090, 3_646, 52_551)],
)
def test_s3rec_file_reads_to_published_counts(name, users, items, interactions):
    dataset, report = load_dataset(_shared(name))
    assert dataset.name == name
    assert (len(dataset.users), len(dataset.items), len(dataset.events)) == (users, items, interactions)
    assert dataset.events["user_id"].nunique() == users
    assert report.ok and report.counts["events"] == interactions
    assert report.counts["unknown_items"] == 0


def test_s3rec_order_becomes_timestamps_and_attributes_become_tokens():
    path = _shared("LastFM")
    dataset = read_s3rec(path)
    first_line = path.read_text().splitlines()[0].split()
    user, items = first_line[0], first_line[1:]
    mine = dataset.events[dataset.events["user_id"] == user]
    assert mine["item_id"].astype(str).tolist() == items
    assert mine["timestamp"].tolist() == list(range(len(items)))
    assert set(dataset.events["event_type"].astype(str)) == {"interaction"}
    assert dataset.users["consent"].all()
    attrs = json.loads((SHARED_DATA / "LastFM_item2attributes.json").read_text())
    some_item = next(iter(attrs))
    row = dataset.items.set_index("item_id").loc[some_item]
    assert row["attributes"] == [f"attr:{a}" for a in attrs[some_item]]
    assert row["in_stock"] and np.isnan(row["price"])


def test_s3rec_small_file_positions_and_catalogue_union(tmp_path):
    txt = tmp_path / "Toy.txt"
    txt.write_text("1 10 11 12\n2 11 13\n\n3 14 10\n")
    (tmp_path / "Toy_item2attributes.json").write_text(json.dumps({"10": [1, 2], "99": [3]}))
    dataset = read_s3rec(txt)
    ev = dataset.events
    assert ev["timestamp"].tolist() == [0, 1, 2, 0, 1, 0, 1]
    assert ev["item_id"].astype(str).tolist() == ["10", "11", "12", "11", "13", "14", "10"]
    # catalogue = items in sequences plus items only in the JSON, numeric order
    assert dataset.items["item_id"].tolist() == ["10", "11", "12", "13", "14", "99"]
    assert dataset.items["attributes"].tolist()[0] == ["attr:1", "attr:2"]
    assert dataset.items["attributes"].tolist()[1] == []
    assert list(ev.columns) == EVENT_COLUMNS and list(dataset.items.columns) == ITEM_COLUMNS


def test_s3rec_without_attributes_json_reads_with_empty_attributes(tmp_path, caplog):
    txt = tmp_path / "NoAttrs.txt"
    txt.write_text("1 5 6\n2 6 7\n")
    with caplog.at_level(logging.INFO, logger="towerline.features.readers"):
        dataset, _ = load_dataset(txt)
    assert dataset.items["attributes"].map(len).sum() == 0
    assert "NoAttrs_item2attributes.json not found" in caplog.text


def test_s3rec_user_on_two_lines_is_refused_naming_both_lines(tmp_path):
    txt = tmp_path / "Dup.txt"
    txt.write_text("1 5 6\n2 6 7\n1 8\n")
    with pytest.raises(DataValidationError) as e:
        read_s3rec(txt)
    assert "Dup.txt line 3, field 'user_id': user '1' already has line 1" in str(e.value)


def test_s3rec_token_that_is_not_an_integer_is_refused_naming_file_line_and_token(tmp_path):
    txt = tmp_path / "Bad.txt"
    txt.write_text("17 362 205\nu9 4 5\n18 362 205 abc\n19 1.5 7\n")
    with pytest.raises(DataValidationError) as e:
        read_s3rec(txt)
    assert e.value.problems == [
        "Bad.txt line 2, field 'user_id': 'u9' is not an integer id; S3Rec lines are whole numbers, 'user item item ...'",
        "Bad.txt line 3, field 'item_id': 'abc' is not an integer id; S3Rec lines are whole numbers, 'user item item ...'",
        "Bad.txt line 4, field 'item_id': '1.5' is not an integer id; S3Rec lines are whole numbers, 'user item item ...'",
    ]


def test_s3rec_attributes_json_with_an_item_that_is_not_an_integer_is_refused(tmp_path):
    txt = tmp_path / "Toy.txt"
    txt.write_text("1 10 11\n")
    (tmp_path / "Toy_item2attributes.json").write_text(json.dumps({"10": [1], "abc": [2]}))
    dataset, report = check_dataset(txt)
    assert dataset is None
    assert report.problems == ["Toy_item2attributes.json item 'abc', field 'item_id': not an integer id; S3Rec items are numbered 1..N"]


def _tiny_dataset() -> Dataset:
    """Every column kind of the contract, with missing values where the contract allows them."""
    events = pd.DataFrame(
        {
            "user_id": pd.Categorical(["007", "007", "u2", "u2", "u3"]),
            "item_id": pd.Categorical(["i1", "i2", "i1", "i3", "i2"]),
            "timestamp": np.array([1_735_689_600, 1_735_689_660, 1_735_690_000, 1_735_690_001, 1_735_700_000], dtype=np.int64),
            "event_type": pd.Categorical(["view", "purchase", "view", "cart", "interaction"]),
            "value": [np.nan, 12.5, np.nan, np.nan, np.nan],
            "event_id": pd.Series(["e1", "e2", "e3", None, "e5"], dtype="str"),
            "channel": pd.Categorical(["web", "app", None, "web", None]),
        }
    )
    items = pd.DataFrame(
        {
            "item_id": pd.Series(["i1", "i2", "i3"], dtype="str"),
            "attributes": [["category:c1", "brand:b1"], [], ["category:c2"]],
            "price": [9.99, 12.5, np.nan],
            "in_stock": [True, False, True],
            "title": pd.Series(["Soap, 100 g", None, 'Shampoo "mild"'], dtype="str"),
        }
    )
    users = pd.DataFrame(
        {
            "user_id": pd.Series(["007", "u2", "u3"], dtype="str"),
            "consent": [True, False, True],
            "country": pd.Series(["NL", "DE", None], dtype="str"),
        }
    )
    return Dataset(name="tiny", events=events, items=items, users=users)


def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    """Categoricals as text, so a frame compares equal whichever id encoding it uses."""
    return frame.astype({c: "str" for c in frame.columns if isinstance(frame[c].dtype, pd.CategoricalDtype)})


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_write_then_load_round_trips_every_column(tmp_path, fmt):
    original = _tiny_dataset()
    paths = write_dataset(original, tmp_path / "out", format=fmt)
    assert {p.name for p in paths.values()} == {f"events.{fmt}", f"items.{fmt}", f"users.{fmt}"}
    loaded, report = load_dataset(tmp_path / "out")
    assert report.ok and not report.warnings
    assert loaded.name == "out"
    for table in ("events", "items", "users"):
        pd.testing.assert_frame_equal(_plain(getattr(loaded, table)), _plain(getattr(original, table)))


def test_parquet_files_carry_the_contract_schema(tmp_path):
    from towerline.features.contracts import EVENTS_SCHEMA, ITEMS_SCHEMA, USERS_SCHEMA

    paths = write_dataset(_tiny_dataset(), tmp_path)
    assert pq.read_schema(paths["events"]).remove_metadata().equals(EVENTS_SCHEMA)
    assert pq.read_schema(paths["items"]).remove_metadata().equals(ITEMS_SCHEMA)
    users_schema = pq.read_schema(paths["users"])
    assert users_schema.names[:2] == USERS_SCHEMA.names and users_schema.field("consent").type == pa.bool_()


def test_generated_data_round_trips_through_files(tmp_path):
    from towerline.features.synthetic import generate_dataset

    original = generate_dataset(60, 20, seed=3)
    write_dataset(original, tmp_path)
    loaded, report = load_dataset(tmp_path)
    assert report.ok and report.counts["duplicate_event_ids"] == 0 and report.counts["out_of_order"] == 0
    for table in ("events", "items", "users"):
        pd.testing.assert_frame_equal(_plain(getattr(loaded, table)), _plain(getattr(original, table)))


def test_iso_8601_and_epoch_timestamps_become_int64_seconds(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text(
        "user_id,item_id,timestamp\n"
        "u1,i1,2025-01-01T00:00:00Z\n"
        "u1,i2,2025-01-01T03:00:00+02:00\n"
        "u1,i3,2025-01-01 01:00:05\n"
        "u1,i4,1735700000\n"
        "u1,i5,2025-01-02\n"
    )
    events = read_events(path)
    assert events["timestamp"].dtype == np.int64
    assert events["timestamp"].tolist() == [1735689600, 1735693200, 1735693205, 1735700000, 1735776000]


def test_parquet_timestamp_column_becomes_epoch_seconds(tmp_path):
    path = tmp_path / "events.parquet"
    ts = pa.array([0, 1_735_689_600_000], type=pa.timestamp("ms", tz="UTC"))
    pq.write_table(pa.table({"user_id": ["u1", "u1"], "item_id": [7, 8], "timestamp": ts}), path)
    events = read_events(path)
    assert events["timestamp"].tolist() == [0, 1_735_689_600]
    assert events["item_id"].astype(str).tolist() == ["7", "8"]  # integer ids become text ids


def test_ids_keep_leading_zeros_and_optional_columns_get_defaults(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,timestamp\n007,0042,1\n")
    events = read_events(path)
    assert events["user_id"].astype(str).tolist() == ["007"]
    assert events["item_id"].astype(str).tolist() == ["0042"]
    assert events["event_type"].astype(str).tolist() == ["interaction"]
    assert np.isnan(events["value"].iloc[0]) and pd.isna(events["event_id"].iloc[0])
    assert list(events.columns) == EVENT_COLUMNS


def test_folder_with_events_only_derives_items_and_users(tmp_path, caplog):
    (tmp_path / "events.csv").write_text("user_id,item_id,timestamp\nu1,i1,1\nu2,i2,2\nu1,i2,3\n")
    with caplog.at_level(logging.INFO, logger="towerline.features.readers"):
        dataset, report = load_dataset(tmp_path)
    assert sorted(dataset.items["item_id"]) == ["i1", "i2"]
    assert sorted(dataset.users["user_id"]) == ["u1", "u2"] and dataset.users["consent"].all()
    assert report.counts["unknown_items"] == 0
    assert "no items file" in caplog.text and "no users file" in caplog.text


def test_single_events_file_and_explicit_format(tmp_path):
    path = tmp_path / "clicks.log"  # suffix says nothing; --format does
    path.write_text("user_id,item_id,timestamp\nu1,i1,1\n")
    with pytest.raises(DataValidationError, match="cannot tell the format"):
        load_dataset(path)
    dataset, _ = load_dataset(path, format="csv")
    assert dataset.name == "clicks" and len(dataset.events) == 1


def test_items_and_users_readers_parse_text_cells(tmp_path):
    items = tmp_path / "items.csv"
    items.write_text("item_id,attributes,price,in_stock\ni1,category:c1|brand:b1,3.5,yes\ni2,,,\n")
    frame = read_items(items)
    assert frame["attributes"].tolist() == [["category:c1", "brand:b1"], []]
    assert frame["in_stock"].tolist() == [True, True]  # empty means in stock
    users = tmp_path / "users.csv"
    users.write_text("user_id,consent,segment\nu1,false,gold\nu2,1,\n")
    frame = read_users(users)
    assert frame["consent"].tolist() == [False, True]
    assert frame["segment"].iloc[0] == "gold"  # extra user attributes are kept


# ----------------------------------------------------------------------------- your own column names

SHOP_CSV = (
    "customer,sku,ts,kind,session,utm_source\n"
    "c1,s1,1735689600,view,a,mail\n"
    "c1,s2,1735689700,purchase,a,mail\n"
    "c2,s1,1735689800,view,b,\n"
)
SHOP_MAP = ["user_id=customer,item_id=sku", "timestamp=ts", "event_type=kind"]


def test_a_single_file_with_its_own_column_names_reads_through_the_mapping(tmp_path, fmt="csv"):
    from towerline.features.readers import parse_column_map

    path = tmp_path / "orders.csv"
    path.write_text(SHOP_CSV)
    mapping = parse_column_map(SHOP_MAP)
    assert mapping == {"user_id": "customer", "item_id": "sku", "timestamp": "ts", "event_type": "kind"}
    dataset, report = load_dataset(path, columns=mapping)
    assert list(dataset.events.columns) == EVENT_COLUMNS and dataset.name == "orders"
    assert dataset.events["user_id"].astype(str).tolist() == ["c1", "c1", "c2"]
    assert dataset.events["event_type"].astype(str).tolist() == ["view", "purchase", "view"]
    assert report.counts["events"] == 3 and report.counts["users"] == 2 and report.counts["items"] == 2


def test_the_mapping_applies_to_parquet_and_to_every_table_of_a_folder(tmp_path):
    folder = tmp_path / "shop"
    folder.mkdir()
    pd.read_csv(pd.io.common.StringIO(SHOP_CSV), dtype=str).to_parquet(folder / "events.parquet")
    pd.DataFrame({"sku": ["s1", "s2"], "cost": ["3.5", "12"]}).to_parquet(folder / "items.parquet")
    pd.DataFrame({"customer": ["c1", "c2"], "opt_in": [True, False]}).to_parquet(folder / "users.parquet")
    columns = {"user_id": "customer", "item_id": "sku", "timestamp": "ts", "price": "cost", "consent": "opt_in"}
    dataset, _ = load_dataset(folder, columns=columns)
    assert dataset.items["price"].tolist() == [3.5, 12.0]
    assert dataset.users.set_index("user_id")["consent"].to_dict() == {"c1": True, "c2": False}
    assert dataset.name == "shop"


def test_an_unknown_mapped_name_is_one_line_naming_the_valid_ones():
    from towerline.features.readers import parse_column_map

    with pytest.raises(DataValidationError) as e:
        parse_column_map(["usr_id=customer,item_id=sku"])
    (line,) = e.value.problems
    assert line.startswith("--map usr_id=customer: 'usr_id' is not a Towerline column; did you mean 'user_id'?")
    assert "valid names: user_id, item_id, timestamp" in line and "consent" in line


def test_a_mapped_column_the_file_lacks_is_named(tmp_path):
    path = tmp_path / "orders.csv"
    path.write_text(SHOP_CSV)
    with pytest.raises(DataValidationError) as e:
        load_dataset(path, columns={"user_id": "client", "item_id": "sku", "timestamp": "ts"})
    (line,) = e.value.problems
    assert "field 'client': no such column to map to 'user_id'" in line and "found: customer, sku" in line


def test_extra_columns_are_ignored_with_one_warning_listing_them(tmp_path, caplog):
    path = tmp_path / "orders.csv"
    path.write_text(SHOP_CSV)
    with caplog.at_level(logging.WARNING):
        dataset, report = load_dataset(path, columns={"user_id": "customer", "item_id": "sku", "timestamp": "ts"})
    extra = [w for w in report.warnings if "not used by Towerline" in w]
    assert len(extra) == 1
    assert "3 columns not used by Towerline, ignored: 'kind', 'session', 'utm_source'" in extra[0]
    assert "--map NAME=COLUMN" in extra[0]
    assert sum("not used by Towerline" in r.getMessage() for r in caplog.records) == 1
    assert list(dataset.events.columns) == EVENT_COLUMNS


def test_missing_consent_data_is_a_warning_naming_the_fix(tmp_path, caplog):
    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "events.csv").write_text("user_id,item_id,timestamp\nu1,i1,1\nu2,i1,2\n")
    with caplog.at_level(logging.INFO, logger="towerline.features.readers"):
        _, report = load_dataset(folder)
    (line,) = [r for r in caplog.records if "no users file" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert "every user is treated as consenting" in line.getMessage()
    assert f"add users.csv with a consent column (user_id,consent) to {folder}" in line.getMessage()
    assert line.getMessage() in report.warnings
    (folder / "users.csv").write_text("user_id,country\nu1,FR\nu2,DE\n")  # a users file without consent
    _, report = load_dataset(folder)
    assert any("users.csv: no consent column: every user is treated as consenting" in w for w in report.warnings)
