"""``--data PATH [--format F] [--map NAME=COLUMN ...]``: one way to point any command at your data.

Shared by ``train``, ``quickstart``, ``evaluate`` and ``data validate|describe`` so the flags read
the same everywhere. The flags become ``data.*`` config overrides (path, format, name, columns),
so the resolved config (logged to MLflow, saved in the bundle) records how the data was read and
``evaluate``/``profile`` re-read it the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

FORMATS = ["csv", "parquet", "s3rec"]
MAP_HELP = (
    "Towerline column NAME held by your COLUMN, e.g. --map user_id=customer,item_id=sku "
    "(repeatable; names: user_id, item_id, timestamp, event_type, value, event_id, channel, "
    "attributes, price, in_stock, title, consent)"
)


def add_map_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--map", dest="column_map", action="append", default=[], metavar="NAME=COLUMN", help=MAP_HELP)


def add_data_flags(p: argparse.ArgumentParser, data_help: str) -> None:
    """``--data``, ``--format`` and ``--map`` on a command that otherwise reads its config's data."""
    p.add_argument("--data", type=Path, default=None, metavar="PATH", help=data_help)
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="format of --data (default: from the file suffix, or the folder's events.* file)")
    add_map_flag(p)


def column_map(args: argparse.Namespace) -> dict[str, str]:
    """The ``--map`` flags as one mapping; a bad entry is a ``DataValidationError`` naming it."""
    if not getattr(args, "column_map", None):
        return {}
    from towerline.features.readers import parse_column_map

    return parse_column_map(args.column_map)


def data_overrides(args: argparse.Namespace, path: Path | str | None = None, name: bool = True) -> list[str]:
    """``data.*`` ``--set`` strings for ``--data``/``--format``/``--map`` (empty without them).

    The format is inferred here, before any config is built, because ``data.format`` records it;
    the data set's name defaults to the folder's or file's, so runs read ``shop-twotower-...``.
    Values go through JSON, which YAML reads back verbatim (paths with ``:`` or spaces survive).
    """
    path = path if path is not None else getattr(args, "data", None)
    mapping = column_map(args)
    if path is None:
        if getattr(args, "format", None) and not getattr(args, "data", None):
            from towerline.errors import ConfigError

            raise ConfigError("--format needs --data PATH (the file or folder it describes)")
        return [f"data.columns={json.dumps(mapping)}"] if mapping else []
    from towerline.features.readers import default_name, infer_format

    fmt = args.format or infer_format(path)
    out: list[Any] = [
        f"data.format={fmt}",
        f"data.path={json.dumps(str(Path(path).resolve()))}",
        f"data.columns={json.dumps(mapping)}",
    ]
    if name:
        out.append(f"data.name={json.dumps(default_name(path))}")
    return out
