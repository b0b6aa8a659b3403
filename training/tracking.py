"""MLflow: where runs go, how a run's bundle becomes a registered model version, and aliases.

The bundle is logged as plain artifacts (JSON, safetensors, npy) and registered with
``create_model_version(source=<run artifact dir>)`` rather than as an MLflow "flavor", because
flavors that serialise Python objects would make loading a model mean unpickling it.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from towerline.config import TrackingConfig
from towerline.errors import TowerlineError

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
BUNDLE_ARTIFACT_PATH = "bundle"


def tracking_uri(cfg: TrackingConfig) -> str:
    """Config first, then ``$MLFLOW_TRACKING_URI``, then ``mlflow.db`` in the working directory
    (as an absolute path, so Ray Serve replicas with another working directory find the same store)."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri == DEFAULT_TRACKING_URI:
        uri = f"sqlite:///{Path('mlflow.db').resolve()}"
    return uri


def use_tracking(cfg: TrackingConfig) -> str:
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    return uri


def code_version() -> str:
    """Git commit of the source tree when there is one (tagged on every run), else the package version."""
    from towerline import __version__

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def register_bundle(run_id: str, model_name: str) -> str:
    """Register the run's bundle as a new version of ``model_name``; returns the version number."""
    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name, description="Towerline two-tower retriever bundles")
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{BUNDLE_ARTIFACT_PATH}"
    mv = client.create_model_version(model_name, source=source, run_id=run_id)
    log.info("registered %s version %s", model_name, mv.version)
    return str(mv.version)


def promote(model_name: str, version: str | int | None, alias: str = "champion") -> str:
    """Point ``alias`` at ``version`` (the newest version when None); returns the version."""
    client = mlflow.MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException as e:
        raise TowerlineError(f"model registry at {mlflow.get_tracking_uri()}: {e.message}") from None
    if not versions:
        raise TowerlineError(
            f"no registered model named '{model_name}' at {mlflow.get_tracking_uri()}; train one first "
            "(towerline train) or pass --tracking-uri"
        )
    known = sorted(int(v.version) for v in versions)
    chosen = str(known[-1] if version is None else version)
    if int(chosen) not in known:
        raise TowerlineError(f"model '{model_name}' has no version {chosen}; versions: {known}")
    client.set_registered_model_alias(model_name, alias, chosen)
    log.info("alias %s@%s -> version %s", model_name, alias, chosen)
    return chosen
