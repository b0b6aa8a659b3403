"""FAISS index over item embeddings: build, search, save, load, and measure recall.

A handful of plain functions in the style of FAISS's own Python helpers (``contrib/exhaustive_search.py``):
numpy in, numpy out, inputs coerced to contiguous ``float32`` once at the boundary, shapes checked
with messages that say what to fix. There is no index manager class: the index is a bundle file
(``index/index.faiss``) with a JSON ``manifest.json`` beside it.

Why inner product: the two towers are trained with a softmax over dot products, so the retrieval
score *is* the dot product; exact ``IndexFlatIP`` is the default because a catalogue of tens of
thousands of items is searched exhaustively in well under a millisecond per query. HNSW (Malkov &
Yashunin, 2018, "Efficient and robust approximate nearest neighbor search using Hierarchical
Navigable Small World graphs") and IVF(-PQ) (Jégou et al., 2011, "Product quantization for nearest
neighbor search") only pay off for large catalogues, and then their recall against exact search is
measured (``benchmark_index``), never assumed.

Why the manifest: an index built from another model version, dimension or a half-written file
returns plausible-looking but wrong neighbours. ``load_index`` refuses all of these loudly:
the sha256 of ``index.faiss`` must match, the file's dimension and count must match the manifest,
and the manifest must match what the caller expects (the model's dim and version).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from towerline.config import IndexConfig
from towerline.errors import BundleError, ConfigError, DataValidationError, IndexMismatchError

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
REBUILD_HINT = "rebuild it with `towerline index --model <bundle | models:/name@alias>`"
_ADD_CHUNK = 100_000  # vectors added per call, so that a long build logs its progress
_METRICS = {faiss.METRIC_INNER_PRODUCT: "inner_product", faiss.METRIC_L2: "l2"}


@contextlib.contextmanager
def _omp_threads(threads: int | None) -> Iterator[None]:
    """Run FAISS with ``threads`` OpenMP threads inside the block, then restore the previous count.

    ``None`` keeps FAISS's current setting (all cores unless someone changed it). Serve replicas and
    benchmarks pass a number so that several processes on one machine do not oversubscribe cores;
    the OpenMP setting is per calling thread, so restoring it leaves other threads alone.
    """
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _as_matrix(x: Any, name: str) -> np.ndarray:
    """Coerce to a C-contiguous float32 (N, D) matrix, the only layout FAISS accepts."""
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {arr.shape}; use x.reshape(1, -1) for one vector")
    return arr


def _unwrap(index: faiss.Index) -> faiss.Index:
    """The index that finds the candidates: IndexIDMap only translates labels, IndexRefine re-scores."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap):
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexRefine):
        index = faiss.downcast_index(index.base_index)
    return index


def _refine_of(index: faiss.Index) -> faiss.IndexRefine | None:
    """The ``IndexRefine`` re-scoring an index's candidates (under an ``IndexIDMap`` or not), else None."""
    outer = faiss.downcast_index(index)
    outer = faiss.downcast_index(outer.index) if isinstance(outer, faiss.IndexIDMap) else outer
    return outer if isinstance(outer, faiss.IndexRefine) else None


def _describe(index: faiss.Index) -> tuple[str, dict[str, int], dict[str, Any]]:
    """(kind, search params settable after load, build params for the record) of an index."""
    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexHNSW):
        hnsw = inner.hnsw
        build: dict[str, Any] = {"M": int(hnsw.nb_neighbors(1)), "efConstruction": int(hnsw.efConstruction),
                                 "storage": "sq8" if isinstance(inner, faiss.IndexHNSWSQ) else "flat"}
        search = {"efSearch": int(hnsw.efSearch)}
        refine = _refine_of(index)
        if refine is not None:
            search["k_factor_rf"] = int(refine.k_factor)
        return "hnsw", search, build
    if isinstance(inner, faiss.IndexIVF):
        fast_scan = isinstance(inner, faiss.IndexIVFPQFastScan)
        pq_m = int(inner.pq.M) if isinstance(inner, (faiss.IndexIVFPQ, faiss.IndexIVFPQFastScan)) else 0
        search = {"nprobe": int(inner.nprobe)}
        refine = _refine_of(index)
        if refine is not None:
            search["k_factor_rf"] = int(refine.k_factor)
        return "ivf", search, {"nlist": int(inner.nlist), "pq_m": pq_m, "fast_scan": fast_scan, "refine": refine is not None}
    if isinstance(inner, faiss.IndexFlat):
        return "flat", {}, {}
    raise ValueError(f"unsupported index type {type(inner).__name__}; build indexes with build_index")


def default_nlist(n: int) -> int:
    """About 4*sqrt(N) inverted lists (FAISS's guideline is 4..16*sqrt(N)), at least 1, at most N."""
    return max(1, min(n, round(4 * math.sqrt(n))))


def build_index(
    vectors: Any,
    cfg: IndexConfig = IndexConfig(),
    ids: Any = None,
    *,
    threads: int | None = None,
) -> faiss.Index:
    """Build an inner-product index over ``vectors`` (N, D) as ``cfg.kind`` says.

    - ``flat``: ``IndexFlatIP``, exact.
    - ``hnsw``: ``IndexHNSWFlat(D, cfg.hnsw_m, METRIC_INNER_PRODUCT)`` with ``efConstruction`` and
      ``efSearch`` from ``cfg``; with ``cfg.hnsw_storage == "sq8"`` the graph holds 8-bit scalar
      codes (``IndexHNSWSQ``) inside ``IndexRefineFlat``, which re-scores the graph's best
      ``k * hnsw_refine_k_factor`` against the float vectors: each visited node costs a quarter
      of the memory traffic, and the exact re-scoring takes back what the codes lose.
    - ``ivf``: ``IndexIVFFlat`` (``IndexIVFPQ`` when ``cfg.ivf_pq_m > 0``, ``IndexIVFPQFastScan`` with
      4-bit codes when ``cfg.ivf_fast_scan`` too) over an exact inner-product quantizer trained on
      ``vectors``; ``cfg.ivf_nlist == 0`` means ``default_nlist(N)``. With ``cfg.ivf_refine_k_factor``
      > 0 it sits inside ``IndexRefineFlat``: the codes find ``k * factor`` candidates cheaply (fast
      scan compares 4-bit codes with SIMD table look-ups) and the float vectors re-rank that short
      list exactly, so the PQ error costs speed, not recall.

    ``ids`` (N,) non-negative unique int64, when given, are returned by ``search`` instead of row
    numbers (flat and HNSW are wrapped in ``IndexIDMap``; IVF stores ids natively). ``threads``
    bounds FAISS's OpenMP threads for the build (None: FAISS's current setting).
    """
    x = _as_matrix(vectors, "vectors")  # (N, D)
    n, d = x.shape
    if n == 0 or d == 0:
        raise ValueError(f"vectors must hold at least one non-empty row, got shape {x.shape}")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise DataValidationError(
            f"item embeddings: {bad.size} of {n} rows hold NaN or inf (first rows: {bad[:5].tolist()}); "
            "the model that produced them has diverged, retrain it (lower the learning rate)"
        )
    labels = None
    if ids is not None:
        labels = np.ascontiguousarray(ids, dtype=np.int64)
        if labels.shape != (n,):
            raise ValueError(f"ids must have shape ({n},) to match vectors, got {labels.shape}")
        if labels.min() < 0:
            raise ValueError("ids must be >= 0: FAISS returns -1 for 'no result'")
        if np.unique(labels).size != n:
            raise ValueError("ids must be unique: a duplicated id makes search results ambiguous")

    metric = faiss.METRIC_INNER_PRODUCT
    with _omp_threads(threads):
        if cfg.kind == "flat":
            index: faiss.Index = faiss.IndexFlatIP(d)
        elif cfg.kind == "hnsw":
            index = _new_hnsw(x, cfg, metric)
        elif cfg.kind == "ivf":
            index = _new_ivf(x, cfg, metric)
        else:  # IndexConfig's Literal already rejects this; kept for configs built by hand
            raise ConfigError(f"config field 'index.kind': {cfg.kind!r} is not one of ['flat', 'hnsw', 'ivf']")

        if labels is not None and not isinstance(index, faiss.IndexIVF):
            index = faiss.IndexIDMap(index)
        t0 = time.perf_counter()
        for start in range(0, n, _ADD_CHUNK):
            stop = min(start + _ADD_CHUNK, n)
            if labels is None:
                index.add(x[start:stop])
            else:
                index.add_with_ids(x[start:stop], labels[start:stop])
            if n > _ADD_CHUNK:
                log.info("%s index: added %d/%d vectors (%.0f s)", cfg.kind, stop, n, time.perf_counter() - t0)
    log.debug("built %s index: %d vectors of dim %d in %.2f s", cfg.kind, n, d, time.perf_counter() - t0)
    return index


def _new_hnsw(x: np.ndarray, cfg: IndexConfig, metric: int) -> faiss.Index:
    """An empty HNSW index as ``cfg`` says (the SQ8 codes' ranges trained on ``x`` (N, D))."""
    d = x.shape[1]
    if cfg.hnsw_storage == "flat":
        graph = faiss.IndexHNSWFlat(d, cfg.hnsw_m, metric)
    else:
        graph = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, cfg.hnsw_m, metric)
    graph.hnsw.efConstruction = cfg.hnsw_ef_construction
    graph.hnsw.efSearch = cfg.hnsw_ef_search
    if cfg.hnsw_storage == "flat":
        return graph
    graph.train(x)
    index = faiss.IndexRefineFlat(graph)  # adds go to both: the codes and the float vectors
    index.k_factor = cfg.hnsw_refine_k_factor
    return index  # FAISS's Python wrapper keeps `graph` alive as long as `index`


def _new_ivf(x: np.ndarray, cfg: IndexConfig, metric: int) -> faiss.Index:
    """An IVF index whose coarse quantizer (and PQ codebooks) are trained on ``x`` (N, D)."""
    n, d = x.shape
    nlist = cfg.ivf_nlist or default_nlist(n)
    if nlist > n:
        log.warning("index.ivf_nlist=%d exceeds the %d vectors; using %d lists", nlist, n, n)
        nlist = n
    quantizer = faiss.IndexFlatIP(d)
    if cfg.ivf_pq_m > 0:
        if d % cfg.ivf_pq_m:
            raise ConfigError(f"config field 'index.ivf_pq_m': {cfg.ivf_pq_m} does not divide the embedding dim {d}")
        if cfg.ivf_fast_scan:  # fast scan works on 4-bit codes only: 16 centroids per sub-vector
            ivf: faiss.IndexIVF = faiss.IndexIVFPQFastScan(quantizer, d, nlist, cfg.ivf_pq_m, 4, metric)
        else:
            nbits = min(8, int(math.log2(n))) if n >= 2 else 1  # PQ trains 2**nbits centroids per sub-vector
            ivf = faiss.IndexIVFPQ(quantizer, d, nlist, cfg.ivf_pq_m, nbits, metric)
    else:
        ivf = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
    ivf.train(x)
    ivf.nprobe = min(cfg.ivf_nprobe, nlist)
    if cfg.ivf_refine_k_factor == 0:
        return ivf  # FAISS's Python wrapper keeps `quantizer` alive as long as `index`
    index = faiss.IndexRefineFlat(ivf)  # adds go to both: the codes and the float vectors
    index.k_factor = cfg.ivf_refine_k_factor
    return index


def set_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Set search-time parameters by FAISS name (``efSearch`` for HNSW, ``nprobe`` for IVF).

    Goes through ``faiss.ParameterSpace``, which reaches through ``IndexIDMap``. Raises
    ``ValueError`` naming the parameter when the index has no such knob.
    """
    space = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, float(value))
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"cannot set search parameter {name}={value!r} on {type(_unwrap(index)).__name__}: {e}") from None


def search(index: faiss.Index, queries: Any, k: int, *, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` items by inner product for each query.

    Args:
        index: from ``build_index`` or ``load_index``.
        queries: (Q, D) user vectors; coerced to contiguous float32.
        k: neighbours per query, >= 1. It may exceed the number of indexed items.

    Returns:
        ``(scores, item_idx)``: scores (Q, k) float32, best first, and item_idx (Q, k) int64 (row
        numbers, or the ``ids`` given to ``build_index``). A label of ``-1`` means "not enough
        results": ``k`` exceeds the indexed count, or an approximate index found fewer than ``k``
        (HNSW with a small ``efSearch``, IVF with a small ``nprobe``). Its score is ``-inf`` so it
        sorts last and can never pass a threshold; callers must drop ``-1`` before looking items up.
    """
    q = _as_matrix(queries, "queries")  # (Q, D)
    if q.shape[1] != index.d:
        raise IndexMismatchError(
            f"queries have dim {q.shape[1]} but the index has dim {index.d}; "
            f"the index belongs to another model, {REBUILD_HINT}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_q = q.shape[0]
    scores = np.full((n_q, k), -np.inf, dtype=np.float32)  # (Q, k)
    item_idx = np.full((n_q, k), -1, dtype=np.int64)  # (Q, k)
    k_found = min(k, index.ntotal)  # asking FAISS for more than ntotal only allocates padding
    if n_q == 0 or k_found == 0:
        return scores, item_idx
    with _omp_threads(threads):
        found_scores, found_idx = index.search(q, k_found)  # (Q, k_found) each
    scores[:, :k_found] = found_scores
    item_idx[:, :k_found] = found_idx
    scores[item_idx < 0] = -np.inf  # FAISS pads with -FLT_MAX; make "missing" unmistakable
    return scores, item_idx


def add_to_index(index: faiss.Index, vectors: Any, ids: Any, *, threads: int | None = None) -> faiss.Index:
    """A copy of ``index`` with ``vectors`` (N, D) added under labels ``ids`` (N,); ``index`` is untouched.

    Why a copy: the served ``ModelState`` keeps answering from the old index while the new one is
    built, and is swapped whole (cold-start items, ``recommender.add_items``). FAISS adds to every
    kind in place without retraining: flat appends rows, HNSW links the new nodes into the graph,
    IVF assigns them to the existing centroids (the centroids were trained on the older catalogue,
    which is fine while the new items are a small share). An index without an ``IndexIDMap``
    labels rows by position, so ``ids`` must continue its count (``ids[0] == ntotal``, contiguous).
    """
    x = _as_matrix(vectors, "vectors")  # (N, D)
    labels = np.ascontiguousarray(ids, dtype=np.int64)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"ids must have shape ({x.shape[0]},) to match vectors, got {labels.shape}")
    if x.shape[1] != index.d:
        raise IndexMismatchError(f"new vectors have dim {x.shape[1]} but the index has dim {index.d}; {REBUILD_HINT}")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise DataValidationError(f"new item vectors: rows {bad[:5].tolist()} hold NaN or inf")
    copy = faiss.deserialize_index(faiss.serialize_index(index))
    if x.shape[0] == 0:
        return copy
    outer = faiss.downcast_index(copy)
    with _omp_threads(threads):
        if isinstance(outer, faiss.IndexIDMap):
            outer.add_with_ids(x, labels)
        else:
            expected = np.arange(copy.ntotal, copy.ntotal + x.shape[0], dtype=np.int64)
            if not np.array_equal(labels, expected):
                raise ValueError(
                    f"this index labels rows by position: new ids must be {copy.ntotal}..{copy.ntotal + x.shape[0] - 1}, "
                    f"got {labels[:3].tolist()}..."
                )
            copy.add(x)
    log.debug("added %d vectors to a %s index (now %d)", x.shape[0], _describe(copy)[0], copy.ntotal)
    return copy


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem can fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_path(directory: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def save_index(index: faiss.Index, directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``index.faiss`` and ``manifest.json`` into ``directory``; return the index file's path.

    ``manifest`` carries what only the caller knows (``model_name``, ``model_version``, anything
    else JSON-serialisable); this function adds what the index says about itself: ``dim``,
    ``metric`` ("inner_product"), ``count``, ``kind``, ``params`` (search-time knobs such as
    ``efSearch``/``nprobe``, applied again by ``load_index``), ``build``, ``created_at`` (UTC),
    ``faiss_version`` and the ``sha256`` of ``index.faiss``. A caller-given ``dim``, ``count``,
    ``metric`` or ``kind`` that disagrees with the index raises ``IndexMismatchError``.

    Both files are written to temporary files in the same directory, flushed to disk, then moved
    over the old ones with ``os.replace`` (atomic on POSIX). If anything fails before the moves, the
    previous index and manifest are untouched and the temporary files are removed. A crash between
    the two moves leaves a new index beside the old manifest, which ``load_index`` refuses on the
    checksum: a failed save is loud, never a silently mismatched pair.
    """
    directory = Path(directory)
    kind, params, build = _describe(index)
    facts: dict[str, Any] = {
        "dim": int(index.d),
        "metric": _METRICS.get(index.metric_type, str(index.metric_type)),
        "count": int(index.ntotal),
        "kind": kind,
    }
    for key, value in facts.items():
        if key in manifest and manifest[key] != value:
            raise IndexMismatchError(f"save_index: manifest field '{key}' is {manifest[key]!r} but the index has {value!r}")
    record: dict[str, Any] = {"model_name": None, "model_version": None, **manifest, **facts}
    record.update(params=params, build=build, faiss_version=faiss.__version__)
    record["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        json.dumps(record)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_index: manifest must be JSON-serialisable: {e}") from None

    directory.mkdir(parents=True, exist_ok=True)
    index_tmp = manifest_tmp = None
    try:
        index_tmp = _temp_path(directory, INDEX_FILE)
        faiss.write_index(index, str(index_tmp))
        _fsync_file(index_tmp)
        record["sha256"] = _sha256(index_tmp)
        manifest_tmp = _temp_path(directory, MANIFEST_FILE)
        manifest_tmp.write_text(json.dumps(record, indent=2) + "\n")
        _fsync_file(manifest_tmp)
        os.replace(index_tmp, directory / INDEX_FILE)
        index_tmp = None
        os.replace(manifest_tmp, directory / MANIFEST_FILE)
        manifest_tmp = None
        _fsync_dir(directory)
    finally:
        for tmp in (index_tmp, manifest_tmp):
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    log.info("saved %s index (%d vectors, dim %d) to %s", kind, record["count"], record["dim"], directory)
    return directory / INDEX_FILE


def _same(expected: Any, found: Any) -> bool:
    """Equal, or equal as text: MLflow model versions are strings, callers often pass ints."""
    return expected == found or (found is not None and str(expected) == str(found))


def load_index(directory: str | Path, expect: dict[str, Any] | None = None) -> tuple[faiss.Index, dict[str, Any]]:
    """Load ``index.faiss`` from ``directory`` after checking it against ``manifest.json``.

    Checks, in order: both files exist (else ``BundleError`` naming the path); the file's sha256
    equals the manifest's (a corrupt, truncated or replaced file raises ``IndexMismatchError``);
    the loaded index's dim, count, metric and kind equal the manifest's; every ``expect`` field
    (e.g. ``{"dim": 64, "model_version": "3", "count": 12103}``) equals the manifest's, else
    ``IndexMismatchError`` naming each field with the expected and found values. Then the
    manifest's ``params`` (``efSearch``/``nprobe``) are applied, so a search knob can be tuned by
    editing the manifest without a rebuild (the checksum covers the index file only).

    The file is read into memory once and both hashed and deserialised from that buffer, so a save
    racing with this load cannot pair the checked bytes with other ones. Nothing is unpickled: the
    manifest is JSON and the index is FAISS's own binary format.
    """
    directory = Path(directory)
    index_path, manifest_path = directory / INDEX_FILE, directory / MANIFEST_FILE
    for path in (manifest_path, index_path):
        if not path.is_file():
            raise BundleError(f"{path} not found; {REBUILD_HINT} --out {directory}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{manifest_path} is not valid JSON ({e}); {REBUILD_HINT}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} must hold a JSON object; {REBUILD_HINT}")
    missing = [key for key in ("dim", "metric", "count", "kind", "sha256") if key not in manifest]
    if missing:
        raise BundleError(f"{manifest_path} lacks field(s) {', '.join(missing)}; {REBUILD_HINT}")

    data = np.fromfile(index_path, dtype=np.uint8)  # (bytes,)
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest["sha256"]:
        raise IndexMismatchError(
            f"{index_path} sha256 {digest} does not match manifest {manifest['sha256']} "
            f"({manifest_path}); the file is corrupt, truncated or from another build, {REBUILD_HINT}"
        )
    try:
        index = faiss.deserialize_index(data)
    except RuntimeError as e:
        raise IndexMismatchError(
            f"{index_path} matches its checksum but FAISS {faiss.__version__} cannot read it "
            f"(written by FAISS {manifest.get('faiss_version')}): {str(e).splitlines()[0]}; {REBUILD_HINT}"
        ) from None
    del data

    kind, _, _ = _describe(index)
    found = {"dim": int(index.d), "count": int(index.ntotal), "metric": _METRICS.get(index.metric_type), "kind": kind}
    problems = [
        f"manifest field '{key}' is {manifest[key]!r} but {INDEX_FILE} has {value!r}"
        for key, value in found.items()
        if not _same(manifest[key], value)
    ]
    problems += [
        f"field '{key}': expected {value!r}, found {manifest.get(key)!r}"
        for key, value in (expect or {}).items()
        if not _same(value, manifest.get(key))
    ]
    if problems:
        raise IndexMismatchError(f"index in {directory} does not match: " + "; ".join(problems) + f"; {REBUILD_HINT}")

    params = manifest.get("params") or {}
    try:
        set_search_params(index, params)
    except ValueError as e:
        raise BundleError(f"{manifest_path} field 'params': {e}") from None
    log.info("loaded %s index from %s: %d vectors, dim %d, params %s", kind, directory, index.ntotal, index.d, params)
    return index, manifest


def measure_recall(approx_idx: Any, exact_idx: Any, k: int) -> float:
    """Recall@k of an approximate search against exact search, averaged over queries.

    For each query, |approx top-k ∩ exact top-k| / |exact top-k|, where ``-1`` labels ("not enough
    results") are never hits and the denominator is ``k`` unless the index holds fewer items. This
    is the intersection measure of FAISS's ``contrib/evaluation.py:knn_intersection_measure``, not the
    1-recall@k of the FAISS benchmarks, because a recommender serves all k items, not just the first.

    Args:
        approx_idx: (Q, >= k) labels from the approximate index.
        exact_idx: (Q, >= k) labels from exact search over the same items.
    """
    approx = np.asarray(approx_idx, dtype=np.int64)
    exact = np.asarray(exact_idx, dtype=np.int64)
    if approx.ndim != 2 or exact.ndim != 2 or approx.shape[0] != exact.shape[0]:
        raise ValueError(f"need two (Q, k) label arrays with the same Q, got {approx.shape} and {exact.shape}")
    if k < 1 or approx.shape[1] < k or exact.shape[1] < k:
        raise ValueError(f"k={k} must be >= 1 and at most the columns of both arrays ({approx.shape[1]}, {exact.shape[1]})")
    recalls = []
    for a, e in zip(approx[:, :k], exact[:, :k]):  # (k,), (k,)
        truth = e[e >= 0]
        if truth.size:
            recalls.append(np.intersect1d(a[a >= 0], truth).size / truth.size)
    if not recalls:
        raise ValueError("exact search returned no results: the index is empty")
    return float(np.mean(recalls))


def timed_search(
    index: faiss.Index, q: np.ndarray, k: int, repeats: int, *, threads: int | None = None
) -> tuple[np.ndarray, float, float]:
    """Labels, wall-clock QPS and CPU-time QPS of one batched search, each the best of ``repeats``.

    CPU time (``time.process_time``: all threads of this process) is reported beside wall time
    because on a shared machine wall time mostly measures the neighbours' load; with one thread,
    CPU-time QPS is the algorithm's own throughput. With several threads it counts OpenMP's
    spin-waiting too, so it is then a lower bound.
    """
    best_wall = best_cpu = math.inf
    labels = np.empty((0, k), dtype=np.int64)
    for _ in range(repeats):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        _, labels = search(index, q, k, threads=threads)
        best_wall = min(best_wall, time.perf_counter() - wall0)
        best_cpu = min(best_cpu, time.process_time() - cpu0)
    n_q = q.shape[0]
    return labels, n_q / best_wall, n_q / max(best_cpu, 1e-9)


def benchmark_index(
    index: faiss.Index,
    exact_index: faiss.Index,
    queries: Any,
    k: int = 10,
    *,
    threads: int | None = None,
    repeats: int = 3,
) -> dict[str, Any]:
    """Recall@k of ``index`` against ``exact_index`` and both indexes' queries per second.

    All queries go to FAISS in one batched call per index, with the same OpenMP thread count for
    both, timed as the best of ``repeats`` calls; so ``qps`` is throughput under batching, which
    flatters exact search (it becomes one BLAS matrix product) and is the fair comparison for a
    server that batches requests (``serve.batch``).

    Returns ``{"k", "recall_at_<k>", "qps", "exact_qps", "speedup", "cpu_qps", "exact_cpu_qps",
    "cpu_speedup", "n_queries", "threads"}``; the ``cpu_*`` figures divide by process CPU time
    instead of wall time (see ``timed_search``), which a busy shared machine distorts far less.
    """
    q = _as_matrix(queries, "queries")  # (Q, D)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    with _omp_threads(threads):
        used_threads = faiss.omp_get_max_threads()
        exact_labels, exact_qps, exact_cpu_qps = timed_search(exact_index, q, k, repeats)
        labels, qps, cpu_qps = timed_search(index, q, k, repeats)
    return {
        "k": k,
        f"recall_at_{k}": measure_recall(labels, exact_labels, k),
        "qps": qps,
        "exact_qps": exact_qps,
        "speedup": qps / exact_qps,
        "cpu_qps": cpu_qps,
        "exact_cpu_qps": exact_cpu_qps,
        "cpu_speedup": cpu_qps / exact_cpu_qps,
        "n_queries": int(q.shape[0]),
        "threads": used_threads,
    }
