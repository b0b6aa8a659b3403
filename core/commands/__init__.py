"""Subcommands of the ``towerline`` CLI, one module per area, each with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib

# Areas in the order ``towerline --help`` lists them. A module that is not written yet is skipped,
# so areas can land one at a time.
AREAS = ["quickstart", "data", "train", "ranker", "baseline", "serve", "recommend", "profile", "experiment", "campaign"]


def register_all(sub: argparse._SubParsersAction) -> None:
    for area in AREAS:
        try:
            module = importlib.import_module(f"towerline.commands.{area}")
        except ModuleNotFoundError as e:
            if e.name == f"towerline.commands.{area}":
                continue
            raise
        module.register(sub)


def example_formatter() -> type[argparse.HelpFormatter]:
    """Keep the line breaks of the example epilog each subcommand carries."""
    return argparse.RawDescriptionHelpFormatter
