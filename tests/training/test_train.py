"""Real Lightning training on tiny synthetic data, logged to a real MLflow store."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pytest
import torch

from support import REPO, tiny_overrides
from towerline.training.bundle import load_bundle
from towerline.cli import main
from towerline.config import load_config
from towerline.errors import BundleError
from towerline.training.tracking import promote
from towerline.training.train import train

METRIC_KEYS = ["ndcg_5", "hr_5", "ndcg_10", "hr_10", "ndcg_20", "hr_20", "mrr", "coverage_10"]


def test_training_lowers_the_loss_and_beats_popularity(tiny_run):
    losses = [p["train/loss"] for p in tiny_run.curve]
    assert len(losses) == 2 and losses[1] < losses[0]
    # the synthetic data has sequential signal; a trained model must beat a popularity ranking,
    # whose HR@10 over 60 items is about 10/58 at best for a uniform target
    assert tiny_run.metrics["test/hr_10"] > 0.3


def test_run_is_tracked_in_mlflow_with_params_metrics_artifacts_and_a_version(tiny_run):
    client = mlflow.MlflowClient(tiny_run.tracking_uri)
    run = client.get_run(tiny_run.run_id)
    assert run.data.params["config/model/dim"] == "16"
    assert run.data.params["config/data/format"] == "synthetic"
    assert run.data.tags["dataset"] == "synthetic" and run.data.tags["code_version"]
    for key in METRIC_KEYS:
        assert f"test/{key}" in run.data.metrics
        assert f"test_unmasked/{key}" in run.data.metrics
    assert len(client.get_metric_history(tiny_run.run_id, "valid/ndcg_10")) == 2  # one per epoch
    assert len(client.get_metric_history(tiny_run.run_id, "train/loss")) == 2
    # masking seen items can only help a model whose history items are never the target
    assert run.data.metrics["test/ndcg_10"] >= run.data.metrics["test_unmasked/ndcg_10"] - 1e-9
    bundle_files = {f.path for f in client.list_artifacts(tiny_run.run_id, "bundle")}
    assert {"bundle/config.json", "bundle/item_embeddings.npy", "bundle/metrics.json", "bundle/vocab", "bundle/retriever"} <= bundle_files
    assert "training_curve.png" in {f.path for f in client.list_artifacts(tiny_run.run_id)}
    versions = client.search_model_versions("name = 'tiny-retriever'")
    assert [v.run_id for v in versions] == [tiny_run.run_id]
    assert tiny_run.model_version == str(versions[0].version)


def test_promote_then_load_by_alias_gives_the_trained_network(tiny_run, tmp_path):
    mlflow.set_tracking_uri(tiny_run.tracking_uri)
    try:
        assert promote("tiny-retriever", None, "champion") == tiny_run.model_version
        served = load_bundle("models:/tiny-retriever@champion", cache_dir=tmp_path)
    finally:
        mlflow.set_tracking_uri(None)
    local = load_bundle(tiny_run.bundle_dir)
    assert served.model_version == tiny_run.model_version and served.model_alias == "champion"
    history = torch.tensor([[0, 0, 5, 7, 9] + [11] * 7])
    with torch.no_grad():
        assert torch.allclose(served.net(history), local.net(history))
    np.testing.assert_array_equal(served.item_embeddings, local.item_embeddings)


def test_promote_refuses_an_unknown_version(tiny_run):
    mlflow.set_tracking_uri(tiny_run.tracking_uri)
    try:
        with pytest.raises(Exception, match="no version 99"):
            promote("tiny-retriever", 99)
    finally:
        mlflow.set_tracking_uri(None)


def test_bundle_with_a_changed_weight_file_is_refused(tiny_run, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_run.bundle_dir, copy)
    weights = copy / "retriever" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="weights.safetensors fails its checksum"):
        load_bundle(copy)


def test_evaluate_command_reproduces_the_run_test_metrics(tiny_run, capsys):
    assert main(["evaluate", "--model", str(tiny_run.bundle_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("test/ndcg_10", "test/hr_10", "test_unmasked/mrr"):
        assert report["metrics"][key] == pytest.approx(tiny_run.metrics[key], abs=1e-6)


def test_same_seed_gives_the_same_metrics(tiny_run, mlflow_store, tmp_path):
    cfg = load_config(REPO / "configs" / "synthetic.yaml", tiny_overrides(mlflow_store) + ["tracking.register=false"])
    again = train(cfg, tmp_path / "again", progress=False)
    for key in ("test/ndcg_10", "test/hr_10", "valid/best_ndcg_10", "test_unmasked/mrr"):
        assert again.metrics[key] == pytest.approx(tiny_run.metrics[key], abs=1e-6), key


def test_resume_continues_the_same_run_from_the_last_checkpoint(mlflow_store, tmp_path):
    base = tiny_overrides(mlflow_store) + ["tracking.register=false"]
    first = train(load_config(REPO / "configs" / "synthetic.yaml", base + ["trainer.max_epochs=1"]), tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "checkpoints" / "last.ckpt").exists()
    second = train(
        load_config(REPO / "configs" / "synthetic.yaml", base + ["trainer.max_epochs=2"]), tmp_path / "r", resume=True, progress=False
    )
    assert second.run_id == first.run_id
    history = mlflow.MlflowClient(mlflow_store).get_metric_history(first.run_id, "valid/ndcg_10")
    assert len(history) == 2  # epoch 0 from the first call, epoch 1 from the resumed one
    assert [p["epoch"] for p in second.curve] == [0.0, 1.0]


def test_train_command_prints_run_id_and_test_metrics(mlflow_store, tmp_path, capsys):
    args = ["train", "--config", str(REPO / "configs" / "synthetic.yaml"), "--out", str(tmp_path / "cli"), "--no-progress"]
    for o in tiny_overrides() + ["trainer.max_epochs=1"]:
        args += ["--set", o]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "MLflow run: " in out and "registered: models:/tiny-retriever/1" in out
    assert "test: ndcg_5=" in out and "test_unmasked: " in out


def test_train_command_names_an_unknown_config_key(capsys):
    assert main(["train", "--set", "model.dimm=8"]) == 2
    assert "unknown config key 'model.dimm'; did you mean 'dim'?" in capsys.readouterr().err
