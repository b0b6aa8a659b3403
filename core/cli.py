"""The ``towerline`` command: one entry point, thin subcommands.

Each subcommand lives in ``towerline.commands.<area>``, parses its flags and calls one library
function; heavy libraries (torch, Ray, MLflow) are imported inside those functions so that
``towerline --help`` answers at once. Errors a user can fix (``TowerlineError``) become one line per
problem on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings

from towerline import __version__
from towerline.errors import DataValidationError, TowerlineError

EPILOG = """examples:
  towerline quickstart                                      # the whole path on synthetic data, end to end
  towerline data generate --out data/synthetic --users 3000 --items 800 --seed 0
  towerline data validate data/synthetic
  towerline data describe ../shared/data/s3rec/Beauty.txt --format s3rec
  towerline train --config configs/synthetic.yaml
  towerline train --data shop/orders.csv --map user_id=customer,item_id=sku,timestamp=ts
  towerline evaluate --model runs/latest/bundle
  towerline promote --name towerline-retriever --version 1 --alias champion
  towerline train-ranker --model runs/latest/bundle
  towerline index --model models:/towerline-retriever@champion --kind hnsw
  towerline serve --model models:/towerline-retriever@champion
  towerline profile --model runs/latest/bundle --out profiles/profiles.parquet
  towerline audience --model runs/latest/bundle --item i00042 --size 500 --out audience.csv
  towerline experiment simulate home-feed --config configs/synthetic.yaml --users 20000 --db demo.db
  towerline campaign run welcome --data data/synthetic --model runs/latest/bundle --as-of 2025-06-30T09:00 --outbox outbox/

Run 'towerline <command> --help' for each command's flags and an example."""

HELP_WIDTH = 100  # help wraps to the terminal, but never wider than this: long lines are hard to read


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps descriptions to the terminal (at most ``HELP_WIDTH``) but keeps example epilogs verbatim.

    A one-paragraph text (every description) is wrapped; a text with line breaks (the examples
    every command carries, aligned by hand) is kept as written, as ``RawDescriptionHelpFormatter``
    would keep everything.
    """

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 30, width: int | None = None) -> None:
        import shutil

        width = width or min(shutil.get_terminal_size().columns - 2, HELP_WIDTH)
        super().__init__(prog, indent_increment, max_help_position, width)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        # argparse %-expands help= strings but never descriptions or epilogs, so a "%%" here (written
        # by habit) would show as is; and RST literals (``x``) from docstrings read as noise in a terminal
        text = re.sub(r"``([^`]+)``", r"'\1'", text.replace("%%", "%"))
        if "\n" in text.strip():
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


def _use_formatter(parser: argparse.ArgumentParser) -> None:
    """Every (sub)command's help through ``HelpFormatter``, whatever its module asked for."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _use_formatter(sub)


def build_parser() -> argparse.ArgumentParser:
    from towerline.commands import register_all

    parser = argparse.ArgumentParser(
        prog="towerline",
        description="Towerline: train two-tower recommenders on behaviour sequences, track them in "
        "MLflow, index them with FAISS and serve them with Ray Serve.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"towerline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, with the libraries' own lines (MLflow, Lightning, Ray)")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    register_all(sub)
    _use_formatter(parser)
    return parser


# Lines libraries write that tell a Towerline user nothing they can act on, or something untrue.
KNOWN_NOISE = (
    "litlogger",  # Lightning's advert for its own logger
    "not found. Creating it",  # Lightning's MLFlowLogger on a new experiment (every first run)
    "building the font cache",  # matplotlib, once per machine
    "will not be applied",  # Ray Serve: it says http_options are not applied when they are
    "log_every_n_steps",  # Lightning: fewer batches than the logging interval (train clamps it anyway)
)


class _UserFacing(logging.Filter):
    """Without ``--verbose``: Towerline's own lines from INFO up, other libraries' from WARNING up,
    and none of ``KNOWN_NOISE``. Set on handlers, so a library resetting its logger's level at
    import (Lightning does) cannot undo it."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "litlogger" in msg:
            return False
        if self.verbose:
            return True
        if record.levelno < logging.WARNING and not record.name.startswith("towerline"):
            return False
        return not any(n in msg for n in KNOWN_NOISE)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """A Python warning as one log line without the library's file path: the user cannot edit
    site-packages, and the path made a third-party line look like Towerline's failure. MLflow's
    advice for hand-written pyfunc models (it forces its warnings "always") does not apply to ours,
    which is logged from code with a signature: dropped here."""
    if any(text in str(message) for text in KNOWN_NOISE):
        return
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)


KNOWN_NOISE = ("Type hint used in the model", "An input example was not provided", "signature.")


def configure_logging(verbose: bool = False) -> None:
    """One stderr handler for everything; quiet third-party libraries unless ``verbose``.

    MLflow configures its own handler at import from ``$MLFLOW_LOGGING_LEVEL`` (its database
    creation lines are INFO), so that variable is set before it is imported; Ray's noise is
    silenced where Ray is started (``towerline.commands.serve``).
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    quiet = _UserFacing(verbose)
    handlers = logging.getLogger().handlers
    for h in handlers:
        for f in [f for f in h.filters if isinstance(f, _UserFacing)]:  # main() may run twice in a process
            h.removeFilter(f)
        h.addFilter(quiet)
    # ``import lightning`` gives the "lightning" logger a console handler of its own; records of
    # lightning.pytorch/fabric would print there unfiltered and again through ours. Route them to
    # our handlers only (their own import then sees handlers and adds none).
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.propagate = False
        for h in handlers:
            if h not in logger.handlers:
                logger.addHandler(h)
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    if not sys.stderr.isatty():  # MLflow's artifact download bar: hundreds of \r updates in a log
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
        logging.getLogger("lightning.pytorch.loggers.mlflow").setLevel(logging.ERROR)  # "Experiment ... Creating it."  # "no AVX2 build" is not news to a user
        warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
        # MLflow's advice for hand-written pyfunc models; ours is logged from code with a signature
        warnings.filterwarnings("ignore", message=r"(?s).*(Type hint used in the model|An input example was not provided)")
        # Lightning on --resume (or a second run into one --out): the checkpoints there are ours
        warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
        warnings.showwarning = _show_warning


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
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
