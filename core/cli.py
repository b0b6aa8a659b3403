"""The ``towerline`` command: one entry point, thin subcommands.

Each subcommand lives in ``towerline.commands.<area>``, parses its flags and calls one library
function; heavy libraries (torch, Ray, MLflow) are imported inside those functions so that
``towerline --help`` answers at once. Errors a user can fix (``TowerlineError``) become one line per
problem on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from towerline import __version__
from towerline.errors import DataValidationError, TowerlineError

EPILOG = """examples:
  towerline data generate --out data/synthetic --users 5000 --items 1000 --seed 0
  towerline data validate data/synthetic
  towerline data describe ../shared/data/s3rec/Beauty.txt --format s3rec
  towerline train --config configs/synthetic.yaml
  towerline serve --model models:/towerline-retriever@champion
  towerline profile --model runs/latest/bundle --out profiles/profiles.parquet
  towerline audience --model runs/latest/bundle --item i00042 --size 500 --out audience.csv
  towerline experiment simulate home-feed --config configs/synthetic.yaml --users 20000 --db demo.db
  towerline campaign run welcome --data data/synthetic --model runs/latest/bundle --as-of 2025-06-30T09:00 --outbox outbox/

Run 'towerline <command> --help' for each command's flags and an example."""


def build_parser() -> argparse.ArgumentParser:
    from towerline.commands import register_all

    parser = argparse.ArgumentParser(
        prog="towerline",
        description="Towerline: train two-tower recommenders on behaviour sequences, track them in "
        "MLflow, index them with FAISS and serve them with Ray Serve.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"towerline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    register_all(sub)
    return parser


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _quiet_third_party_logs() -> None:
    """Lightning installs its own console handler; keep one copy of each line and no adverts."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.propagate = False
        for h in logger.handlers:
            h.addFilter(_DropAdverts())
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # "no AVX2 build" is not news to a user
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    _quiet_third_party_logs()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DataValidationError as e:
        for line in e.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except TowerlineError as e:
        for line in str(e).splitlines() or [type(e).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
