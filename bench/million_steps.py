"""Seconds per training step on a 1M-item shop: dense AdamW vs ``model.sparse_item_grads`` (issue #17).

The same Lightning system and config path as ``bench/scale.py --million``; only
``model.sparse_item_grads`` differs (``false``: one AdamW over every parameter, the path of before;
``true``: SparseAdam on the item-id table + AdamW for the rest). Each setting runs ``--steps`` steps
in ``--rounds`` interleaved rounds; the figure is the median over steps (the first of each run is
dropped: allocations). CPU seconds per step are reported beside wall seconds because on a shared
machine the wall clock mostly measures the other tenants.

    python bench/million_steps.py --users 200000 --batch-size 128 --dim 64 --steps 12 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.million_steps")


def prepare(work: Path, users: int) -> Path:
    """A 1M-item shop as one ``events.parquet`` (the local reader's layout), from the streamed generator."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from towerline.features.synthetic import generate_sharded

    shards = work / "shards"
    generate_sharded(shards, users, 1_000_000, seed=0)
    shop = work / "shop"
    shop.mkdir()
    pq.write_table(pa.concat_tables([pq.read_table(f) for f in sorted((shards / "events").glob("*.parquet"))]),
                   shop / "events.parquet")
    for name in ("items.parquet", "users.parquet"):
        (shop / name).write_bytes((shards / name).read_bytes())
    return shop


def run(shop: Path, work: Path, sparse: str, args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L
    from towerline.config import load_config
    from towerline.training.data import SequenceDataModule
    from towerline.training.system import TwoTowerSystem

    cfg = load_config(REPO / "configs" / "synthetic.yaml", [
        "data.format=parquet", f"data.path={shop}", "data.name=million", "loss.kind=sampled_softmax",
        "loss.n_negatives=4096", f"trainer.batch_size={args.batch_size}", f"model.dim={args.dim}", "model.n_layers=1",
        "trainer.max_epochs=1", f"model.sparse_item_grads={sparse}",
    ])
    dm = SequenceDataModule(cfg, work / "data")
    dm.prepare_data()
    dm.setup()
    s = dm.stats
    system = TwoTowerSystem(s.n_items, s.n_attributes, s.n_event_types, cfg, item_attributes=dm.item_attributes,
                            item_counts=dm.item_counts)
    wall: list[float] = []
    cpu: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            wall.append(time.perf_counter() - self.t)
            cpu.append(time.process_time() - self.c)

    trainer = L.Trainer(max_steps=args.steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()])
    trainer.fit(system, train_dataloaders=dm.train_dataloader())
    return {"sparse_item_grads": system.sparse_item_grads, "steps": trainer.global_step,
            "cpu_s": cpu[1:], "wall_s": wall[1:], "loadavg_1m": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "million_steps.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="towerline-million-steps-") as tmp:
        work = Path(tmp)
        shop = prepare(work, args.users)
        runs: dict[str, list[dict[str, Any]]] = {"false": [], "true": []}
        for _ in range(args.rounds):
            for sparse, done in runs.items():
                done.append(run(shop, work, sparse, args))
                log.info("sparse_item_grads=%s: %s", sparse, done[-1])
    out: dict[str, Any] = {"command": "python bench/million_steps.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                           "items": 1_000_000, "users": args.users, "batch_size": args.batch_size, "dim": args.dim,
                           "n_negatives": 4096, "machine": f"{os.cpu_count()} CPU cores"}
    for sparse, rs in runs.items():
        cpu = [x for r in rs for x in r["cpu_s"]]
        wall = [x for r in rs for x in r["wall_s"]]
        out["sparse" if sparse == "true" else "dense"] = {
            "median_cpu_s_per_step": round(statistics.median(cpu), 3),
            "median_wall_s_per_step": round(statistics.median(wall), 3), "steps_measured": len(cpu),
            "loadavg_1m": [r["loadavg_1m"] for r in rs]}
    out["cpu_speedup"] = round(out["dense"]["median_cpu_s_per_step"] / out["sparse"]["median_cpu_s_per_step"], 2)
    out["wall_speedup"] = round(out["dense"]["median_wall_s_per_step"] / out["sparse"]["median_wall_s_per_step"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
