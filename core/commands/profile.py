"""``towerline profile`` and ``towerline audience``: know the customers, then pick who to reach.

``profile`` builds RFM scores, lifecycle segments and interest tags from the data, trains the churn
and LTV models on a time split of it (``churn_probability``, ``predicted_ltv`` per customer), clusters the
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
from pathlib import Path

log = logging.getLogger(__name__)

PROFILE_EXAMPLE = """example:
  towerline profile --model runs/latest/bundle --out profiles/profiles.parquet
  towerline profile --data ../shared/data/s3rec/Beauty.txt --model models:/towerline-beauty@champion --out beauty/profiles.parquet

Without --data the profiles are built from the data the model was trained on (its config.json)."""

AUDIENCE_EXAMPLE = """example:
  towerline audience --model runs/latest/bundle --item i00042 --size 500 --out audience.csv
  towerline audience --model runs/latest/bundle --attributes category:skincare --size 1000 --segment at-risk \\
      --profiles profiles/profiles.parquet --out winback.csv"""

SCORER_EXAMPLE = """example:
  towerline audience-scorer --model runs/latest/bundle          # writes runs/latest/bundle/audience_scorer.json
  towerline audience --model runs/latest/bundle --item i00042 --size 500   # now ranks with it

Fitted on the model's validation step (each user's validation item hidden, the history before it);
the test step is never read. Delete the file to rank by log p(item | user) alone."""



def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("profile", help="user profiles: RFM, lifecycle segments, interest tags, clusters",
                       description="Build user profiles (RFM scores and groups, lifecycle segment, interest tags, "
                       "churn probability and predicted LTV from models trained on a time split of the events, "
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
    p.add_argument("--scoring", choices=["auto", "learned", "probability", "dot"], default="auto",
                   help="auto (default): the bundle's learned scorer (audience_scorer.json) for an item when it has "
                   "one, else log p(item | user); probability: the model alone; dot: the raw inner product")
    p.add_argument("--out", type=Path, default=Path("audience.csv"), help="CSV to write (default: audience.csv)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ URIs")
    p.set_defaults(func=cmd_audience)

    p = sub.add_parser("audience-scorer", help="fit the audience scorer: model + co-visitation + category/brand evidence",
                       description="Fit the weights that combine the model's log p(item | user) with co-visitation, "
                       "category/brand affinity and activity on the validation step, and store them beside the "
                       "bundle (audience_scorer.json); `towerline audience` and POST /audiences then rank with them.",
                       epilog=SCORER_EXAMPLE, formatter_class=fmt)
    p.add_argument("--model", required=True, help="bundle directory (the file is written into it unless --out)")
    p.add_argument("--max-items", type=int, default=1500, help="validation items to fit on (default: 1500; 0 = all)")
    p.add_argument("--hidden", type=int, default=16, help="tanh units beside the linear score (default: 16; 0 = linear)")
    p.add_argument("--seed", type=int, default=0, help="item and negative sampling seed (default: 0)")
    p.add_argument("--out", type=Path, default=None, help="where to write the JSON (default: <bundle>/audience_scorer.json)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ URIs")
    p.set_defaults(func=cmd_audience_scorer)


def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="events folder/file or S3Rec .txt (default: the model's training data)")
    p.add_argument("--format", choices=["csv", "parquet", "s3rec"], default=None, help="format of --data (default: from the suffix)")


def cmd_profile(args: argparse.Namespace) -> int:
    from towerline.bundle import check_model

    _check_model_first(args, check_model)
    from towerline.marketing.jobs import PROFILE_ARTIFACT_PATH, run_profile

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


def cmd_audience(args: argparse.Namespace) -> int:
    from towerline.bundle import check_model

    _check_model_first(args, check_model)
    from towerline.marketing.jobs import run_audience

    frame = run_audience(
        model=args.model, out=args.out, item_id=args.item_id, attributes=args.attributes, size=args.size,
        segment=args.segment, profiles_path=args.profiles, data=args.data, format=args.format,
        scoring=args.scoring, tracking_uri=args.tracking_uri,
    )
    what = f"item {args.item_id}" if args.item_id else "attributes " + " ".join(args.attributes)
    print(f"audience for {what}: {len(frame):,} users -> {args.out}")
    print(frame.head(10).to_string(index=False))
    return 0



def cmd_audience_scorer(args: argparse.Namespace) -> int:
    from towerline.bundle import check_model

    _check_model_first(args, check_model)
    from towerline.marketing.jobs import run_audience_scorer

    path, scorer = run_audience_scorer(args.model, out=args.out, max_items=args.max_items, seed=args.seed,
                                       hidden=args.hidden, tracking_uri=args.tracking_uri)
    f = scorer.fitted
    print(f"audience scorer fitted on {f['items']:,} validation items ({f['buyers']:,} buyers) -> {path}")
    print("weights (standardised features): " + ", ".join(f"{k} {w:+.3f}" for k, w in zip(scorer.features, scorer.weights)))
    return 0


def _check_model_first(args: argparse.Namespace, check_model: object) -> None:
    """Resolve and verify ``--model`` before torch, MLflow runs or data loading: a wrong model is one
    line (exit 2) at once, not a traceback after the profiles are half built."""
    import os

    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    check_model(args.model)  # type: ignore[operator]
