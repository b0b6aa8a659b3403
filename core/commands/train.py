"""``towerline train | evaluate | promote``: fit a retriever, re-evaluate a bundle, move an alias."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from towerline.commands.datasource import add_data_flags, add_map_flag, column_map, data_overrides

TRAIN_EXAMPLE = """example:
  towerline train --config configs/synthetic.yaml
  towerline train --data shop/orders.csv --map user_id=customer,item_id=sku,timestamp=ts
  towerline train --config configs/beauty.yaml --set model.dim=128 --set trainer.max_time_s=1000 --out runs/beauty
  towerline train --config configs/beauty.yaml --out runs/beauty --resume
  towerline train --config configs/lastfm.yaml --workers 2 --out runs/lastfm-ddp   # Ray Train, DDP
  towerline train --config configs/synthetic.yaml --warm-start models:/towerline-retriever@champion --out runs/next

Compare runs in the MLflow UI:  mlflow ui --backend-store-uri sqlite:///mlflow.db"""

EVALUATE_EXAMPLE = """example:
  towerline evaluate --model runs/latest/bundle
  towerline evaluate --model models:/towerline-retriever@champion
  towerline evaluate --model runs:/<run_id>/bundle --data ../shared/data/s3rec/LastFM.txt --format s3rec
  towerline evaluate --model runs/latest/bundle --rules serving   # NDCG@10 the serving rules cost"""

PROMOTE_EXAMPLE = """example:
  towerline promote --name towerline-retriever --version 3 --alias champion
  towerline promote --name towerline-retriever            # newest version becomes champion"""

KEY_METRICS = ("ndcg_5", "hr_5", "ndcg_10", "hr_10", "ndcg_20", "hr_20", "mrr", "coverage_10")


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("train", help="train a two-tower retriever, log it to MLflow, register a version",
                       description="Train the two-tower retriever on the configured data, track the run in "
                       "MLflow (params, per-epoch metrics, bundle artifacts) and register a model version.",
                       epilog=TRAIN_EXAMPLE, formatter_class=fmt)
    p.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in synthetic defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config value, e.g. --set model.dim=128 (repeatable)")
    add_data_flags(p, "your data instead of the config's: a folder with events.* (+ items.*, users.*), one "
                   "events file, or an S3Rec .txt file")
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="run folder: data cache, checkpoints, bundle (default: runs/latest)")
    p.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint and MLflow run")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="Ray Train workers running DDP (default: trainer.workers, 1 = one process without Ray)")
    p.add_argument("--warm-start", default=None, metavar="MODEL",
                   help="continue from a trained version (models:/name@alias, runs:/<id>/bundle, a bundle or run dir) "
                   "on this config's data: vocabularies grow, known rows keep their weights, the optimiser starts fresh")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="re-evaluate a bundle with full-catalogue ranking metrics",
                       description="Evaluate a trained bundle on the leave-one-out (or time) split of its data "
                       "set, or of another one given with --data.", epilog=EVALUATE_EXAMPLE, formatter_class=fmt)
    p.add_argument("--model", required=True, help="bundle directory, runs:/<run_id>/bundle or models:/<name>@<alias>")
    p.add_argument("--data", default=None, help="data path (default: the data the model was trained on)")
    p.add_argument("--format", choices=["synthetic", "s3rec", "csv", "parquet"], default=None, help="format of --data")
    add_map_flag(p)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help="override data.* settings")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ URIs")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--rules", choices=["protocol", "serving"], default="protocol",
                   help="protocol (default): the published full-ranking protocol; serving: also serve every test "
                   "user through the serving rules (default serve settings) and report the NDCG@10 they cost")
    p.add_argument("--users", type=int, default=None, help="--rules serving: evaluate the first N test users only")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("promote", help="point a registry alias (e.g. champion) at a model version",
                       description="Move an alias of a registered model to a version, so serving can load "
                       "models:/<name>@<alias>.", epilog=PROMOTE_EXAMPLE, formatter_class=fmt)
    p.add_argument("--name", default="towerline-retriever", help="registered model name (default: towerline-retriever)")
    p.add_argument("--version", default=None, help="version to promote (default: the newest)")
    p.add_argument("--alias", default="champion", help="alias to move (default: champion)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.set_defaults(func=cmd_promote)


def _tracking(uri: str | None) -> None:
    from towerline.config import TrackingConfig
    from towerline.training.tracking import use_tracking

    use_tracking(TrackingConfig(tracking_uri=uri))


def format_metrics(metrics: dict[str, float], prefix: str) -> str:
    cells = [f"{k}={metrics[f'{prefix}/{k}']:.4f}" for k in KEY_METRICS if f"{prefix}/{k}" in metrics]
    return f"{prefix:>14}: " + "  ".join(cells)


def cmd_train(args: argparse.Namespace) -> int:
    from towerline.config import load_config
    from towerline.training.train import train

    # --data/--map first: an explicit --set data.name=... still wins
    overrides = data_overrides(args) + list(args.overrides)
    overrides += [f"tracking.tracking_uri={args.tracking_uri}"] if args.tracking_uri else []
    overrides += [f"trainer.workers={args.workers}"] if args.workers is not None else []
    if args.warm_start:
        overrides.append(f"trainer.warm_start={args.warm_start}")
    cfg = load_config(args.config, overrides)
    result = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    print(f"MLflow run: {result.run_id}  (tracking URI {result.tracking_uri})")
    if result.model_version:
        print(f"registered: models:/{result.model_name}/{result.model_version}  "
              f"(promote with: towerline promote --name {result.model_name} --version {result.model_version})")
    print(f"bundle: {result.bundle_dir}")
    print(format_metrics(result.metrics, "test"))
    print(format_metrics(result.metrics, "test_unmasked"))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from towerline.bundle import check_model

    _tracking(args.tracking_uri)
    check_model(args.model)  # first: a wrong --model is one line, before torch loads or data is read
    from towerline.training.evaluate import evaluate_bundle

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.format:
        overrides.append(f"data.format={args.format}")
    if args.column_map:
        overrides.append(f"data.columns={json.dumps(column_map(args))}")
    if args.rules == "serving":
        return _evaluate_serving_rules(args, overrides)
    report = evaluate_bundle(args.model, overrides)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {report['model']} (version {report['model_version'] or '-'}) on {report['dataset']}")
    for prefix in ("valid", "test", "test_unmasked"):
        print(format_metrics(report["metrics"], prefix))
    return 0


def _evaluate_serving_rules(args: argparse.Namespace, overrides: list[str]) -> int:
    from towerline.serving.offline import evaluate_serving_rules

    r = evaluate_serving_rules(args.model, data_overrides=overrides, max_users=args.users)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    rel = r["difference_ndcg_10"] / r["protocol_ndcg_10"] * 100 if r["protocol_ndcg_10"] else float("nan")
    print(f"model {r['model']} (version {r['model_version'] or '-'}) on {r['dataset']}: {r['users']} test users, {r['stage']}")
    print(f"  NDCG@10 evaluation protocol (history masked, target kept): {r['protocol_ndcg_10']:.4f}")
    print(f"  NDCG@10 through the serving rules (serve defaults):       {r['serving_rules_ndcg_10']:.4f}"
          f"  ({r['fallback_users']} users served popular items)")
    print(f"  serving rules cost: {r['difference_ndcg_10']:+.4f} NDCG@10 ({rel:+.1f}%)")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from towerline.training.tracking import promote

    _tracking(args.tracking_uri)
    version = promote(args.name, args.version, args.alias)
    print(f"models:/{args.name}@{args.alias} -> version {version}")
    return 0
