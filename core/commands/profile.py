"""``towerline profile`` and ``towerline audience``: know the customers, then pick who to reach.

``profile`` builds RFM scores, lifecycle segments and interest tags from the data, clusters the
model's user vectors, writes ``profiles.parquet`` (consenting users only, aggregates only) and a
``report.html`` beside it, and logs both to MLflow as artifacts of the model's training run (the
bundle manifest's ``run_id``), or of a new run when that run is not in the tracking store.

``audience`` ranks users by how likely they are to buy an item next. Consent always applies: the
consent flags come from ``--profiles`` (a file ``profile`` wrote), else from ``--data``, else from
the data the model was trained on.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROFILE_EXAMPLE = """example:
  towerline profile --model runs/latest/bundle --out profiles/profiles.parquet
  towerline profile --data ../shared/data/s3rec/Beauty.txt --model models:/towerline-beauty@champion --out beauty/profiles.parquet

Without --data the profiles are built from the data the model was trained on (its config.json)."""

AUDIENCE_EXAMPLE = """example:
  towerline audience --model runs/latest/bundle --item i00042 --size 500 --out audience.csv
  towerline audience --model runs/latest/bundle --attributes category:skincare --size 1000 --segment at-risk \\
      --profiles profiles/profiles.parquet --out winback.csv"""

PROFILE_ARTIFACT_PATH = "profiles"


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("profile", help="user profiles: RFM, lifecycle segments, interest tags, clusters",
                       description="Build user profiles (RFM scores and groups, lifecycle segment, interest tags, "
                       "clusters of the model's user vectors), write them as Parquet with an HTML report beside "
                       "them and log both to MLflow.", epilog=PROFILE_EXAMPLE, formatter_class=fmt)
    _data_flags(p)
    p.add_argument("--model", required=True, help="bundle directory, runs:/<run_id>/bundle or models:/<name>@<alias>")
    p.add_argument("--out", type=Path, default=Path("profiles.parquet"), help="profiles Parquet (default: profiles.parquet); report.html goes beside it")
    p.add_argument("--config", type=Path, default=None, help="YAML config whose 'profile:' section sets thresholds (default: the model's)")
    p.add_argument("--clusters", type=int, default=None, help="number of k-means clusters (default: profile.n_clusters)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default: 0)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the files to MLflow")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("audience", help="the users most likely to buy an item next (for a campaign)",
                       description="Rank users by the model's probability that they buy the item next (FAISS search "
                       "of the item vector against user vectors), leaving out past buyers and users without "
                       "consent; write the audience as CSV.", epilog=AUDIENCE_EXAMPLE, formatter_class=fmt)
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--item", dest="item_id", help="item id to find buyers for")
    query.add_argument("--attributes", nargs="+", help="attribute tokens; the query is the mean vector of items carrying all of them")
    p.add_argument("--size", type=int, default=100, help="audience size (default: 100)")
    p.add_argument("--segment", default=None, help="only users of this lifecycle segment, RFM group or cluster number")
    p.add_argument("--model", required=True, help="bundle directory, runs:/<run_id>/bundle or models:/<name>@<alias>")
    p.add_argument("--profiles", type=Path, default=None, help="profiles Parquet from `towerline profile` (consent, segments)")
    _data_flags(p)
    p.add_argument("--scoring", choices=["probability", "dot"], default="probability",
                   help="rank by log p(item | user) (default) or the raw inner product")
    p.add_argument("--out", type=Path, default=Path("audience.csv"), help="CSV to write (default: audience.csv)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ URIs")
    p.set_defaults(func=cmd_audience)


def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="events folder/file or S3Rec .txt (default: the model's training data)")
    p.add_argument("--format", choices=["csv", "parquet", "s3rec"], default=None, help="format of --data (default: from the suffix)")


@dataclass
class ProfileResult:
    profiles_path: Path
    report_path: Path
    n_users: int
    n_clusters: int
    cluster_labels: dict[int, list[str]]
    run_id: str | None


def cmd_profile(args: argparse.Namespace) -> int:
    result = run_profile(
        model=args.model, out=args.out, data=args.data, format=args.format, config=args.config,
        n_clusters=args.clusters, seed=args.seed, tracking_uri=args.tracking_uri, log_to_mlflow=not args.no_mlflow,
    )
    print(f"profiles: {result.profiles_path} ({result.n_users:,} users with consent)")
    print(f"report:   {result.report_path}")
    for c, tags in sorted(result.cluster_labels.items()):
        print(f"  cluster {c}: {', '.join(tags) or '-'}")
    if result.run_id:
        print(f"logged to MLflow run {result.run_id} under '{PROFILE_ARTIFACT_PATH}/'")
    return 0


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
    import pandas as pd

    from towerline.bundle import load_bundle
    from towerline.features.profile_report import write_profile_report
    from towerline.features.profiles import build_profiles, cluster_users, export_profiles, label_clusters
    from towerline.serving.audience import user_vectors

    _tracking(tracking_uri)
    bundle = load_bundle(model)
    cfg = _profile_config(bundle.config, config)
    dataset = load_model_data(bundle.config, data, format)
    profiles = build_profiles(dataset, cfg)

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


def load_model_data(model_config: dict[str, Any], data: str | None, format: str | None) -> Any:
    """``--data`` if given, else the data set described by the model's ``config.json``."""
    from towerline.features.readers import load_dataset
    from towerline.features.synthetic import generate_dataset

    if data:
        return load_dataset(data, format)[0]
    d = model_config.get("data", {})
    if d.get("format", "synthetic") == "synthetic":
        log.info("no --data: regenerating the model's synthetic data (%s users, %s items, seed %s)",
                 d.get("synthetic_users"), d.get("synthetic_items"), d.get("seed"))
        return generate_dataset(int(d.get("synthetic_users", 3000)), int(d.get("synthetic_items", 800)), int(d.get("seed", 0)))
    if not d.get("path"):
        from towerline.errors import ConfigError

        raise ConfigError("the model's config names no data path; pass --data")
    fmt = d.get("format") if d.get("format") in ("csv", "parquet", "s3rec") else None
    return load_dataset(d["path"], fmt, name=d.get("name"))[0]


def cmd_audience(args: argparse.Namespace) -> int:
    frame = run_audience(
        model=args.model, out=args.out, item_id=args.item_id, attributes=args.attributes, size=args.size,
        segment=args.segment, profiles_path=args.profiles, data=args.data, format=args.format,
        scoring=args.scoring, tracking_uri=args.tracking_uri,
    )
    what = f"item {args.item_id}" if args.item_id else "attributes " + " ".join(args.attributes)
    print(f"audience for {what}: {len(frame):,} users -> {args.out}")
    print(frame.head(10).to_string(index=False))
    return 0


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
    scoring: str = "probability",
    tracking_uri: str | None = None,
) -> Any:
    """The ``towerline audience`` pipeline; returns the audience DataFrame it wrote to ``out``."""
    from towerline.bundle import load_bundle
    from towerline.features.profiles import build_profiles, load_profiles
    from towerline.serving.audience import find_audience, user_vectors

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


def _profile_config(model_config: dict[str, Any], config: str | Path | None) -> Any:
    from towerline.config import ProfileConfig, from_dict, load_config

    if config is not None:
        return load_config(config).profile
    return from_dict(ProfileConfig, model_config.get("profile") or {}, "profile")


def _tracking(uri: str | None) -> str:
    from towerline.config import TrackingConfig
    from towerline.training.tracking import use_tracking

    return use_tracking(TrackingConfig(tracking_uri=uri))


def _log_artifacts(bundle: Any, files: list[Path], cluster_labels: dict[int, list[str]]) -> str | None:
    """Log ``files`` under ``profiles/`` of the model's run, or of a new run if that one is unknown here."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    run_id = bundle.manifest.get("run_id")
    if run_id:
        try:
            client.get_run(run_id)
        except MlflowException:
            log.info("model run %s is not in %s; logging the profiles to a new run", run_id, mlflow.get_tracking_uri())
            run_id = None
    if run_id is None:
        experiment = (bundle.config.get("tracking") or {}).get("experiment", "towerline")
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        run_id = client.create_run(exp_id, tags={"mlflow.runName": "profiles", "model_uri": bundle.uri}).info.run_id
        client.set_terminated(run_id)
    for f in files:
        client.log_artifact(run_id, str(f), PROFILE_ARTIFACT_PATH)
    client.log_dict(run_id, {str(k): v for k, v in cluster_labels.items()}, f"{PROFILE_ARTIFACT_PATH}/cluster_labels.json")
    return run_id
