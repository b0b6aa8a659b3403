"""``towerline data generate | validate | describe``: make, check and summarise event data.

Each command parses its flags, calls one library function in ``towerline.features`` and prints
the result. Problems a user can fix arrive as ``DataValidationError`` / ``ConfigError``, which
``towerline.cli.main`` prints as one ``error:`` line each with exit status 2. Non-fatal findings
(duplicates, unknown ids, out-of-order rows) are logged as warnings on stderr and counted on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from towerline.commands.datasource import add_map_flag, column_map

DATA_EXAMPLE = """examples:
  towerline data generate --out data/synthetic --users 5000 --items 1000 --seed 0
  towerline data validate data/synthetic
  towerline data describe ../shared/data/s3rec/Beauty.txt --format s3rec"""

GENERATE_EXAMPLE = """example:
  towerline data generate --out data/synthetic --users 5000 --items 1000 --seed 0
  towerline data generate --out data/small-csv --users 200 --items 50 --format csv
  towerline data generate --out data/big --users 2000000 --items 1000000 --shard-events 1000000

Writes events, items and users files (Parquet by default) that 'towerline data validate' accepts."""

VALIDATE_EXAMPLE = """example:
  towerline data validate data/synthetic                  # folder: events.* (+ items.*, users.*)
  towerline data validate my_events.csv                    # one events file
  towerline data validate orders.csv --map user_id=customer,item_id=sku,timestamp=ts
  towerline data validate ../shared/data/s3rec/LastFM.txt --format s3rec

Exit status 0 when the data is usable (warnings allowed), 2 when it is not; every problem names
file, row and field, e.g.
  error: events.csv row 1042, field 'timestamp': 'yesterday' is neither epoch seconds nor ISO-8601"""

PREPARE_EXAMPLE = """example:
  towerline data prepare --config configs/synthetic.yaml --out runs/latest/data
  towerline data prepare --config configs/synthetic.yaml --set data.format=parquet --set data.path=data/shop --out prepared --engine ray

Writes vocab/, sequences.npz, item_attributes.npy, items.parquet, users.parquet and prepared.json:
the data cache 'towerline train' reads from <out>/data. Both engines write the same files; ray reads
events/part-*.parquet (or .csv) shards with Ray Data, bounded memory per worker."""

DESCRIBE_EXAMPLE = """example:
  towerline data describe data/synthetic
  towerline data describe ../shared/data/s3rec/Beauty.txt --format s3rec --json"""

FORMATS = ["csv", "parquet", "s3rec"]
NON_FATAL = (
    "duplicate_event_ids",
    "duplicate_items",
    "duplicate_users",
    "unknown_items",
    "unknown_users",
    "out_of_order",
    "empty_sequences",
)


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    data = sub.add_parser(
        "data", help="generate, validate and describe event data",
        description="Make synthetic shop data, check event/item/user files, and summarise a data set.",
        epilog=DATA_EXAMPLE, formatter_class=fmt,
    )
    data.set_defaults(func=lambda args: _no_action(data))
    actions = data.add_subparsers(dest="data_command", metavar="<action>")

    p = actions.add_parser(
        "generate", help="write a seeded synthetic data set (events, items, users)",
        description="Generate the embedded default data set: a seeded synthetic shop with power-law item "
        "popularity, categories and brands, sessions with a view -> click -> cart -> purchase funnel, "
        "prices and months of timestamps.", epilog=GENERATE_EXAMPLE, formatter_class=fmt,
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write events/items/users into (created)")
    p.add_argument("--users", type=int, default=5000, metavar="N", help="number of users (default: 5000)")
    p.add_argument("--items", type=int, default=1000, metavar="M", help="number of items (default: 1000)")
    p.add_argument("--events", type=int, default=None, metavar="E", help="number of events (default: 20 per user)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed; the same seed writes the same data (default: 0)")
    p.add_argument("--format", choices=["parquet", "csv"], default="parquet", help="file format (default: parquet)")
    p.add_argument("--shard-events", type=int, default=None, metavar="ROWS",
                   help="stream the events to events/part-*.{parquet,csv} shards of about ROWS rows, one block of "
                   "users at a time, in bounded memory (for shops of millions; what 'data prepare --engine ray' reads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_generate)

    p = actions.add_parser(
        "validate", help="check a data set; exit 0 when usable, 2 when not",
        description="Read a folder (events.csv|parquet, optional items.*, users.*), one events file or an "
        "S3Rec .txt file, check it against the data contract and print counts and problems.",
        epilog=VALIDATE_EXAMPLE, formatter_class=fmt,
    )
    p.add_argument("path", type=Path, help="folder, events file or S3Rec .txt file")
    p.add_argument("--format", choices=FORMATS, default=None, help="file format (default: from the file suffix)")
    add_map_flag(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_validate)

    p = actions.add_parser(
        "describe", help="print users, items, events, sequence lengths, event mix, sparsity",
        description="Summarise a data set: table sizes, sequence-length percentiles, event-type mix, "
        "sparsity and time span.", epilog=DESCRIBE_EXAMPLE, formatter_class=fmt,
    )
    p.add_argument("path", type=Path, help="folder, events file or S3Rec .txt file")
    p.add_argument("--format", choices=FORMATS, default=None, help="file format (default: from the file suffix)")
    add_map_flag(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_describe)

    p = actions.add_parser(
        "prepare", help="build vocabularies and sequences (the training data cache), locally or with Ray Data",
        description="Prepare a config's data set once: vocabularies, per-user sequences and the item-attribute "
        "matrix, as 'towerline train' caches them. --engine ray builds the same files from event shards "
        "with Ray Data (a local Ray on 127.0.0.1, or the cluster in $RAY_ADDRESS).",
        epilog=PREPARE_EXAMPLE, formatter_class=fmt,
    )
    p.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in synthetic defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config value, e.g. --set data.path=data/shop (repeatable)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write the prepared files into")
    p.add_argument("--engine", choices=["local", "ray"], default=None, help="override data.engine (default: the config's)")
    p.set_defaults(func=cmd_prepare)


def cmd_generate(args: argparse.Namespace) -> int:
    from towerline.errors import ConfigError

    for flag, value, least in (("--users", args.users, 1), ("--items", args.items, 2), ("--events", args.events, 1)):
        if value is not None and value < least:  # the user's flag, not the generator's parameter name
            raise ConfigError(f"{flag} must be >= {least}, got {value}")
    from towerline.features.synthetic import generate_dataset, generate_sharded
    from towerline.features.writers import write_dataset

    if args.shard_events is not None:
        r = generate_sharded(args.out, args.users, args.items, args.seed, n_events=args.events,
                             rows_per_shard=args.shard_events, format=args.format, progress=_progress(args))
        print(f"wrote {r['dir']}/events/  ({r['events']:,} events in {r['shards']} shards), "
              f"items ({r['items']:,}), users ({r['users']:,})")
        return 0

    dataset = generate_dataset(args.users, args.items, args.seed, n_events=args.events, progress=_progress(args))
    paths = write_dataset(dataset, args.out, format=args.format)
    for name, path in paths.items():
        print(f"wrote {path}  ({len(getattr(dataset, name)):,} {name})")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from towerline.config import load_config
    from towerline.training.data import PREPARED, SequenceDataModule

    overrides = list(args.overrides) + ([f"data.engine={args.engine}"] if args.engine else [])
    cfg = load_config(args.config, overrides)
    SequenceDataModule(cfg, args.out).prepare_data()
    summary = json.loads((args.out / PREPARED).read_text())
    print(f"prepared {summary['dataset']} with engine {cfg.data.engine} in {args.out}: "
          f"{summary['events']:,} events, {summary['users']:,} users, {summary['items']:,} items")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from towerline.errors import DataValidationError
    from towerline.features.readers import check_dataset

    _, report = check_dataset(args.path, args.format, progress=_progress(args), columns=column_map(args))
    c = report.counts
    sizes = ", ".join(f"{c[k]:,} {k}" for k in ("events", "users", "items") if k in c)
    print(f"{args.path}: {sizes or 'nothing read'}")
    for key in NON_FATAL:
        if c.get(key):
            print(f"  {key:<20} {c[key]:,}")
    if not report.ok:
        print(f"invalid: {len(report.problems)} problem line(s) on stderr")
        raise DataValidationError(report.problems)
    print(f"valid ({len(report.warnings)} warning(s){' on stderr' if report.warnings else ''})")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from towerline.features.describe import describe_dataset, format_description
    from towerline.features.readers import load_dataset

    dataset, _ = load_dataset(args.path, args.format, progress=_progress(args), columns=column_map(args))
    summary = describe_dataset(dataset)
    print(json.dumps(summary, indent=2) if args.json else format_description(summary))
    return 0


def _no_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()
