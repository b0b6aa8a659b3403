"""``train_distributed(cfg)``: the same ``TwoTowerSystem`` fitted by N Ray Train workers with DDP.

``towerline train --workers N`` (``trainer.workers``) lands here; ``workers: 1`` keeps the
one-process path in ``train.py``. What changes and what does not:

* **Data**: the driver prepares the cache once (``prepare_data``, Ray Data when
  ``data.engine: ray``); each worker loads it (``setup``) and reads its own shard of the training
  windows through a ``DistributedSampler``. Validation is *not* sharded: every worker scores every
  validation user, so all ranks log the same ``valid/ndcg_10`` and early stopping and checkpoint
  choice agree without gathering ranks (validation is a small share of an epoch; shard it with a
  rank gather when it is not). On a cluster, ``--out`` must be on storage every node sees.
* **Training**: Lightning's Ray integration (``RayDDPStrategy``, ``RayLightningEnvironment``,
  ``prepare_trainer``) under ``ray.train.torch.TorchTrainer``; Ray picks the process group backend
  (NCCL where the workers have GPUs, gloo otherwise) and ``accelerator`` stays the config's.
* **Checkpoints** go through Ray Train: ``RayTrainReportCallback`` reports one per epoch with the
  epoch's metrics; Ray keeps the best two by ``valid/ndcg_10`` (plus the latest) under
  ``<out>/ray/train``. ``--resume`` restarts from Ray's latest checkpoint there (Ray Train restores
  a run from its storage folder), else from ``<out>/checkpoints/last.ckpt``; after fitting, the
  best and latest are copied to ``<out>/checkpoints/{best,last}.ckpt`` so a one-process
  ``--resume`` continues a distributed run too.
* **MLflow**: the driver opens the run (so ``run.json`` names it before any worker starts); rank 0
  is the only worker that logs to it (params, per-epoch metrics); the driver then tests the best
  checkpoint in one process (the same full-catalogue test as ``train.py``), logs the bundle and
  registers the version exactly as the one-process path does.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import MLFlowLogger
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from towerline.config import TowerlineConfig, from_dict, save_config, to_dict
from towerline.errors import ConfigError
from towerline.training.averaging import averaging_callbacks
from towerline.training.data import SequenceDataModule
from towerline.training.ranker_model import item_categories
from towerline.training.system import TwoTowerSystem
from towerline.training.tracking import code_version, use_tracking
from towerline.training.train import (
    MONITOR,
    LearningCurve,
    TrainResult,
    best_epoch_metrics,
    export_and_register,
    run_name,
)

log = logging.getLogger(__name__)

RAY_RUN_NAME = "train"  # <out>/ray/train: Ray Train's storage for this run folder
CKPT_FILE = "checkpoint.ckpt"  # what RayTrainReportCallback writes inside each checkpoint


class ShardedDataModule(SequenceDataModule):
    """The prepared cache, with each worker's training windows its own ``DistributedSampler`` shard.

    ``prepare_data`` is a no-op: the driver prepared the cache before the workers started, and a
    worker on another node must not rebuild it. Evaluation loaders are the parent's (unsharded).
    """

    def __init__(self, cfg: TowerlineConfig, work_dir: str | Path, rank: int, world_size: int):
        super().__init__(cfg, work_dir)
        self.rank, self.world_size = rank, world_size
        self._prepared = True

    def train_dataloader(self) -> DataLoader:
        ds = self.training_dataset()
        # Lightning calls set_epoch on it, so every epoch reshuffles with seed + epoch on all ranks
        sampler = DistributedSampler(ds, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=self.cfg.trainer.seed)
        return DataLoader(ds, batch_size=worker_batch_size(self.cfg.trainer.batch_size, self.world_size), sampler=sampler,
                          num_workers=self.cfg.trainer.num_workers)


def worker_batch_size(batch_size: int, world_size: int) -> int:
    """Each worker's share of ``trainer.batch_size``, which stays the global batch of one optimizer step.

    DDP averages the workers' gradients, so N workers at ``batch_size`` each would take 1/N of the
    steps per epoch at N times the batch: the same epochs would train less (LastFM, 5 epochs: test
    NDCG@10 0.0238 with 2 workers against 0.0316 with one). Splitting the batch keeps the number and the
    size of the steps of a one-process run, so the learning rate and epoch count carry over unchanged.
    """
    return max(1, -(-batch_size // world_size))


def _build_system(cfg: TowerlineConfig, dm: SequenceDataModule) -> TwoTowerSystem:
    stats = dm.stats
    return TwoTowerSystem(
        stats.n_items, stats.n_attributes, stats.n_event_types, cfg,
        item_attributes=dm.item_attributes, item_counts=dm.item_counts,
        item_category=item_categories(dm.item_attributes, dm.vocabs.attributes),
    )


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the Lightning fit of ``train.py`` under RayDDPStrategy."""
    import ray.train
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer

    cfg: TowerlineConfig = from_dict(TowerlineConfig, config["cfg"])
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    dm = ShardedDataModule(cfg, config["data_dir"], rank, world)
    dm.setup()
    system = _build_system(cfg, dm)
    if config["resume"]:
        system._log_hyperparams = False  # the run holds the original params already (see train.py)
    logger = (
        MLFlowLogger(experiment_name=cfg.tracking.experiment, tracking_uri=config["tracking_uri"], run_id=config["run_id"], log_model=False)
        if rank == 0 else False
    )
    trainer = L.Trainer(
        max_epochs=cfg.trainer.max_epochs,
        max_time=dt.timedelta(seconds=cfg.trainer.max_time_s) if cfg.trainer.max_time_s else None,
        accelerator=cfg.trainer.accelerator,
        devices="auto",  # one device (or the CPU) per worker: Ray Train assigns it
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        precision=cfg.trainer.precision,
        logger=logger,
        # the curve first: the checkpoint the report callback saves then holds this epoch's point
        # weight averaging first (as in train.py): the checkpoints Ray Train reports hold the averaged weights
        callbacks=averaging_callbacks(cfg.trainer, dm.n_train_batches())
        + [EarlyStopping(monitor=MONITOR, mode="max", patience=cfg.trainer.patience), LearningCurve(), RayTrainReportCallback()],
        enable_checkpointing=False,  # checkpoints go through Ray Train
        use_distributed_sampler=False,  # training is sharded by ShardedDataModule, evaluation is not
        default_root_dir=config["root_dir"],
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        limit_train_batches=cfg.trainer.limit_train_batches,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer = prepare_trainer(trainer)
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            trainer.fit(system, datamodule=dm, ckpt_path=os.path.join(d, CKPT_FILE))
    else:
        trainer.fit(system, datamodule=dm, ckpt_path=config["fallback_ckpt"])


def _use_gpu(cfg: TowerlineConfig, workers: int) -> bool:
    """GPUs when the config allows them and the Ray cluster has one per worker (the driver may have none)."""
    import ray

    return cfg.trainer.accelerator in ("auto", "gpu", "cuda") and ray.cluster_resources().get("GPU", 0) >= workers


def _load_ckpt(checkpoint: Any) -> dict[str, Any]:
    """A Ray Train checkpoint -> the Lightning checkpoint dict inside it (on CPU)."""
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, CKPT_FILE), map_location="cpu", weights_only=False)


def train_distributed(cfg: TowerlineConfig, out_dir: str | Path = "runs/latest", resume: bool = False, progress: bool = True) -> TrainResult:
    """Fit with ``cfg.trainer.workers`` Ray Train workers, then test, bundle and register as ``train()`` does."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from towerline.features.ray_data import ray_session

    workers = cfg.trainer.workers
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    save_config(cfg, out / "config.yaml")

    dm = SequenceDataModule(cfg, out / "data")
    changes = dm.cache_changes() if resume else None
    if changes:
        raise ConfigError(
            f"--resume: {out / 'data'} was prepared from other data ({'; '.join(changes)}); the checkpoint "
            f"in {out} belongs to that data. Resume with the original config, or train into a new --out"
        )
    dm.prepare_data()
    dm.setup()
    system = _build_system(cfg, dm)

    uri = use_tracking(cfg.tracking)
    run_file = out / "run.json"
    resume_run = json.loads(run_file.read_text())["run_id"] if resume and run_file.exists() else None
    logger = MLFlowLogger(
        experiment_name=cfg.tracking.experiment,
        tracking_uri=uri,
        run_id=resume_run,
        run_name=None if resume_run else run_name(cfg),
        tags={"dataset": cfg.data.name, "code_version": code_version(), "split": cfg.data.split, "workers": str(workers)},
        log_model=False,
    )
    run_id = logger.run_id
    run_file.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    log.info("MLflow run %s (tracking URI %s), %d Ray Train workers", run_id, uri, workers)

    storage = out / "ray"
    if not resume:
        shutil.rmtree(storage / RAY_RUN_NAME, ignore_errors=True)  # else Ray Train would restore the old run
    last_ckpt = out / "checkpoints" / "last.ckpt"
    fallback = str(last_ckpt) if resume and last_ckpt.exists() else None
    if resume and not fallback and not (storage / RAY_RUN_NAME).exists():
        log.warning("--resume: no checkpoint in %s or %s, starting from scratch", storage / RAY_RUN_NAME, last_ckpt)

    started = time.perf_counter()
    with ray_session(num_cpus=max(workers, min(4, os.cpu_count() or 1))):
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={
                "cfg": to_dict(cfg), "data_dir": str(out / "data"), "root_dir": str(out), "run_id": run_id,
                "tracking_uri": uri, "resume": bool(resume_run), "fallback_ckpt": fallback,
            },
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=_use_gpu(cfg, workers)),
            run_config=RunConfig(
                name=RAY_RUN_NAME,
                storage_path=str(storage),
                checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=MONITOR, checkpoint_score_order="max"),
            ),
        )
        result = trainer.fit()
    fit_seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint (error: {result.error}); see {storage / RAY_RUN_NAME}")

    scored = [(c, m) for c, m in (result.best_checkpoints or []) if MONITOR in m]
    best_ckpt, best_metrics = max(scored, key=lambda cm: cm[1][MONITOR]) if scored else (result.checkpoint, {})
    latest = _load_ckpt(result.checkpoint)
    best = _load_ckpt(best_ckpt)
    (out / "checkpoints").mkdir(exist_ok=True)
    torch.save(latest, out / "checkpoints" / "last.ckpt")
    torch.save(best, out / "checkpoints" / "best.ckpt")
    system.load_state_dict(best["state_dict"])
    system._log_hyperparams = False  # rank 0 logged the params (or the original run did, on --resume)
    curve_points = list(latest.get("callbacks", {}).get("LearningCurve", {}).get("points", []))

    tester = L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision, logger=logger,
        enable_progress_bar=progress, enable_model_summary=False, default_root_dir=out,
    )
    tested = tester.test(system, datamodule=dm, verbose=False)
    metrics = {k: float(v) for k, v in (tested[0] if tested else {}).items()}
    if MONITOR in best_metrics:
        metrics["valid/best_ndcg_10"] = float(best_metrics[MONITOR])
    metrics["train/epochs"] = float(len(curve_points))
    metrics["train/seconds"] = curve_points[-1]["elapsed_s"] if curve_points else fit_seconds
    metrics["train/workers"] = float(workers)
    metrics.update(best_epoch_metrics(curve_points))
    logger.log_metrics({k: v for k, v in metrics.items() if k.startswith("best/") or k in ("train/epochs", "train/seconds", "train/workers")})

    curve = LearningCurve()
    curve.points = curve_points
    return export_and_register(cfg, dm, system, logger, out, curve, metrics, run_id=run_id, tracking_uri=uri,
                               progress=progress)
