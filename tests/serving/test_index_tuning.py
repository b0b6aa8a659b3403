"""``towerline index --target-recall``: parameters chosen by measuring on real user vectors."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from towerline.cli import main
from towerline.config import IndexConfig
from towerline.serving.index import build_index, measure_recall, search
from towerline.serving.model_index import sampled_user_vectors
from towerline.serving.recommender import load_model

QUERIES = 200  # sampled users: 100 choose the setting, 100 held out for the manifest's figures


@pytest.fixture(autouse=True)
def one_faiss_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def test_target_recall_index_meets_it_on_held_out_users_and_serves_with_the_chosen_params(tiny_run, tmp_path):
    out = tmp_path / "tuned"
    assert main(["index", "--model", str(tiny_run.bundle_dir), "--target-recall", "0.95", "--queries", str(QUERIES),
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target_recall"] == 0.95 and manifest["recall_at_10"] >= 0.95 and manifest["threads"] == 1
    assert manifest["qps"] > 0 and manifest["build_s"] >= 0 and manifest["memory_bytes"] > 0
    tuning = manifest["tuning"]
    assert tuning["tune_users"] == tuning["held_out_users"] == QUERIES // 2
    assert tuning["chosen"] in tuning["tried"] and tuning["chosen"]["params"] == manifest["params"]
    assert {t["kind"] for t in tuning["tried"]} == {"hnsw", "ivf"}  # the model's config is flat: both compete

    # the served index runs with the chosen parameters and reproduces the recorded recall on the held-out users
    state = load_model(tiny_run.bundle_dir, index_dir=out)
    assert not state.exact and state.index_kind == manifest["kind"]
    held_out = sampled_user_vectors(state.bundle, QUERIES)[QUERIES // 2:]
    exact = build_index(state.bundle.item_embeddings, IndexConfig(kind="flat"))
    recall = measure_recall(search(state.index, held_out, 10)[1], search(exact, held_out, 10)[1], 10)
    assert recall == pytest.approx(manifest["recall_at_10"]) and recall >= 0.95


def test_unreachable_target_is_one_line_and_exit_2_and_writes_nothing(tiny_run, tmp_path, capsys):
    out = tmp_path / "never"
    # one probed list of ~31 holds a few items: no re-ranked list can find the rest
    code = main(["index", "--model", str(tiny_run.bundle_dir), "--target-recall", "0.99", "--kind", "ivf",
                 "--nprobe", "1", "--queries", str(QUERIES), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(err) == 1 and err[0].startswith("error: --target-recall 0.99: no ivf setting reached it")
    assert "best recall@10 0." in err[0] and "--kind flat" in err[0]


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_target_recall_outside_0_1_is_one_line_naming_the_flag(tmp_path, capsys, value):
    assert main(["index", "--model", str(tmp_path / "missing"), "--target-recall", value]) == 2
    assert capsys.readouterr().err.strip() == f"error: --target-recall must be in (0, 1], got {float(value)}"


def test_exact_kind_meets_any_target_without_a_search(tiny_run, tmp_path):
    out = tmp_path / "flat"
    assert main(["index", "--model", str(tiny_run.bundle_dir), "--target-recall", "1.0", "--kind", "flat",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "flat" and manifest["recall_at_10"] == 1.0 and "tuning" not in manifest
    assert np.isfinite(manifest["memory_bytes"])
