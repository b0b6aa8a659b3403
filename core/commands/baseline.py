"""``towerline baseline``: popularity and item-KNN runs in the same MLflow experiment as the models."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLE = """example:
  towerline baseline --kind popularity --config configs/synthetic.yaml
  towerline baseline --kind item-knn --config configs/beauty.yaml --neighbours 200

Each baseline is fitted on the same training split as the retriever and evaluated with the same
full-ranking protocol and metric keys (valid/ndcg_10, test/ndcg_10, test_unmasked/..., coverage_10,
novelty_10, diversity_10), so the MLflow runs table shows every model's lift over it."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("baseline", help="log a popularity or item-KNN baseline run beside the models",
                       description="Fit a non-neural baseline on the config's data and log its full-ranking "
                       "metrics to the config's MLflow experiment with the model runs' metric keys.",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", required=True, choices=["popularity", "item-knn"], help="which baseline")
    p.add_argument("--config", type=Path, default=None, help="Towerline YAML (default: the embedded synthetic shop)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config value, e.g. --set data.path=... (repeatable)")
    p.add_argument("--neighbours", type=int, default=100, help="item-KNN: similar items kept per item (default: 100)")
    p.add_argument("--out", type=Path, default=Path("runs/baseline"), help="work folder for the data cache (default: runs/baseline)")
    p.set_defaults(func=cmd_baseline)


def cmd_baseline(args: argparse.Namespace) -> int:
    from towerline.config import load_config
    from towerline.errors import ConfigError
    from towerline.training.baselines import run_baseline

    if args.neighbours < 1:
        raise ConfigError(f"--neighbours must be >= 1, got {args.neighbours}")
    cfg = load_config(args.config, args.overrides)
    result = run_baseline(cfg, args.kind, args.out, neighbours=args.neighbours)
    m = result.metrics
    print(f"baseline {result.kind} on {cfg.data.name}: {result.seconds:.1f} s, MLflow run {result.run_id}")
    print(f"test NDCG@10 {m['test/ndcg_10']:.4f}  HR@10 {m['test/hr_10']:.4f}  MRR {m['test/mrr']:.4f}  "
          f"(unmasked NDCG@10 {m['test_unmasked/ndcg_10']:.4f})")
    print(f"coverage@10 {m['test/coverage_10']:.3f}  novelty@10 {m['test/novelty_10']:.2f} bits  "
          f"diversity@10 {m.get('test/diversity_10', float('nan')):.3f}")
    return 0
