"""``towerline train-ranker``: train the ranking stage for an existing retriever bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLE = """example:
  towerline train-ranker --model runs/latest/bundle
  towerline train-ranker --model runs/beauty/bundle --set ranker.n_candidates=200 --set ranker.max_epochs=5
  towerline train-ranker --model runs/latest/bundle --config configs/synthetic.yaml   # its ranker: section

The bundle's own config and data are reused; only the ranker section can change. When the bundle's
manifest names an MLflow run, the ranker is logged into that run and the updated bundle is
registered as a new model version."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-ranker",
        help="train the ranker for an existing bundle and measure its lift over retrieval",
        description="Build the retriever's top-N candidates, train the ranker on them (early stopping on "
        "validation pipeline NDCG@10), compare retrieve-then-rank with retrieval alone on the test users "
        "(NDCG@10, HR@10, MRR, lift with a 95% paired-bootstrap interval) and add ranker/ to the bundle.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="bundle directory (or runs:/<run_id>/bundle, models:/<name>@<alias>)")
    p.add_argument("--config", type=Path, default=None, help="YAML config whose ranker: section replaces the bundle's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config value, e.g. --set ranker.hidden=128 (repeatable)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the bundle config's, $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--no-register", action="store_true", help="do not register the updated bundle as a new model version")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train_ranker)


def cmd_train_ranker(args: argparse.Namespace) -> int:
    from towerline.config import load_config, to_dict
    from towerline.training.ranker_train import train_ranker_for_bundle

    section = to_dict(load_config(args.config).ranker) if args.config else None
    result = train_ranker_for_bundle(
        args.model, section, args.overrides, args.tracking_uri, progress=not args.no_progress, register=not args.no_register
    )
    m = result.metrics
    n = next((k.rsplit("_", 1)[1] for k in m if k.startswith("test/retrieval_recall_")), "?")
    print(f"bundle: {result.bundle_dir}  (ranker/ added)")
    if result.model_version:
        print(f"registered: models:/{result.model_name}/{result.model_version}")
    print(f"test NDCG@10  pipeline {m['test/pipeline_ndcg_10']:.4f}  retrieval {m['test/retrieval_ndcg_10']:.4f}  "
          f"lift {m['test/pipeline_lift_ndcg_10']:.3f}x  95% CI [{m['test/pipeline_lift_ndcg_10_ci_low']:.3f}, "
          f"{m['test/pipeline_lift_ndcg_10_ci_high']:.3f}]")
    print(f"test HR@10    pipeline {m['test/pipeline_hr_10']:.4f}  retrieval {m['test/retrieval_hr_10']:.4f}")
    print(f"test MRR      pipeline {m['test/pipeline_mrr']:.4f}  retrieval {m['test/retrieval_mrr']:.4f}")
    print(f"retriever recall@{n}: {m[f'test/retrieval_recall_{n}']:.4f} (the pipeline's ceiling for HR)")
    return 0
