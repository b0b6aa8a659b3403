"""``train(cfg)``: the whole retriever pipeline on one screen (RecBole's ``run_recbole`` idea).

config -> DataModule (features once, then split) -> TwoTowerSystem -> Lightning fit with early
stopping on ``valid/ndcg_10`` -> test with the best checkpoint -> bundle -> MLflow artifacts and a
registered model version.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

from towerline.config import TowerlineConfig, save_config, to_dict
from towerline.errors import ConfigError
from towerline.features.contracts import Dataset
from towerline.training.averaging import averaging_callbacks
from towerline.training.data import SequenceDataModule, cache_key
from towerline.training.export import export_bundle
from towerline.training.progress import EpochLine, show_bar
from towerline.training import warm_start
from towerline.training.ranker_model import item_categories
from towerline.training.system import TwoTowerSystem
from towerline.training.tracking import BUNDLE_ARTIFACT_PATH, code_version, log_dataset, register_bundle, use_tracking
from towerline.training.ranker_train import train_ranker

log = logging.getLogger(__name__)

MONITOR = "valid/ndcg_10"


class LearningCurve(Callback):
    """Validation NDCG@10 against wall-clock time, so runs can be compared at equal time budgets."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.points: list[dict[str, float]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter() - (self.points[-1]["elapsed_s"] if self.points else 0.0)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs after the epoch's validation, so both the train loss and valid metrics are known
        m = trainer.callback_metrics
        point = {"epoch": float(trainer.current_epoch), "elapsed_s": time.perf_counter() - self.start}
        for key in sorted(m):  # every validation metric: the best epoch's are logged as best/valid_*
            if key.startswith(("valid/", "valid_unmasked/")) or key == "train/loss":
                point[key] = float(m[key])
        self.points.append(point)
        pl_module.log("time/elapsed_s", point["elapsed_s"])

    def state_dict(self) -> dict[str, Any]:
        return {"points": self.points}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = list(state_dict.get("points", []))

    def plot(self, path: Path) -> Path | None:
        if not self.points:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
        t = [p["elapsed_s"] for p in self.points]
        ax1.plot(t, [p.get(MONITOR, float("nan")) for p in self.points], marker="o")
        ax1.set_xlabel("wall time (s)")
        ax1.set_ylabel("valid NDCG@10")
        ax2.plot([p["epoch"] for p in self.points], [p.get("train/loss", float("nan")) for p in self.points], marker="o")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("train loss")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def run_name(cfg: TowerlineConfig, now: dt.datetime | None = None) -> str:
    """``beauty-twotower-20261201-101233``: data set, model and start time, readable in the MLflow UI.

    Set explicitly because MLflow's generated names (``capable-auk-759``) come from Python's global
    random state, which ``seed_everything`` has just fixed: every run would get the same name.
    """
    model = "twotower+ranker" if cfg.ranker.enabled else "twotower"
    return f"{cfg.data.name}-{model}-{(now or dt.datetime.now()):%Y%m%d-%H%M%S}"


def best_epoch_metrics(curve: list[dict[str, float]]) -> dict[str, float]:
    """``best/epoch`` and the validation metrics of the epoch with the highest ``valid/ndcg_10``
    (the first such epoch, as ``ModelCheckpoint`` keeps it), as ``best/valid_<metric>``."""
    scored = [p for p in curve if MONITOR in p]
    if not scored:
        return {}
    best = max(scored, key=lambda p: p[MONITOR])  # max() keeps the first of equal scores
    out = {"best/epoch": best["epoch"]}
    out.update({f"best/valid_{k.removeprefix('valid/')}": v for k, v in best.items() if k.startswith("valid/")})
    return out


@dataclass
class TrainResult:
    run_id: str
    tracking_uri: str
    bundle_dir: Path
    metrics: dict[str, float]
    model_name: str | None = None
    model_version: str | None = None
    curve: list[dict[str, float]] = field(default_factory=list)


def train(
    cfg: TowerlineConfig, out_dir: str | Path = "runs/latest", resume: bool = False, progress: bool = True,
    dataset: Dataset | None = None,
) -> TrainResult:
    """Fit, test and register a two-tower retriever; everything lands in ``out_dir`` and MLflow.

    ``progress``: a progress bar when stderr is a terminal, else (and with ``progress=False``) one
    log line per epoch (``training.progress``). ``dataset``: ``cfg.data``'s data when the caller has
    read it already (it is not read again).
    """
    if cfg.trainer.workers > 1:  # Ray Train workers running the same system with DDP
        from towerline.training.distributed import train_distributed

        return train_distributed(cfg, out_dir, resume=resume, progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    save_config(cfg, out / "config.yaml")

    dm = SequenceDataModule(cfg, out / "data", dataset=dataset)
    changes = dm.cache_changes() if resume else None
    if changes:
        raise ConfigError(
            f"--resume: {out / 'data'} was prepared from other data ({'; '.join(changes)}); the checkpoint "
            f"in {out} belongs to that data. Resume with the original config, or train into a new --out"
        )
    dm.prepare_data()
    # -- warm start (training/warm_start.py): parent's vocabularies grown, then its weights copied
    parent = None
    if cfg.trainer.warm_start:
        use_tracking(cfg.tracking)  # models:/ and runs:/ parents resolve against the run's tracking store
        parent = warm_start.load_parent(cfg.trainer.warm_start)
        warm_start.check_compatible(parent, to_dict(cfg)["model"])
        warm_start.grow_prepared_data(dm, parent)
    dm.setup()
    stats = dm.stats
    system = TwoTowerSystem(
        stats.n_items, stats.n_attributes, stats.n_event_types, cfg,
        item_attributes=dm.item_attributes, item_counts=dm.item_counts,
        item_category=item_categories(dm.item_attributes, dm.vocabs.attributes),
    )
    if parent is not None and not resume:
        warm_start.load_parent_weights(system.net, parent)
    # -- end of warm start

    uri = use_tracking(cfg.tracking)
    run_file = out / "run.json"
    last_ckpt = out / "checkpoints" / "last.ckpt"
    resume_run = json.loads(run_file.read_text())["run_id"] if resume and run_file.exists() else None
    if resume and not last_ckpt.exists():
        log.warning("--resume: no checkpoint at %s, starting from scratch", last_ckpt)
    logger = MLFlowLogger(
        experiment_name=cfg.tracking.experiment,
        tracking_uri=uri,
        run_id=resume_run,
        run_name=None if resume_run else run_name(cfg),
        tags={"dataset": cfg.data.name, "code_version": code_version(), "split": cfg.data.split,
              **(warm_start.parent_tags(parent, str(cfg.trainer.warm_start)) if parent is not None else {})},
        log_model=False,
    )
    if resume_run:
        # MLflow params are immutable and the run already holds the original config; a resumed fit
        # may only change budgets (max_epochs, max_time_s), which the run's metrics show anyway.
        system._log_hyperparams = False
    run_id = logger.run_id
    run_file.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    log.info("MLflow run %s (tracking URI %s)", run_id, uri)

    if not resume_run:  # a resumed run has its input already
        log_dataset(logger.experiment, run_id, cfg.data, cache_key(cfg)["sha256"], dm.prepared_counts())
    curve = LearningCurve()
    bar = show_bar(progress)
    refit = cfg.trainer.refit  # the test model: exactly max_epochs, no validation, its last weights are "best"
    best = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=None if refit else MONITOR, mode="max",
                           save_last=True)
    stopping = [] if refit else [EarlyStopping(monitor=MONITOR, mode="max", patience=cfg.trainer.patience)]
    trainer = L.Trainer(
        max_epochs=cfg.trainer.max_epochs,
        max_time=dt.timedelta(seconds=cfg.trainer.max_time_s) if cfg.trainer.max_time_s else None,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        precision=cfg.trainer.precision,
        logger=logger,
        # weight averaging first: the checkpoint callbacks then see (and save) the averaged weights
        callbacks=averaging_callbacks(cfg.trainer, dm.n_train_batches()) + [best, *stopping, curve]
        + ([] if bar else [EpochLine(monitor=MONITOR)]),
        default_root_dir=out,
        # at most once per epoch: a larger interval than the epoch has batches only earns a warning
        log_every_n_steps=max(1, min(cfg.trainer.log_every_n_steps, dm.n_train_batches())),
        limit_train_batches=cfg.trainer.limit_train_batches,
        limit_val_batches=0 if refit else None,
        num_sanity_val_steps=0,
        enable_progress_bar=bar,
        enable_model_summary=False,
    )
    trainer.fit(system, datamodule=dm, ckpt_path=str(last_ckpt) if resume and last_ckpt.exists() else None)
    tested = trainer.test(system, datamodule=dm, ckpt_path="best" if best.best_model_path else None, verbose=False)
    metrics = {k: float(v) for k, v in (tested[0] if tested else {}).items()}
    if best.best_model_score is not None:
        metrics["valid/best_ndcg_10"] = float(best.best_model_score)
    metrics["train/epochs"] = float(trainer.current_epoch)
    metrics["train/seconds"] = curve.points[-1]["elapsed_s"] if curve.points else 0.0
    metrics.update(best_epoch_metrics(curve.points))
    # the run's summary, beside the per-epoch curves and the test metrics Lightning logged already
    logger.log_metrics({k: v for k, v in metrics.items() if k.startswith("best/") or k in ("train/epochs", "train/seconds")})

    return export_and_register(cfg, dm, system, logger, out, curve, metrics, run_id=run_id, tracking_uri=uri,
                               progress=progress)


def export_and_register(
    cfg: TowerlineConfig,
    dm: SequenceDataModule,
    system: TwoTowerSystem,
    logger: MLFlowLogger,
    out: Path,
    curve: LearningCurve,
    metrics: dict[str, float],
    *,
    run_id: str,
    tracking_uri: str,
    progress: bool,
) -> TrainResult:
    """What every training path does once the model is fitted and tested (``train`` in one process,
    ``train_distributed`` with Ray Train): the learning curve, the bundle, its MLflow artifacts, the
    ranker when enabled, the registered version, the run closed. One function so that one worker
    and N workers cannot drift apart in what they hand to serving.
    """
    plot = curve.plot(out / "training_curve.png")
    (out / "curve.json").write_text(json.dumps(curve.points, indent=2))
    bundle = export_bundle(
        system.net, dm.vocabs, cfg, out / "bundle",
        items=dm.items_table(), item_popularity=dm.item_counts, histories=dm.split.full, users=dm.users_consent(), metrics=metrics,
        extra_files={"training_curve.png": plot, "curve.json": out / "curve.json"} if plot else {},
        manifest_extra={"model_name": cfg.tracking.model_name, "run_id": run_id},
    )
    client = logger.experiment
    client.log_artifacts(run_id, str(bundle), BUNDLE_ARTIFACT_PATH)
    if plot:
        client.log_artifact(run_id, str(plot))
    if cfg.ranker.enabled:  # before registering, so the registered version includes the ranker
        metrics.update(train_ranker(system.net, dm.vocabs, dm.split, cfg, bundle, run_id=run_id,
                                    tracking_uri=tracking_uri, progress=progress).metrics)
    result = TrainResult(run_id=run_id, tracking_uri=tracking_uri, bundle_dir=bundle, metrics=metrics, curve=curve.points)
    if cfg.tracking.register:
        result.model_name = cfg.tracking.model_name
        result.model_version = register_bundle(run_id, cfg.tracking.model_name, bundle)
        client.set_tag(run_id, "model_version", result.model_version)
    logger.finalize("success")
    return result
