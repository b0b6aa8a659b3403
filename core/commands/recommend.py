"""``towerline recommend``: batch recommendations for many users through the service's request path."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLE = """example:
  towerline recommend --model runs/latest/bundle --users all --k 20 --out recs.parquet
  towerline recommend --model models:/towerline-retriever@champion --users users.csv --out recs.csv
  towerline recommend --model runs/beauty/bundle --users ids.txt --history-db towerline_history.sqlite --out recs.parquet
  towerline recommend --model runs/latest/bundle --users all --config shop.yaml --experiment home-feed --out recs.parquet

--users: 'all' (every user the model knows), or a CSV/Parquet file with a user_id column, or a text
file with one id per line. Every user goes through the code POST /recommend runs (history, consent,
business rules, popular fallback), the model stages batched. Output columns: user_id, rank, item_id,
score, model_version, fallback; Parquet or CSV by the --out suffix. With --experiment (an experiment
of --config's experiments: list, as `towerline serve --config --experiment` takes it) each user gets
the answer of the arm the service assigns them (its model version or popular rules) and the rows add
experiment, arm."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recommend", help="batch recommendations for a file of users (or all) into Parquet/CSV",
                       description="Answer every user as POST /recommend would (same rules, consent and popular "
                       "fallback), with the model stages batched, and write one row per recommended item.",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle directory, runs:/<run_id>/bundle or models:/<name>@<alias>")
    p.add_argument("--users", required=True, help="'all', or a CSV/Parquet (user_id column) or txt (one id a line) file")
    p.add_argument("--k", type=int, default=20, help="recommendations per user (default: 20)")
    p.add_argument("--out", type=Path, required=True, help="output file, .parquet or .csv")
    p.add_argument("--batch-size", type=int, default=512, help="users per model call (default: 512)")
    p.add_argument("--history-db", default=None,
                   help="SQLite file of the service's online history, so its events count (default: none, the "
                   "bundle's histories only)")
    p.add_argument("--max-per-category", type=int, default=None, help="diversity cap per category (default: none)")
    p.add_argument("--threads", type=int, default=1,
                   help="chunks of users answered side by side, torch and FAISS on one thread each (default: 1; "
                   "2 may help on an idle multi-core machine, costs ~10%% more CPU on a busy one)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ URIs")
    p.add_argument("--config", type=Path, default=None,
                   help="Towerline YAML whose experiments: list defines the A/B arms (as for towerline serve)")
    p.add_argument("--experiment", default=None,
                   help="experiment (from --config) whose arms the users get, as /recommend assigns them")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a log line per 5,000 users instead)")
    p.set_defaults(func=cmd_recommend)


def cmd_recommend(args: argparse.Namespace) -> int:
    import os
    import sys

    from towerline.bundle import check_model
    from towerline.errors import TowerlineError
    from towerline.serving.settings import settings_from

    if args.out.suffix.lower() not in (".parquet", ".csv"):
        raise TowerlineError(f"--out {args.out}: use a .parquet or .csv file name")
    if args.batch_size < 1:
        raise TowerlineError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.users != "all" and not Path(args.users).is_file():
        raise TowerlineError(f"--users {args.users}: file not found (give a CSV/Parquet/txt of user ids, or 'all')")
    if not 1 <= args.k <= 1000:
        raise TowerlineError(f"--k must be between 1 and 1000, got {args.k}")
    if args.threads < 1:
        raise TowerlineError(f"--threads must be >= 1, got {args.threads}")
    # one torch/FAISS thread per worker: intra-op threads spin at every op's barrier on a busy machine
    settings = settings_from(max_per_category=args.max_per_category, threads=1, max_k=max(args.k, 200))
    experiments = _experiments(args.config, args.experiment)
    if args.tracking_uri:
        import mlflow

        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
        mlflow.set_tracking_uri(args.tracking_uri)
    check_model(args.model)  # a wrong --model is one line, before torch loads

    import torch

    from towerline.serving.batch import recommend_all

    torch.set_num_threads(1)
    store = None
    if args.history_db:
        if not Path(args.history_db).is_file():
            raise TowerlineError(f"--history-db {args.history_db}: file not found")
        from towerline.serving.history import SQLiteHistoryStore

        store = SQLiteHistoryStore(args.history_db)
    try:
        summary = recommend_all(args.model, args.users, k=args.k, out=args.out, settings=settings, store=store,
                                batch_size=args.batch_size, progress=False if args.no_progress else sys.stderr.isatty(),
                                workers=args.threads, experiments=experiments, experiment=args.experiment)
    finally:
        if store is not None:
            store.close()
    print(f"{summary['users']} users -> {summary['rows']} rows in {summary['out']} "
          f"({summary['fallback_users']} on the popular fallback, model {summary['model']}, "
          f"{summary['seconds']:.1f} s)")
    if summary.get("arms"):
        print(f"experiment {args.experiment}: " + ", ".join(f"{a} {n} users" for a, n in summary["arms"].items()))
    return 0


def _experiments(config: Path | None, experiment: str | None) -> tuple:
    """The experiments of ``--config``; ``--experiment`` must name one of them (one line, exit 2)."""
    from towerline.config import load_config
    from towerline.errors import TowerlineError
    from towerline.marketing.assignment import find_experiment

    if experiment is not None and config is None:
        raise TowerlineError(f"--experiment {experiment}: give the --config whose experiments: list defines it")
    if config is None:
        return ()
    experiments = load_config(config).experiments
    if experiment is not None:
        find_experiment(experiments, experiment)  # an unknown name fails here, before the model loads
    return experiments
