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


def train_tiny(root: Path, extra_overrides: list[str] | tuple[str, ...] = ()):
    """Train the tiny config in ``root`` with its own SQLite MLflow store; returns the TrainResult.

    Runs from ``root`` so MLflow's ./mlruns artifacts stay out of the checkout.
    """
    import os

    import mlflow

    from towerline.config import load_config
    from towerline.training.train import train

    uri = f"sqlite:///{root / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = load_config(REPO / "configs" / "synthetic.yaml", tiny_overrides(uri) + list(extra_overrides))
        return train(cfg, root / "run", progress=False)
    finally:
        os.chdir(cwd)
        mlflow.set_tracking_uri(None)
