"""Build, measure and save the FAISS index of a trained model (``towerline index``, the quickstart).

The index parameters come from the model's own config (the ``index:`` section it was trained
with), with the caller's overrides on top: ``towerline index`` flags change single fields, so a
team sets its index once in the training YAML and every build of that model follows it.
Approximate kinds are measured against exact search on the user vectors of sampled users (the
queries the service will really send), and the figures go into the index manifest.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from towerline.config import IndexConfig
from towerline.serving.index import benchmark_index, build_index, save_index
from towerline.serving.recommender import training_histories, user_vectors
from towerline.training.bundle import load_bundle


def build_model_index(
    model: str,
    out: Path | None = None,
    overrides: dict[str, Any] | None = None,
    n_queries: int = 1000,
    threads: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Build, measure (approximate kinds) and save an index for ``model``; returns a report.

    ``overrides``: ``IndexConfig`` fields (``kind``, ``hnsw_m``, ...) replacing the model config's.
    """
    torch.set_num_threads(threads)
    bundle = load_bundle(model)
    cfg = dataclasses.replace(bundle.config.index, **(overrides or {}))
    kind = cfg.kind
    emb = bundle.item_embeddings  # (V, D)
    t0 = time.perf_counter()
    index = build_index(emb, cfg, threads=threads)
    build_s = time.perf_counter() - t0
    report: dict[str, Any] = {"kind": kind, "count": int(emb.shape[0]), "dim": bundle.dim, "build_s": round(build_s, 3),
                              "config": dataclasses.asdict(cfg)}
    if kind != "flat" and bundle.histories is not None and len(bundle.histories):
        rng = np.random.default_rng(seed)
        rows = rng.choice(len(bundle.histories), size=min(n_queries, len(bundle.histories)), replace=False)
        queries = np.concatenate([user_vectors(bundle, training_histories(bundle, chunk))
                                  for chunk in np.array_split(rows, max(1, len(rows) // 256))])  # (Q, D)
        exact = build_index(emb, IndexConfig(kind="flat"))
        bench = benchmark_index(index, exact, queries, k=10, threads=threads)
        report.update({k: bench[k] for k in ("recall_at_10", "qps", "exact_qps", "speedup", "n_queries")})
    if out is None:
        local = not str(model).startswith(("runs:/", "models:/"))
        out = Path(model) / "index" if local else Path("indexes") / f"{bundle.model_name}-v{bundle.model_version}"
    manifest = {"model_name": bundle.model_name, "model_version": bundle.model_version, "model_uri": str(model),
                **{k: report[k] for k in ("recall_at_10", "qps", "exact_qps") if k in report}}
    save_index(index, out, manifest)
    report["out"] = str(out)
    return report
