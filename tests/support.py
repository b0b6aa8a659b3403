"""Helpers test modules import by name (``from support import ...``); fixtures live in conftest.py.

A module of its own because ``from conftest import`` is ambiguous once sub-folders have conftests.
"""

from __future__ import annotations

from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "s3rec"
REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(tracking_uri: str | None = None) -> list[str]:
    """A config small enough to train in seconds on one CPU core, still with real signal."""
    out = [
        "data.synthetic_users=300",
        "data.synthetic_items=60",
        "model.dim=16",
        "model.max_len=12",
        "model.n_layers=1",
        "model.dropout=0.1",
        "trainer.max_epochs=2",
        "trainer.batch_size=64",
        "trainer.lr=0.005",
        "trainer.eval_batch_size=128",
        "tracking.experiment=tests",
        "tracking.model_name=tiny-retriever",
    ]
    if tracking_uri:
        out.append(f"tracking.tracking_uri={tracking_uri}")
    return out
