"""serving/index.py: exactness against numpy, recall of HNSW/IVF, and the manifest's refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from towerline.config import IndexConfig
from towerline.errors import BundleError, ConfigError, DataValidationError, IndexMismatchError
from towerline.serving import index as ix
from towerline.serving.index import (
    benchmark_index,
    build_index,
    default_nlist,
    load_index,
    measure_recall,
    save_index,
    search,
)

DIM = 16


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """The test machine is shared: one OpenMP thread, restored afterwards."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def gaussian(n: int, seed: int, d: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


@pytest.fixture
def items() -> np.ndarray:
    return gaussian(2000, seed=0)  # (N, D)


@pytest.fixture
def queries() -> np.ndarray:
    return gaussian(50, seed=1)  # (Q, D)


def brute_force(items: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ items.T.astype(np.float64)  # (Q, N)
    order = np.argsort(-scores, axis=1)[:, :k]  # (Q, k)
    return np.take_along_axis(scores, order, axis=1), order


def saved(tmp_path: Path, items: np.ndarray, kind: str = "flat", **manifest) -> Path:
    directory = tmp_path / "index"
    save_index(build_index(items, IndexConfig(kind=kind)), directory, {"model_name": "m", "model_version": "3", **manifest})
    return directory


# --- build and search -------------------------------------------------------------------------


def test_flat_search_equals_numpy_brute_force(items, queries):
    scores, item_idx = search(build_index(items), queries, k=10)
    want_scores, want_idx = brute_force(items, queries, k=10)
    assert scores.shape == item_idx.shape == (50, 10)
    assert scores.dtype == np.float32 and item_idx.dtype == np.int64
    np.testing.assert_array_equal(item_idx, want_idx)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)


def test_float64_and_non_contiguous_inputs_are_coerced(items, queries):
    fortran_items = np.asfortranarray(items.astype(np.float64))
    strided_queries = np.repeat(queries, 2, axis=1)[:, ::2]  # same values, non-contiguous view
    _, got = search(build_index(fortran_items), strided_queries, k=5)
    np.testing.assert_array_equal(got, brute_force(items, queries, k=5)[1])


def test_ids_replace_row_numbers_in_results(items, queries):
    ids = np.arange(len(items)) + 1000
    _, want = brute_force(items, queries, k=10)
    for kind in ("flat", "ivf"):
        cfg = IndexConfig(kind=kind, ivf_nprobe=default_nlist(len(items)))  # nprobe = nlist: exhaustive
        _, got = search(build_index(items, cfg, ids=ids), queries, k=10)
        np.testing.assert_array_equal(got, want + 1000, err_msg=kind)


def test_duplicate_or_negative_ids_are_refused(items):
    with pytest.raises(ValueError, match="unique"):
        build_index(items, ids=np.zeros(len(items), dtype=np.int64))
    with pytest.raises(ValueError, match=">= 0"):
        build_index(items, ids=np.arange(len(items)) - 1)


def test_hnsw_recall_against_exact_is_high(items, queries):
    cfg = IndexConfig(kind="hnsw", hnsw_m=16, hnsw_ef_construction=100, hnsw_ef_search=128)
    _, approx = search(build_index(items, cfg), queries, k=10)
    assert measure_recall(approx, brute_force(items, queries, k=10)[1], k=10) > 0.9


def test_hnsw_over_sq8_codes_rescored_exactly_keeps_recall_and_exact_scores(tmp_path, items, queries):
    cfg = IndexConfig(kind="hnsw", hnsw_m=16, hnsw_ef_construction=100, hnsw_ef_search=128, hnsw_storage="sq8",
                      hnsw_refine_k_factor=3)
    index = build_index(items, cfg, ids=np.arange(len(items)) + 7)
    refine = faiss.downcast_index(faiss.downcast_index(index).index)
    assert isinstance(refine, faiss.IndexRefineFlat) and isinstance(faiss.downcast_index(refine.base_index), faiss.IndexHNSWSQ)
    scores, got = search(index, queries, k=10)
    assert measure_recall(got - 7, brute_force(items, queries, k=10)[1], k=10) > 0.9
    exact_scores = np.einsum("qd,qkd->qk", queries, items[got - 7])  # re-scored: float dot products, not codes
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-5)
    save_index(index, tmp_path, {"model_version": "1"})
    loaded, manifest = load_index(tmp_path)
    assert manifest["params"] == {"efSearch": 128, "k_factor_rf": 3} and manifest["build"]["storage"] == "sq8"
    np.testing.assert_array_equal(search(loaded, queries, k=10)[1], got)


def test_ivf_recall_against_exact_is_high(items, queries):
    cfg = IndexConfig(kind="ivf", ivf_nprobe=48)  # default nlist = 179 lists for 2000 items
    index = build_index(items, cfg)
    assert faiss.downcast_index(index).nlist == default_nlist(len(items)) == 179
    _, approx = search(index, queries, k=10)
    assert measure_recall(approx, brute_force(items, queries, k=10)[1], k=10) > 0.9


def test_ivf_pq_with_one_dimension_per_subquantizer_keeps_recall(items, queries):
    index = build_index(items, IndexConfig(kind="ivf", ivf_nprobe=48, ivf_pq_m=DIM))
    assert isinstance(faiss.downcast_index(index), faiss.IndexIVFPQ)
    _, approx = search(index, queries, k=10)
    assert measure_recall(approx, brute_force(items, queries, k=10)[1], k=10) > 0.9


def test_ivf_pq_m_that_does_not_divide_dim_is_a_config_error(items):
    with pytest.raises(ConfigError, match="ivf_pq_m.*5.*16"):
        build_index(items, IndexConfig(kind="ivf", ivf_pq_m=5))


def test_nlist_never_exceeds_the_number_of_items():
    assert default_nlist(1) == 1 and default_nlist(10) == 10 and default_nlist(10_000) == 400
    index = build_index(gaussian(30, seed=2), IndexConfig(kind="ivf", ivf_nlist=500))
    assert faiss.downcast_index(index).nlist == 30


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_k_larger_than_item_count_pads_with_minus_one(kind):
    few = gaussian(5, seed=3)
    scores, item_idx = search(build_index(few, IndexConfig(kind=kind)), gaussian(3, seed=4), k=8)
    assert item_idx.shape == scores.shape == (3, 8)
    for row, row_scores in zip(item_idx, scores):
        assert sorted(row[:5].tolist()) == [0, 1, 2, 3, 4]
        assert (row[5:] == -1).all()
        assert np.isneginf(row_scores[5:]).all() and np.isfinite(row_scores[:5]).all()


def test_ivf_that_finds_fewer_than_k_marks_the_rest_missing():
    few = gaussian(30, seed=6)
    index = build_index(few, IndexConfig(kind="ivf", ivf_nlist=30, ivf_nprobe=1))  # ~1 item per list, 1 list probed
    scores, item_idx = search(index, gaussian(4, seed=7), k=10)
    missing = item_idx == -1
    assert missing.any() and not missing[:, 0].any()  # some results missing, yet a hit for every query
    assert np.isneginf(scores[missing]).all() and np.isfinite(scores[~missing]).all()


def test_query_with_the_wrong_dim_is_an_index_mismatch(items):
    with pytest.raises(IndexMismatchError, match="dim 8 but the index has dim 16"):
        search(build_index(items), gaussian(2, seed=5, d=8), k=3)


def test_one_dimensional_query_is_refused_with_a_reshape_hint(items):
    with pytest.raises(ValueError, match="reshape"):
        search(build_index(items), items[0], k=3)


def test_non_finite_embeddings_are_reported_with_their_rows(items):
    items[[7, 42]] = np.nan
    with pytest.raises(DataValidationError, match=r"2 of 2000 rows.*\[7, 42\]"):
        build_index(items)


# --- recall and benchmark ---------------------------------------------------------------------


def test_measure_recall_counts_the_intersection_and_ignores_missing_labels():
    exact = np.array([[1, 2, 9], [4, 5, 6]])
    assert measure_recall(exact, exact, k=3) == 1.0
    assert measure_recall(np.array([[2, 1, 3], [4, 5, -1]]), exact, k=3) == pytest.approx(2 / 3)
    assert measure_recall(np.array([[-1, -1, -1], [6, 5, 4]]), exact, k=3) == pytest.approx(0.5)
    # fewer items than k: the denominator is what exact search could return
    assert measure_recall(np.array([[3, 1, -1]]), np.array([[1, 3, -1]]), k=3) == 1.0


def test_benchmark_reports_recall_and_throughput(items, queries):
    exact = build_index(items)
    report = benchmark_index(build_index(items, IndexConfig(kind="hnsw", hnsw_m=8, hnsw_ef_search=1)), exact, queries, k=10, threads=1, repeats=1)
    assert set(report) >= {"recall_at_10", "qps", "exact_qps", "speedup", "threads"}
    assert 0 < report["recall_at_10"] < 1  # efSearch=1 on a 2000-item graph misses neighbours
    assert report["qps"] > 0 and report["exact_qps"] > 0 and report["threads"] == 1
    assert benchmark_index(exact, exact, queries, repeats=1)["recall_at_10"] == 1.0


# --- save and load ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_load_round_trip_returns_the_same_results(tmp_path, items, queries, kind):
    index = build_index(items, IndexConfig(kind=kind))
    before = search(index, queries, k=10)
    path = save_index(index, tmp_path / "index", {"model_name": "m", "model_version": "3", "source": "unit test"})
    loaded, manifest = load_index(tmp_path / "index", expect={"dim": DIM, "model_version": "3", "count": 2000})
    after = search(loaded, queries, k=10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    assert manifest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["kind"] == kind and manifest["metric"] == "inner_product"
    assert (manifest["dim"], manifest["count"], manifest["model_name"], manifest["source"]) == (DIM, 2000, "m", "unit test")
    assert manifest["faiss_version"] == faiss.__version__ and manifest["created_at"].endswith("+00:00")


def test_search_params_in_the_manifest_are_applied_on_load(tmp_path, items):
    directory = saved(tmp_path, items, kind="hnsw")
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["params"] == {"efSearch": IndexConfig().hnsw_ef_search}
    manifest["params"]["efSearch"] = 33  # tuning without a rebuild: the checksum covers index.faiss only
    (directory / "manifest.json").write_text(json.dumps(manifest))
    loaded, _ = load_index(directory)
    assert faiss.downcast_index(loaded).hnsw.efSearch == 33


def test_hnsw_with_ids_keeps_ids_and_params_through_save_and_load(tmp_path, items, queries):
    cfg = IndexConfig(kind="hnsw", hnsw_ef_search=200)
    index = build_index(items, cfg, ids=np.arange(len(items)) + 7)
    save_index(index, tmp_path, {"model_version": "1"})
    loaded, manifest = load_index(tmp_path)
    assert manifest["kind"] == "hnsw" and manifest["params"] == {"efSearch": 200}
    assert manifest["build"] == {"M": cfg.hnsw_m, "efConstruction": cfg.hnsw_ef_construction, "storage": "flat"}
    _, got = search(loaded, queries, k=10)
    np.testing.assert_array_equal(got, search(index, queries, k=10)[1])
    assert got.min() >= 7


def test_unknown_search_param_in_the_manifest_is_a_bundle_error(tmp_path, items):
    directory = saved(tmp_path, items, kind="flat")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["params"] = {"efSearch": 10}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="params.*efSearch"):
        load_index(directory)


def test_flipped_byte_in_index_file_is_refused(tmp_path, items):
    directory = saved(tmp_path, items)
    data = bytearray((directory / "index.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (directory / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(IndexMismatchError, match=r"index.faiss sha256 \w+ does not match manifest .*towerline index"):
        load_index(directory)


def test_truncated_index_file_is_refused(tmp_path, items):
    directory = saved(tmp_path, items)
    data = (directory / "index.faiss").read_bytes()
    (directory / "index.faiss").write_bytes(data[: len(data) // 3])
    with pytest.raises(IndexMismatchError, match="sha256"):
        load_index(directory)


@pytest.mark.parametrize(
    ("expect", "field", "expected", "found"),
    [({"dim": 64}, "dim", "64", "16"), ({"model_version": "4"}, "model_version", "'4'", "'3'"), ({"count": 12103}, "count", "12103", "2000")],
)
def test_expectation_mismatch_names_field_expected_and_found(tmp_path, items, expect, field, expected, found):
    directory = saved(tmp_path, items)
    with pytest.raises(IndexMismatchError, match=f"field '{field}': expected {expected}, found {found}"):
        load_index(directory, expect=expect)


def test_model_version_given_as_int_matches_its_string(tmp_path, items):
    _, manifest = load_index(saved(tmp_path, items), expect={"model_version": 3})
    assert manifest["model_version"] == "3"


def test_manifest_that_disagrees_with_the_file_is_refused(tmp_path, items):
    directory = saved(tmp_path, items)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["dim"] = 64
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match="manifest field 'dim' is 64 but index.faiss has 16"):
        load_index(directory)


def test_missing_files_are_bundle_errors_naming_the_path(tmp_path, items):
    with pytest.raises(BundleError, match=str(tmp_path / "nowhere" / "manifest.json")):
        load_index(tmp_path / "nowhere")
    directory = saved(tmp_path, items)
    (directory / "index.faiss").unlink()
    with pytest.raises(BundleError, match=str(directory / "index.faiss")):
        load_index(directory)


def test_manifest_that_is_not_json_is_a_bundle_error(tmp_path, items):
    directory = saved(tmp_path, items)
    (directory / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_index(directory)


def test_save_refuses_a_manifest_dim_that_disagrees_with_the_index(tmp_path, items):
    with pytest.raises(IndexMismatchError, match="'dim' is 64 but the index has 16"):
        save_index(build_index(items), tmp_path, {"dim": 64})
    assert list(tmp_path.iterdir()) == []


def test_save_leaves_exactly_two_files(tmp_path, items):
    directory = saved(tmp_path, items)
    save_index(build_index(items[:100]), directory, {"model_version": "4"})  # overwrite in place
    assert sorted(p.name for p in directory.iterdir()) == ["index.faiss", "manifest.json"]
    load_index(directory, expect={"count": 100, "model_version": "4"})


def test_failed_write_keeps_the_existing_index_and_leaves_no_temp_files(tmp_path, items, queries, monkeypatch):
    directory = saved(tmp_path, items)
    before_bytes = (directory / "index.faiss").read_bytes()
    before = search(load_index(directory)[0], queries, k=10)

    def disk_full(index, path):  # writes part of the file, then fails like a full disk
        Path(path).write_bytes(b"IxF2 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ix.faiss, "write_index", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_index(build_index(items[:10]), directory, {"model_version": "4"})
    monkeypatch.undo()

    assert sorted(p.name for p in directory.iterdir()) == ["index.faiss", "manifest.json"]
    assert (directory / "index.faiss").read_bytes() == before_bytes
    loaded, manifest = load_index(directory, expect={"model_version": "3", "count": 2000})
    np.testing.assert_array_equal(search(loaded, queries, k=10)[1], before[1])


def test_manifest_that_is_not_json_serialisable_is_refused_before_writing(tmp_path, items):
    directory = saved(tmp_path, items)
    before_bytes = (directory / "index.faiss").read_bytes()
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_index(build_index(items[:10]), directory, {"model_version": object()})
    assert sorted(p.name for p in directory.iterdir()) == ["index.faiss", "manifest.json"]
    assert (directory / "index.faiss").read_bytes() == before_bytes


def test_index_command_follows_the_models_index_section_and_flags_override_it(tmp_path, capsys):
    """``towerline index`` reads the ``index:`` section the model was trained with; a flag changes one field."""
    from support import train_tiny
    from towerline.cli import main

    run = train_tiny(tmp_path, ["index.kind=hnsw", "index.hnsw_m=8", "index.hnsw_ef_search=32"])
    assert main(["index", "--model", str(run.bundle_dir), "--out", str(tmp_path / "a"), "--queries", "50"]) == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["kind"] == "hnsw" and manifest["params"]["efSearch"] == 32
    assert main(["index", "--model", str(run.bundle_dir), "--out", str(tmp_path / "b"), "--ef-search", "64"]) == 0
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["params"]["efSearch"] == 64
    assert main(["index", "--model", str(run.bundle_dir), "--out", str(tmp_path / "c"), "--kind", "flat"]) == 0
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["kind"] == "flat"
    out = capsys.readouterr().out
    assert "over 60 items" in out  # the catalogue's items, not the two reserved rows


def test_ivf_fast_scan_pq_reranked_exactly_keeps_recall_and_params_through_save_and_load(tmp_path, items, queries):
    """4-bit fast-scan codes find a short list; the float vectors re-rank it, so scores are exact."""
    cfg = IndexConfig(kind="ivf", ivf_nlist=16, ivf_nprobe=16, ivf_pq_m=8, ivf_fast_scan=True, ivf_refine_k_factor=8)
    save_index(build_index(items, cfg), tmp_path / "fs", {})
    index, manifest = load_index(tmp_path / "fs")
    assert manifest["params"] == {"nprobe": 16, "k_factor_rf": 8}
    assert manifest["build"] == {"nlist": 16, "pq_m": 8, "fast_scan": True, "refine": True}
    scores, idx = search(index, queries, 10)
    exact_scores, exact_idx = brute_force(items, queries, 10)
    assert measure_recall(idx, exact_idx, 10) >= 0.95
    found = idx == exact_idx
    np.testing.assert_allclose(scores[found], exact_scores[found], rtol=1e-4, atol=1e-4)


def test_ivf_fast_scan_without_pq_is_a_config_error():
    with pytest.raises(ConfigError, match="index.ivf_fast_scan"):
        IndexConfig(kind="ivf", ivf_fast_scan=True)
