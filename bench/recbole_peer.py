"""RecBole 1.2.1 SASRec (CE) on an S3Rec file, epoch by epoch, for ``bench/train_speed.py --peer recbole``.

Runs under the peer's own interpreter (``--peer-python``, a separate venv with ``pip install
torch==<same> recbole==1.2.1``), so it imports nothing from Towerline. It converts the S3Rec
``user item item ...`` file to RecBole atomic files in a temporary folder (position in the sequence
as the timestamp: leave-one-out by time is then the S3Rec split), trains RecBole's SASRec with the
issue's settings (CE loss, hidden 64, 2 layers, 2 heads, max length 50, batch 256, lr 1e-3, RecBole's
default dropouts 0.5), evaluates full ranking on the validation item after every epoch (RecBole
does not mask the history of sequential models: our ``valid_unmasked/ndcg_10``), and stops at the
target or the time budget. Prints one JSON line: the curve ``[elapsed_s, ndcg_10]`` and when the
target was reached.

    /work/recbole-venv/bin/python bench/recbole_peer.py --data ../shared/data/s3rec/Beauty.txt --max-time-s 900
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path


def write_atomic(s3rec: Path, folder: Path, name: str) -> int:
    """``<folder>/<name>/<name>.inter`` from an S3Rec file; returns the number of interactions."""
    out = folder / name
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with s3rec.open() as src, (out / f"{name}.inter").open("w") as dst:
        dst.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for line in src:
            user, *items = line.split()
            for t, item in enumerate(items):
                dst.write(f"{user}\t{item}\t{t}\n")
                n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="S3Rec file: one 'user item item ...' line per user")
    parser.add_argument("--max-time-s", type=float, default=900.0)
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--target", type=float, default=0.0492)
    parser.add_argument("--keep-going", action="store_true", help="train on after the target (to the budget)")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)

    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads()
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="recbole-peer-"))
    name = args.data.stem.lower()
    n_inter = write_atomic(args.data, work, name)
    config = Config(model="SASRec", dataset=name, config_dict={
        "data_path": str(work), "checkpoint_dir": str(work / "saved"), "use_gpu": torch.cuda.is_available(),
        "seed": 42, "reproducibility": True, "show_progress": False, "worker": 0, "log_wandb": False,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",  # already 5-core
        "loss_type": "CE", "train_neg_sample_args": None, "hidden_size": 64, "inner_size": 256, "n_layers": 2,
        "n_heads": 2, "MAX_ITEM_LIST_LENGTH": 50, "train_batch_size": args.batch_size, "learning_rate": 0.001,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["NDCG", "Hit"], "topk": [10], "valid_metric": "NDCG@10", "eval_batch_size": 4096,
        "epochs": args.max_epochs,
    })
    init_seed(config["seed"], config["reproducibility"])
    t_data = time.perf_counter()
    dataset = create_dataset(config)
    train_data, valid_data, _test = data_preparation(config, dataset)
    model = SASRec(config, train_data.dataset).to(config["device"])
    trainer = Trainer(config, model)
    data_s = time.perf_counter() - t_data
    curve: list[list[float]] = []
    reached = None
    cpu: list[list[float]] = []  # CPU seconds of each epoch's training and validation: what load changes least
    t0 = time.perf_counter()
    for epoch in range(args.max_epochs):
        c0 = time.process_time()
        trainer._train_epoch(train_data, epoch, show_progress=False)
        c1 = time.process_time()
        _score, result = trainer._valid_epoch(valid_data, show_progress=False)
        cpu.append([round(c1 - c0, 1), round(time.process_time() - c1, 1)])
        elapsed = time.perf_counter() - t0
        ndcg = float(result["ndcg@10"])
        curve.append([round(elapsed, 1), ndcg])
        print(f"recbole epoch {epoch + 1}: valid NDCG@10 {ndcg:.4f} at {elapsed:.1f} s (CPU s train, valid: {cpu[-1]})",
              file=sys.stderr, flush=True)
        if reached is None and ndcg >= args.target:
            reached = {"epoch": epoch + 1, "s": round(elapsed, 1)}
            if not args.keep_going:
                break
        if elapsed >= args.max_time_s:
            break
    print(json.dumps({
        "peer": "RecBole 1.2.1 SASRec (CE, hidden 64, 2 layers, max len 50, batch %d, lr 1e-3)" % args.batch_size,
        "torch_threads": threads, "interactions": n_inter, "data_prep_s": round(data_s, 1),
        "training_samples_per_epoch": len(train_data.dataset), "target": args.target, "reached": reached,
        "epochs": len(curve), "seconds_per_epoch": round(curve[-1][0] / len(curve), 1) if curve else None,
        "best_valid_ndcg_10": max((c[1] for c in curve), default=None), "curve": curve,
        "epoch_cpu_s_train_valid": cpu,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
