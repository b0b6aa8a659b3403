"""Build, measure and save the FAISS index of a trained model (``towerline index``, the quickstart).

The index parameters come from the model's own config (the ``index:`` section it was trained
with), with the caller's overrides on top: ``towerline index`` flags change single fields, so a
team sets its index once in the training YAML and every build of that model follows it.
Approximate kinds are measured against exact search on the user vectors of sampled users (the
queries the service will really send), and the figures go into the index manifest.

With ``target_recall`` the parameters are not taken but searched for (``serving.index_tuning``):
the sampled users are split in two, settings are chosen on one half and the manifest's figures
(recall@10, QPS on ``threads`` threads, build time, memory, every setting tried) are measured on the
other, the held-out half. The chosen search parameters are the manifest's ``params``, which
``load_index`` applies, so the served index runs with what was measured.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from towerline.config import IndexConfig
from towerline.errors import ConfigError
from towerline.serving.index import benchmark_index, build_index, save_index
from towerline.serving.index_tuning import index_bytes, tune_index
from towerline.serving.recommender import training_histories, user_vectors
from towerline.training.bundle import Bundle, load_bundle

FIGURES = ("recall_at_10", "qps", "cpu_qps", "exact_qps", "exact_cpu_qps", "speedup", "build_s", "memory_bytes",
           "n_queries", "threads", "target_recall", "tuning")


def sampled_user_vectors(bundle: Bundle, n: int, seed: int = 0) -> np.ndarray:
    """(Q, D) user vectors of ``n`` users drawn at random (seeded) from the bundle's histories, the
    vector ``/recommend`` computes for each (their whole training history, ``user_vectors``)."""
    hist = bundle.histories
    if hist is None or not len(hist):
        raise ConfigError("the bundle holds no user histories (histories.npz): there are no user vectors to measure on")
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(hist), size=min(n, len(hist)), replace=False)
    return np.concatenate([user_vectors(bundle, training_histories(bundle, chunk))
                           for chunk in np.array_split(rows, max(1, len(rows) // 256))])  # (Q, D)


def build_model_index(
    model: str,
    out: Path | None = None,
    overrides: dict[str, Any] | None = None,
    n_queries: int = 1000,
    threads: int = 1,
    seed: int = 0,
    *,
    target_recall: float | None = None,
    build_threads: int | None = None,
) -> dict[str, Any]:
    """Build, measure (approximate kinds) and save an index for ``model``; returns a report.

    ``overrides``: ``IndexConfig`` fields (``kind``, ``hnsw_m``, ...) replacing the model config's.
    ``target_recall``: search the parameters for the fastest index with at least this recall@10
    (``overrides`` then fix the fields they name; without a ``kind`` override HNSW and IVF-PQ both
    compete unless the model's config names an approximate kind). ``threads``: OpenMP threads of the
    measured searches (1: the queries per second of one core); ``build_threads``: of the builds.
    """
    overrides = dict(overrides or {})
    if target_recall is not None and not 0.0 < target_recall <= 1.0:
        raise ConfigError(f"--target-recall must be in (0, 1], got {target_recall}")
    torch.set_num_threads(threads)
    bundle = load_bundle(model)
    cfg = dataclasses.replace(bundle.config.index, **overrides)
    emb = bundle.item_embeddings  # (V, D)
    report: dict[str, Any] = {"count": int(emb.shape[0]), "dim": bundle.dim, "threads": threads}
    if target_recall is not None and overrides.get("kind") != "flat":
        kinds = (cfg.kind,) if cfg.kind != "flat" else ("hnsw", "ivf")
        queries = sampled_user_vectors(bundle, n_queries, seed)
        half = max(1, len(queries) // 2)
        tuned = tune_index(emb, queries[:half], queries[half:] if len(queries) > 1 else queries, target_recall,
                           base=cfg, kinds=kinds, fixed=frozenset(overrides) - {"kind"}, threads=threads,
                           build_threads=build_threads)
        index, cfg = tuned.index, tuned.cfg
        report.update(recall_at_10=tuned.recall_at_10, qps=tuned.qps, cpu_qps=tuned.cpu_qps, exact_qps=tuned.exact_qps,
                      exact_cpu_qps=tuned.exact_cpu_qps, speedup=tuned.qps / tuned.exact_qps,
                      build_s=round(tuned.build_s, 3), memory_bytes=tuned.memory_bytes, n_queries=len(queries) - half,
                      target_recall=target_recall,
                      tuning={"tune_users": half, "held_out_users": len(queries) - half, "seed": seed,
                              "chosen": tuned.chosen.record(), "tried": [t.record() for t in tuned.tried]})
    else:
        t0 = time.perf_counter()
        index = build_index(emb, cfg, threads=build_threads or threads)
        report.update(build_s=round(time.perf_counter() - t0, 3), memory_bytes=index_bytes(index))
        if target_recall is not None:  # --kind flat: exact search meets any target
            report.update(recall_at_10=1.0, target_recall=target_recall)
        if cfg.kind != "flat" and bundle.histories is not None and len(bundle.histories):
            queries = sampled_user_vectors(bundle, n_queries, seed)
            exact = build_index(emb, IndexConfig(kind="flat"))
            bench = benchmark_index(index, exact, queries, k=10, threads=threads)
            report.update({k: bench[k] for k in ("recall_at_10", "qps", "cpu_qps", "exact_qps", "exact_cpu_qps",
                                                  "speedup", "n_queries")})
    report.update(kind=cfg.kind, config=dataclasses.asdict(cfg))
    if out is None:
        local = not str(model).startswith(("runs:/", "models:/"))
        out = Path(model) / "index" if local else Path("indexes") / f"{bundle.model_name}-v{bundle.model_version}"
    manifest = {"model_name": bundle.model_name, "model_version": bundle.model_version, "model_uri": str(model),
                **{k: report[k] for k in FIGURES if k in report}}
    save_index(index, out, manifest)
    report["out"] = str(out)
    return report
