"""The ``towerline profile`` and ``towerline audience`` jobs as functions (the CLI only parses flags).

``run_profile`` builds RFM scores, lifecycle segments and interest tags from the data, adds each
customer's churn probability and predicted LTV (``add_campaign_scores``), clusters the model's user vectors, writes ``profiles.parquet`` (consenting users only, aggregates only) and a
``report.html`` beside it, and logs both to MLflow as artifacts of the model's training run (the
bundle manifest's ``run_id``), or of a new run when that run is not in the tracking store.

``run_audience`` ranks users by how likely they are to buy an item next. Consent always applies:
the consent flags come from a profiles file, else from the given data, else from the data the
model was trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from towerline.config import ProfileConfig, TowerlineConfig, TrackingConfig, load_config
from towerline.errors import ConfigError
from towerline.features.readers import load_dataset
from towerline.features.user_features import build_profiles
from towerline.marketing.audience import find_audience, user_vectors
from towerline.marketing.clusters import cluster_users, label_clusters
from towerline.marketing.profile_report import write_profile_report
from towerline.marketing.profiles import export_profiles, load_profiles
from towerline.marketing.scores import add_campaign_scores
from towerline.training.bundle import load_bundle
from towerline.training.data import load_data
from towerline.training.tracking import use_tracking

log = logging.getLogger(__name__)

PROFILE_ARTIFACT_PATH = "profiles"


@dataclass
class ProfileResult:
    profiles_path: Path
    report_path: Path
    n_users: int
    n_clusters: int
    cluster_labels: dict[int, list[str]]
    run_id: str | None


def run_profile(
    model: str,
    out: str | Path,
    data: str | None = None,
    format: str | None = None,
    config: str | Path | None = None,
    n_clusters: int | None = None,
    seed: int = 0,
    tracking_uri: str | None = None,
    log_to_mlflow: bool = True,
) -> ProfileResult:
    """The whole ``towerline profile`` pipeline: data -> profiles + clusters -> Parquet, HTML, MLflow."""
    _tracking(tracking_uri)
    bundle = load_bundle(model)
    cfg = _profile_config(bundle.config, config)
    dataset = load_model_data(bundle.config, data, format)
    profiles = build_profiles(dataset, cfg)
    profiles = add_campaign_scores(profiles, dataset, cfg)

    ids, vectors = user_vectors(bundle)
    k = n_clusters or cfg.n_clusters
    labels, _ = cluster_users(vectors, k, seed)
    profiles["cluster"] = pd.Series(labels, index=pd.Index(ids.astype(str))).reindex(profiles["user_id"]).fillna(-1).astype("int64").to_numpy()
    missing = int((profiles["cluster"] < 0).sum())
    if missing:
        log.info("profile: %d users are unknown to the model and have no cluster (-1)", missing)
    cluster_labels = label_clusters(profiles[profiles["consent"]])

    out = Path(out)
    export_profiles(profiles, out)
    report = write_profile_report(profiles, out.parent / "report.html", cluster_labels,
                                  title=f"Customer profiles: {dataset.name}")
    run_id = _log_artifacts(bundle, [out, report], cluster_labels) if log_to_mlflow else None
    return ProfileResult(out, report, int(profiles["consent"].sum()), len(set(labels.tolist())), cluster_labels, run_id)


def load_model_data(model_config: TowerlineConfig, data: str | None, format: str | None) -> Any:
    """``--data`` if given, else the data set the model was trained on, read as training read it
    (``training.data.load_data``: the same reader, column mapping and synthetic seed)."""
    if data:
        return load_dataset(data, format)[0]
    d = model_config.data
    if d.format != "synthetic" and not d.path:
        raise ConfigError("the model's config names no data path; pass --data")
    if d.format == "synthetic":
        log.info("no --data: regenerating the model's synthetic data (%s users, %s items, seed %s)",
                 d.synthetic_users, d.synthetic_items, d.seed)
    return load_data(d)


def run_audience(
    model: str,
    out: str | Path,
    item_id: str | None = None,
    attributes: list[str] | None = None,
    size: int = 100,
    segment: str | None = None,
    profiles_path: str | Path | None = None,
    data: str | None = None,
    format: str | None = None,
    scoring: str = "auto",
    tracking_uri: str | None = None,
) -> Any:
    """The ``towerline audience`` pipeline; returns the audience DataFrame it wrote to ``out``."""
    _tracking(tracking_uri)
    bundle = load_bundle(model)
    if profiles_path is not None:
        profiles = load_profiles(profiles_path)
    else:  # consent must come from somewhere: the data's users table
        profiles = build_profiles(load_model_data(bundle.config, data, format), _profile_config(bundle.config, None))
    ids, vectors = user_vectors(bundle)
    frame = find_audience(bundle, vectors, ids, item_id=item_id, attributes=attributes, size=size,
                          segment=segment, profiles=profiles, scoring=scoring)  # type: ignore[arg-type]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    return frame


def run_audience_scorer(model: str, out: str | Path | None = None, max_items: int = 1500, seed: int = 0,
                        hidden: int = 16, tracking_uri: str | None = None) -> tuple[Path, Any]:
    """The ``towerline audience-scorer`` pipeline: fit on the validation step, write the JSON beside the bundle."""
    from towerline.marketing.audience_scorer import fit_scorer, save_scorer, scorer_path

    _tracking(tracking_uri)
    bundle = load_bundle(model)
    scorer = fit_scorer(bundle, max_items=max_items, seed=seed, hidden=hidden)
    return save_scorer(scorer, out if out is not None else scorer_path(bundle)), scorer


def _profile_config(model_config: TowerlineConfig, config: str | Path | None) -> ProfileConfig:
    if config is not None:
        return load_config(config).profile
    return model_config.profile


def _tracking(uri: str | None) -> str:
    return use_tracking(TrackingConfig(tracking_uri=uri))


def _log_artifacts(bundle: Any, files: list[Path], cluster_labels: dict[int, list[str]]) -> str | None:
    """Log ``files`` under ``profiles/`` of the model's run, or of a new run if that one is unknown here."""
    client = mlflow.MlflowClient()
    run_id = bundle.manifest.get("run_id")
    if run_id:
        try:
            client.get_run(run_id)
        except MlflowException:
            log.info("model run %s is not in %s; logging the profiles to a new run", run_id, mlflow.get_tracking_uri())
            run_id = None
    if run_id is None:
        experiment = bundle.config.tracking.experiment
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        run_id = client.create_run(exp_id, tags={"mlflow.runName": "profiles", "model_uri": bundle.uri}).info.run_id
        client.set_terminated(run_id)
    for f in files:
        client.log_artifact(run_id, str(f), PROFILE_ARTIFACT_PATH)
    client.log_dict(run_id, {str(k): v for k, v in cluster_labels.items()}, f"{PROFILE_ARTIFACT_PATH}/cluster_labels.json")
    return run_id
