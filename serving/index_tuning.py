"""Pick ANN parameters from a target recall@10 by measuring them (``towerline index --target-recall``).

Why measure instead of using rules of thumb: recall at a given ``efSearch`` or ``nprobe`` depends on
how the trained embeddings cluster, and i.i.d. Gaussian vectors (``bench/index_recall.py``) are a
far harder case than a trained catalogue. So every candidate setting is searched with the user
vectors the service will really send (``serving.recommender.user_vectors``, the one history -> vector
path) and compared against exact search over the same items.

Why two groups of users: the settings are chosen on one sample of users (``tune``) and the figures
that go into the manifest are measured on another (``held_out``), so the recorded recall is not
flattered by having picked the setting that happened to suit the sampled users. A setting must meet
the target on both.

The search is a short ladder per index kind, cheapest first, stopping one step after the target is
met (that step is the spare if the held-out users need it):

- HNSW: graph degree ``M`` in 16, 32, 48 (one build each, stopping at the first ``M`` that meets the
  target), ``efSearch`` doubling from 16 to 2048 on each graph.
- IVF with fast-scan PQ (4-bit codes, two dimensions per sub-quantizer) inside ``IndexRefineFlat``:
  one build with about 4*sqrt(N) lists; ``nprobe`` doubling from 1 up to all lists and, for each,
  the re-ranked short list ``k * k_factor_rf`` with factor 2, 4, ..., 64.

A field the caller fixed (``--hnsw-m``, ``--ef-search``, ``--nlist``, ``--nprobe``) is not varied.
Among the settings that meet the target on both groups the one with the most queries per second of
CPU time on one thread wins (CPU time, not wall clock: on a shared machine the neighbours' load
would otherwise pick the setting; both are recorded). When none does, ``ConfigError`` says the best recall reached and how to proceed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from towerline.config import IndexConfig
from towerline.errors import ConfigError
from towerline.serving.index import build_index, default_nlist, measure_recall, search, set_search_params, timed_search

log = logging.getLogger(__name__)

K = 10
HNSW_M = (16, 32, 48)
EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024, 2048)
REFINE_K_FACTORS = (2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Trial:
    """One measured setting: the build fields, FAISS search params, recall@10 and QPS on the tuning users."""

    kind: str
    build: dict[str, Any]
    params: dict[str, int]
    recall_at_10: float
    qps: float  # wall clock
    cpu_qps: float  # per second of process CPU time: what the choice uses, robust to a busy machine

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "build": self.build, "params": self.params, "recall_at_10": round(self.recall_at_10, 4),
                "qps": round(self.qps, 1), "cpu_qps": round(self.cpu_qps, 1)}


@dataclass
class Tuned:
    """The chosen index with its figures on the held-out users, and every setting tried."""

    index: faiss.Index
    cfg: IndexConfig
    chosen: Trial
    recall_at_10: float  # held-out users
    qps: float  # held-out users, one batched call per repeat, ``threads`` OpenMP threads
    cpu_qps: float
    exact_qps: float
    exact_cpu_qps: float
    build_s: float
    memory_bytes: int
    tried: list[Trial] = field(default_factory=list)


@dataclass
class _Built:
    cfg: IndexConfig
    index: faiss.Index
    build_s: float


def index_bytes(index: faiss.Index) -> int:
    """Bytes the index holds (its serialised size: codes, vectors, graph links, centroids)."""
    return int(faiss.serialize_index(index).nbytes)


def _build_configs(base: IndexConfig, kind: str, fixed: set[str], n: int, d: int) -> list[IndexConfig]:
    """The builds to try for ``kind``, cheapest first; ``fixed`` fields keep ``base``'s value."""
    if kind == "hnsw":
        ms = (base.hnsw_m,) if "hnsw_m" in fixed else HNSW_M
        return [dataclasses.replace(base, kind="hnsw", hnsw_m=m) for m in ms]
    pq_m = base.ivf_pq_m if "ivf_pq_m" in fixed and base.ivf_pq_m else (d // 2 if d % 2 == 0 else d)
    nlist = base.ivf_nlist if "ivf_nlist" in fixed and base.ivf_nlist else default_nlist(n)
    return [dataclasses.replace(base, kind="ivf", ivf_nlist=min(nlist, n), ivf_pq_m=pq_m, ivf_fast_scan=True,
                                ivf_refine_k_factor=REFINE_K_FACTORS[0])]


def _build_fields(cfg: IndexConfig) -> dict[str, Any]:
    """The ``IndexConfig`` fields a build fixes (search-time knobs are the trial's ``params``)."""
    names = (("hnsw_m", "hnsw_ef_construction", "hnsw_storage") if cfg.kind == "hnsw"
             else ("ivf_nlist", "ivf_pq_m", "ivf_fast_scan"))
    return {"kind": cfg.kind, **{name: getattr(cfg, name) for name in names}}


def _ladder(cfg: IndexConfig, fixed: set[str]) -> list[list[dict[str, int]]]:
    """Search settings in rungs of increasing cost: HNSW one ``efSearch`` per rung; IVF one ``nprobe``
    per rung, its re-ranking factors cheapest first within it."""
    if cfg.kind == "hnsw":
        efs = (cfg.hnsw_ef_search,) if "hnsw_ef_search" in fixed else EF_SEARCH
        return [[{"efSearch": ef}] for ef in efs]
    nlist = cfg.ivf_nlist
    probes = [cfg.ivf_nprobe] if "ivf_nprobe" in fixed else sorted({min(2**i, nlist) for i in range(nlist.bit_length() + 1)})
    return [[{"nprobe": p, "k_factor_rf": f} for f in REFINE_K_FACTORS] for p in probes]


def _measure(index: faiss.Index, queries: np.ndarray, exact: np.ndarray, threads: int) -> tuple[float, float, float]:
    """(recall@10 against ``exact`` labels, wall-clock QPS, CPU-time QPS) of ``index`` on ``queries`` (Q, D)."""
    labels, qps, cpu_qps = timed_search(index, queries, K, repeats=2, threads=threads)
    return measure_recall(labels, exact, K), qps, cpu_qps


def tune_index(
    vectors: np.ndarray,
    tune: np.ndarray,
    held_out: np.ndarray,
    target: float,
    *,
    base: IndexConfig = IndexConfig(),
    kinds: tuple[str, ...] = ("hnsw", "ivf"),
    fixed: frozenset[str] = frozenset(),
    threads: int = 1,
    build_threads: int | None = None,
) -> Tuned:
    """The fastest index over ``vectors`` (N, D) whose recall@10 meets ``target`` on both query sets.

    Args:
        vectors: the item embeddings, (N, D).
        tune: user vectors the settings are chosen on, (Q1, D).
        held_out: user vectors of other users, the figures' queries, (Q2, D).
        target: recall@10 in (0, 1].
        base: the model's ``index:`` config; ``fixed`` names its fields the caller set on purpose.
        kinds: index kinds to try (``hnsw``, ``ivf``).
        threads: OpenMP threads for every timed search (1: the QPS of one core).
        build_threads: OpenMP threads for the builds (default ``threads``).

    Raises ``ConfigError`` naming ``--target-recall`` and the best recall reached when no setting
    meets the target.
    """
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"--target-recall must be in (0, 1], got {target}")
    n, d = vectors.shape
    exact = build_index(vectors, IndexConfig(kind="flat"))
    exact_tune = search(exact, tune, K, threads=build_threads or threads)[1]
    tried: list[Trial] = []
    kept: list[tuple[_Built, list[Trial]]] = []  # builds with settings that met the target
    for kind in kinds:
        for cfg in _build_configs(base, kind, set(fixed), n, d):
            t0 = time.perf_counter()
            index = build_index(vectors, cfg, threads=build_threads or threads)
            built = _Built(cfg, index, time.perf_counter() - t0)
            build_fields = _build_fields(cfg)
            met: list[Trial] = []
            first_met: int | None = None
            for r, rung in enumerate(_ladder(cfg, set(fixed))):
                if first_met is not None and r > first_met + 1:
                    break  # one rung past the first that met the target: the spare for the held-out users
                previous = -1.0
                for params in rung:
                    set_search_params(index, params)
                    recall, qps, cpu_qps = _measure(index, tune, exact_tune, threads)
                    trial = Trial(kind, build_fields, dict(params), recall, qps, cpu_qps)
                    tried.append(trial)
                    log.info("%s: recall@10 %.4f, %.0f QPS", " ".join(f"{k}={v}" for k, v in {**build_fields, **params}.items()),
                             recall, cpu_qps)
                    if recall >= target:
                        met.append(trial)
                        first_met = r if first_met is None else first_met
                        break
                    if recall - previous < 0.002:
                        break  # a longer re-ranked list finds nothing more: the probed lists bound the recall
                    previous = recall
            if met:
                kept.append((built, met))
                if kind == "hnsw":
                    break  # a larger M only builds longer
    candidates = sorted(((t.cpu_qps, i, t) for i, (_, ts) in enumerate(kept) for t in ts), key=lambda c: -c[0])
    if candidates:
        exact_held = search(exact, held_out, K, threads=build_threads or threads)[1]
        _, exact_qps, exact_cpu_qps = timed_search(exact, held_out, K, repeats=2, threads=threads)
        for _, i, trial in candidates:
            built = kept[i][0]
            set_search_params(built.index, trial.params)
            recall, qps, cpu_qps = _measure(built.index, held_out, exact_held, threads)
            if recall >= target:
                cfg = _with_params(built.cfg, trial.params)
                return Tuned(built.index, cfg, trial, recall, qps, cpu_qps, exact_qps, exact_cpu_qps, built.build_s,
                             index_bytes(built.index), tried)
            log.info("%s %s: recall@10 %.4f on the held-out users is below %.3f", trial.kind, trial.params, recall, target)
    best = max(tried, key=lambda t: t.recall_at_10) if tried else None
    reached = f"best recall@10 {best.recall_at_10:.4f} ({best.kind} {best.params})" if best else "nothing was tried"
    raise ConfigError(
        f"--target-recall {target}: no {'/'.join(kinds)} setting reached it on both the tuning and the held-out users "
        f"({reached}); "
        "lower the target, leave --hnsw-m/--ef-search/--nlist/--nprobe to the search, or use --kind flat (exact)"
    )


def _with_params(cfg: IndexConfig, params: dict[str, int]) -> IndexConfig:
    """``cfg`` with the chosen search params written back into its fields (for the manifest's record)."""
    names = {"efSearch": "hnsw_ef_search", "nprobe": "ivf_nprobe"}
    changes = {names[k]: int(v) for k, v in params.items() if k in names}
    if "k_factor_rf" in params:
        changes["hnsw_refine_k_factor" if cfg.kind == "hnsw" else "ivf_refine_k_factor"] = int(params["k_factor_rf"])
    return dataclasses.replace(cfg, **changes)
