"""``towerline quickstart``: the main job on the embedded default, end to end, in a few minutes.

synthetic data -> validate/describe -> train (MLflow run + registered version) -> promote to
``champion`` -> FAISS index -> Ray Serve on 127.0.0.1 -> one ``POST /recommend`` -> stop. Every step
is the same library call its own subcommand makes, so the quickstart is also a smoke test of the
whole product.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from towerline.commands import example_formatter
from towerline.commands.datasource import add_data_flags, column_map, data_overrides

EXAMPLE = """example:
  towerline quickstart                       # everything under ./quickstart, MLflow in ./mlflow.db
  towerline quickstart --out /tmp/tl --users 2000 --epochs 5
  towerline quickstart --data shop/ --map user_id=customer,item_id=sku,timestamp=ts   # your data
Then compare runs:  mlflow ui --backend-store-uri sqlite:///mlflow.db"""

DESCRIPTION = (
    "The main job end to end in a few minutes: synthetic data (or yours, with --data) -> validate and "
    "describe -> train (an MLflow run and a registered version) -> promote to champion -> FAISS index "
    "-> Ray Serve on 127.0.0.1 -> one POST /recommend -> stop."
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="generate synthetic data, train, register, index, serve one request",
                       description=DESCRIPTION, epilog=EXAMPLE, formatter_class=example_formatter())
    p.add_argument("--out", type=Path, default=Path("quickstart"), help="working folder (default: ./quickstart)")
    p.add_argument("--users", type=int, default=3000, help="synthetic users (default: 3000)")
    p.add_argument("--items", type=int, default=800, help="synthetic items (default: 800)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs at most (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default: 0)")
    p.add_argument("--port", type=int, default=None,
                   help="port on 127.0.0.1 for the one served request (default: a free one)")
    p.add_argument("--no-serve", action="store_true", help="stop after training and indexing")
    add_data_flags(p, "run on your data instead of synthetic data: a folder with events.* (+ items.*, "
                   "users.*), one events file or an S3Rec .txt file (--users/--items/--seed then unused)")
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from towerline.errors import ConfigError

    for flag, value, least in (("--users", args.users, 1), ("--items", args.items, 2), ("--epochs", args.epochs, 1)):
        if value < least:  # in the flag's words, before minutes of work
            raise ConfigError(f"{flag} must be >= {least}, got {value}")
    from towerline.config import load_config
    from towerline.features.describe import describe_dataset, format_description
    from towerline.features.readers import load_dataset
    from towerline.features.synthetic import generate_dataset
    from towerline.features.vocab import N_RESERVED
    from towerline.features.writers import write_dataset
    from towerline.training.tracking import promote, use_tracking
    from towerline.training.train import train

    out: Path = args.out
    if args.data is not None:
        data_settings = data_overrides(args)  # infers the format; a bad --map or path stops here, at once
        print(f"[1/5] reading and validating {args.data}")
        dataset, report = load_dataset(args.data, args.format, columns=column_map(args))
    else:
        data_dir = out / "data"
        print(f"[1/5] generating synthetic e-commerce events into {data_dir}")
        write_dataset(generate_dataset(args.users, args.items, seed=args.seed, progress=sys.stderr.isatty()), data_dir)
        dataset, report = load_dataset(data_dir, format="parquet", name="synthetic")
        data_settings = ["data.format=parquet", f"data.path={json.dumps(str(data_dir.resolve()))}"]
    print(format_description(describe_dataset(dataset)))

    print("[2/5] training the two-tower retriever (Lightning, tracked in MLflow)")
    repo_config = Path(__file__).resolve().parents[2] / "configs" / "synthetic.yaml"  # present in a checkout
    cfg = load_config(
        repo_config if repo_config.exists() else None,
        data_settings + [f"trainer.max_epochs={args.epochs}"],
    )
    result = train(cfg, out / "run", dataset=dataset)  # read and validated above: not read twice
    print(f"      MLflow run {result.run_id}, registered {result.model_name} version {result.model_version}")
    print(f"      test NDCG@10 {result.metrics.get('test/ndcg_10', float('nan')):.4f}  HR@10 {result.metrics.get('test/hr_10', float('nan')):.4f}")

    uri = use_tracking(cfg.tracking)
    version = promote(cfg.tracking.model_name, result.model_version, "champion")
    model_uri = f"models:/{cfg.tracking.model_name}@champion"
    print(f"[3/5] promoted version {version} to {model_uri}")

    from towerline.commands.serve import serve_locally
    from towerline.serving.model_index import build_model_index
    from towerline.serving.app import AppArgs

    report = build_model_index(model_uri, out / "index", {"kind": "flat"})
    # the index holds a vector per vocabulary row, the reserved padding/unknown rows included
    print(f"[4/5] exact FAISS index over {report['count'] - N_RESERVED} items written to {report['out']}")
    if args.no_serve:
        return 0
    user_id = str(dataset.events["user_id"].iloc[0])
    from towerline.serving.ingress import free_ports

    # the server lives for one request: any free port does, and a fixed default (8000) is often taken
    port = args.port if args.port is not None else free_ports("127.0.0.1")[0]
    print(f"[5/5] Ray Serve on 127.0.0.1:{port} with {model_uri}: one POST /recommend for {user_id}")
    app_args = AppArgs(model=model_uri, index_dir=str(report["out"]), tracking_uri=uri,
                       settings={"host": "127.0.0.1", "port": port,  # every file of the run stays under --out
                                 "history_db": str(out / "history.sqlite"), "feedback_db": str(out / "feedback.sqlite"),
                                 "ingress_replicas": 1})  # one request: a second replica only costs a model load
    answer = serve_locally(app_args, "127.0.0.1", port, num_cpus=2, check_request={"user_id": user_id, "k": 5})
    print(json.dumps(answer["body"] if answer else None, indent=2))
    return 0 if answer and answer["status"] == 200 else 1
