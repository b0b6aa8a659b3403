"""What events, items and users look like once they are inside Towerline.

Readers turn files into these shapes (or a ``DataValidationError``); everything downstream trusts
them. In memory a table is a pandas DataFrame with exactly the columns below, so the heavy work
(vocabularies, sequences, splits) stays vectorised over millions of rows. The pydantic ``Event``
model is the same contract for one event arriving over HTTP (``POST /events``).

Canonical columns (``EVENT_COLUMNS`` etc. give the order):

events  user_id str | item_id str | timestamp int64 (epoch seconds) | event_type str
        | value float64 (money, NaN when absent) | event_id str or None | channel str or None
items   item_id str | attributes list[str] (tokens such as "category:c12", "brand:b3")
        | price float64 (NaN when absent) | in_stock bool | title str or None
users   user_id str | consent bool (false => no personalisation) | any further attribute columns

Id columns may be pandas ``Categorical`` of strings (the generator and Parquet files use it to keep
10-million-row tables small); code that reads them must accept both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from towerline.text import Money, Text, Timestamp

# The funnel an e-commerce site records, in increasing order of intent. "interaction" is the one
# type of data sets that record no type (the S3Rec files). Other strings are allowed: they get
# their own vocabulary entry.
EVENT_TYPES: tuple[str, ...] = ("interaction", "view", "click", "cart", "purchase")
DEFAULT_EVENT_TYPE = "interaction"

EVENT_COLUMNS = ["user_id", "item_id", "timestamp", "event_type", "value", "event_id", "channel"]
ITEM_COLUMNS = ["item_id", "attributes", "price", "in_stock", "title"]
USER_COLUMNS = ["user_id", "consent"]

REQUIRED_EVENT_COLUMNS = ["user_id", "item_id", "timestamp"]
REQUIRED_ITEM_COLUMNS = ["item_id"]
REQUIRED_USER_COLUMNS = ["user_id"]

EVENTS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("timestamp", pa.int64()),
        ("event_type", pa.string()),
        ("value", pa.float64()),
        ("event_id", pa.string()),
        ("channel", pa.string()),
    ]
)
ITEMS_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("attributes", pa.list_(pa.string())),
        ("price", pa.float64()),
        ("in_stock", pa.bool_()),
        ("title", pa.string()),
    ]
)
USERS_SCHEMA = pa.schema([("user_id", pa.string()), ("consent", pa.bool_())])


@dataclass
class Dataset:
    """Events, catalogue and users of one data set, validated and in canonical columns."""

    name: str
    events: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame


class Event(BaseModel):
    """One behaviour event as it arrives over HTTP; the same fields as a row of ``events``.

    Every field is typed by ``towerline.text`` (encodable text, 1970..2100 timestamps from an int
    or ISO-8601, finite money, unknown fields rejected by name), so what passes here can be stored
    by SQLite, Redis and the vocabularies without a 500 further down.
    """

    model_config = ConfigDict(extra="forbid")

    user_id: Annotated[Text, Field(min_length=1, max_length=256)]
    item_id: Annotated[Text, Field(min_length=1, max_length=256)]
    timestamp: Optional[Timestamp] = Field(
        default=None, description="epoch seconds or ISO-8601 (1970..2100); the server's clock when absent"
    )
    event_type: Annotated[Text, Field(min_length=1, max_length=64)] = DEFAULT_EVENT_TYPE
    value: Optional[Money] = Field(default=None, description="money, for purchases")
    event_id: Optional[Annotated[Text, Field(min_length=1, max_length=256)]] = Field(default=None, description="deduplication key")
    channel: Optional[Annotated[Text, Field(max_length=64)]] = None
