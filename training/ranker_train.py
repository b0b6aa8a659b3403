"""``train_ranker(...)``: the ranking stage on one screen, for a retriever that is already trained.

retriever + split -> per-item features -> candidate lists (one batched retrieval pass) -> Lightning
fit with early stopping on ``valid/pipeline_ndcg_10`` -> test: retrieve-then-rank against
retrieval alone on the same users (NDCG@10, HR@10, MRR, full catalogue, history masked), the lift
with a paired-bootstrap 95% interval, the retriever's recall@N -> ``ranker/`` in the bundle, the
manifest rewritten, metrics and files logged to the retriever's MLflow run.

Model selection includes the untrained ranker, which reproduces the retrieval order exactly
(``Ranker`` starts as the identity): if no epoch beats retrieval on validation, the bundle ships
the identity and the test lift is 1.0, rather than a ranker that validation says is worse.

``train_ranker_for_bundle`` is the same for an existing bundle (``towerline train-ranker``): the
bundle's config and histories give the split, the manifest's ``run_id`` the MLflow run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from towerline.bundle import MANIFEST, write_manifest
from towerline.config import TowerlineConfig, apply_overrides, flatten, from_dict, to_dict
from towerline.errors import ConfigError
from towerline.features.contracts import Dataset
from towerline.features.user_features import build_profiles, profile_features
from towerline.features.sequences import build_sequences
from towerline.features.splits import Split
from towerline.features.vocab import N_RESERVED, PAD_IDX, Vocabs
from towerline.training import inference
from towerline.training.bundle import load_bundle
from towerline.training.candidates import CandidateSet, RankerData, build_ranker_data
from towerline.training.data import load_data, make_split
from towerline.training.export import item_embeddings
from towerline.training.metrics import ranking_metrics
from towerline.training.model import TwoTowerNet
from towerline.training.ranker_model import Ranker, build_ranker_features
from towerline.training.ranker_system import RankerSystem, pipeline_ranks
from towerline.training.tracking import BUNDLE_ARTIFACT_PATH, register_bundle, use_tracking

log = logging.getLogger(__name__)

MONITOR = "valid/pipeline_ndcg_10"
RANKER_DIR = "ranker"
_MANIFEST_OWN_KEYS = ("format", "towerline_version", "created_at", "files")


@dataclass
class RankerResult:
    metrics: dict[str, float]
    ranker: Ranker
    bundle_dir: Path
    curve: list[dict[str, float]] = field(default_factory=list)
    model_name: str | None = None
    model_version: str | None = None


# ----------------------------------------------------------------------------- metrics


def ndcg_at(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """(U,) per-user NDCG@k of one relevant item from 0-based ranks (``ranking_metrics``' formula)."""
    r = np.asarray(ranks, dtype=np.float64)
    return np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)


def paired_bootstrap_lift(
    pipeline: np.ndarray, baseline: np.ndarray, n_samples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``mean(pipeline) / mean(baseline)`` and its percentile bootstrap interval (Efron & Tibshirani, 1993).

    Paired: each resample draws users with replacement and takes *both* systems' values of those
    users, so the user-to-user spread that both share cancels out of the ratio and the interval is
    much tighter than two independent ones. Returns ``(ratio, low, high)``; NaN where the baseline
    mean is 0.

    Args:
        pipeline, baseline: (U,) per-user metric values of the same users in the same order.
    """
    a = np.asarray(pipeline, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two equal 1-D arrays, got {a.shape} and {b.shape}")
    if len(a) == 0 or b.mean() == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    ratios = np.empty(n_samples)
    chunk = max(1, 2_000_000 // len(a))  # resamples per chunk: bounded memory for large U
    for lo in range(0, n_samples, chunk):
        m = min(chunk, n_samples - lo)
        idx = rng.integers(0, len(a), size=(m, len(a)))  # (m, U)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios[lo : lo + m] = a[idx].mean(1) / b[idx].mean(1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.nanpercentile(ratios, [tail, 100.0 - tail])
    return float(a.mean() / b.mean()), float(low), float(high)


@torch.no_grad()
def score_candidates(ranker: Ranker, data: CandidateSet, batch_size: int = 1024) -> np.ndarray:
    """(P, N) ranker scores of a candidate set in eval mode, through ``inference.rank_scores`` (serving's call)."""
    was_training = ranker.training
    ranker.eval()
    device = ranker.item_vectors.device
    out = []
    tensors = data.tensors()
    for lo in range(0, len(data), batch_size):
        hist, types, ts, cand, cand_scores, users = (t[lo : lo + batch_size].to(device) for t in tensors[:5] + tensors[7:8])
        out.append(inference.rank_scores(ranker, hist, types, ts, cand, cand_scores, users).float().cpu())
    ranker.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, data.cand.shape[1]), dtype=np.float32)


def pipeline_report(
    scores: np.ndarray, data: CandidateSet, prefix: str = "test", bootstrap_samples: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Retrieve-then-rank vs retrieval alone on the same users: NDCG@10, HR@10, MRR, lift + 95% CI, recall@N."""
    ranks = pipeline_ranks(torch.from_numpy(scores), torch.from_numpy(data.target_pos), torch.from_numpy(data.retrieval_rank))
    base = torch.from_numpy(data.retrieval_rank)
    pipe_m, base_m = ranking_metrics(ranks, ks=(10,)), ranking_metrics(base, ks=(10,))
    lift, low, high = paired_bootstrap_lift(ndcg_at(ranks.numpy()), ndcg_at(base.numpy()), bootstrap_samples, seed)
    n = data.cand.shape[1]
    out = {}
    for name, m in (("pipeline", pipe_m), ("retrieval", base_m)):
        out[f"{prefix}/{name}_ndcg_10"] = m["ndcg_10"]
        out[f"{prefix}/{name}_hr_10"] = m["hr_10"]
        out[f"{prefix}/{name}_mrr"] = m["mrr"]
    out[f"{prefix}/pipeline_lift_ndcg_10"] = lift
    out[f"{prefix}/pipeline_lift_ndcg_10_ci_low"] = low
    out[f"{prefix}/pipeline_lift_ndcg_10_ci_high"] = high
    out[f"{prefix}/retrieval_recall_{n}"] = data.recall
    out[f"{prefix}/pipeline_users"] = float(len(data))
    return out


# ----------------------------------------------------------------------------- fitting


class EpochLog(Callback):
    """Per-epoch ``ranker/train_loss`` and ``valid/pipeline_ndcg_10`` into MLflow (step = epoch), and the
    best ranker state in memory (no checkpoint files: the weights are small and go to the bundle)."""

    def __init__(self, client: Any | None, run_id: str | None, best_score: float, best_state: dict[str, torch.Tensor]):
        self.client, self.run_id = client, run_id
        self.best_score, self.best_state, self.best_epoch = best_score, best_state, -1
        self.points: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs after the epoch's validation, so both numbers are known
        m = trainer.callback_metrics
        point = {"epoch": float(trainer.current_epoch)}
        for key in ("ranker/train_loss", MONITOR, "valid/pipeline_hr_10", "valid/pipeline_mrr"):
            if key in m:
                point[key] = float(m[key])
        self.points.append(point)
        score = point.get(MONITOR, float("-inf"))
        if score > self.best_score:
            self.best_score, self.best_epoch = score, trainer.current_epoch
            self.best_state = {k: v.detach().cpu().clone() for k, v in pl_module.ranker.state_dict().items()}
        if self.client is not None and self.run_id:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            step = trainer.current_epoch
            self.client.log_batch(
                self.run_id, metrics=[Metric(k, v, ts, step) for k, v in point.items() if k != "epoch"]
            )


def _loader(data: CandidateSet, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    return DataLoader(
        TensorDataset(*data.tensors()),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


def build_ranker_for(net: TwoTowerNet, vocabs: Vocabs, split: Split, cfg: TowerlineConfig) -> Ranker:
    """A fresh ranker whose per-item facts come from this retriever and the split's training data,
    and (with ``ranker.use_profiles``) whose per-user profile table comes from the marketing layer."""
    emb = item_embeddings(net)  # (V, D) eval-mode item vectors, as in the bundle
    attrs = net.item_tower.item_attributes
    attrs_np = attrs.cpu().numpy() if attrs is not None else np.full((net.n_items, 1), PAD_IDX, dtype=np.int64)
    features = build_ranker_features(emb, attrs_np, vocabs.attributes, split.train)
    table = training_profile_table(split, vocabs, cfg) if cfg.ranker.use_profiles else None
    ranker = Ranker(
        n_items=net.n_items,
        n_attributes=net.n_attributes,
        n_event_types=net.n_event_types,
        item_dim=emb.shape[1],
        cfg=cfg.ranker,
        max_attributes=attrs_np.shape[1],
        features=features,
        n_profile_features=0 if table is None else table.shape[1],
        n_users=0 if table is None else table.shape[0],
    )
    if table is not None:
        ranker.user_profiles.copy_(torch.from_numpy(table))
    return ranker


def training_profile_table(split: Split, vocabs: Vocabs, cfg: TowerlineConfig) -> np.ndarray:
    """(len(vocabs.users), P) profile features per user vocabulary row, from training prefixes only.

    Profiles are built by the marketing layer (``features.profiles``) over the events the retriever
    trained on, so no validation or test interaction leaks into a feature; reserved rows and users
    without training events are zeros.
    """
    train = split.train
    user_rows = np.repeat(train.user_idx, train.lengths)
    events = pd.DataFrame({
        "user_id": vocabs.users.decode(user_rows),
        "item_id": vocabs.items.decode(train.item_idx),
        "timestamp": train.timestamp,
        "event_type": vocabs.event_types.decode(train.event_type_idx),
        "value": train.value,
    })
    items = pd.DataFrame({"item_id": vocabs.items.ids, "attributes": [[] for _ in range(len(vocabs.items.ids))]})
    users = pd.DataFrame({"user_id": vocabs.users.ids, "consent": True})
    profiles = build_profiles(Dataset("train-prefix", events, items, users), cfg.profile)
    ids = np.concatenate([np.array(["<pad>", "<unk>"], dtype=object), vocabs.users.ids])
    table = profile_features(profiles, ids)
    table[:N_RESERVED] = 0.0
    return table


def fit_ranker(
    ranker: Ranker, data: RankerData, cfg: TowerlineConfig, client: Any | None = None, run_id: str | None = None,
    progress: bool = True,
) -> tuple[Ranker, EpochLog]:
    """Fit with early stopping on validation pipeline NDCG@10; the best epoch's (or the untrained,
    retrieval-order) weights are loaded back into ``ranker``."""
    rc = cfg.ranker
    if len(data.train) == 0:
        raise ConfigError(
            f"config field 'ranker.n_candidates': the retriever's top-{rc.n_candidates} holds the true next item "
            "for none of the sampled training positions; raise ranker.n_candidates or train the retriever longer"
        )
    baseline = ranking_metrics(torch.from_numpy(data.valid.retrieval_rank), ks=(10,))["ndcg_10"]
    init_state = {k: v.detach().cpu().clone() for k, v in ranker.state_dict().items()}
    epochs = EpochLog(client, run_id, best_score=baseline, best_state=init_state)
    system = RankerSystem(ranker, rc)
    trainer = L.Trainer(
        max_epochs=rc.max_epochs,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        precision=cfg.trainer.precision,
        logger=False,
        enable_checkpointing=False,
        callbacks=[EarlyStopping(monitor=MONITOR, mode="max", patience=rc.patience), epochs],
        num_sanity_val_steps=0,
        enable_progress_bar=progress,
        enable_model_summary=False,
    )
    seed = cfg.trainer.seed
    trainer.fit(
        system,
        train_dataloaders=_loader(data.train, rc.batch_size, True, seed),
        val_dataloaders=_loader(data.valid, cfg.trainer.eval_batch_size, False, seed),
    )
    ranker.load_state_dict(epochs.best_state)
    ranker.cpu().eval()
    if epochs.best_epoch < 0:
        log.warning(
            "no ranker epoch beat retrieval on validation (NDCG@10 %.4f); shipping the untrained ranker, "
            "which keeps the retrieval order", baseline,
        )
    else:
        log.info("best ranker epoch %d: valid pipeline NDCG@10 %.4f (retrieval %.4f)", epochs.best_epoch, epochs.best_score, baseline)
    return ranker, epochs


# ----------------------------------------------------------------------------- bundle + MLflow


def save_ranker(ranker: Ranker, bundle_dir: str | Path, metrics: dict[str, float] | None = None) -> Path:
    """Write ``ranker/config.json`` + ``ranker/weights.safetensors``, merge ``metrics`` into
    ``metrics.json`` and rewrite the manifest, keeping its extra keys (model_name, run_id, ...)."""
    d = Path(bundle_dir)
    rdir = d / RANKER_DIR
    rdir.mkdir(parents=True, exist_ok=True)
    (rdir / "config.json").write_text(json.dumps(ranker.meta(), indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in ranker.state_dict().items()}
    save_file(state, str(rdir / "weights.safetensors"))
    mpath = d / "metrics.json"
    merged = json.loads(mpath.read_text()) if mpath.exists() else {}
    merged.update(metrics or {})
    mpath.write_text(json.dumps(merged, indent=2, sort_keys=True))
    old = json.loads((d / MANIFEST).read_text()) if (d / MANIFEST).exists() else {}
    write_manifest(d, {k: v for k, v in old.items() if k not in _MANIFEST_OWN_KEYS})
    return rdir


def _log_to_run(client: Any, run_id: str, cfg: TowerlineConfig, bundle_dir: Path, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric, Param

    run = client.get_run(run_id)
    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items() if np.isfinite(v)])
    # params are immutable in MLflow: a later train-ranker with other settings records them as a tag
    params = {f"ranker/{k}": str(v) for k, v in flatten(to_dict(cfg.ranker)).items()}
    new = [Param(k, v) for k, v in params.items() if k not in run.data.params]
    if new:
        client.log_batch(run_id, params=new)
    client.set_tag(run_id, "ranker_config", json.dumps(to_dict(cfg.ranker), sort_keys=True))
    client.log_artifacts(run_id, str(bundle_dir / RANKER_DIR), f"{BUNDLE_ARTIFACT_PATH}/{RANKER_DIR}")
    for name in ("metrics.json", MANIFEST):
        client.log_artifact(run_id, str(bundle_dir / name), BUNDLE_ARTIFACT_PATH)


def train_ranker(
    net: TwoTowerNet,
    vocabs: Vocabs,
    split: Split,
    cfg: TowerlineConfig,
    bundle_dir: str | Path,
    *,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    progress: bool = True,
) -> RankerResult:
    """Train the ranker on ``net``'s candidates, measure the lift on test, add it to the bundle and run.

    Args:
        net: the trained retriever (the bundle's net).
        vocabs: the bundle's vocabularies.
        split: the split the retriever was trained on (same ``Split.full`` the bundle's histories hold).
        cfg: the full config; ``cfg.ranker`` drives this stage, ``cfg.trainer`` gives seed,
            accelerator and evaluation batch size.
        bundle_dir: local bundle directory; ``ranker/`` is written into it and the manifest rewritten.
        run_id: MLflow run to log into (the retriever's); None logs nothing.
        tracking_uri: MLflow tracking URI (None: the current one).
    """
    rc = cfg.ranker
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    bundle_dir = Path(bundle_dir)
    client = None
    if run_id:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri)
    ranker = build_ranker_for(net, vocabs, split, cfg)
    data = build_ranker_data(
        net, split, rc.n_candidates, rc.history_len, rc.max_positions_per_user, cfg.trainer.eval_batch_size, progress,
        train_on=rc.train_on, holdout_share=rc.holdout_share, seed=cfg.trainer.seed,
    )
    ranker, epochs = fit_ranker(ranker, data, cfg, client, run_id, progress)

    metrics = pipeline_report(score_candidates(ranker, data.test), data.test, "test", rc.bootstrap_samples, cfg.trainer.seed)
    metrics["valid/best_pipeline_ndcg_10"] = epochs.best_score
    metrics["valid/retrieval_ndcg_10"] = ranking_metrics(torch.from_numpy(data.valid.retrieval_rank), ks=(10,))["ndcg_10"]
    metrics["ranker/train_positions"] = float(len(data.train))
    metrics["ranker/train_recall"] = data.train_recall
    metrics["ranker/epochs"] = float(len(epochs.points))
    metrics["ranker/best_epoch"] = float(epochs.best_epoch)
    log.info(
        "test NDCG@10: pipeline %.4f vs retrieval %.4f, lift %.3fx [%.3f, %.3f]; recall@%d %.3f",
        metrics["test/pipeline_ndcg_10"], metrics["test/retrieval_ndcg_10"], metrics["test/pipeline_lift_ndcg_10"],
        metrics["test/pipeline_lift_ndcg_10_ci_low"], metrics["test/pipeline_lift_ndcg_10_ci_high"],
        data.test.cand.shape[1], data.test.recall,
    )
    save_ranker(ranker, bundle_dir, metrics)
    if client is not None and run_id:
        _log_to_run(client, run_id, cfg, bundle_dir, metrics)
    return RankerResult(metrics=metrics, ranker=ranker, bundle_dir=bundle_dir, curve=epochs.points)


def train_ranker_for_bundle(
    uri: str | Path,
    ranker_section: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    tracking_uri: str | None = None,
    progress: bool = True,
    register: bool = True,
) -> RankerResult:
    """``towerline train-ranker``: train the ranker of an existing bundle, logged into the bundle's MLflow run.

    The bundle's ``config.json`` is the config (its ``ranker`` section replaced by
    ``ranker_section`` when given, then ``--set`` overrides); its ``histories.npz`` (or, in older
    bundles, its data set re-read with the bundle's vocabularies) gives the same split the retriever
    was trained on. With a ``run_id`` in the manifest the ranker is logged into that run, and the
    updated bundle becomes a new registered version (``register``).
    """
    bundle = load_bundle(uri)
    data = to_dict(bundle.config)
    if ranker_section is not None:
        data["ranker"] = ranker_section
    cfg: TowerlineConfig = from_dict(TowerlineConfig, apply_overrides(data, overrides or []))
    if tracking_uri:
        cfg = from_dict(TowerlineConfig, apply_overrides(to_dict(cfg), [f"tracking.tracking_uri={tracking_uri}"]))
    if bundle.histories is not None:
        seqs = bundle.histories
    else:
        seqs = build_sequences(load_data(cfg.data).events, bundle.vocabs)
    split = make_split(seqs, cfg.data)

    run_id = bundle.manifest.get("run_id")
    uri_used = None
    if run_id:
        import mlflow
        from mlflow.exceptions import MlflowException

        uri_used = use_tracking(cfg.tracking)
        try:
            mlflow.MlflowClient(uri_used).get_run(run_id)
        except MlflowException:
            log.warning("run %s is not in the MLflow store at %s: the ranker is written to the bundle only", run_id, uri_used)
            run_id = None
    result = train_ranker(bundle.net, bundle.vocabs, split, cfg, bundle.path, run_id=run_id, tracking_uri=uri_used, progress=progress)
    if run_id and register and cfg.tracking.register:
        name = bundle.manifest.get("model_name") or cfg.tracking.model_name
        result.model_name = name
        result.model_version = register_bundle(run_id, name)
        import mlflow

        mlflow.MlflowClient(uri_used).set_tag(run_id, "model_version", result.model_version)
    return result
